"""Several workers on one search: electing the parent run, reaping the trials of dead workers, and the lock under
which one worker fits and registers the winner while the others wait.

Workers meet only through the stores: the MLflow tracking store (the parent run, the final-fit runs) and Optuna's
storage (the trials, with the worker's host and pid as a user attribute). Nothing here trains or registers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time

from medtransfer.config import Config
from medtransfer.layout import LOCK_FOLDER, STEP_FINAL_FIT, STEP_SEARCH, Tag
from medtransfer.search.storage import (LOCK_POLL_SECONDS, WorkerStalled, adopt_trial, advisory_lock,
                                        heartbeat_backend, is_postgresql, lock_key)

#: Trial user attributes: the worker running it ({"host", "pid"}), its MLflow run, and whether it was surplus.
WORKER_ATTR = "worker"
RUN_ATTR = "mlflow_run_id"
SURPLUS_ATTR = "surplus"
ELECTION_PAUSE_SECONDS = 0.5
#: On a search parent run that a later search went on in: how the run had ended before, and when.
RESUMED_AFTER_TAG = "resumed_after"
# Bounds on waiting for other workers. One worker fits every fold under the final-fit lock while the others wait;
# a wait longer than this means its holder is stopped or stuck. Trials of other workers that show no progress (no
# epoch reported, no trial ended) for this long belong to stopped or stuck workers that no heartbeat reaps (a
# storage without heartbeats, whose reaping only sees dead processes; a trial stopped before its first heartbeat).
FINAL_FIT_WAIT_SECONDS = 6 * 3600
OTHERS_STALL_SECONDS = 3600


# -- the parent run ------------------------------------------------------------------------------------------------
def find_or_create_parent(client, experiment_id: str, study: str, tags: dict[str, str]) -> str:
    """The study's parent run: the oldest active run tagged with the study, created if there is none.

    Several workers may start at once; each creates a candidate if it sees none, then all elect the oldest
    (ties broken by run id) and the losers delete their candidates, so every worker logs under one parent.
    """
    found = _parents(client, experiment_id, study)
    if found:
        mark_resumed(client, found[0])
        return found[0].info.run_id
    mine = client.create_run(experiment_id, tags=tags, run_name=f"search {study.split('/', 1)[-1]}").info.run_id
    time.sleep(ELECTION_PAUSE_SECONDS)
    winner = _parents(client, experiment_id, study)[0].info.run_id
    if winner != mine:
        client.delete_run(mine)
    return winner


def mark_resumed(client, parent) -> None:
    """Tag a parent run that had ended (a killed, failed or finished search run again) with how and when it ended
    before this search went on in it: it ends again with this search's outcome, and the UI still shows the break."""
    if parent.info.status == "RUNNING":
        return  # another worker's search, still going on: nothing was resumed
    ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((parent.info.end_time or 0) / 1000))
    client.set_tag(parent.info.run_id, RESUMED_AFTER_TAG, f"{parent.info.status} at {ended}")


def log_parent_params(client, run_id: str, params: dict[str, object], attempts: int = 5) -> None:
    """Log the search parent's params, once for all its workers.

    Every worker of a search logs the same values on the one elected parent. Two workers inserting the same key
    at the same moment break the store's unique key (PostgreSQL says so; SQLite serialises them), so a failed
    insert is retried with only the keys still missing; a key another worker logged first with the same value is
    accepted. A different value is logged anyway, so MLflow refuses it as it refuses any changed param."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    wanted = {key: str(value) for key, value in params.items()}
    for attempt in range(attempts):
        have = client.get_run(run_id).data.params
        todo = {key: value for key, value in wanted.items() if have.get(key) != value}
        if not todo:
            return
        try:
            client.log_batch(run_id, params=[Param(key, value) for key, value in todo.items()])
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _parents(client, experiment_id: str, study: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{Tag.STUDY} = '{study}' and tags.{Tag.STEP} = '{STEP_SEARCH}'", max_results=100
    )
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


# -- dead workers and their trials --------------------------------------------------------------------------------


def mlflow_run_closer(client):
    """A callback for a trial failed because its worker stopped: close the trial's MLflow run as FAILED."""

    def close_mlflow_run(_study, trial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            client.set_tag(run_id, "optuna_state", "FAIL (stale: its worker stopped)")
            client.set_terminated(run_id, "FAILED")

    return close_mlflow_run


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


@contextlib.contextmanager
def final_fit_lock(config: Config, study: str, wait_seconds: float = FINAL_FIT_WAIT_SECONDS):
    """An exclusive lock per study, so that parallel workers register the final fits once: a PostgreSQL advisory
    lock when the Optuna storage is PostgreSQL (workers on several hosts), else an fcntl lock on a file under the
    repository (workers on one host). Either is released by the operating system or the server when its holder
    dies, so a killed worker never blocks the others; a stopped one blocks them `wait_seconds` at most."""
    holder = f"another worker to fit and register the final models of {study}"
    if is_postgresql(config.optuna_storage):
        with advisory_lock(config.optuna_storage, lock_key(f"final-fit:{study}"), wait_seconds=wait_seconds,
                           holder=holder):
            yield
        return
    import fcntl

    folder = config.resolve(LOCK_FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(study.encode()).hexdigest()[:16]}.lock"
    with path.open("w") as handle:
        _flock_within(handle, wait_seconds, holder)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flock_within(handle, wait_seconds: float, holder: str) -> None:
    """fcntl's exclusive lock on `handle`, polled until `wait_seconds` have passed (a blocking flock has no
    timeout)."""
    import fcntl

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise WorkerStalled(f"waited {wait_seconds:.0f} s for {holder}",
                                   fix="a worker that is stopped (SIGSTOP) or stuck holds the lock: end it, then rerun")
            time.sleep(LOCK_POLL_SECONDS)


def close_orphaned_fits(client, experiment_id: str, study: str) -> int:
    """Close the final-fit runs of `study` left RUNNING by a worker that died; returns how many.

    Called under the final-fit lock, so no live worker is fitting this study: a RUNNING fit is an orphan. A fit
    whose model was registered before its worker died is complete (metrics and model precede registration) and
    ends FINISHED; any other ends FAILED, and its fold is fit again."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{Tag.STEP} = '{STEP_FINAL_FIT}' and tags.{Tag.STUDY} = '{study}' and attributes.status = 'RUNNING'",
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


def wait_for_other_workers(study, client, poll_seconds: float = 2.0,
                           stall_seconds: float = OTHERS_STALL_SECONDS) -> None:
    """Block until no other worker is running a trial, so that every worker picks the same best trial. Trials of
    dead workers are failed meanwhile (stale heartbeats, including those of trials abandoned before their first one
    (`adopt_silent_trials`), or gone processes on this host); running trials that show no progress for
    `stall_seconds` end the wait with an error."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    close_mlflow_run = mlflow_run_closer(client)
    heartbeats = heartbeat_backend(study._storage)  # noqa: SLF001
    watched: dict[int, float] = {}
    progress, since = None, time.monotonic()
    while True:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if not t.user_attrs.get(SURPLUS_ATTR)]
        if not running:
            return
        now = {(t.number, len(t.intermediate_values)) for t in running}
        if now != progress:
            progress, since = now, time.monotonic()
        elif time.monotonic() - since > stall_seconds:
            numbers = ", ".join(str(number) for number, _ in sorted(now))
            raise WorkerStalled(f"trials {numbers} of other workers have shown no progress for {stall_seconds:.0f} s",
                               fix="the workers running them are stopped (SIGSTOP) or stuck: end them, then rerun")
        if heartbeats is not None:
            adopt_silent_trials(heartbeats, running, watched)
            fail_stale_trials(study)
        else:
            reap_dead_trials(study, close_mlflow_run)
        time.sleep(poll_seconds)


def adopt_silent_trials(storage, running: list, watched: dict[int, float]) -> None:
    """Give each trial in `running` that this worker has watched for two grace periods one heartbeat of its own
    (`storage.adopt_trial`), once; `watched` maps trial ids to when they were first seen, or to 0 once adopted.

    A worker killed between creating its trial and recording the trial's first heartbeat (the worker's first trial
    starts while it is still setting up, so that window is not small) leaves a RUNNING trial that Optuna never fails:
    it only fails trials whose last heartbeat is older than the grace period. Adopted, such a trial goes stale a grace
    period later and is failed and retried like any trial whose worker died. A trial that is alive beats anyway, so
    the adoption changes nothing for it; a dead one that had heartbeats went stale before two grace periods passed,
    so it is failed before it could be adopted and kept a little longer."""
    grace = storage.grace_period or 2 * storage.heartbeat_interval
    clock = time.monotonic()
    for trial in running:
        seen = watched.setdefault(trial._trial_id, clock)  # noqa: SLF001
        if seen and clock - seen > 2 * grace:
            adopt_trial(storage, trial._trial_id)  # noqa: SLF001
            watched[trial._trial_id] = 0.0  # noqa: SLF001
