"""A tracking store that does not answer stops a step within seconds with one line, its password masked."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from medtransfer.errors import ConfigError
from medtransfer.store_check import (
    bound_postgres_waits, check_server_reachable, check_sqlite_store, database_fault, masked, store_timeout,
)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "postgresql+psycopg", "postgresql"])
def test_a_closed_port_is_one_line_naming_the_uri_with_the_password_masked(scheme):
    uri = f"{scheme}://user:secret@127.0.0.1:{_closed_port()}/db"
    with pytest.raises(ConfigError) as raised:
        check_server_reachable(uri, "params.yaml: stores.tracking_uri", timeout=5)
    message = str(raised.value)
    assert "\n" not in message and "secret" not in message and "user:***@127.0.0.1" in message
    assert "cannot reach the store" in message and "refused" in message.lower()


def test_a_listening_server_and_file_stores_pass():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_server_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", "here", timeout=5)
    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns", "databricks"):
        check_server_reachable(uri, "here", timeout=5)


@contextlib.contextmanager
def _not_postgres(reply: bytes | None):
    """A loopback port whose listener answers every connection with `reply` and closes it (None: it accepts and
    then says nothing); yields the port."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                if reply is None:
                    held.append(connection)  # silent: the client's own timeout must end the wait
                    continue
                with connection:
                    connection.recv(1024)
                    connection.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for connection in held:
            connection.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg", "postgresql+psycopg2"])
@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None], ids=["another-service", "silent"])
@pytest.mark.timeout(120)  # a silent listener must end at libpq's connect_timeout (2 s here), not hang the suite
def test_a_port_that_answers_but_is_no_postgresql_is_one_line_within_the_timeout(scheme, reply):
    """Something listens (a web server, a proxy, a stuck process): SQLAlchemy inside MLflow would retry for
    minutes; the check opens one session, bounded by the store timeout, and names the driver's reason."""
    with _not_postgres(reply) as port, pytest.raises(ConfigError) as raised:
        check_server_reachable(f"{scheme}://user:secret@127.0.0.1:{port}/db", "here", timeout=2)
    message = str(raised.value)
    assert "\n" not in message and "secret" not in message and "user:***@127.0.0.1" in message, message
    assert message.startswith("here: cannot open a session on the store"), message


def test_masking_and_the_timeout_setting(monkeypatch):
    assert masked("postgresql://u:pw@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert masked("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MEDTRANSFER_STORE_TIMEOUT", "2.5")
    assert store_timeout() == 2.5
    for bad in ("nan", "-1", "0", "inf", "soon"):
        monkeypatch.setenv("MEDTRANSFER_STORE_TIMEOUT", bad)
        assert store_timeout() == 10.0


def test_a_step_on_an_unreachable_tracking_server_exits_2_with_one_line(tmp_path, write_params, cli):
    params = write_params({}, sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}})
    uri = f"http://127.0.0.1:{_closed_port()}"
    result = cli("--params", str(params), "source", "--name", "random", env={"MEDTRANSFER_TRACKING_URI": uri},
                 timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the store {uri}" in lines[0], result.stderr
    assert "$MEDTRANSFER_TRACKING_URI" in lines[0]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder whose files nobody may write: permission bits for a plain user; for root (who ignores them) a
    read-only tmpfs mounted for the test. Yields (folder, make_read_only); skips where neither can be had."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = False

    def make_read_only() -> None:
        nonlocal mounted
        if os.geteuid() != 0:
            for entry in folder.iterdir():
                entry.chmod(0o444)
            folder.chmod(0o555)
            return
        staged = tmp_path / "staged"
        shutil.copytree(folder, staged)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("root here cannot mount a read-only tmpfs (no CAP_SYS_ADMIN)")
        mounted = True
        for entry in staged.iterdir():
            shutil.copy2(entry, folder / entry.name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    yield folder, make_read_only
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o755)


def _mlflow_like_store(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO experiments VALUES (0, 'Default')")
        connection.commit()


def test_a_read_only_sqlite_store_is_refused_up_front_and_left_unchanged(read_only_folder):
    folder, make_read_only = read_only_folder
    store = folder / "mlflow.db"
    _mlflow_like_store(store)
    check_sqlite_store(f"sqlite:///{store}", "here")  # writable: passes, and the probe leaves nothing behind
    before = store.read_bytes()
    make_read_only()
    with pytest.raises(ConfigError) as raised:
        check_sqlite_store(f"sqlite:///{store}", "params.yaml: stores.tracking_uri")
    message = raised.value.one_line()
    assert "\n" not in message and f"cannot write to the tracking store {store}" in message
    assert "readonly" in message and "writable" in message
    assert store.read_bytes() == before
    with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    assert tables == ["experiments"]


def test_a_step_on_a_read_only_store_exits_2_with_one_line_before_any_output(tmp_path, write_params, cli,
                                                                             read_only_folder):
    folder, make_read_only = read_only_folder
    _mlflow_like_store(folder / "mlflow.db")
    make_read_only()
    params = write_params({}, sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}})
    result = cli("--params", str(params), "source", "--name", "random",
                 env={"MEDTRANSFER_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write to the tracking store" in lines[0], result.stderr
    assert not (tmp_path / "mlartifacts").exists()


class _DriverError(Exception):
    """Stands in for a DB-API driver's error (psycopg2.OperationalError); only its module and name matter."""


_DriverError.__module__ = "psycopg2.errors"
_DriverError.__name__ = _DriverError.__qualname__ = "OperationalError"


def _wrapped(message: str) -> Exception:
    """The chain MLflow raises for a failed statement: MlflowException from SQLAlchemy's from the driver's."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    driver = _DriverError(message)
    try:
        try:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, driver) from driver
        except sqlalchemy.exc.OperationalError as error:
            raise MlflowException("(psycopg2.OperationalError) ...\n" * 30) from error
    except MlflowException as error:
        return error


@pytest.mark.parametrize(("message", "fix"), [
    ("canceling statement due to statement timeout\n", "server is up"),
    ("server closed the connection unexpectedly\n\tThis probably means", "server is up"),
    ("database is locked", "another process holds the SQLite store"),
    ("attempt to write a readonly database", "writable"),
])
def test_a_database_failure_deep_in_a_chain_becomes_one_line(message, fix):
    fault = database_fault(_wrapped(message))
    assert fault is not None and fault.exit_code == 2
    line = fault.one_line()
    assert "\n" not in line and "OperationalError" in line and message.split("\n")[0] in line and fix in line


def test_other_errors_are_not_taken_for_database_faults():
    assert database_fault(ValueError("a bug")) is None
    try:
        raise RuntimeError("outer") from KeyError("inner")
    except RuntimeError as error:
        assert database_fault(error) is None


def test_the_cli_prints_one_line_for_a_database_failure_and_re_raises_anything_else(monkeypatch, capsys):
    from medtransfer import cli

    def fail_with(error):
        def handler(_args):
            raise error
        return handler

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    subparser_action = next(action for action in parser._actions if action.dest == "command")
    subparser_action.choices["summary"].set_defaults(handler=fail_with(_wrapped("canceling statement due to statement timeout")))
    assert cli.main(["summary"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medtransfer summary: error: a store's database failed")
    subparser_action.choices["summary"].set_defaults(handler=fail_with(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["summary"])


def test_postgresql_tracking_stores_get_bounded_sessions(monkeypatch, postgres_database):
    import sqlalchemy
    from mlflow.store.db.utils import create_sqlalchemy_engine

    for variable in ("PGCONNECT_TIMEOUT", "PGOPTIONS"):
        monkeypatch.delenv(variable, raising=False)
    bound_postgres_waits("sqlite:///mlflow.db")
    assert "PGOPTIONS" not in os.environ and "PGCONNECT_TIMEOUT" not in os.environ
    uri = postgres_database("bounds")
    bound_postgres_waits(uri)
    assert os.environ["PGCONNECT_TIMEOUT"] == "10"
    engine = create_sqlalchemy_engine(uri)  # MLflow's own engine, built from the URI alone
    try:
        with engine.connect() as connection:
            shown = {name: connection.execute(sqlalchemy.text(f"SHOW {name}")).scalar()
                     for name in ("statement_timeout", "idle_in_transaction_session_timeout")}
    finally:
        engine.dispose()
    assert shown == {"statement_timeout": "1min", "idle_in_transaction_session_timeout": "15s"}
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=5000")
    bound_postgres_waits(uri)
    assert os.environ["PGOPTIONS"] == "-c statement_timeout=5000"  # the user's setting wins
