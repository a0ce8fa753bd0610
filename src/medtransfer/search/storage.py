"""Optuna storage from a URL: SQLite for one process, a journal file for several processes on one host, any
SQLAlchemy database URL (PostgreSQL, MySQL) for several hosts.

`journal:<path>` selects Optuna's JournalStorage over a file (safe for concurrent processes on one host through
its file lock); SQLite files are not safe for many concurrent writers. Server databases get heartbeats, so a trial
whose worker died is marked failed (and retried) by the survivors.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings

from medtransfer.errors import ConfigError

JOURNAL_PREFIX = "journal:"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


def create_storage(url: str, on_failed_trial=None, *, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                   grace_seconds: int = GRACE_SECONDS):
    """An Optuna storage object for `url` (already resolved against the repository root). `on_failed_trial(study,
    trial)` runs when a heartbeat storage fails a stale trial (no heartbeat for `grace_seconds`), before the trial
    is retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith(JOURNAL_PREFIX):
        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX):]))
    if url.startswith("sqlite:"):
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    if "://" not in url:
        raise ConfigError(
            f"'{url}' is not an Optuna storage URL",
            where="stores.optuna_storage",
            fix="use sqlite:///optuna.db, journal:optuna.log, or a database URL such as postgresql://user@host/db",
        )
    try:
        # Workers starting together would race to create Optuna's tables (PostgreSQL refuses the second CREATE
        # TYPE): the first creates them under a database lock, the others then find them.
        with (advisory_lock(url, lock_key("optuna-schema")) if is_postgresql(url) else contextlib.nullcontext(),
              warnings.catch_warnings()):
            # Heartbeats have carried Optuna's "experimental" label since 2.8; the warning would greet every worker.
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace_seconds,
                heartbeat_stale_trial_callback=_then_retry(on_failed_trial, RetryHeartbeatStaleTrialCallback(max_retry=3)),
            )
    except (optuna.exceptions.StorageInternalError, ImportError, ValueError) as error:
        raise ConfigError(f"cannot open the Optuna storage ({type(error).__name__}: {error})", where="stores.optuna_storage") from None


def _then_retry(first, retry):
    def callback(study, trial) -> None:
        if first is not None:
            first(study, trial)
        retry(study, trial)

    return callback


def supports_heartbeats(storage) -> bool:
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage) and storage.heartbeat_interval is not None


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(f"medtransfer:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def advisory_lock(url: str, key: int):
    """PostgreSQL's session-level advisory lock `key` on the database at `url`, held on a dedicated connection for
    the block. The server releases it when that connection ends, so a worker that dies never leaves it held."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    finally:
        engine.dispose()
