"""A tracking store that does not answer stops a step within seconds with one line, its password masked."""

from __future__ import annotations

import socket

import pytest

from medtransfer.errors import ConfigError
from medtransfer.store_check import check_server_reachable, masked, store_timeout


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
