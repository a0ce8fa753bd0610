"""The tracking store, checked before MLflow opens it.

MLflow meets a broken SQLite file with about a minute of connection retries and a long SQLAlchemy traceback, and
meets a store in a folder that does not exist by creating an empty database elsewhere than the study's (or none),
after which every registered model reads as missing. A tracking server or database that does not answer costs
minutes of HTTP or connection retries (500 s and 117 traceback lines for a closed port). Checking first turns each
of these into one line within seconds: `check_sqlite_store` for a local file, `check_server_reachable` for a server.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from medtransfer.errors import ConfigError, EnvironmentFault

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
    problem = _write_probe(store)
    if problem:
        raise ConfigError(f"cannot write to the tracking store {store} ({problem})", where=where,
                          fix=f"make it and its folder writable (a read-only copy: copy it elsewhere first), or {fix_uri}")


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


def _write_probe(store: Path) -> str | None:
    """Whether SQLite can write to `store`: a table created inside a transaction that is rolled back, so nothing
    changes. Permission bits alone cannot tell (root ignores them, a read-only mount does not), and SQLite opens an
    unwritable file read-only without a word; MLflow would then fail at its first write, after the step's work. None
    if writable (or busy: another writer holds it, and MLflow waits for it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=rw", uri=True, timeout=5,
                                                isolation_level=None)) as connection:
            connection.execute("BEGIN")
            try:
                connection.execute("CREATE TABLE medtransfer_write_probe (x)")
            finally:
                connection.execute("ROLLBACK")
    except sqlite3.OperationalError as error:
        return None if "locked" in str(error) else str(error)
    except sqlite3.Error as error:
        return str(error)
    return None


#: How long one store may take to accept a connection before the step stops with one line (several addresses of
#: one host share it). `$MEDTRANSFER_STORE_TIMEOUT` overrides it, in seconds.
STORE_TIMEOUT_SECONDS = 10.0
STORE_TIMEOUT_ENV = "MEDTRANSFER_STORE_TIMEOUT"
#: Default ports of the server stores a URI may name without one.
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def masked(uri: str) -> str:
    """`uri` with the password (if any) replaced by ***, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def store_timeout() -> float:
    """The connect timeout in seconds: $MEDTRANSFER_STORE_TIMEOUT if it is a finite number above 0, else the default."""
    text = os.environ.get(STORE_TIMEOUT_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return STORE_TIMEOUT_SECONDS
    return value if 0 < value < float("inf") else STORE_TIMEOUT_SECONDS


def check_server_reachable(uri: str, where: str, timeout: float | None = None) -> None:
    """Raise `ConfigError` unless the server a `http(s)://` or database (`postgresql+psycopg://…`) URI names accepts a
    TCP connection within `timeout` seconds (default `store_timeout()`). File stores and other schemes pass: this
    asks only whether anything answers, so that MLflow's and SQLAlchemy's own retries never start on a dead address."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ConfigError(f"the store URI {masked(uri)} has an invalid port", where=where,
                          fix="write the port as a number from 1 to 65535") from None
    timeout = store_timeout() if timeout is None else timeout
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
        if scheme in ("postgresql", "postgres"):
            _check_database_login(uri, where, timeout)
        return
    except socket.timeout:
        cause = f"no answer within {timeout:g} s"
    except socket.gaierror as error:
        cause = f"unknown host ({error.strerror})"
    except OSError as error:
        cause = error.strerror or str(error)
    raise ConfigError(f"cannot reach the store {masked(uri)}: {cause}", where=where,
                      fix=f"start the server, or fix the address and port where the URI is set; ${STORE_TIMEOUT_ENV} "
                          "sets the wait in seconds")


def _check_database_login(uri: str, where: str, timeout: float) -> None:
    """Raise `ConfigError` unless a PostgreSQL session opens on `uri` within `timeout` seconds. Something answering
    on the port is not yet a database that takes this user (another service on the port, a wrong password or
    database name): SQLAlchemy would retry those for minutes inside MLflow. Without the URI's driver, MLflow reports
    that itself; nothing is checked here."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool,
                                          connect_args={"connect_timeout": max(1, math.ceil(timeout))})
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError):
        return
    try:
        with engine.connect():
            return
    except sqlalchemy.exc.SQLAlchemyError as error:
        detail = str(getattr(error, "orig", None) or error).strip().splitlines()
        cause = detail[0] if detail else type(error).__name__
    finally:
        engine.dispose()
    raise ConfigError(f"cannot open a session on the store {masked(uri)}: {cause}", where=where,
                      fix="check that the port serves PostgreSQL and that the user, password and database in the "
                          "URI are right")


#: Server settings for every PostgreSQL session MLflow opens (libpq reads $PGOPTIONS): a statement, or a transaction
#: left idle, that a stopped peer or a stuck server keeps waiting ends with an error instead of holding the step.
POSTGRES_SESSION_OPTIONS = "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=15000"


def bound_postgres_waits(uri: str) -> None:
    """Bound MLflow's own waits on a PostgreSQL tracking store. MLflow builds its SQLAlchemy engine from the URI
    alone, so the bounds go where libpq reads them, the environment (inherited by every stage a study starts):
    $PGCONNECT_TIMEOUT (the store timeout) and $PGOPTIONS (statement and idle-in-transaction timeouts). A value the
    user set, or the URI's own `?connect_timeout=`/`?options=`, wins. Other stores are left alone."""
    if urlsplit(uri).scheme.split("+", 1)[0].lower() not in ("postgresql", "postgres"):
        return
    os.environ.setdefault("PGCONNECT_TIMEOUT", str(max(2, round(store_timeout()))))
    os.environ.setdefault("PGOPTIONS", POSTGRES_SESSION_OPTIONS)


#: Driver errors that mean the database, not the program, failed: a lost or refused connection, a statement or lock
#: timeout, a read-only or locked file. Matched by class name and module, so no driver needs importing here.
_DATABASE_FAULTS = {("sqlalchemy", "OperationalError"), ("sqlalchemy", "InterfaceError"), ("sqlalchemy", "TimeoutError"),
                    ("psycopg2", "OperationalError"), ("psycopg2", "InterfaceError"), ("psycopg", "OperationalError"),
                    ("sqlite3", "OperationalError"), ("optuna", "StorageInternalError")}


def database_fault(error: BaseException) -> EnvironmentFault | None:
    """The one-line fault for an error whose cause chain holds a database driver's connection, timeout or write
    failure (as MLflow, Optuna and SQLAlchemy raise them, wrapped several layers deep), or None for any other error."""
    seen: set[int] = set()
    cause: BaseException | None = error
    found: BaseException | None = None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        kind = (type(cause).__module__.split(".", 1)[0], type(cause).__name__)
        if kind in _DATABASE_FAULTS:
            found = cause  # keep walking: the innermost driver error says most
        cause = cause.__cause__ or cause.__context__
    if found is None:
        return None
    inner = getattr(found, "orig", None) or found
    detail = " ".join(str(inner).split())[:200] or type(inner).__name__
    if "locked" in detail:
        fix = ("another process holds the SQLite store; wait for it, or use a PostgreSQL store for several workers "
               "(stores.optuna_storage, stores.tracking_uri)")
    elif "readonly" in detail or "read-only" in detail:
        fix = "make the store and its folder writable, then rerun"
    else:
        fix = ("check that the database server is up and not overloaded, then rerun; a search worker's unfinished "
               "trial is failed by heartbeat and retried by the others")
    return EnvironmentFault(f"a store's database failed ({type(inner).__name__}: {detail})", fix=fix)
