"""MedMNIST downloads against a local HTTP server: checksum verified, mismatch deleted, offline fails fast."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial

import pytest

from medtransfer.data.download import (
    MEDMNIST_MD5,
    MEDMNIST_SIZES,
    download_medmnist,
    download_verified,
    medmnist_file,
    medmnist_file_for_path,
)
from medtransfer.errors import DataError

GUARD_SECONDS = 20  # guards against hanging; not a performance limit


@pytest.fixture
def file_server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_checksum_table_covers_every_size():
    for subset, sums in MEDMNIST_MD5.items():
        assert sorted(sums) == list(MEDMNIST_SIZES), subset
        assert all(len(value) == 32 and int(value, 16) >= 0 for value in sums.values())


def test_file_names_follow_medmnist(tmp_path):
    assert medmnist_file("breastmnist").file_name == "breastmnist.npz"
    assert medmnist_file("dermamnist", 224).url("http://h/f") == "http://h/f/dermamnist_224.npz?download=1"
    assert medmnist_file_for_path(tmp_path / "pneumoniamnist_64.npz") == medmnist_file("pneumoniamnist", 64)
    assert medmnist_file_for_path(tmp_path / "my_data.npz") is None
    with pytest.raises(DataError, match="unknown MedMNIST subset 'fashionmnist'"):
        medmnist_file("fashionmnist")


def test_verified_download_lands_whole(file_server, tmp_path):
    folder, base = file_server
    payload = bytes(range(256)) * 5000
    (folder / "x.npz").write_bytes(payload)
    destination = tmp_path / "raw" / "x.npz"
    download_verified(f"{base}/x.npz", destination, hashlib.md5(payload).hexdigest())
    assert destination.read_bytes() == payload
    assert [p.name for p in destination.parent.iterdir()] == ["x.npz"], "no partial file left"


def test_checksum_mismatch_deletes_the_download(file_server, tmp_path):
    folder, base = file_server
    (folder / "breastmnist.npz").write_bytes(b"not the official file")
    destination = tmp_path / "raw" / "breastmnist.npz"
    with pytest.raises(DataError, match="checksum mismatch .* expected 750601b1f35ba3300ea97c75c52ff8f6; the download was deleted"):
        download_medmnist(medmnist_file("breastmnist"), destination, base_url=base)
    assert not destination.exists() and list(destination.parent.iterdir()) == []


def test_present_file_is_verified_not_downloaded_again(tmp_path):
    destination = tmp_path / "breastmnist.npz"
    destination.write_bytes(b"a local copy with another checksum")
    with pytest.raises(DataError, match="exists but its MD5 is"):
        download_medmnist(medmnist_file("breastmnist"), destination, base_url="http://127.0.0.1:9")


# A hard timeout fails a hanging test (pytest-timeout raises in the test); no elapsed-time assertion.
@pytest.mark.timeout(GUARD_SECONDS, method="signal")
def test_offline_fails_fast_with_where_to_put_the_file(tmp_path):
    # A port bound but not listening refuses the connection at once: no name lookup, whose failure (or slowness, or a
    # resolver that answers for unknown names) depends on the machine's network.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{closed.getsockname()[1]}"
    destination = tmp_path / "breastmnist.npz"
    try:
        with pytest.raises(DataError) as caught:
            download_medmnist(medmnist_file("breastmnist"), destination, base_url=base, timeout=10)
    finally:
        closed.close()
    message = caught.value.one_line()
    assert f"cannot download {base}/breastmnist.npz" in message
    assert f"place it at {destination}" in message and "750601b1f35ba3300ea97c75c52ff8f6" in message
    assert not destination.exists()


@pytest.mark.timeout(GUARD_SECONDS, method="signal")
def test_a_server_that_never_answers_times_out(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection into its backlog, never answers
    try:
        with pytest.raises(DataError, match="no answer from|cannot download"):
            download_verified(f"http://127.0.0.1:{silent.getsockname()[1]}/x.npz", tmp_path / "x.npz", "0" * 32, timeout=1)
    finally:
        silent.close()


def test_download_command_against_a_mirror(file_server, tmp_path, write_params, cli):
    folder, base = file_server
    (folder / "breastmnist.npz").write_bytes(b"tampered")
    params = write_params({"breastmnist": {"format": "medmnist", "path": "data/raw/medmnist/breastmnist.npz", "classes": ["m", "b"]}})
    result = cli("--params", str(params), "download", "--dataset", "breastmnist", env={"MEDTRANSFER_MEDMNIST_URL": base}, timeout=GUARD_SECONDS * 3)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "checksum mismatch" in line and "the download was deleted" in line
    assert not (tmp_path / "data/raw/medmnist/breastmnist.npz").exists()
