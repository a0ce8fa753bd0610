"""`search`: an Optuna study per (dataset, source, regime), every trial a nested MLflow run, the best
configuration fit on every fold and registered, and a pointer file for DVC.

MLflow layout: one parent run per study (tag `study`), found again on resume and by every worker; one nested child
per trial (its parameters, per-epoch metrics and value); one nested child per final fit (fold × seed), whose model
is registered as `<dataset>.<source>.<regime>` with alias `fold<k>` and `champion` on the fit with the lowest
validation loss. Under `mlflow run`, the launcher's run records which study parent it fed; the experiment chosen
by the launcher is kept.

Resuming: rerunning continues until the study holds the requested number of COMPLETE trials. A trial left RUNNING
by a worker that died on this host (its pid is gone) is marked FAIL and its MLflow run closed as FAILED; with a
server database, Optuna's heartbeats do the same across hosts and retry the trial. Final fits already registered
for the current best trial are reused, never registered twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from medtransfer.layout import STEP_SEARCH, STEP_TRIAL, STEP_FINAL_FIT
from medtransfer.config import Config
from medtransfer.data.prepare import load_prepared
from medtransfer.errors import ConfigError
from medtransfer.pointers import FoldModel, ModelPointer, fold_model_alias, write_pointer
from medtransfer.registry import ALIAS_CHAMPION, ALIAS_DEFAULT, ROLE_FINETUNED, Tag, finetuned_model_name, model_uri, source_model_name
from medtransfer.search.parent_run import (fit_descriptions, fit_run_name, log_optuna_plots, search_parent_tags,
                                           search_space_params, trial_run_name)
from medtransfer.search.sampler import TrialSeededTPESampler
from medtransfer.search.space import settings_with, suggest
from medtransfer.search.storage import advisory_lock, create_storage, is_postgresql, lock_key, supports_heartbeats
from medtransfer.train.finetune import FinetuneRequest, run_finetune
from medtransfer.train.loop import REGIMES
from medtransfer.train.presets import PRESETS, PROTOCOL_SEARCH

WORKER_ATTR = "worker"
RUN_ATTR = "mlflow_run_id"
ELECTION_PAUSE_SECONDS = 0.5


@dataclass(frozen=True)
class SearchRequest:
    dataset: str
    source: str
    regime: str
    trials: int | None = None  # default: search.trials in params
    preset: str | None = None  # a fixed protocol: no search


@dataclass(frozen=True)
class SearchOutcome:
    study: str
    parent_run_id: str
    complete_trials: int
    best_params: dict
    pointer: ModelPointer
    pointer_path: str


def study_name(config: Config, request: SearchRequest) -> str:
    base = f"{config.stores.experiment}/{finetuned_model_name(request.dataset, request.source, request.regime)}"
    return f"{base}/{request.preset}" if request.preset else base


def run_search(config: Config, request: SearchRequest) -> SearchOutcome:
    """Search (or apply a preset), fit the best configuration on every fold, register, write the pointer."""
    import mlflow

    from medtransfer.registry import resolve_model_version
    from medtransfer.tracking import ensure_experiment, study_run_id, use_tracking_store

    if request.regime not in REGIMES:
        raise ConfigError(f"unknown regime '{request.regime}'", fix=f"use one of: {', '.join(REGIMES)}")
    if request.preset is not None and request.preset not in PRESETS:
        raise ConfigError(f"unknown preset '{request.preset}'", fix=f"use one of: {', '.join(PRESETS)}")
    prepared = load_prepared(config, request.dataset)
    config.source(request.source)
    # The launcher's run (under `mlflow run`) must not be picked up as a nested trial run: take it out of the env.
    launcher_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    use_tracking_store(config)
    client = mlflow.MlflowClient()
    source_version = resolve_model_version(client, model_uri(source_model_name(request.source), alias=ALIAS_DEFAULT))
    name = study_name(config, request)
    experiment_id = ensure_experiment(config)
    parent_tags = {
        "step": STEP_SEARCH,
        Tag.STUDY: name,
        Tag.DATASET: request.dataset,
        Tag.SOURCE: request.source,
        Tag.REGIME: request.regime,
        Tag.DATA_FINGERPRINT: prepared.fingerprint,
        **search_parent_tags(config, request),
    }
    if study_run_id():
        parent_tags["mlflow.parentRunId"] = study_run_id()  # shown under the study's run in the UI
    parent_id = find_or_create_parent(client, experiment_id, name, parent_tags)
    if launcher_run_id:
        client.set_tag(launcher_run_id, Tag.STUDY, name)
        client.set_tag(launcher_run_id, "study_parent_run_id", parent_id)
    trials_target = request.trials or config.search.trials
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_params({"dataset": request.dataset, "source": request.source, "regime": request.regime,
                           "preset": request.preset or "none",
                           "protocol": request.preset or PROTOCOL_SEARCH, "source_version": source_version.version,
                           **search_space_params(config, request.preset)})
        if request.preset is not None:
            best_params, best_trial, complete = {}, request.preset, 0
            settings = PRESETS[request.preset]
        else:
            study = _open_study(config, name, client)
            # A worker that dies mid-trial leaves its trial to the survivors: once failed (heartbeat) and re-queued,
            # it is run in a further round, so the study still ends with the requested number of COMPLETE trials.
            for _round in range(1 + config.search.max_failed_attempts):
                _run_trials(config, study, request, trials_target, source_version.version, name)
                _wait_for_other_workers(study, client)
                if _complete_count(study) >= trials_target:
                    break
            complete_trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            complete = len(complete_trials)
            if not complete_trials:
                raise ConfigError(f"study {name} has no complete trial", fix="check the failed trials' runs in MLflow")
            best = min(complete_trials, key=lambda t: t.value)
            best_params, best_trial = dict(best.params), str(best.number)
            settings = settings_with(config.train, best_params)
            mlflow.log_metrics({"best_val_loss": best.value, "complete_trials": float(complete)})
            mlflow.set_tag("best_trial", best_trial)
            log_optuna_plots(study)
        # One worker fits and registers; the others wait, then find the registered versions and reuse them.
        with final_fit_lock(config, name):
            close_orphaned_fits(client, experiment_id, name)
            fits = _final_fits(config, request, settings, best_trial, best_params, name, prepared, source_version)
        aucs = np.array([fit.test_auc for fit in fits if fit.test_auc is not None], dtype=float)
        summary = {
            "test_auc_mean": float(aucs.mean()) if aucs.size else float("nan"),
            "test_auc_sd": float(aucs.std(ddof=1)) if aucs.size > 1 else 0.0,
        }
        mlflow.log_metrics({k: v for k, v in summary.items() if np.isfinite(v)})
        for fit in fits:
            if fit.test_auc is not None:
                mlflow.log_metric(f"test_auc_{fit.alias}", fit.test_auc)
    pointer = ModelPointer(
        registered_model=finetuned_model_name(request.dataset, request.source, request.regime),
        dataset=request.dataset,
        source=request.source,
        regime=request.regime,
        source_model=source_model_name(request.source),
        source_version=str(source_version.version),
        source_weights_sha256=source_version.tags.get(Tag.WEIGHTS_SHA256, ""),
        data_fingerprint=prepared.fingerprint,
        study=name,
        champion_version=_champion(client, fits, finetuned_model_name(request.dataset, request.source, request.regime)),
        folds=fits,
        test_auc_mean=summary["test_auc_mean"] if np.isfinite(summary["test_auc_mean"]) else None,
        test_auc_sd=summary["test_auc_sd"],
        best_params=best_params,
        protocol=request.preset or PROTOCOL_SEARCH,
    )
    path = write_pointer(config, pointer)
    return SearchOutcome(name, parent_id, complete, best_params, pointer, str(path))


# -- the parent run ------------------------------------------------------------------------------------------------


def find_or_create_parent(client, experiment_id: str, study: str, tags: dict[str, str]) -> str:
    """The study's parent run: the oldest active run tagged with the study, created if there is none.

    Several workers may start at once; each creates a candidate if it sees none, then all elect the oldest
    (ties broken by run id) and the losers delete their candidates, so every worker logs under one parent.
    """
    found = _parents(client, experiment_id, study)
    if found:
        return found[0].info.run_id
    mine = client.create_run(experiment_id, tags=tags, run_name=f"search {study.split('/', 1)[-1]}").info.run_id
    time.sleep(ELECTION_PAUSE_SECONDS)
    winner = _parents(client, experiment_id, study)[0].info.run_id
    if winner != mine:
        client.delete_run(mine)
    return winner


def _parents(client, experiment_id: str, study: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.study = '{study}' and tags.step = '{STEP_SEARCH}'", max_results=100
    )
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


# -- trials --------------------------------------------------------------------------------------------------------


def _mlflow_run_closer(client):
    """A callback for a trial failed because its worker stopped: close the trial's MLflow run as FAILED."""

    def close_mlflow_run(_study, trial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            client.set_tag(run_id, "optuna_state", "FAIL (stale: its worker stopped)")
            client.set_terminated(run_id, "FAILED")

    return close_mlflow_run


def _open_study(config: Config, name: str, client):
    import optuna

    close_mlflow_run = _mlflow_run_closer(client)
    search = config.search
    storage = create_storage(config.optuna_storage, on_failed_trial=close_mlflow_run,
                             heartbeat_seconds=config.stores.optuna_heartbeat_seconds,
                             grace_seconds=config.stores.optuna_grace_seconds)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="minimize",
        load_if_exists=True,
        sampler=TrialSeededTPESampler(seed=search.seed, n_startup_trials=search.startup_trials),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner_startup_trials, n_warmup_steps=search.pruner_warmup_epochs
        ),
    )
    if not supports_heartbeats(storage):
        reap_dead_trials(study, close_mlflow_run)
    return study


def reap_dead_trials(study, on_reaped) -> int:
    """Mark FAIL the RUNNING trials whose worker process, on this host, no longer exists; returns how many."""
    from optuna.trial import TrialState

    reaped = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR) or {}
        if owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", -1))):
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # noqa: SLF001
            on_reaped(study, trial)
            reaped += 1
    return reaped


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_trials(config: Config, study, request: SearchRequest, target: int, source_version: str, name: str) -> None:
    import mlflow
    import optuna
    from optuna.trial import TrialState

    search = config.search

    def enough_already(trial) -> bool:
        trials = study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        running = sum(t.state == TrialState.RUNNING and t.number != trial.number and not t.user_attrs.get("surplus")
                      for t in trials)
        return complete + running >= target

    def objective(trial) -> float:
        if enough_already(trial):
            # Other workers hold the remaining trials: record this one as surplus and stop, so the study ends with
            # exactly the requested number of COMPLETE trials.
            trial.set_user_attr("surplus", True)
            study.stop()
            raise optuna.TrialPruned("enough trials are complete or running")
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        values = suggest(trial, search.space)
        settings = settings_with(config.train, values)
        child = mlflow.start_run(
            experiment_id=mlflow.active_run().info.experiment_id,  # nested runs live with their parent
            nested=True,
            run_name=trial_run_name(request.source, request.regime, trial.number),
            tags={"step": STEP_TRIAL, Tag.STUDY: name, "trial": str(trial.number)},
        )
        trial.set_user_attr(RUN_ATTR, child.info.run_id)
        steps = {"n": 0}

        def report(_phase: str, _epoch: int, metrics: dict[str, float]) -> None:
            steps["n"] += 1
            trial.report(metrics["val_loss"], steps["n"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {steps['n']}")

        try:
            mlflow.log_params({f"search_{k}": v for k, v in values.items()})
            result = run_finetune(
                config,
                FinetuneRequest(request.dataset, request.source, request.regime, search.search_fold, settings,
                                source_version=source_version),
                on_epoch_end=report,
                log_model=False,
                use_active_run=True,
                extra_tags={Tag.STUDY: name, "trial": str(trial.number), "step": STEP_TRIAL},
            )
        except optuna.TrialPruned:
            mlflow.set_tag("optuna_state", "PRUNED")
            mlflow.end_run("KILLED")
            raise
        except BaseException:
            mlflow.set_tag("optuna_state", "FAIL")
            mlflow.end_run("FAILED")
            raise
        mlflow.log_metric("objective_val_loss", result.best_val_loss)
        mlflow.set_tag("optuna_state", "COMPLETE")
        mlflow.end_run("FINISHED")
        return result.best_val_loss

    def stop_when_enough(study_, _trial) -> None:
        if sum(t.state == TrialState.COMPLETE for t in study_.get_trials(deepcopy=False)) >= target:
            study_.stop()

    done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if done >= target:
        return
    # Pruned and surplus trials do not count; the cap stops a study whose trials keep failing to complete.
    cap = (target - done) * (1 + search.max_failed_attempts)
    study.optimize(objective, n_trials=cap, callbacks=[stop_when_enough], gc_after_trial=True)


def _complete_count(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def final_fit_lock(config: Config, study: str):
    """An exclusive lock per study, so that parallel workers register the final fits once: a PostgreSQL advisory
    lock when the Optuna storage is PostgreSQL (workers on several hosts), else an fcntl lock on a file under the
    repository (workers on one host). Either is released by the operating system or the server when its holder
    dies, so a killed worker never blocks the others."""
    if is_postgresql(config.optuna_storage):
        with advisory_lock(config.optuna_storage, lock_key(f"final-fit:{study}")):
            yield
        return
    import fcntl

    folder = config.resolve(".medtransfer-locks")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(study.encode()).hexdigest()[:16]}.lock"
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def close_orphaned_fits(client, experiment_id: str, study: str) -> int:
    """Close the final-fit runs of `study` left RUNNING by a worker that died; returns how many.

    Called under the final-fit lock, so no live worker is fitting this study: a RUNNING fit is an orphan. A fit
    whose model was registered before its worker died is complete (metrics and model precede registration) and
    ends FINISHED; any other ends FAILED, and its fold is fit again."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.step = '{STEP_FINAL_FIT}' and tags.{Tag.STUDY} = '{study}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for run in runs:
        registered = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        if registered:
            client.set_tag(run.info.run_id, "registered_version", registered[0].version)
            client.set_terminated(run.info.run_id, "FINISHED")
        else:
            client.set_tag(run.info.run_id, "failure", "its worker stopped before registering the model")
            client.set_terminated(run.info.run_id, "FAILED")
    return len(runs)


def _wait_for_other_workers(study, client, poll_seconds: float = 2.0) -> None:
    """Block until no other worker is running a trial, so that every worker picks the same best trial."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    close_mlflow_run = _mlflow_run_closer(client)
    while True:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if not t.user_attrs.get("surplus")]
        if not running:
            return
        if supports_heartbeats(study._storage):  # noqa: SLF001
            fail_stale_trials(study)
        else:
            reap_dead_trials(study, close_mlflow_run)
        time.sleep(poll_seconds)


# -- final fits ----------------------------------------------------------------------------------------------------


def _final_fits(config, request, settings, best_trial: str, best_params: dict, name: str, prepared, source_version) -> list[FoldModel]:
    import mlflow

    from medtransfer.models.mlflow_models import register_logged_model

    client = mlflow.MlflowClient()
    registered_name = finetuned_model_name(request.dataset, request.source, request.regime)
    folds = config.search.folds if config.search.folds is not None else list(range(prepared.num_folds))
    fits = []
    for fold in folds:
        for seed_index, seed in enumerate(config.search.seeds):
            alias = fold_model_alias(fold, seed_index)
            version = _registered_fit(client, registered_name, name, best_trial, fold, seed)
            if version is None:
                mlflow.start_run(experiment_id=mlflow.active_run().info.experiment_id, nested=True,
                                 run_name=fit_run_name(request.source, request.regime, alias),
                                 tags={"step": STEP_FINAL_FIT, Tag.STUDY: name, "trial": best_trial,
                                       "fold": str(fold), "seed": str(seed)})
                try:
                    result = run_finetune(
                        config,
                        FinetuneRequest(request.dataset, request.source, request.regime, fold,
                                        dataclasses.replace(settings, seed=seed), preset=request.preset,
                                        source_version=str(source_version.version)),
                        use_active_run=True,
                        extra_tags={"step": STEP_FINAL_FIT, Tag.STUDY: name, "trial": best_trial},
                    )
                    tags = {
                        Tag.ROLE: ROLE_FINETUNED,
                        Tag.DATASET: request.dataset,
                        Tag.SOURCE: request.source,
                        Tag.REGIME: request.regime,
                        Tag.ARCH: result.model.arch,
                        Tag.WEIGHTS_SHA256: result.weights_sha256,
                        Tag.DATA_FINGERPRINT: prepared.fingerprint,
                        Tag.PREPROCESSING: source_version.tags.get(Tag.PREPROCESSING, ""),
                        Tag.STUDY: name,
                        "trial": best_trial,
                        "params": json.dumps(best_params, sort_keys=True),
                        "fold": str(fold),
                        "seed": str(seed),
                        "source_version": str(source_version.version),
                        "best_val_loss": f"{result.best_val_loss:.6g}",
                        "test_auc": f"{result.test_metrics.get('test_auc', float('nan')):.6g}",
                    }
                    version = register_logged_model(result.model_uri, registered_name, tags, **fit_descriptions(
                        request, fold, seed, best_trial, source_version.version, result.test_metrics))
                    mlflow.set_tag("registered_version", version.version)
                except BaseException:
                    mlflow.end_run("FAILED")
                    raise
                mlflow.end_run("FINISHED")
            client.set_registered_model_alias(registered_name, alias, str(version.version))
            auc = float(version.tags.get("test_auc", "nan"))
            fits.append(FoldModel(fold=fold, seed=seed, version=str(version.version), run_id=version.run_id,
                                  weights_sha256=version.tags[Tag.WEIGHTS_SHA256], alias=alias,
                                  test_auc=auc if np.isfinite(auc) else None))
    return fits


def _registered_fit(client, registered_name: str, study: str, trial: str, fold: int, seed: int):
    """The version already registered for this study, trial, fold and seed (a resumed search reuses it)."""
    from medtransfer.registry import registered_versions

    for version in registered_versions(client, registered_name):
        tags = version.tags
        if (tags.get(Tag.STUDY), tags.get("trial"), tags.get("fold"), tags.get("seed")) == (study, trial, str(fold), str(seed)):
            return version
    return None


def _champion(client, fits: list[FoldModel], registered_name: str) -> str:
    """Alias `champion` on the fit with the lowest validation loss (never chosen by test AUC)."""
    losses = {}
    for fit in fits:
        version = client.get_model_version(registered_name, fit.version)
        losses[fit.version] = float(version.tags.get("best_val_loss", "inf"))
    champion = min(losses, key=losses.get)
    client.set_registered_model_alias(registered_name, ALIAS_CHAMPION, champion)
    return champion
