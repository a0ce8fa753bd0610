"""Optuna storage from a URL: SQLite for one process, a journal file for several processes on one host, any
SQLAlchemy database URL (PostgreSQL, MySQL) for several hosts.

`journal:<path>` selects Optuna's JournalStorage over a file (safe for concurrent processes on one host through
its file lock); SQLite files are not safe for many concurrent writers. Server databases get heartbeats, so a trial
whose worker died is marked failed (and retried) by the survivors.

No wait on the database is unbounded: SQLite waits for a busy database for a while, PostgreSQL connections carry a
connect timeout, TCP keepalives, a statement timeout and an idle-in-transaction timeout, and advisory locks are
polled until a deadline. A heartbeat worker that goes longer than its grace period allows without running (SIGSTOP,
a suspended host) or without recording a heartbeat (a lost database) stops at once, before any further write: the
other workers may already have failed and retried its trial (see `HeartbeatLease`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import time
import warnings
from pathlib import Path

from medtransfer.errors import ConfigError, UserError
from medtransfer.store_check import check_server_reachable, masked

JOURNAL_PREFIX = "journal:"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
# SQLite: how long a statement waits for another process's write lock before failing ("database is locked").
SQLITE_BUSY_SECONDS = 60
# PostgreSQL. The statement timeout ends a statement that a lock (held by a stopped worker) or a stuck server keeps
# waiting. A worker stopped inside a transaction has its session ended by the server after the idle-in-transaction
# timeout, which releases its row locks well before the statements queued behind them time out. Keepalives and the
# TCP user timeout end a connection to a host that vanished, which no server-side timeout can.
CONNECT_TIMEOUT_SECONDS = 10
STATEMENT_TIMEOUT_SECONDS = 60
IDLE_IN_TRANSACTION_SECONDS = 15
POSTGRES_CONNECT_ARGS = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "keepalives": 1, "keepalives_idle": 10,
                         "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000}
# Creating Optuna's tables takes seconds; a worker waiting longer for the one creating them waits on a stuck one.
SCHEMA_LOCK_WAIT_SECONDS = 300
LOCK_POLL_SECONDS = 0.5


class WorkerStalled(UserError):
    """This worker cannot make progress: a wait on another worker or on the database ran past its bound, or the worker
    itself stalled past its heartbeats' grace period. It stops rather than wait forever, with exit code 2 and one
    line like every user-facing fault: the cure is on the machine (a stopped or stuck worker, a database out of
    reach), not in the input or the code."""


_WHERE = "stores.optuna_storage"
_URL_FIX = ("use sqlite:///optuna.db, journal:optuna.log, or a reachable database URL such as "
            "postgresql+psycopg2://user@host/db")


def create_storage(url: str, on_failed_trial=None, *, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                   grace_seconds: int = GRACE_SECONDS):
    """An Optuna storage object for `url` (already resolved against the repository root). `on_failed_trial(study,
    trial)` runs when a heartbeat storage fails a stale trial (no heartbeat for `grace_seconds`), before the trial
    is retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith(JOURNAL_PREFIX):
        journal = Path(url[len(JOURNAL_PREFIX):])
        if not journal.parent.is_dir():
            raise ConfigError(f"the Optuna journal's folder {journal.parent} does not exist", where=_WHERE,
                              fix="create the folder, or point stores.optuna_storage at an existing one")
        try:
            return JournalStorage(JournalFileBackend(str(journal)))
        except OSError as error:
            raise ConfigError(f"cannot open the Optuna journal {journal} ({error.strerror or error})", where=_WHERE,
                              fix="make the file and its folder writable by this user") from None
    if "://" not in url:
        raise ConfigError(f"'{url}' is not an Optuna storage URL", where=_WHERE, fix=_URL_FIX)
    check_server_reachable(url, _WHERE)  # a dead address: one line within the store timeout, not driver retries
    try:
        if url.startswith("sqlite:"):
            storage = RDBStorage(url, engine_kwargs=bounded_engine_kwargs(url))
            storage.get_all_studies()  # reads the file: a file that is not a database fails here, not mid-search
            return storage
        # Workers starting together would race to create Optuna's tables (PostgreSQL refuses the second CREATE
        # TYPE): the first creates them under a database lock, the others then find them.
        schema_lock = (advisory_lock(url, lock_key("optuna-schema"), wait_seconds=SCHEMA_LOCK_WAIT_SECONDS,
                                     holder="another worker creating Optuna's tables")
                       if is_postgresql(url) else contextlib.nullcontext())
        with schema_lock, warnings.catch_warnings():
            # Heartbeats have carried Optuna's "experimental" label since 2.8; the warning would greet every worker.
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return lease_storage_class()(
                url,
                engine_kwargs=bounded_engine_kwargs(url),
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace_seconds,
                heartbeat_stale_trial_callback=_then_retry(on_failed_trial, RetryHeartbeatStaleTrialCallback(max_retry=3)),
            )
    except (WorkerStalled, ConfigError):
        raise
    except Exception as error:  # noqa: BLE001 - any failure to open the storage is the storage's, said in one line
        detail = " ".join(str(getattr(error, "orig", None) or error).split())[:200]
        raise ConfigError(f"cannot open the Optuna storage {masked(url)} ({type(error).__name__}: {detail})",
                          where=_WHERE, fix=_URL_FIX) from None


def bounded_engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine options that bound every wait on the database at `url`: SQLite's busy timeout, PostgreSQL's
    timeouts (see POSTGRES_CONNECT_ARGS). A setting the URL itself carries (`?connect_timeout=5`, `?options=...`)
    wins. Other servers keep their driver's defaults."""
    if url.startswith("sqlite:"):
        return {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}}
    if not is_postgresql(url):
        return {}
    from sqlalchemy.engine import make_url

    given = make_url(url).query
    connect_args = {key: value for key, value in POSTGRES_CONNECT_ARGS.items() if key not in given}
    # libpq's `options` are server settings for the session; the URL's own come last, so they win.
    server = (f"-c statement_timeout={STATEMENT_TIMEOUT_SECONDS * 1000} "
              f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_SECONDS * 1000}")
    connect_args["options"] = f"{server} {given['options']}" if isinstance(given.get("options"), str) else server
    return {"connect_args": connect_args}


def _then_retry(first, retry):
    def callback(study, trial) -> None:
        if first is not None:
            first(study, trial)
        retry(study, trial)

    return callback


def supports_heartbeats(storage) -> bool:
    """Whether `storage` (or the cache Optuna wraps around it in a study, `study._storage`) records heartbeats."""
    from optuna.storages._heartbeat import BaseHeartbeat

    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(f"medtransfer:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def advisory_lock(url: str, key: int, *, wait_seconds: float, holder: str):
    """PostgreSQL's session-level advisory lock `key` on the database at `url`, held on a dedicated connection for
    the block. The server releases it when that connection ends, so a worker that dies never leaves it held. Waits
    at most `wait_seconds` for it (`holder` says who holds it, for the error), polling: a blocking pg_advisory_lock
    would wait forever on a stopped holder, or be cut by the statement timeout."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **bounded_engine_kwargs(url))
    try:
        with engine.connect() as connection:
            _acquire(connection, key, wait_seconds, holder)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    finally:
        engine.dispose()


def _acquire(connection, key: int, wait_seconds: float, holder: str) -> None:
    import sqlalchemy

    deadline = time.monotonic() + wait_seconds
    while True:
        taken = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one()
        connection.commit()  # not idle in a transaction while it waits
        if taken:
            return
        if time.monotonic() > deadline:
            raise WorkerStalled(f"waited {wait_seconds:.0f} s for {holder}",
                               fix="a worker that is stopped (SIGSTOP) or stuck holds the lock: end it, then rerun")
        time.sleep(LOCK_POLL_SECONDS)


# -- a stalled worker must not outlive its grace period -----------------------------------------------------------


class HeartbeatLease:
    """What a worker's heartbeats promise the others: that it still runs its trial. Once the promise may have lapsed
    (no heartbeat for the grace period, by the others' clock), the others fail the trial and retry it; a worker that
    then went on would write into a trial, and its MLflow run, that were closed over its head.

    So a worker that has gone `limit` seconds (the grace period less one heartbeat interval, a margin for the write
    in flight) without running, or with its heartbeats failing, or with one heartbeat stuck, exits at once with one
    line and code 2, before any further write: a watchdog thread ticks every fraction of the limit, and every SQL
    statement and every commit of the process (Optuna's and MLflow's engines alike) first checks when it last ticked,
    so after a SIGCONT no statement runs and nothing is committed before the stall is noticed. Exiting without cleanup
    leaves the stores as the other workers left them; the database ends its connections and rolls back anything it
    left open. Armed when the worker starts its trials (`arm_lease`), or by its first heartbeat, so only a process
    that runs trials on a heartbeat storage is ever stopped by it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.tick = min(1.0, limit / 4)
        self.last_tick = time.monotonic()
        self.beat_in_flight: float | None = None  # when the heartbeat now being recorded started
        self.last_beat: dict[int, float] = {}  # trial id -> when its last successful heartbeat started

    def check_running(self, now: float | None = None) -> None:
        """Stop the process if it has not run (ticked) for longer than the limit, as of `now` (default: the clock)."""
        stalled = (time.monotonic() if now is None else now) - self.last_tick
        if stalled > self.limit:
            _stop_worker(f"this worker was stalled for {stalled:.0f} s (stopped or starved), longer than its "
                         f"heartbeats allow ({self.limit:.0f} s): the other workers may have failed and retried its "
                         f"trial, so it stops without writing anything more")

    def watch_once(self) -> None:
        """One tick of the watchdog. The clock is read once: the tick it records is the time it checked, so a stop
        that falls anywhere in here leaves an old tick behind, which the next check (this thread's or a write's)
        sees as the stall. (Reading the clock again to record the tick would let a stop just after the check go
        unseen: the tick recorded after the SIGCONT would be fresh, and writes would pass.)"""
        now = time.monotonic()
        self.check_running(now)
        started = self.beat_in_flight
        if started is not None and now - started > self.limit:
            _stop_worker(f"a heartbeat has waited {now - started:.0f} s on the Optuna storage, "
                         f"longer than the others allow ({self.limit:.0f} s): its trial may be retried "
                         f"elsewhere, so this worker stops", fix="check that the database server is reachable")
        self.last_tick = now

    def watch(self) -> None:
        while True:
            self.watch_once()
            time.sleep(self.tick)

    def beat(self, trial_id: int, record) -> None:
        """Run `record()` (one heartbeat) under the lease: a failed heartbeat is retried at the next beat, until the
        last good one is older than the limit."""
        self.check_running()
        started = time.monotonic()
        self.last_beat.setdefault(trial_id, started)  # a trial's first heartbeat
        self.beat_in_flight = started
        try:
            record()
        except Exception as error:  # noqa: BLE001 -- a lost connection, a statement timeout: retried, within limits
            lapsed = time.monotonic() - self.last_beat[trial_id]
            if lapsed > self.limit:
                _stop_worker(f"no heartbeat could be recorded for {lapsed:.0f} s ({type(error).__name__}: "
                             f"{error}): its trial may be retried elsewhere, so this worker stops",
                             fix="check that the database server is reachable")
            return
        finally:
            self.beat_in_flight = None
        self.last_beat[trial_id] = started


_lease: HeartbeatLease | None = None
_lease_guard = threading.Lock()


def heartbeat_lease(heartbeat_seconds: float, grace_seconds: float) -> HeartbeatLease:
    """This process's lease, armed on first use: the watchdog thread and the check before every SQL statement and
    commit (`guard_every_write`)."""
    global _lease
    with _lease_guard:
        if _lease is None:
            _lease = HeartbeatLease(max(1.0, grace_seconds - heartbeat_seconds))
            threading.Thread(target=_lease.watch, name="medtransfer-heartbeat-lease", daemon=True).start()
            guard_every_write()
        return _lease


#: The engine events that run the lease's check: every SQL statement, and every commit (a statement run before a
#: stall would otherwise be committed after the SIGCONT without another check).
GUARDED_EVENTS = ("before_cursor_execute", "commit")


def guard_every_write() -> None:
    """Check this process's lease (when armed) before every SQL statement and every commit of every SQLAlchemy engine,
    Optuna's and MLflow's alike. Idempotent; a no-op for a process whose lease was never armed."""
    import sqlalchemy

    for event in GUARDED_EVENTS:
        if not sqlalchemy.event.contains(sqlalchemy.engine.Engine, event, _check_lease):
            sqlalchemy.event.listen(sqlalchemy.engine.Engine, event, _check_lease)


def _check_lease(*_args) -> None:
    if _lease is not None:
        _lease.check_running()


_stopping = threading.Lock()


def _stop_worker(what: str, fix: str | None = None) -> None:
    """Exit now with one line and code 2: no exception (it would run cleanup that writes: `finally` blocks, MLflow
    ending its runs at exit), straight to the file descriptor (another thread may hold sys.stderr's lock). Several
    threads notice a stall at once; the first says so, the others wait here for the exit."""
    _stopping.acquire()
    error = WorkerStalled(what, fix=fix)
    os.write(2, f"medtransfer search: error: {error.one_line()}\n".encode())
    os._exit(error.exit_code)


@functools.cache
def lease_storage_class():
    """Optuna's RDBStorage, its heartbeats run under this process's `HeartbeatLease` (a class made on first use:
    Optuna is imported only when a storage is made)."""
    from optuna.storages import RDBStorage

    class _HeartbeatLeaseStorage(RDBStorage):
        """An RDBStorage whose heartbeats run under this process's `HeartbeatLease`."""

        def lease(self) -> HeartbeatLease:
            """This process's lease, armed now if it was not yet (see `heartbeat_lease`)."""
            return heartbeat_lease(self.heartbeat_interval, self.grace_period or 2 * self.heartbeat_interval)

        def record_heartbeat(self, trial_id: int) -> None:
            self.lease().beat(trial_id, lambda: super(_HeartbeatLeaseStorage, self).record_heartbeat(trial_id))

    return _HeartbeatLeaseStorage


def heartbeat_backend(storage):
    """The heartbeat storage behind `storage` (a study wraps its storage in Optuna's cache), or None when it records
    no heartbeats."""
    backend = getattr(storage, "_backend", storage)
    return backend if supports_heartbeats(backend) else None


def arm_lease(storage) -> None:
    """Arm this process's heartbeat lease before it creates its first trial on `storage` (a study's, or the storage
    itself), when that records heartbeats under a lease. Armed only by the first heartbeat, a worker stopped between
    creating its first trial and recording that trial's first heartbeat would, once continued, write into the trial
    the others had failed meanwhile (`workers.adopt_silent_trials`)."""
    backend = heartbeat_backend(storage)
    if backend is not None and hasattr(backend, "lease"):
        backend.lease()


def adopt_trial(storage, trial_id: int) -> None:
    """Record one heartbeat for a running trial of another worker, outside this worker's lease (`storage`: an
    RDBStorage with heartbeats): a trial left without any heartbeat then goes stale like the others
    (`workers.adopt_silent_trials`). Its own worker's heartbeats, before or after, update the same row."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    try:
        RDBStorage.record_heartbeat(storage, trial_id)
    except sqlalchemy.exc.IntegrityError:  # its own worker recorded its first heartbeat at the same moment
        pass
