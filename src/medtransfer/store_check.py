"""A local SQLite tracking store, checked before MLflow opens it.

MLflow meets a broken SQLite file with about a minute of connection retries and a long SQLAlchemy traceback, and
meets a store in a folder that does not exist by creating an empty database elsewhere than the study's (or none),
after which every registered model reads as missing. Checking the file first turns each of these into one line.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from medtransfer.errors import ConfigError

SQLITE_HEADER = b"SQLite format 3\x00"
_SQLITE_PREFIX = "sqlite:///"


def check_sqlite_store(tracking_uri: str, where: str) -> None:
    """Raise `ConfigError` unless a `sqlite:///` store is usable: its folder exists and is writable, and the file is
    absent (MLflow creates it) or a readable SQLite database that passes `PRAGMA quick_check`. Other stores pass."""
    if not tracking_uri.startswith(_SQLITE_PREFIX):
        return
    rest = tracking_uri[len(_SQLITE_PREFIX):]
    if not rest or rest == ":memory:":
        return
    store = Path(rest.split("?", 1)[0])
    fix_uri = "fix stores.tracking_uri (or $MEDTRANSFER_TRACKING_URI)"
    if not store.parent.is_dir():
        raise ConfigError(f"the tracking store's folder {store.parent} does not exist", where=where,
                          fix=f"create it or {fix_uri}")
    if not store.exists():
        if not os.access(store.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot create the tracking store {store}: its folder is not writable", where=where,
                              fix=f"make {store.parent} writable or {fix_uri}")
        return
    if not store.is_file():
        raise ConfigError(f"the tracking store {store} is not a regular file", where=where,
                          fix=f"move it away or {fix_uri}")
    try:
        with store.open("rb") as stream:
            header = stream.read(len(SQLITE_HEADER))
    except OSError as error:
        raise ConfigError(f"cannot read the tracking store {store} ({error.strerror})", where=where,
                          fix=f"make it readable or {fix_uri}") from None
    if len(header) == 0:
        return  # an empty file is a database SQLite has not written yet
    if header != SQLITE_HEADER:
        raise ConfigError(f"the tracking store {store} is not an SQLite database", where=where,
                          fix=f"restore it from a backup, move it away to start afresh, or {fix_uri}")
    problem = _quick_check(store)
    if problem:
        raise ConfigError(f"the tracking store {store} is damaged ({problem})", where=where,
                          fix=f"restore it from a backup, move it away to start afresh, or {fix_uri}")


def _quick_check(store: Path) -> str | None:
    """SQLite's own consistency check, read-only and bounded: a truncated or damaged file fails it. None if sound."""
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True, timeout=5)) as connection:
            rows = connection.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            return None  # another worker is writing; MLflow waits for it
        return str(error)
    except sqlite3.Error as error:
        return str(error)
    results = [row[0] for row in rows]
    return None if results == ["ok"] else "; ".join(results[:2])
