"""No wait without a bound (issue 37), without a database server: a worker stalled past its heartbeats' grace period
stops with one line before it writes again; locks and waits on other workers end with a one-line error; database
connections carry timeouts. tests/search/test_postgres.py stops a worker of a real study on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from medtransfer.config import load_config
from medtransfer.search import storage
from medtransfer.search.storage import (CONNECT_TIMEOUT_SECONDS, SQLITE_BUSY_SECONDS, WorkerStalled,
                                        bounded_engine_kwargs, lease_storage_class, supports_heartbeats)
from medtransfer.search.workers import WORKER_ATTR, final_fit_lock, wait_for_other_workers

HEARTBEAT_SECONDS, GRACE_SECONDS = 1, 3  # the lease lapses after 2 s without running
# A trial that writes a user attribute as many times as argv[2] says, through a heartbeat storage whose grace period is
# argv[4] seconds: every 0.2 s, or (argv[3] == "stdin") printing each committed step and waiting for a line on stdin
# before the next, so that a test can stop it where no write of its own is in flight.
WORKER = """
import sys, time, warnings
import optuna
from medtransfer.search.storage import lease_storage_class

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
study = optuna.create_study(study_name="s", storage=lease_storage_class()(
    sys.argv[1], heartbeat_interval={heartbeat}, grace_period=int(sys.argv[4])))

def objective(trial):
    for step in range(int(sys.argv[2])):
        trial.set_user_attr(f"step{{step:05d}}", step)
        if sys.argv[3] == "stdin":
            print(step, flush=True)
            sys.stdin.readline()
        else:
            time.sleep(0.2)
    return 0.0

study.optimize(objective, n_trials=1)
""".format(heartbeat=HEARTBEAT_SECONDS)


def _start_worker(tmp_path, process_waits, steps: int, pace: str = "sleep", grace: int = GRACE_SECONDS):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    worker = subprocess.Popen([sys.executable, str(script), url, str(steps), pace, str(grace)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return worker, url


def _steps_written(url: str) -> int:
    """The steps the worker has written, read straight from the file: Optuna would create its tables on open, which
    races the worker creating them."""
    path = url.removeprefix("sqlite:///")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as connection:
            return connection.execute("SELECT COUNT(*) FROM trial_user_attributes").fetchone()[0]
    except sqlite3.OperationalError:  # no file or no table yet
        return 0


def _wait_for_steps(url: str, worker, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _steps_written(url) < steps:
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        if time.monotonic() >= deadline:  # a bound on the wait, not a claim about speed
            pytest.fail(f"the worker wrote fewer than {steps} steps in {timeout} s")
        time.sleep(0.2)


def test_a_worker_stopped_past_its_grace_period_exits_with_one_line_and_writes_nothing_more(tmp_path, process_waits):
    # Stopped between two steps (it has printed step 2, so that step is committed, and waits on stdin): no write of
    # its own is in flight, so every step after the stall would be a write the lease failed to prevent. The rows are
    # counted once it has exited: a read while it is stopped could wait on a lock its heartbeat holds.
    worker, url = _start_worker(tmp_path, process_waits, steps=100_000, pace="stdin")
    try:
        for step in range(3):
            line = worker.stdout.readline()
            assert line.strip() == str(step), (line, worker.poll())
            if step < 2:
                worker.stdin.write("\n")
                worker.stdin.flush()
        os.killpg(worker.pid, signal.SIGSTOP)
        time.sleep(GRACE_SECONDS + 1)  # past the grace period: the other workers may have failed its trial
        os.killpg(worker.pid, signal.SIGCONT)
        with contextlib.suppress(BrokenPipeError):  # it may already have exited
            worker.stdin.write("\n")  # go on to the next step: the lease must stop it first
            worker.stdin.flush()
        _, err = process_waits.finish(worker, timeout=60)
    finally:
        process_waits.kill(worker)
    assert worker.returncode == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith("medtransfer search: error: this worker was stalled for "), err
    assert _steps_written(url) == 3, "no write after the stall"


def test_a_worker_stopped_within_its_grace_period_goes_on(tmp_path, process_waits):
    # Stopped for 0.5 s with a lease of 9 s (grace 10 s less one heartbeat): a loaded machine that delays the test's
    # SIGCONT, or the worker's next tick, by seconds still leaves it within its lease.
    worker, url = _start_worker(tmp_path, process_waits, steps=15, grace=10)
    try:
        _wait_for_steps(url, worker, 3)
        os.killpg(worker.pid, signal.SIGSTOP)
        time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGCONT)
        _, err = process_waits.finish(worker, timeout=120)
    finally:
        process_waits.kill(worker)
    assert worker.returncode == 0, err[-3000:]
    assert _steps_written(url) == 15


def test_failing_heartbeats_stop_the_worker_once_the_last_good_one_is_older_than_the_limit(monkeypatch):
    stops = []

    def stop(what, fix=None):
        stops.append(what)
        raise SystemExit(2)

    def lost():
        raise ConnectionError("server closed the connection unexpectedly")

    monkeypatch.setattr(storage, "_stop_worker", stop)
    lease = storage.HeartbeatLease(limit=0.3)  # no watchdog thread: ticks by hand
    lease.beat(7, lambda: None)
    lease.beat(7, lost)
    assert not stops, "one failed heartbeat within the limit is retried at the next"
    time.sleep(0.4)
    lease.last_tick = time.monotonic()
    with pytest.raises(SystemExit):
        lease.beat(7, lost)
    assert stops[0].startswith("no heartbeat could be recorded for ") and "ConnectionError" in stops[0]


def test_a_stop_between_the_watchdogs_check_and_its_record_is_seen_by_the_next_write(monkeypatch):
    """The watchdog records as its tick the clock reading it checked. Were it to read the clock again to record the
    tick, a SIGSTOP falling between the two readings would go unseen: resumed, it would record a fresh tick, and the
    next write's check would pass although the worker had been stopped far longer than the limit."""
    stops = []

    def stop(what, fix=None):
        stops.append(what)
        raise SystemExit(2)

    lease = storage.HeartbeatLease(limit=2.0)  # no watchdog thread: one tick by hand
    lease.last_tick = 9.5
    readings = iter([10.0])  # the watchdog's check; every later reading is after the SIGCONT, 50 s on
    monkeypatch.setattr(storage, "_stop_worker", stop)
    monkeypatch.setattr(storage.time, "monotonic", lambda: next(readings, 60.0))
    lease.watch_once()  # checked at 10.0: running
    assert not stops
    with pytest.raises(SystemExit):
        lease.check_running()  # a write, after the SIGCONT
    assert stops[0].startswith("this worker was stalled for 50 s")


def test_a_study_sees_the_heartbeats_of_the_storage_it_wraps(tmp_path):
    # Optuna wraps an RDBStorage in a cache inside a study; the waits of `search.workers` look at the wrapper.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=lease_storage_class()(url, heartbeat_interval=1, grace_period=3))
    assert supports_heartbeats(study._storage)  # noqa: SLF001
    assert not supports_heartbeats(optuna.create_study(storage=url)._storage)  # noqa: SLF001


def test_database_connections_carry_timeouts_and_the_urls_own_settings_win():
    connect = bounded_engine_kwargs("postgresql://u@db.example/optuna")["connect_args"]
    assert connect["connect_timeout"] == CONNECT_TIMEOUT_SECONDS and connect["keepalives"] == 1
    assert "-c statement_timeout=" in connect["options"]
    assert "-c idle_in_transaction_session_timeout=" in connect["options"]
    own = bounded_engine_kwargs("postgresql+psycopg://u@db/o?connect_timeout=3&options=-c%20statement_timeout%3D5000")
    assert "connect_timeout" not in own["connect_args"]
    assert own["connect_args"]["options"].endswith("-c statement_timeout=5000"), "the URL's own setting comes last"
    assert bounded_engine_kwargs("sqlite:///optuna.db") == {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}}
    assert bounded_engine_kwargs("mysql://u@db/o") == {}


def test_the_final_fit_lock_is_waited_for_within_a_bound(tmp_path, write_params):
    config = load_config(write_params({}))
    with final_fit_lock(config, "e/target.random.full"):  # held by "another worker"
        # the wait ends at its bound with one line (the suite's timeout catches a wait that never ends)
        with pytest.raises(WorkerStalled, match="waited 1 s for another worker to fit and register"):
            with final_fit_lock(config, "e/target.random.full", wait_seconds=1):
                pass
    with final_fit_lock(config, "e/target.random.full", wait_seconds=1):
        pass  # free again


def test_waiting_on_other_workers_trials_that_never_progress_ends_with_an_error():
    study = optuna.create_study()
    trial = study.ask()  # RUNNING, owned by a live process on this host (this one): never reaped as dead
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
    with pytest.raises(WorkerStalled, match=f"trials {trial.number} of other workers have shown no progress"):
        wait_for_other_workers(study, client=None, poll_seconds=0.05, stall_seconds=0.3)
    assert study.trials[0].state == TrialState.RUNNING


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_abandoned_before_its_first_heartbeat_is_failed_and_retried_instead_of_waited_on(tmp_path):
    """Its worker was killed between creating the trial and recording its first heartbeat, so Optuna's stale rule
    (last heartbeat older than the grace period) never applies to it: the survivors' wait gives it a heartbeat after
    watching it for two grace periods, then fails it as stale and re-queues it, instead of waiting on it until the
    stall bound (an hour in the product, 60 s here, which fails the test)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = lease_storage_class()(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1,
                                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    study = optuna.create_study(storage=storage)
    abandoned = study.ask()  # RUNNING, with no heartbeat: the worker that asked for it is gone
    abandoned.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    wait_for_other_workers(study, client=None, poll_seconds=0.1, stall_seconds=60)
    trials = study.get_trials()
    assert trials[abandoned.number].state == TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == abandoned.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING
    assert retries[0].params == trials[abandoned.number].params


def test_a_statement_run_before_a_stall_is_not_committed_after_it(tmp_path, monkeypatch):
    # The window the per-statement check leaves: the INSERT ran while the lease was fresh, the process was stopped
    # before its COMMIT, and the COMMIT comes after the SIGCONT. The commit's own check must stop it before the
    # database commits anything.
    import sqlalchemy

    stops = []

    def stop(what, fix=None):
        stops.append(what)
        raise SystemExit(2)

    monkeypatch.setattr(storage, "_stop_worker", stop)
    monkeypatch.setattr(storage, "_lease", None)  # no lease armed in this process: every check is a no-op
    storage.guard_every_write()
    path = tmp_path / "rows.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE rows (value INTEGER)"))
    lease = storage.HeartbeatLease(limit=1.0)
    with pytest.raises(SystemExit), engine.connect() as connection:
        connection.execute(sqlalchemy.text("INSERT INTO rows VALUES (1)"))  # before the stall: nothing to notice
        lease.last_tick = time.monotonic() - 10.0  # ... stopped for 10 s, then continued
        monkeypatch.setattr(storage, "_lease", lease)
        connection.commit()
    monkeypatch.setattr(storage, "_lease", None)
    assert stops and stops[0].startswith("this worker was stalled for 10 s"), stops
    with contextlib.closing(sqlite3.connect(path)) as reader:
        assert reader.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 0, "the stalled write was committed"
