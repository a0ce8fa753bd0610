"""A search as processes: a worker killed mid-trial and the rerun, two workers on one study, `mlflow run -e search`,
and a storage that cannot be used (one line, exit 2)."""

from __future__ import annotations

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

from medtransfer.search.storage import create_storage
from medtransfer.search.study import SearchRequest, study_name


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_gives_exactly_the_requested_trials(config, cli_env, search_runs):
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random", "--trials", "2"]
    worker = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
    rerun = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=900)
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
    assert not search_runs(config, "attributes.status = 'RUNNING'"), "no run left RUNNING"
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
def test_two_parallel_workers_share_one_study(search_project, tracking_server, cli_env, search_runs):
    config = search_project(tracking_uri=tracking_server, storage="journal:optuna.log")
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random", "--trials", "3"]
    workers = [subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert len(search_runs(config, "tags.step = 'search'")) == 1, "one parent for the study"
    versions = mlflow.MlflowClient().search_model_versions("name = 'target.random.full'")
    assert len(versions) == 2, "one registration per fold"


@pytest.mark.slow
def test_mlflow_run_search_logs_under_the_launchers_run_in_the_profiles_experiment(config, repo_root, cli_env):
    import shutil

    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, config.root / name)
    command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "search", "-P", "dataset=target", "-P", "source=random",
               "-P", "regime=full", "-P", "trials=1", "--env-manager", "local",
               "--experiment-name", config.stores.experiment]  # another experiment is refused (tests/test_mlproject.py)
    result = subprocess.run(command, cwd=config.root, env=cli_env({"MLFLOW_TRACKING_URI": config.tracking_uri}),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(config.stores.experiment).experiment_id],
                              max_results=100)
    steps = {run.data.tags.get("step") for run in runs}
    assert {"search", "trial", "final_fit"} <= steps
    launcher = [run for run in runs if "study_parent_run_id" in run.data.tags]
    assert len(launcher) == 1 and launcher[0].info.status == "FINISHED"


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
def test_an_unusable_optuna_storage_is_one_line_exit_2_and_leaves_no_run(tmp_path, search_project, cli_env,
                                                                         search_runs, kind, expected):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    storage = {"journal in a missing folder": "journal:/nonexistent/dir/x.log",
               "a file that is not a database": f"sqlite:///{junk}",
               "an unknown scheme": "foo://bar",
               "a closed PostgreSQL port": f"postgresql+psycopg2://worker:secret@127.0.0.1:{_closed_port()}/optuna"}[kind]
    config = search_project(storage=storage)
    command = [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
               "--dataset", "target", "--source", "random"]
    done = subprocess.run(command, env=cli_env({"MEDTRANSFER_STORE_TIMEOUT": "5"}), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "secret" not in done.stderr
    mlflow.set_tracking_uri(config.tracking_uri)
    assert not search_runs(config, "tags.step = 'search'"), "a storage that was never usable leaves no search run"
