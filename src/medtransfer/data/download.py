"""MedMNIST downloads from the published Zenodo record, verified against the official MD5 checksums.

The file lands in `data/raw/medmnist/` under MedMNIST's own name (`breastmnist.npz` at 28 px,
`breastmnist_224.npz` at 224 px). A checksum mismatch deletes the download and says so. Without a network the
download fails within the timeout with a message naming the file and where to put it by hand; it never hangs,
even when name resolution stalls (the connection is opened on a daemon thread with a deadline).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medtransfer.atomic_files import current_umask
from medtransfer.config import Config
from medtransfer.errors import ConfigError, DataError
from medtransfer.hashing import file_md5

MEDMNIST_RECORD_URL = "https://zenodo.org/records/10519652/files"
MEDMNIST_SIZES = (28, 64, 128, 224)

# Official MD5 checksums of the 2D MedMNIST v3 files (MedMNIST's medmnist/info.py, version 3.0.2), by size.
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    "pathmnist": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                  128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "chestmnist": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                   128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "dermamnist": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                   128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "octmnist": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                 128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumoniamnist": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                    128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "breastmnist": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                    128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "bloodmnist": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                   128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissuemnist": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                    128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "organamnist": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                    128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
}

_FILE_NAME = re.compile(r"^(?P<subset>[a-z]+mnist)(?:_(?P<size>\d+))?\.npz$")


@dataclass(frozen=True)
class MedmnistFile:
    """One published MedMNIST file: subset, resolution, file name, URL and official MD5."""

    subset: str
    size: int
    md5: str

    @property
    def file_name(self) -> str:
        return f"{self.subset}.npz" if self.size == 28 else f"{self.subset}_{self.size}.npz"

    def url(self, base_url: str = MEDMNIST_RECORD_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.file_name}?download=1"


def medmnist_file(subset: str, size: int = 28) -> MedmnistFile:
    """The published file for `subset` at `size` px, or a DataError listing what exists."""
    if subset not in MEDMNIST_MD5:
        raise DataError(
            f"unknown MedMNIST subset '{subset}'",
            fix=f"known 2D subsets: {', '.join(sorted(MEDMNIST_MD5))}",
        )
    if size not in MEDMNIST_SIZES:
        raise DataError(f"MedMNIST has no {size} px files", fix=f"sizes: {', '.join(map(str, MEDMNIST_SIZES))}")
    return MedmnistFile(subset, size, MEDMNIST_MD5[subset][size])


def medmnist_file_for_path(path: Path) -> MedmnistFile | None:
    """The published file a local path is named after (e.g. breastmnist_224.npz), if any."""
    match = _FILE_NAME.match(Path(path).name)
    if match is None or match["subset"] not in MEDMNIST_MD5:
        return None
    size = int(match["size"] or 28)
    return medmnist_file(match["subset"], size) if size in MEDMNIST_SIZES else None


def download_medmnist(
    file: MedmnistFile, destination: Path, *, base_url: str | None = None, timeout: float = 30.0
) -> str:
    """Fetch `file` to `destination` unless an intact copy is there; returns 'present' or 'downloaded'."""
    base_url = base_url or os.environ.get("MEDTRANSFER_MEDMNIST_URL") or MEDMNIST_RECORD_URL
    if destination.is_file():
        actual = file_md5(destination)
        if actual == file.md5:
            return "present"
        raise DataError(
            f"exists but its MD5 is {actual}, not the official {file.md5}",
            where=str(destination),
            fix="delete it to download again (a locally modified copy must keep another name)",
        )
    download_verified(file.url(base_url), destination, file.md5, timeout=timeout)
    return "downloaded"


def download_verified(url: str, destination: Path, md5: str, *, timeout: float = 30.0) -> None:
    """Stream `url` into a temporary file beside `destination`, check its MD5, then rename it into place.

    A mismatch deletes the download. No network, a refused connection, an HTTP error or a stall longer than
    `timeout` seconds (name resolution included) raise a one-line DataError saying where to put the file by hand.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    by_hand = f"download {url} yourself and place it at {destination} (MD5 {md5})"
    response = _open_with_deadline(url, timeout, destination, by_hand)
    digest = hashlib.md5()  # noqa: S324 - MedMNIST publishes MD5 checksums; this is integrity, not security
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's file is owner-only; a download is an ordinary file
        with os.fdopen(handle, "wb") as stream, response:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, urllib.error.URLError) as error:
                    raise DataError(f"download interrupted ({error})", where=str(destination), fix=by_hand) from None
                if not chunk:
                    break
                digest.update(chunk)
                stream.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(
                f"checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected {md5}; the download was deleted",
                where=str(destination),
                fix=f"try again later, or {by_hand}",
            )
        os.replace(temporary, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _open_with_deadline(url: str, timeout: float, destination: Path, by_hand: str):
    """urlopen on a daemon thread: socket timeouts do not cover name resolution, a deadline does."""
    outcome: dict = {}

    def open_url() -> None:
        try:
            outcome["response"] = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - https/http URLs only
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = error

    opener = threading.Thread(target=open_url, name="medtransfer-download", daemon=True)
    started = time.monotonic()
    opener.start()
    opener.join(timeout)
    if opener.is_alive():
        raise DataError(
            f"no answer from {url} within {timeout:g} s (offline?)", where=str(destination), fix=by_hand
        )
    error = outcome.get("error")
    if error is not None:
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"cannot download {url} ({type(error).__name__}: {reason}) after {time.monotonic() - started:.1f} s",
            where=str(destination),
            fix=by_hand,
        )
    return outcome["response"]


def download_targets(config: Config, *, dataset: str | None = None, subset: str | None = None,
                     size: int = 28) -> list[tuple[MedmnistFile, Path]]:
    """What `medtransfer download` fetches, and where: a MedMNIST subset by name (into <raw_data>/medmnist/), one
    medmnist dataset of the params, or (neither given) every medmnist dataset whose path is named after a MedMNIST
    file."""
    if subset:
        file = medmnist_file(subset, size)
        return [(file, config.raw_data_dir / "medmnist" / file.file_name)]
    names = [dataset] if dataset else [n for n, d in config.datasets.items() if d.format == "medmnist"]
    targets = []
    for name in names:
        path = config.resolve(config.dataset(name).path)
        file = medmnist_file_for_path(path)
        if file is None:
            if dataset:
                raise ConfigError(
                    f"'{path.name}' is not a published MedMNIST file name (e.g. breastmnist.npz, dermamnist_224.npz)",
                    where=f"{config.source_file}: datasets.{name}.path",
                    fix="use --subset and --size, or name the file as MedMNIST does",
                )
            continue
        targets.append((file, path))
    if not targets:
        raise ConfigError("no dataset of params.yaml names a MedMNIST file", where=str(config.source_file))
    return targets
