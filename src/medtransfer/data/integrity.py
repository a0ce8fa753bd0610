"""Checksums of a prepared folder's arrays, checked by every step that reads prepared data.

manifest.json records each array file's sha256 and size. A manifest alone vouches for nothing: an images.npy
replaced or edited after `prepare` (by hand, a half-finished copy, another checkout) would be trained and analysed
under the manifest's fingerprint. The record in the manifest holds no timestamps, so that DVC sees an unchanged
output when nothing changed; the size and mtime at which each file last matched its sha256 live in a host-local
stamp instead, under the repository's gitignored `.medtransfer-locks/` (a file inside `data/prepared/`, which DVC
tracks, must not change when it is only read). A load whose stat matches the stamp skips hashing (the fast path);
any other rehashes the file once and, when it still matches, renews the stamp.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from medtransfer.atomic_files import atomic_write
from medtransfer.errors import DataError
from medtransfer.hashing import file_sha256

#: The array files of a prepared folder (groups.npy only when the dataset has groups).
ARRAY_FILES = ("images.npy", "labels.npy", "groups.npy", "splits.npy")


def array_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {'sha256', 'bytes'}} of the array files present in `folder`, for the manifest."""
    return {
        name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
        for name in ARRAY_FILES
        if (folder / name).is_file()
    }


def _stat_key(path: Path) -> list[int]:
    """What says a file is unchanged without reading it: size, mtime (ns) and inode (a copy put in its place)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _read_stamp(stamp: Path, folder: Path) -> dict[str, Any]:
    """The stamp's {file name: {'sha256', 'stat'}} for `folder`; empty when absent, unreadable or another folder's."""
    try:
        content = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("folder") != str(folder.resolve()):
        return {}
    files = content.get("files")
    return files if isinstance(files, dict) else {}


def write_stamp(stamp: Path, folder: Path, records: dict[str, dict[str, Any]],
                stats: dict[str, list[int]] | None = None) -> None:
    """Record that `folder`'s array files, with `stats` (by default as they are now on disk), match `records` (their
    sha256s). Best effort: a read-only checkout only loses the fast path."""
    stats = stats or {name: _stat_key(folder / name) for name in records}
    content = {
        "folder": str(folder.resolve()),
        "files": {name: {"sha256": record["sha256"], "stat": stats[name]} for name, record in records.items()},
    }
    with contextlib.suppress(OSError):
        atomic_write(stamp, lambda stream: stream.write(json.dumps(content, indent=1).encode()))


def verify_arrays(folder: Path, records: Any, stamp: Path, dataset: str) -> None:
    """Refuse (DataError, naming the file) prepared arrays that differ from the manifest's `records`.

    Sizes are compared first, then the stamp's stat; only a file whose stat changed is read and hashed.
    """
    fix = f"rerun 'medtransfer prepare --dataset {dataset}' (or 'dvc checkout' to restore the prepared data)"
    if not isinstance(records, dict) or not records:
        raise DataError("manifest.json records no array checksums (prepared by an older medtransfer)",
                        where=str(folder), fix=fix)
    present = {name for name in ARRAY_FILES if (folder / name).is_file()}
    odd = sorted(present ^ set(records))
    if odd:
        state = "missing" if odd[0] in records else "not written by prepare (manifest.json does not list it)"
        raise DataError(f"{odd[0]} is {state}", where=str(folder / odd[0]), fix=fix)
    known = _read_stamp(stamp, folder)
    stats: dict[str, list[int]] = {}
    renewed = False
    for name, record in records.items():
        path = folder / name
        key = stats[name] = _stat_key(path)  # taken before hashing: a file changed meanwhile is rehashed next time
        if key[0] != record["bytes"]:
            raise DataError(f"changed since prepare: {key[0]} bytes, manifest.json says {record['bytes']}",
                            where=str(path), fix=fix)
        if known.get(name) == {"sha256": record["sha256"], "stat": key}:
            continue  # the same file, untouched since it last matched
        digest = file_sha256(path)
        if digest != record["sha256"]:
            raise DataError(f"changed since prepare: sha256 {digest[:12]}…, "
                            f"manifest.json says {record['sha256'][:12]}…", where=str(path), fix=fix)
        renewed = True
    if renewed:
        write_stamp(stamp, folder, records, stats)


def stamp_path(root: Path, lock_folder: str, dataset: str) -> Path:
    """Where the stamp of prepared dataset `dataset` lives: `<root>/<lock_folder>/prepared/<dataset>.json`."""
    return Path(root) / lock_folder / "prepared" / f"{os.path.basename(dataset)}.json"
