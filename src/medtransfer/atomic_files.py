"""Atomic outputs: write to a temporary sibling, then rename, so a failure never leaves a half-written result.

Files and folders come out with the mode a plain `open`/`mkdir` would give them under the process's umask (a
replaced file keeps its own mode), not the owner-only mode of `tempfile`'s private temporaries: a study must stay
readable by its group or a web server.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

# tempfile names its temporaries with 8 characters from this alphabet; matching it exactly means a sweep for
# leftovers of folder `a` can never take the temporary file of a neighbour such as `a.json` (`.a.json.x.tmp`).
_RANDOM_PART = "[a-z0-9_]{8}"


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which races with
    other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, fresh: int) -> int:
    """The mode the replacement of `path` gets: the existing one's, else `fresh` under the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return fresh & ~current_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create `path` through `write(stream)` so that readers see either the old file or the complete new one:
    the bytes go to a temporary sibling, are flushed to disk, and the sibling is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, _mode_for(path, 0o666))
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        _raise_naming(error, path)
        raise


# A full disk fails a write() that knows no file name, so the error would not say where; these get the output's.
_NAMELESS_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _raise_naming(error: BaseException, path: Path) -> None:
    """Raise `error` again with `path` as its file name when it is a nameless out-of-space error; else return."""
    if isinstance(error, OSError) and error.errno in _NAMELESS_SPACE_ERRORS and not error.filename:
        raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error


def _keep_modes(staging: Path, final: Path) -> None:
    """Give each file of the new output that replaces one of the old the old one's mode, as `atomic_write` does
    for a single file: a folder written afresh would otherwise carry the writer's umask (077: owner-only)."""
    for new in staging.rglob("*"):
        if new.is_symlink():
            continue
        with contextlib.suppress(OSError):
            old, fresh = os.stat(final / new.relative_to(staging), follow_symlinks=False), new.stat()
            same_kind = stat.S_IFMT(old.st_mode) == stat.S_IFMT(fresh.st_mode)
            if same_kind and stat.S_IMODE(old.st_mode) != stat.S_IMODE(fresh.st_mode):
                os.chmod(new, stat.S_IMODE(old.st_mode))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def lock_path(final: Path) -> Path:
    """The lock file that serialises the writers of folder `final`. It is never deleted: removing a lock file
    lets a waiting writer and a newcomer lock two different files and both write."""
    final = Path(final)
    return final.parent / f".{final.name}.lock"


def _leftovers(final: Path, suffix: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{_RANDOM_PART}\.{suffix}")
    return sorted(
        entry for entry in final.parent.iterdir()
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
    )


def _recover(final: Path) -> None:
    """Undo what a killed writer left, under the lock (so no live writer owns any of it): put a retired output
    back when `final` is missing, then delete every staging (`.tmp`) and retired (`.old`) folder of `final`.

    A retired folder holds the previous output, moved there whole by one rename; the new output replaces it by the
    next rename, so `final` is missing only when a writer died between the two, and the retired copy is whole then.
    """
    retired = [folder / final.name for folder in _leftovers(final, "old") if (folder / final.name).is_dir()]
    if not final.exists() and retired:
        # Only one writer runs at a time and each cleans up before writing, so at most one retired copy can be
        # whole; the newest is the one a single killed writer left.
        newest = max(retired, key=lambda folder: folder.parent.stat().st_mtime_ns)
        os.rename(newest, final)
    for leftover in _leftovers(final, "tmp") + _leftovers(final, "old"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _locked(final: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of `final`'s writers; yields False (without it) when `wait` is off and it is taken."""
    descriptor = os.open(lock_path(final), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def restore_interrupted(final: Path) -> None:
    """For readers that find `final` missing: finish the recovery of a writer killed mid-replacement, unless a
    writer is running now (it recovers itself). Never waits."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return
    with contextlib.suppress(OSError), _locked(final, wait=False) as held:
        if held:
            _recover(final)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2` with RENAME_EXCHANGE); False where the C library,
    kernel or file system cannot, so the caller falls back to two renames. Other failures raise OSError."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    Writers of one `final` take turns on an exclusive lock (`lock_path`) held from start to end, so two concurrent
    writers end with one whole output, the later one's. A folder cannot be renamed over a non-empty one, so an
    existing `final` is swapped with the new one in one step where Linux allows it (`exchange_paths`), so readers
    never find it missing; elsewhere it is first moved aside and deleted only after the new one is in place, and a
    writer killed between those renames leaves the previous output in a retired sibling, which the next writer (or
    `restore_interrupted`) puts back before anything else, and deletes the leftovers of killed writers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final):
        _recover(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(staging, _mode_for(final, 0o777))  # mkdtemp makes it private; the output is an ordinary folder
        try:
            yield staging
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            _raise_naming(error, final)
            raise
        if final.is_dir():
            _keep_modes(staging, final)
            if exchange_paths(staging, final):  # one step: `final` is never missing, the old output sits in staging
                shutil.rmtree(staging, ignore_errors=True)
                return
        retired = None
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rename(final, retired / final.name)
        try:
            os.rename(staging, final)
        except BaseException:
            if retired is not None:
                os.rename(retired / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
