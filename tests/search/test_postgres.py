"""Scale-out on PostgreSQL: several `medtransfer search` workers (separate processes) on one Optuna RDB study and one
MLflow store on the same server; heartbeats and retries after a SIGKILL; repeated kills at random points.

Every test needs a PostgreSQL server ($MEDTRANSFER_TEST_POSTGRES_URL, started by .ci/run) and skips without one.
MLflow talks to PostgreSQL directly here (a `postgresql://` tracking URI, as every worker of a cluster could);
tests/test_study_server.py runs the whole study through a tracking server on PostgreSQL.

No wait here is unbounded: the workers of a test share one deadline (WORKERS_SECONDS); a worker past it prints its
stacks (SIGABRT) before it is killed, and every worker still alive at the end of a test is killed, stopped or not.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from medtransfer.config import load_config
from medtransfer.data.prepare import prepare_dataset
from medtransfer.models.sources import register_source
from medtransfer.pointers import pointer_path, read_pointer, verify_pointer
from medtransfer.search.storage import create_storage
from medtransfer.search.study import SearchRequest, study_name

pytestmark = pytest.mark.slow(minutes=5)

TRAIN = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 3, "patience": 3, "augment": False, "seed": 0}
SEARCH = {
    "trials": 2,
    "space": {"learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True}},
    "startup_trials": 1,
    "pruner_startup_trials": 100,  # no pruning: every trial a worker starts should complete
    "pruner_warmup_epochs": 1,
}
FOLDS = 2
# A worker whose heartbeats lapse for GRACE_SECONDS loses its trial, and stops itself once it has not run for
# GRACE_SECONDS - HEARTBEAT_SECONDS: on a loaded 2-core machine (the other test worker, the database's own
# writes) a healthy worker can be kept waiting for seconds, so the grace leaves it 9 s, not 3.
HEARTBEAT_SECONDS, GRACE_SECONDS = 1, 10
# All the workers of one test, together: about a minute on a quiet machine, three times that on a loaded one. Below
# the test's own timeout (slow(minutes=5)), so a worker that hangs is aborted, and prints its stacks, first.
WORKERS_SECONDS = 600


@pytest.fixture
def project(tmp_path, write_params, blob_npz, postgres_database, monkeypatch):
    """A target, a registered random source, Optuna and MLflow both on fresh PostgreSQL databases."""
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    blob_npz(tmp_path / "data/raw/target.npz", 0)
    stores = {
        "tracking_uri": postgres_database("mlflow"),
        "artifact_root": "mlartifacts",
        "experiment": "scale-test",
        "optuna_storage": postgres_database("optuna"),
        "optuna_heartbeat_seconds": HEARTBEAT_SECONDS,
        "optuna_grace_seconds": GRACE_SECONDS,
    }
    params = write_params(
        {"target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                    "split": {"scheme": "stratified_kfold", "folds": FOLDS, "val_fraction": 0.25}}},
        sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}},
        train=TRAIN, search=SEARCH, stores=stores,
    )
    config = load_config(params)
    prepare_dataset(config, "target")
    register_source(config, "random")  # also creates MLflow's schema before any worker starts
    return config


def _command(config, trials: int) -> list[str]:
    return [sys.executable, "-m", "medtransfer", "--params", str(config.source_file), "search",
            "--dataset", "target", "--source", "random", "--trials", str(trials)]


class Workers:
    """`medtransfer search` workers on one project, all waited for within one deadline (WORKERS_SECONDS)."""

    def __init__(self, config, process_waits, env: dict) -> None:
        self.config = config
        self.waits = process_waits
        self.env = env
        self.deadline = time.monotonic() + WORKERS_SECONDS
        self.started: list[subprocess.Popen] = []

    def start(self, trials: int) -> subprocess.Popen:
        worker = subprocess.Popen(_command(self.config, trials), env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.started.append(worker)
        return worker

    def outcome(self, worker: subprocess.Popen) -> tuple[int, str]:
        """The exit code and output of `worker`, before the deadline; past it, its stacks fail the test."""
        try:
            output, _ = self.waits.finish(worker, timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a worker was still running after {WORKERS_SECONDS} s (its output and stacks: captured stderr)")
        return worker.returncode, output

    def finish(self, worker: subprocess.Popen) -> str:
        returncode, output = self.outcome(worker)
        assert returncode == 0, output[-3000:]
        return output

    def kill(self, worker: subprocess.Popen) -> None:
        self.waits.kill(worker)

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.returncode is None:
                self.waits.kill(worker)  # SIGKILL ends a stopped process too

    def all_exited(self) -> bool:
        return all(worker.poll() is not None for worker in self.started)

    def report(self) -> str:
        """Each worker's state and output, for a failure message; a running worker first prints its stacks (SIGABRT,
        then it is killed)."""
        parts = []
        for worker in self.started:
            if worker.poll() is None:
                output, state = self.waits.kill(worker, signal.SIGABRT, drain_seconds=15), "was running; its stacks last"
                self.waits.kill(worker)
            else:
                readable = worker.stdout is not None and not worker.stdout.closed
                output, state = (worker.stdout.read() if readable else ""), f"had exited with {worker.returncode}"
            parts.append(f"--- worker {worker.pid} {state}:\n{output[-4000:]}")
        return "\n".join(parts)


@pytest.fixture
def workers(project, process_waits, cli_env):
    pool = Workers(project, process_waits, cli_env())
    yield pool
    pool.kill_all()


def _study(config):
    name = study_name(config, SearchRequest("target", "random", "full"))
    return optuna.load_study(study_name=name, storage=create_storage(config.optuna_storage))


def _wait_for_a_running_trial(config, pool: Workers, timeout: float = 300):
    """The first trial seen running with its MLflow run started; fails, with every worker's output, when the workers
    have all exited or none started a trial within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pool.all_exited():
        try:
            running = [t for t in _study(config).get_trials() if t.state == TrialState.RUNNING
                       and "mlflow_run_id" in t.user_attrs]
        except KeyError:  # the study does not exist yet
            running = []
        if running:
            return running[0]
        time.sleep(0.1)
    pytest.fail(f"no running trial was seen in {timeout:g} s\n{pool.report()}")


def _has_a_heartbeat(config, trial) -> bool:
    """Whether Optuna recorded a heartbeat of `trial` (its RDB storage's trial_heartbeats table): a running trial
    with none is never stale, so another worker would never take it over."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(config.optuna_storage, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("SELECT count(*) FROM trial_heartbeats WHERE trial_id = :id"),
                                      {"id": trial._trial_id}).scalar() > 0
    finally:
        engine.dispose()


def _assert_consistent(config, trials: int) -> list:
    """The invariants a study must keep whatever happened to its workers."""
    study = _study(config)
    every = study.get_trials()
    complete = [t for t in every if t.state == TrialState.COMPLETE]
    assert len(complete) == trials, [(t.number, t.state.name) for t in every]
    assert len({t.params["learning_rate"] for t in complete}) == trials, "distinct trials"
    assert not [t for t in every if t.state in (TrialState.RUNNING, TrialState.WAITING)], "no trial left open"
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.stores.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "no MLflow run left RUNNING"
    assert len([r for r in runs if r.data.tags.get("step") == "search"]) == 1, "one parent run for the study"
    trial_runs = [r for r in runs if r.data.tags.get("step") == "trial"]
    numbers = [r.data.tags["trial"] for r in trial_runs]
    assert len(numbers) == len(set(numbers)), "one MLflow run per Optuna trial, never two"
    for trial in every:
        if "mlflow_run_id" in trial.user_attrs:
            run = client.get_run(trial.user_attrs["mlflow_run_id"])
            expected = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}[trial.state.name]
            assert run.info.status == expected, (trial.number, trial.state.name, run.info.status)
    versions = client.search_model_versions("name = 'target.random.full'")
    assert len(versions) == FOLDS, "one registered version per fold, never duplicated"
    path = pointer_path(config, "target", "random", "full")
    verify_pointer(client, read_pointer(path), str(path))  # the pointer agrees with the registry
    states = {}
    for trial in every:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    print(f"\n  trials {states}; trial runs {len(trial_runs)}, by status "
          f"{sorted((r.info.status for r in trial_runs))}; registered versions {len(versions)}")  # shown with -s
    return every


def _stop_mid_trial(config, worker: subprocess.Popen, pool: Workers, attempts: int = 20):
    """SIGSTOP `worker` in the middle of a trial that has recorded a heartbeat; returns that trial as it was at the
    stop. The stop follows the sight of the running trial at once, whatever the length of a trial on this machine:
    a trial that ended in between, or that had no heartbeat yet, sends the worker on (SIGCONT) to be caught again."""
    for _ in range(attempts):
        trial = _wait_for_a_running_trial(config, pool)
        os.killpg(worker.pid, signal.SIGSTOP)
        still = [t for t in _study(config).get_trials() if t.number == trial.number and t.state == TrialState.RUNNING]
        if still and _has_a_heartbeat(config, still[0]):
            assert still[0].user_attrs["worker"]["pid"] == worker.pid
            return still[0]
        os.killpg(worker.pid, signal.SIGCONT)
        time.sleep(HEARTBEAT_SECONDS / 10)
    pytest.fail(f"the worker was never caught mid-trial in {attempts} attempts\n{pool.report()}")


def _snapshot(config) -> dict:
    """What any worker could change: Optuna's trials, MLflow's runs and registered versions, the pointer file."""
    trials = [(t.number, t.state.name, t.params, t.values, t.user_attrs, t.system_attrs, t.intermediate_values,
               t.datetime_complete) for t in _study(config).get_trials()]
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.stores.experiment)
    runs = sorted((r.info.run_id, r.info.status, r.info.end_time, r.data.tags, r.data.metrics, r.data.params)
                  for r in client.search_runs([experiment.experiment_id], max_results=1000))
    versions = sorted((v.name, v.version, v.run_id, v.tags, v.status, v.last_updated_timestamp)
                      for v in client.search_model_versions("name = 'target.random.full'"))
    pointer = pointer_path(config, "target", "random", "full").read_bytes()
    return {"trials": trials, "runs": runs, "versions": versions, "pointer": pointer}


def test_three_workers_on_postgres_complete_exactly_the_requested_trials(project, workers):
    for worker in [workers.start(trials=4) for _ in range(3)]:
        workers.finish(worker)
    every = _assert_consistent(project, trials=4)
    # How the trials fall between the workers depends on which started first and how fast they ran, so that is only
    # shown (-s); that every trial ran in one of them is not. test_a_stopped_worker... has one worker take over the
    # trial of another, whatever the timing.
    complete = [t for t in every if t.state == TrialState.COMPLETE]
    pids = [t.user_attrs["worker"]["pid"] for t in complete if "worker" in t.user_attrs]
    assert len(pids) == len(complete) and set(pids) <= {worker.pid for worker in workers.started}, pids
    print(f"  trials per worker: {sorted(pids.count(pid) for pid in set(pids))}")


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried_by_a_survivor(project, workers):
    doomed = workers.start(trials=2)
    # Stopped mid-trial first, so the trial read is still running when the SIGKILL lands (a trial read and then
    # killed could have completed in between).
    victim = _stop_mid_trial(project, doomed, workers)
    workers.kill(doomed)
    workers.finish(workers.start(trials=2))
    every = _assert_consistent(project, trials=2)
    by_number = {t.number: t for t in every}
    assert by_number[victim.number].state == TrialState.FAIL, "the heartbeat marked the dead worker's trial failed"
    retries = [t for t in every if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, "retried once, by the survivor"
    assert retries[0].params == victim.params


def test_killing_the_search_at_random_points_then_rerunning_keeps_everything_consistent(project, workers):
    """SIGKILL at random moments (in trials, between them, in the final fits), three times, then a clean rerun."""
    rng = random.Random(20261127)
    for _ in range(3):
        worker = workers.start(trials=2)
        time.sleep(rng.uniform(3.0, 25.0))
        if worker.poll() is None:
            workers.kill(worker)
        else:
            workers.outcome(worker)
    workers.finish(workers.start(trials=2))
    _assert_consistent(project, trials=2)


def test_a_stopped_worker_is_failed_by_heartbeat_and_the_others_finish_without_waiting_on_it(project, workers):
    """SIGSTOP one worker mid-trial: alive, holding its connections, never heartbeating. The other two complete the
    study with exactly the requested trials within WORKERS_SECONDS, its trial failed by heartbeat and retried once.
    Continued afterwards (SIGCONT), it exits with code 2 and one line, and changes nothing."""
    stopped = workers.start(trials=3)
    victim = _stop_mid_trial(project, stopped, workers)
    for worker in [workers.start(trials=3) for _ in range(2)]:
        workers.finish(worker)
    every = _assert_consistent(project, trials=3)
    assert {t.number: t for t in every}[victim.number].state == TrialState.FAIL, "failed by heartbeat"
    retries = [t for t in every if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, "retried once, by another worker"
    assert retries[0].params == victim.params
    assert retries[0].user_attrs["worker"]["pid"] != stopped.pid
    before = _snapshot(project)
    os.killpg(stopped.pid, signal.SIGCONT)
    returncode, output = workers.outcome(stopped)
    last = output.strip().splitlines()[-1]
    assert returncode == 2, output[-3000:]
    assert last.startswith("medtransfer search: error: this worker was stalled for"), output[-3000:]
    assert _snapshot(project) == before, "the continued worker changed nothing"
