"""Optuna storage from a URL: SQLite for one process, a journal file for several processes on one host, any
SQLAlchemy database URL (PostgreSQL, MySQL) for several hosts.

`journal:<path>` selects Optuna's JournalStorage over a file (safe for concurrent processes on one host through
its file lock); SQLite files are not safe for many concurrent writers. Server databases get heartbeats, so a trial
whose worker died is marked failed (and retried) by the survivors.
"""

from __future__ import annotations

from medtransfer.errors import ConfigError

JOURNAL_PREFIX = "journal:"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


def create_storage(url: str, on_failed_trial=None):
    """An Optuna storage object for `url` (already resolved against the repository root). `on_failed_trial(study,
    trial)` runs when a heartbeat storage fails a stale trial, before the trial is retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
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
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            failed_trial_callback=_then_retry(on_failed_trial, RetryFailedTrialCallback(max_retry=3)),
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
