"""Optuna searches as MLflow runs: pruning, resume, crash recovery, parallel workers, registration, pointers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from medtransfer.config import load_config
from medtransfer.data.prepare import prepare_dataset
from medtransfer.models.sources import register_source
from medtransfer.pointers import pointer_path, read_pointer, verify_pointer
from medtransfer.search.storage import create_storage
from medtransfer.search.study import SearchRequest, run_search, study_name

BIN = Path(sys.executable).parent
TRAIN = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 2, "patience": 2, "augment": False, "seed": 0}
SEARCH = {
    "trials": 2,
    "space": {"learning_rate": {"type": "float", "low": 1.0e-9, "high": 3.0e-3, "log": True}},
    "startup_trials": 1,
    "pruner_startup_trials": 1,
    "pruner_warmup_epochs": 1,
}


def _project(tmp_path, write_params, blob_npz, tracking_uri=None, storage="sqlite:///optuna.db"):
    blob_npz(tmp_path / "data/raw/target.npz", 0)
    stores = {"tracking_uri": tracking_uri or "sqlite:///mlflow.db", "experiment": "search-test",
              "optuna_storage": storage}
    params = write_params(
        {"target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                    "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}}},
        sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}},
        train=TRAIN, search=SEARCH, stores=stores,
    )
    config = load_config(params)
    prepare_dataset(config, "target")
    register_source(config, "random")
    return config


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def config(tmp_path, write_params, blob_npz, clean_mlflow_env):
    return _project(tmp_path, write_params, blob_npz)


def _runs(config, filter_string=""):
    experiment = mlflow.MlflowClient().get_experiment_by_name(config.stores.experiment)
    return mlflow.MlflowClient().search_runs([experiment.experiment_id], filter_string=filter_string, max_results=500)


def test_a_hopeless_trial_is_pruned(config, monkeypatch):
    """The pruning machinery (report, median rule, KILLED run, a replacement trial) on validation curves forced by
    the test: the real fine-tuning runs, but each epoch reports a scripted loss by learning rate, so which trial is
    worse never depends on how training happened to go on this machine."""
    import medtransfer.search.study as search_study

    real_finetune = search_study.run_finetune

    def scripted_curves(config_, request_, *, on_epoch_end=None, **kwargs):
        loss = 5.0 if request_.settings.learning_rate < 1e-6 else 0.3

        def report(phase, epoch, metrics):
            if on_epoch_end is not None:
                on_epoch_end(phase, epoch, {**metrics, "val_loss": loss})

        return real_finetune(config_, request_, on_epoch_end=report, **kwargs)

    monkeypatch.setattr(search_study, "run_finetune", scripted_curves)
    request = SearchRequest("target", "random", "full", trials=2)
    study = optuna.create_study(storage=create_storage(config.optuna_storage), study_name=study_name(config, request),
                                direction="minimize")
    study.enqueue_trial({"learning_rate": 3e-3})  # reports 0.3 each epoch
    study.enqueue_trial({"learning_rate": 1e-9})  # reports 5.0: worse than the median, pruned after the warm-up
    # The first configuration again: the same curve as the first trial, and the median rule (prune when worse)
    # lets it complete the requested two.
    study.enqueue_trial({"learning_rate": 3e-3})
    outcome = run_search(config, request)
    trials = optuna.load_study(study_name=outcome.study, storage=create_storage(config.optuna_storage)).get_trials()
    assert trials[1].params["learning_rate"] == pytest.approx(1e-9)
    assert trials[1].state == TrialState.PRUNED
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    pruned_run = mlflow.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["optuna_state"] == "PRUNED"


def test_resume_reuses_the_parent_and_every_run_is_nested(config):
    first = run_search(config, SearchRequest("target", "random", "full", trials=1))
    second = run_search(config, SearchRequest("target", "random", "full", trials=2))
    assert first.parent_run_id == second.parent_run_id and second.complete_trials == 2
    parents = _runs(config, "tags.step = 'search'")
    assert [run.info.run_id for run in parents] == [first.parent_run_id]
    children = [run for run in _runs(config) if run.data.tags.get("step") in ("trial", "final_fit")]
    assert len(children) >= 2 + 2
    assert all(run.data.tags.get("mlflow.parentRunId") == first.parent_run_id for run in children)
    assert not _runs(config, "attributes.status = 'RUNNING'")
    parent = mlflow.get_run(first.parent_run_id)
    assert {"test_auc_mean", "test_auc_sd", "best_val_loss"} <= set(parent.data.metrics)
    # Whichever trial won each time: the fits the pointer names are current, every other final fit is superseded,
    # and the README's filter returns one fit per fold.
    current = {fold.run_id for fold in second.pointer.folds}
    fits = _runs(config, "tags.step = 'final_fit'")
    assert {run.info.run_id for run in fits if run.data.tags.get("superseded") == "false"} == current
    assert all(run.data.tags.get("superseded") == "true" for run in fits if run.info.run_id not in current)
    shown = _runs(config, "tags.step = 'final_fit' and tags.superseded = 'false'")
    assert sorted(run.data.tags["fold"] for run in shown) == ["0", "1"]


def test_an_earlier_fit_is_tagged_superseded_and_only_changed_tags_are_written(tmp_path, monkeypatch):
    from medtransfer.search.promotion import mark_superseded

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")

    def fit(dataset="target", source="random", regime="full", **extra):
        tags = {"step": "final_fit", "dataset": dataset, "source": source, "regime": regime, **extra}
        return client.create_run(experiment, tags=tags).info.run_id

    old, new = fit(superseded="false"), fit()
    other_source, other_step = fit(source="natural"), client.create_run(experiment, tags={"step": "trial"}).info.run_id
    writes = []
    monkeypatch.setattr(client, "set_tag", lambda *args: (writes.append(args), type(client).set_tag(client, *args)))
    mark_superseded(client, experiment, SearchRequest("target", "random", "full"), {new})
    tags = {run_id: client.get_run(run_id).data.tags.get("superseded") for run_id in (old, new, other_source, other_step)}
    assert tags == {old: "true", new: "false", other_source: None, other_step: None}
    writes.clear()
    mark_superseded(client, experiment, SearchRequest("target", "random", "full"), {new})
    assert writes == [], "nothing changed, nothing written"


def test_pointer_matches_the_registry(config):
    outcome = run_search(config, SearchRequest("target", "random", "full", trials=1))
    path = pointer_path(config, "target", "random", "full")
    pointer = read_pointer(path)
    assert pointer == outcome.pointer and len(pointer.folds) == 2
    manifest = json.loads((config.prepared_data_dir / "target/manifest.json").read_text())
    client = mlflow.MlflowClient()
    fold0 = client.get_model_version_by_alias("target.random.full", "fold0")
    assert fold0.tags["data_fingerprint"] == manifest["fingerprint"] == pointer.data_fingerprint
    assert fold0.tags["study"] == outcome.study and json.loads(fold0.tags["params"]) == outcome.best_params
    assert str(client.get_model_version_by_alias("target.random.full", "champion").version) == pointer.champion_version
    verify_pointer(client, pointer, str(path))  # agrees
    client.set_registered_model_alias("target.random.full", "fold0", pointer.folds[1].version)
    from medtransfer.errors import ModelError

    with pytest.raises(ModelError, match="registry disagrees with the model pointer: alias fold0"):
        verify_pointer(client, pointer, str(path))


def test_preset_paper_registers_without_searching(config, monkeypatch):
    import dataclasses

    from medtransfer.train import presets

    quick = dataclasses.replace(presets.PAPER, max_epochs=1, head_max_epochs=1, batch_size=16)
    monkeypatch.setitem(presets.PRESETS, "paper", quick)
    outcome = run_search(config, SearchRequest("target", "random", "freeze", preset="paper"))
    assert outcome.complete_trials == 0 and outcome.study.endswith("/paper")
    version = mlflow.MlflowClient().get_model_version_by_alias("target.random.freeze", "fold1")
    assert version.tags["trial"] == "paper"


def _cli_env(extra=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}, **(extra or {}))
    return env


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_gives_exactly_the_requested_trials(config):
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random", "--trials", "2"]
    worker = subprocess.Popen(command, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    name = study_name(config, SearchRequest("target", "random", "full"))

    def trials() -> list:
        return optuna.load_study(study_name=name, storage=create_storage(config.optuna_storage)).get_trials()

    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            try:
                running = [t for t in trials() if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            except KeyError:
                running = []
            if running:
                break
            time.sleep(0.5)
        assert running, "the search never started a trial"
    finally:  # at once: a trial of this size may end within seconds on a fast machine
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    # What the kill caught, read after it: the trial seen running may still have ended first (then another, or a
    # final fit, was caught), so the checks below follow these states rather than assume the kill's timing.
    caught = [t for t in trials() if t.state == TrialState.RUNNING]
    rerun = subprocess.run(command, env=_cli_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Progress says which trial and which final fit each epoch belongs to; library chatter stays out of stderr.
    assert re.search(r"target\.random\.full trial [12]/2 full epoch 1/", rerun.stdout), rerun.stdout[-2000:]
    assert re.search(r"final fit fold 1 \(2/2\) full epoch 1/", rerun.stdout), rerun.stdout[-2000:]
    for chatter in ("ExperimentalWarning", "already exists. Creating a new version", "Created version"):
        assert chatter not in rerun.stderr, rerun.stderr[-2000:]
    after = trials()
    assert sum(t.state == TrialState.COMPLETE for t in after) == 2
    assert not [t for t in after if t.state == TrialState.RUNNING]
    mlflow.set_tracking_uri(config.tracking_uri)
    for killed in caught:  # each trial the kill left running is failed, and so is its MLflow run
        assert after[killed.number].state == TrialState.FAIL
        if "mlflow_run_id" in killed.user_attrs:
            assert mlflow.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert not _runs(config, "attributes.status = 'RUNNING'"), "no run left RUNNING"
    versions = mlflow.MlflowClient().search_model_versions("name = 'target.random.full'")
    assert len(versions) == 2, "one registered version per fold"


@pytest.fixture
def tracking_server(tmp_path, start_mlflow_server):
    """A local MLflow server over SQLite (SQLite files are not safe for concurrent writers; the server is)."""
    store = tmp_path / "server"
    store.mkdir()
    with start_mlflow_server(["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                              "--default-artifact-root", (store / "artifacts").as_uri()]) as url:
        yield url


@pytest.mark.slow
def test_two_parallel_workers_share_one_study(tmp_path, write_params, blob_npz, clean_mlflow_env, tracking_server):
    config = _project(tmp_path, write_params, blob_npz, tracking_uri=tracking_server, storage="journal:optuna.log")
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random", "--trials", "3"]
    workers = [subprocess.Popen(command, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr[-3000:]
    name = study_name(config, SearchRequest("target", "random", "full"))
    trials = optuna.load_study(study_name=name, storage=create_storage(config.optuna_storage)).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({t.params["learning_rate"] for t in complete}) == 3, "distinct trials"
    # Which worker runs how many trials depends on which started first and how fast it ran (a late one may find every
    # trial taken and only leave a surplus one), so the split is only shown (-s); that each ran in one of them is not.
    pids = [t.user_attrs["worker"]["pid"] for t in complete]
    assert set(pids) <= {worker.pid for worker in workers}, pids
    print(f"  trials per worker: {sorted(pids.count(pid) for pid in set(pids))}")
    mlflow.set_tracking_uri(tracking_server)
    assert len(_runs(config, "tags.step = 'search'")) == 1, "one parent for the study"
    versions = mlflow.MlflowClient().search_model_versions("name = 'target.random.full'")
    assert len(versions) == 2, "one registration per fold"


@pytest.mark.slow
def test_mlflow_run_search_logs_under_the_launchers_run_in_the_profiles_experiment(config, repo_root):
    import shutil

    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, config.root / name)
    command = [str(BIN / "mlflow"), "run", ".", "-e", "search", "-P", "dataset=target", "-P", "source=random",
               "-P", "regime=full", "-P", "trials=1", "--env-manager", "local",
               "--experiment-name", config.stores.experiment]  # another experiment is refused (tests/test_mlproject.py)
    result = subprocess.run(command, cwd=config.root, env=_cli_env({"MLFLOW_TRACKING_URI": config.tracking_uri}),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(config.stores.experiment).experiment_id],
                              max_results=100)
    steps = {run.data.tags.get("step") for run in runs}
    assert {"search", "trial", "final_fit"} <= steps
    launcher = [run for run in runs if "study_parent_run_id" in run.data.tags]
    assert len(launcher) == 1 and launcher[0].info.status == "FINISHED"


def test_a_failed_model_upload_fails_the_fit_and_registers_nothing(config, monkeypatch):
    """The artifact store refuses the model (disk full) in the first final fit: that run ends FAILED, so does the
    search, no version is registered and no pointer is written."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    upload = LocalArtifactRepository.log_artifacts

    def refuse_models(self, local_dir, artifact_path=None):
        if "models" in Path(self.artifact_dir).parts:  # MLflow 3 keeps logged models under <experiment>/models/
            raise OSError(28, "No space left on device")
        return upload(self, local_dir, artifact_path)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", refuse_models)
    with pytest.raises(OSError, match="No space left"):
        run_search(config, SearchRequest("target", "random", "full"))
    fits = _runs(config, "tags.step = 'final_fit'")
    assert len(fits) == 1 and fits[0].info.status == "FAILED"
    assert [run.info.status for run in _runs(config, "tags.step = 'search'")] == ["FAILED"]
    assert not mlflow.MlflowClient().search_model_versions("name = 'target.random.full'")
    assert not pointer_path(config, "target", "random", "full").exists()


def test_best_trial_and_champion_are_the_lowest_validation_losses_in_the_runs(config):
    """Checked against what the MLflow runs recorded, not against the pointer or aliases the same code wrote."""
    request = SearchRequest("target", "random", "full", trials=2)
    study = optuna.create_study(storage=create_storage(config.optuna_storage), study_name=study_name(config, request),
                                direction="minimize")
    study.enqueue_trial({"learning_rate": 1e-4})
    study.enqueue_trial({"learning_rate": 3e-3})
    outcome = run_search(config, request)
    runs = _runs(config)
    complete = [run for run in runs if run.data.tags.get("step") == "trial"
                and run.data.tags.get("optuna_state") == "COMPLETE"]
    assert len(complete) == 2
    best = min(complete, key=lambda run: run.data.metrics["objective_val_loss"])
    fits = [run for run in runs if run.data.tags.get("step") == "final_fit"]
    assert len(fits) == 2 and {run.data.tags["trial"] for run in fits} == {best.data.tags["trial"]}
    for run in fits:
        assert float(run.data.params["learning_rate"]) == pytest.approx(float(best.data.params["search_learning_rate"]))
    lowest = min(run.data.metrics["best_val_loss"] for run in fits)
    champion = mlflow.MlflowClient().get_model_version_by_alias("target.random.full", "champion")
    # any fit at the lowest loss (two folds can tie exactly, e.g. both at a loss of 0)
    assert champion.run_id in {run.info.run_id for run in fits if run.data.metrics["best_val_loss"] == lowest}
    assert outcome.parent_run_id == fits[0].data.tags["mlflow.parentRunId"]


def test_the_paper_protocol_of_the_study_reaches_the_trainer_on_every_fold(tmp_path, write_params, blob_npz,
                                                                           clean_mlflow_env, monkeypatch, repo_root):
    """dvc.yaml's search stage, as DVC would render it for a profile with `study.protocol: paper`, fits the preset's
    settings (here a 1-epoch stand-in) on every fold, logs them, and records the protocol in the pointer."""
    import dataclasses
    import shlex

    import yaml

    from medtransfer import cli
    from medtransfer.search import promotion
    from medtransfer.train import presets

    blob_npz(tmp_path / "data/raw/target.npz", 0)
    params = write_params(
        {"target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                    "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}}},
        sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}},
        train=TRAIN, search=SEARCH, stores={"experiment": "paper-protocol", "tracking_uri": "sqlite:///mlflow.db",
                                            "optuna_storage": "sqlite:///optuna.db"},
        study={"targets": ["target"], "sources": ["random"], "regimes": ["freeze"], "protocol": "paper"},
    )
    config = load_config(params)
    prepare_dataset(config, "target")
    register_source(config, "random")
    quick = dataclasses.replace(presets.PAPER, max_epochs=1, head_max_epochs=1, batch_size=16)
    monkeypatch.setitem(presets.PRESETS, "paper", quick)
    handed = []
    real_finetune = promotion.run_finetune
    monkeypatch.setattr(promotion, "run_finetune", lambda cfg, request, **kw: handed.append(request) or
                        real_finetune(cfg, request, **kw))

    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["search"]
    assert "study.protocol" in stage["params"]  # DVC reruns the searches when the protocol changes
    command = stage["cmd"].replace("${item.dataset}", "target").replace("${item.source}", "random") \
        .replace("${item.regime}", "freeze").replace("${study.protocol}", config.study.protocol)
    words = shlex.split(command)
    assert words[:2] == ["medtransfer", "search"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--params", str(params), *words[1:]]) == 0

    assert sorted(request.fold for request in handed) == [0, 1]  # every fold, and no search trial before them
    assert all(request.preset == "paper" for request in handed)
    assert all(dataclasses.replace(request.settings, seed=quick.seed) == quick for request in handed)
    pointer = read_pointer(pointer_path(config, "target", "random", "freeze"))
    assert pointer.protocol == "paper" and pointer.best_params == {}
    fits = _runs(config, "tags.step = 'final_fit'")
    assert sorted(run.data.params["fold"] for run in fits) == ["0", "1"]
    for run in fits:
        logged = run.data.params
        assert logged["preset"] == "paper"
        assert {key: logged[key] for key in ("learning_rate", "batch_size", "max_epochs", "patience",
                                             "head_learning_rate", "head_patience", "optimizer")} == \
            {key: str(getattr(quick, key)) for key in ("learning_rate", "batch_size", "max_epochs", "patience",
                                                       "head_learning_rate", "head_patience", "optimizer")}
    (parent,) = _runs(config, "tags.step = 'search'")
    assert parent.data.params["protocol"] == "paper"
    assert not _runs(config, "tags.step = 'trial'")


def test_search_runs_and_versions_explain_themselves(config):
    """Source and regime in run names, code revision and profile on every run, the parent's description, space
    and Optuna plots, registry descriptions linking each fit to its source version."""
    from medtransfer.tracking import CODE_REVISION_TAG, PROFILE_TAG

    outcome = run_search(config, SearchRequest("target", "random", "full", trials=2))
    client = mlflow.MlflowClient()

    runs = _runs(config)
    by_step = {}
    for run in runs:
        by_step.setdefault(run.data.tags["step"], []).append(run)
    assert sorted(run.info.run_name for run in by_step["final_fit"]) == ["fit random/full fold0", "fit random/full fold1"]
    assert by_step["trial"] and all(run.info.run_name == f"trial {run.data.tags['trial']} random/full"
                                    for run in by_step["trial"])
    assert {"search", "trial", "final_fit", "source"} <= set(by_step)
    for run in runs:
        assert run.data.tags[PROFILE_TAG] == config.project.profile, run.info.run_name
        assert run.data.tags[CODE_REVISION_TAG], run.info.run_name

    parent = client.get_run(outcome.parent_run_id)
    description = parent.data.tags["mlflow.note.content"]
    assert "source `random`, regime `full`" in description and "`learning_rate` float [1e-09, 0.003] log" in description
    assert parent.data.params["space_learning_rate"] == "float [1e-09, 0.003] log"
    plots = {artifact.path for artifact in client.list_artifacts(outcome.parent_run_id, "optuna")}
    assert plots == {"optuna/optimization_history.png", "optuna/param_importances.png"}

    source_version = outcome.pointer.source_version
    assert "Pretraining source `random`" in client.get_registered_model("source.random").description
    assert "`resnet18` with weights from `random(seed=0)`" in client.get_model_version("source.random", source_version).description
    assert "fine-tuned from source `random` ([source.random](#/models/source.random))" in \
        client.get_registered_model("target.random.full").description
    for fit in outcome.pointer.folds:
        version_description = client.get_model_version("target.random.full", fit.version).description
        link = f"[source.random v{source_version}](#/models/source.random/versions/{source_version})"
        assert f"fold {fit.fold} (seed 0)" in version_description and link in version_description
        assert f"test AUC {fit.test_auc:.3f}" in version_description


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize(("kind", "expected"), [
    ("journal in a missing folder", "the Optuna journal's folder /nonexistent/dir does not exist"),
    ("a file that is not a database", "cannot open the Optuna storage sqlite:///"),
    ("an unknown scheme", "cannot open the Optuna storage foo://bar"),
    ("a closed PostgreSQL port", "cannot reach the store postgresql+psycopg2://worker:***@127.0.0.1:"),
])
def test_an_unusable_optuna_storage_is_one_line_exit_2_and_leaves_no_run(tmp_path, write_params, blob_npz,
                                                                         clean_mlflow_env, kind, expected):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    storage = {"journal in a missing folder": "journal:/nonexistent/dir/x.log",
               "a file that is not a database": f"sqlite:///{junk}",
               "an unknown scheme": "foo://bar",
               "a closed PostgreSQL port": f"postgresql+psycopg2://worker:secret@127.0.0.1:{_closed_port()}/optuna"}[kind]
    config = _project(tmp_path, write_params, blob_npz, storage=storage)
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random"]
    done = subprocess.run(command, env=_cli_env({"MEDTRANSFER_STORE_TIMEOUT": "5"}), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "secret" not in done.stderr
    mlflow.set_tracking_uri(config.tracking_uri)
    assert not _runs(config, "tags.step = 'search'"), "a storage that was never usable leaves no search run"
