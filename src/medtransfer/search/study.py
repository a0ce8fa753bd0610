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

This module is the study loop; `search.workers` coordinates the workers of one search (parent-run election,
reaping, the final-fit lock), `search.promotion` fits, registers and points at the winner.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from medtransfer.config import Config
from medtransfer.data.prepare import load_prepared
from medtransfer.errors import ConfigError
from medtransfer.layout import REGIMES, STEP_SEARCH, STEP_TRIAL
from medtransfer.pointers import ModelPointer
from medtransfer.registry import ALIAS_DEFAULT, Tag, finetuned_model_name, model_uri, source_model_name
from medtransfer.run_scope import ends_with_outcome
from medtransfer.search.parent_run import log_optuna_plots, search_parent_tags, search_space_params, trial_run_name
from medtransfer.search.promotion import fit_every_fold_once, log_test_auc_summary, write_search_pointer
from medtransfer.search.sampler import TrialSeededTPESampler
from medtransfer.search.space import settings_with, suggest
from medtransfer.search.storage import arm_lease, create_storage, supports_heartbeats
from medtransfer.search.trials import complete_trials, only_complete
from medtransfer.search.workers import (RUN_ATTR, SURPLUS_ATTR, WORKER_ATTR, find_or_create_parent, log_parent_params,
                                        mlflow_run_closer, reap_dead_trials, wait_for_other_workers)
from medtransfer.train.finetune import FinetuneRequest, run_finetune
from medtransfer.train.presets import PRESETS
from medtransfer.train.protocols import PROTOCOL_SEARCH


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

    def describe(self) -> str:
        """What `medtransfer search` prints: the trials, the registered versions, the test AUC, the pointer."""
        pointer = self.pointer
        versions = ", ".join(f"{fit.alias}=v{fit.version}" for fit in pointer.folds)
        auc = "n/a" if pointer.test_auc_mean is None else f"{pointer.test_auc_mean:.4f} ± {pointer.test_auc_sd:.4f}"
        return (f"study {self.study}: {self.complete_trials} complete trials, best {self.best_params or 'preset'}\n"
                f"  registered {pointer.registered_model}: {versions}; champion v{pointer.champion_version}; "
                f"test AUC {auc}\n  -> {self.pointer_path}")


def study_name(config: Config, request: SearchRequest) -> str:
    base = f"{config.stores.experiment}/{finetuned_model_name(request.dataset, request.source, request.regime)}"
    return f"{base}/{request.preset}" if request.preset else base


def run_search(config: Config, request: SearchRequest) -> SearchOutcome:
    """Search (or apply a preset), fit the best configuration on every fold, register, write the pointer."""
    import mlflow

    from medtransfer.registry import resolve_model_version
    from medtransfer.tracking import ensure_experiment, pipeline_run_id, use_tracking_store

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
        Tag.STEP: STEP_SEARCH,
        Tag.STUDY: name,
        Tag.DATASET: request.dataset,
        Tag.SOURCE: request.source,
        Tag.REGIME: request.regime,
        Tag.DATA_FINGERPRINT: prepared.fingerprint,
        **search_parent_tags(config, request),
    }
    if pipeline_run_id():
        parent_tags["mlflow.parentRunId"] = pipeline_run_id()  # shown under the pipeline's run in the UI
    # Opened before any run exists: a storage that cannot be used stops here with one line, leaving no FAILED run.
    storage = _storage(config, client) if request.preset is None else None
    parent_id = find_or_create_parent(client, experiment_id, name, parent_tags)
    if launcher_run_id:
        client.set_tag(launcher_run_id, Tag.STUDY, name)
        client.set_tag(launcher_run_id, "study_parent_run_id", parent_id)
    trials_target = request.trials or config.search.trials
    # Ends the parent however the search ends (KILLED when interrupted), with any trial or fit run left open in it.
    with ends_with_outcome(mlflow.start_run(run_id=parent_id)):
        log_parent_params(client, parent_id, {
            "dataset": request.dataset, "source": request.source, "regime": request.regime,
            "preset": request.preset or "none", "protocol": request.preset or PROTOCOL_SEARCH,
            "source_version": source_version.version, **search_space_params(config, request.preset)})
        if request.preset is not None:
            best_params, best_trial, complete = {}, request.preset, []
            settings = PRESETS[request.preset]
        else:
            study = _open_study(config, name, storage, client)
            # A worker that dies mid-trial leaves its trial to the survivors: once failed (heartbeat) and re-queued,
            # it is run in a further round, so the study still ends with the requested number of COMPLETE trials.
            for _round in range(1 + config.search.max_failed_attempts):
                _run_trials(config, study, request, trials_target, source_version.version, name)
                wait_for_other_workers(study, client)
                if len(complete_trials(study)) >= trials_target:
                    _run_trials(config, study, request, trials_target, source_version.version, name)  # retries left
                    break
            complete = complete_trials(study)
            if not complete:
                raise ConfigError(f"study {name} has no complete trial", fix="check the failed trials' runs in MLflow")
            best = min(complete, key=lambda t: t.value)
            best_params, best_trial = dict(best.params), str(best.number)
            settings = settings_with(config.train, best_params)
            mlflow.log_metrics({"best_val_loss": best.value, "complete_trials": float(len(complete))})
            mlflow.set_tag("best_trial", best_trial)
            log_optuna_plots(study)
        # One worker fits and registers; the others wait, then find the registered versions and reuse them.
        fits = fit_every_fold_once(config, request, settings, best_trial, best_params, name, prepared, source_version,
                                   client, experiment_id)
        summary = log_test_auc_summary(fits)
    pointer, path = write_search_pointer(config, request, name, fits, summary, best_params, prepared, source_version,
                                         client)
    return SearchOutcome(name, parent_id, len(complete), best_params, pointer, str(path))


# -- trials --------------------------------------------------------------------------------------------------------


def _storage(config: Config, client):
    """The configured Optuna storage, whose heartbeat closes a stale trial's MLflow run before the trial is retried."""
    return create_storage(config.optuna_storage, on_failed_trial=mlflow_run_closer(client),
                          heartbeat_seconds=config.stores.optuna_heartbeat_seconds,
                          grace_seconds=config.stores.optuna_grace_seconds)


def _open_study(config: Config, name: str, storage, client):
    import optuna

    search = config.search
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
        reap_dead_trials(study, mlflow_run_closer(client))
    return study


def _run_trials(config: Config, study, request: SearchRequest, target: int, source_version: str, name: str) -> None:
    import mlflow
    import optuna
    from optuna.trial import TrialState

    search = config.search

    def taken_slots(trial) -> int:
        """Trials that count toward the target besides this one: complete, or running in another worker."""
        trials = study.get_trials(deepcopy=False)
        complete = len(only_complete(trials))
        running = sum(t.state == TrialState.RUNNING and t.number != trial.number and not t.user_attrs.get(SURPLUS_ATTR)
                      for t in trials)
        return complete + running

    def objective(trial) -> float:
        taken = taken_slots(trial)
        if taken >= target:
            # Other workers hold the remaining trials: record this one as surplus and stop, so the study ends with
            # exactly the requested number of COMPLETE trials.
            trial.set_user_attr(SURPLUS_ATTR, True)
            study.stop()
            raise optuna.TrialPruned("enough trials are complete or running")
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        values = suggest(trial, search.space)
        settings = settings_with(config.train, values)
        steps = {"n": 0}

        def report(_phase: str, _epoch: int, metrics: dict[str, float]) -> None:
            steps["n"] += 1
            trial.report(metrics["val_loss"], steps["n"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {steps['n']}")

        child = mlflow.start_run(
            experiment_id=mlflow.active_run().info.experiment_id,  # nested runs live with their parent
            nested=True,
            run_name=trial_run_name(request.source, request.regime, trial.number),
            tags={Tag.STEP: STEP_TRIAL, Tag.STUDY: name, Tag.TRIAL: str(trial.number)},
        )
        try:  # from the moment the run is open, so that however the trial ends, its run ends with it
            trial.set_user_attr(RUN_ATTR, child.info.run_id)
            mlflow.log_params({f"search_{k}": v for k, v in values.items()})
            result = run_finetune(
                config,
                FinetuneRequest(request.dataset, request.source, request.regime, search.search_fold, settings,
                                source_version=source_version),
                on_epoch_end=report,
                log_model=False,
                # the log's epoch lines: which trial of how many (the slot it fills; a retried trial reuses one)
                run_name=f"search {request.dataset}.{request.source}.{request.regime} trial {taken + 1}/{target}",
                use_active_run=True,
                extra_tags={Tag.STUDY: name, Tag.TRIAL: str(trial.number), Tag.STEP: STEP_TRIAL},
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
        if len(complete_trials(study_)) >= target:
            study_.stop()

    done = len(complete_trials(study))
    if done >= target:
        # Retries queued after the study reached its target (a stale trial failed while the others finished): each
        # is taken from the queue as Optuna hands out waiting trials, one worker each, and recorded as surplus
        # without running, so no trial is left WAITING.
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            arm_lease(study._storage)  # noqa: SLF001
        for _ in waiting:
            study.optimize(objective, n_trials=1, gc_after_trial=False)
        return
    arm_lease(study._storage)  # noqa: SLF001
    # Pruned and surplus trials do not count; the cap stops a study whose trials keep failing to complete.
    cap = (target - done) * (1 + search.max_failed_attempts)
    study.optimize(objective, n_trials=cap, callbacks=[stop_when_enough], gc_after_trial=True)
