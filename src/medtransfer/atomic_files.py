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
import json
import re
import secrets
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


# NumPy's `tofile` (behind `np.save`) reports a full disk as a short write, with no errno at all.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _raise_naming(error: BaseException, path: Path) -> None:
    """Raise `error` again with `path` as its file name when it is a nameless out-of-space error (or NumPy's short
    write, which a full disk causes: raised as ENOSPC with its own words); else return."""
    if isinstance(error, OSError) and error.errno in _NAMELESS_SPACE_ERRORS and not error.filename:
        raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
    if isinstance(error, OSError) and error.errno is None and _SHORT_WRITE.fullmatch(str(error).strip()):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a write stopped short: {error})",
                      str(path)) from error


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


def _recover(final: Path, held: frozenset[Path] = frozenset()) -> None:
    """Undo what a killed writer left, under the lock (so no live writer owns any of it): finish the replacement of a
    group of folders whose commit had begun (`atomic_directories`), put a retired output back when `final` is
    missing, then delete every staging (`.tmp`) and retired (`.old`) folder of `final`.

    A retired folder holds the previous output, moved there whole by one rename; the new output replaces it by the
    next rename, so `final` is missing only when a writer died between the two, and the retired copy is whole then.
    ``held``: the outputs whose locks this process already holds (a group writer holds all of its own).
    """
    if not _settle_journals(final, held | {final}):
        return  # a writer of another folder of the group is running: it finishes the group, and cleans up after
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
    """For readers: finish the recovery of a writer killed mid-replacement (`final` missing, or the group it belongs
    to half replaced), unless a writer is running now (it recovers itself). Never waits."""
    final = Path(final)
    if not final.parent.is_dir() or (final.exists() and not _journals(final)):
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

    One output is the one-member case of `atomic_directories`.
    """
    with atomic_directories(final) as (staging,):
        yield staging


def _new_staging(final: Path) -> Path:
    """An empty temporary sibling of `final`, with the mode a plain `mkdir` (or the existing `final`) would have."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(staging, _mode_for(final, 0o777))  # mkdtemp makes it private; the output is an ordinary folder
    return staging


def _move_into_place(staging: Path, final: Path) -> None:
    """Replace `final` (if any) by `staging` with two renames, the old output retired meanwhile (deleted after)."""
    retired = None
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rename(final, retired / final.name)
    try:
        os.rename(staging, final)
    except BaseException:
        if retired is not None:
            os.rename(retired / final.name, final)
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


# -- several folders replaced as one unit ----------------------------------------------------------------------------
#
# A stage with two outputs (compare: its tables and its plot curves) must never leave one new beside the other old.
# The group writer stages every folder, then writes a journal beside each output naming every (staging, output)
# pair and the staging's inode, and only then replaces the outputs one by one. A writer killed after the journals
# were written leaves a commit that any later writer or reader of any output of the group finishes (rolls forward:
# an output whose inode is its staging's is done, the others are replaced by their staging, whole since before the
# journal). Killed before the journals were complete, no output had been replaced: the stagings are leftovers.

_JOURNAL_SUFFIX = "commit"


def _journals(final: Path) -> list[Path]:
    """The commit journals beside `final` (a group writer's, see `atomic_directories`)."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[0-9a-f]{{8}}\.{_JOURNAL_SUFFIX}(-new)?")
    with contextlib.suppress(FileNotFoundError):
        return sorted(entry for entry in final.parent.iterdir() if pattern.fullmatch(entry.name) and entry.is_file())
    return []


def _canonical(path: Path) -> Path:
    """`path` with its folder's symbolic links resolved: the name a journal records and compares."""
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


def _journal_path(final: Path, token: str) -> Path:
    return final.parent / f".{final.name}.{token}.{_JOURNAL_SUFFIX}"


def _inode(path: Path) -> list[int] | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return [info.st_dev, info.st_ino]


def _write_journals(pairs: list[tuple[Path, Path]]) -> list[Path]:
    """One journal beside each output, every one naming the whole group; each written whole, then renamed."""
    token = secrets.token_hex(4)
    entries = [{"final": str(_canonical(final)), "staging": str(_canonical(staging)), "inode": _inode(staging)}
               for staging, final in pairs]
    text = json.dumps({"token": token, "entries": entries})
    journals = []
    for _, final in pairs:
        journal = _journal_path(final, token)
        unfinished = journal.with_name(f"{journal.name}-new")
        with open(unfinished, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.rename(unfinished, journal)
        journals.append(journal)
    return journals


def _settle_journals(final: Path, held: frozenset[Path]) -> bool:
    """Finish (or drop) the group commits whose journals lie beside `final`; False when one must wait for a live
    writer of another output of its group (whose lock this process cannot take)."""
    for journal in _journals(final):
        if journal.name.endswith("-new"):  # died while writing the journals: no output was replaced yet
            journal.unlink(missing_ok=True)
            continue
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            entries = [(Path(e["staging"]), Path(e["final"]), e["inode"]) for e in record["entries"]]
        except (OSError, ValueError, KeyError, TypeError):
            journal.unlink(missing_ok=True)  # not ours, or unreadable: nothing can be rolled forward from it
            continue
        others = sorted({output for _, output, _ in entries} - {_canonical(path) for path in held}, key=str)
        with contextlib.ExitStack() as stack:
            if not all(stack.enter_context(_locked(other, wait=False)) for other in others if other.parent.is_dir()):
                return False
            _roll_forward(entries)
            for staging, output, _ in entries:  # what is left: previous outputs, or a group that never began
                shutil.rmtree(staging, ignore_errors=True)
                done = _journal_path(output, str(record.get("token", "")))
                done.unlink(missing_ok=True)
                done.with_name(f"{done.name}-new").unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
    return True


def _roll_forward(entries: list[tuple[Path, Path, list[int]]]) -> None:
    """Put every staging of a committed group in place, unless the group was never complete (then change nothing)."""
    pending = [(staging, output) for staging, output, inode in entries if _inode(output) != inode]
    if any(_inode(staging) != inode for staging, output, inode in entries if (staging, output) in pending):
        return  # a staging is gone although its output is not the new one: the commit never began
    for staging, output in pending:
        if not (output.is_dir() and exchange_paths(staging, output)):
            _move_into_place(staging, output)


@contextlib.contextmanager
def atomic_directories(*finals: Path) -> Iterator[list[Path]]:
    """`atomic_directory` for several folders that must change together: yields one empty staging folder per output;
    on success every output is replaced, and a writer killed at any instant leaves all old or all new outputs once
    the next writer, or a reader through `restore_interrupted`, has run (see the journal note above)."""
    named = [Path(final) for final in finals]  # as the caller named them: errors name these
    for final in named:
        final.parent.mkdir(parents=True, exist_ok=True)
    finals = [_canonical(Path(os.path.abspath(final))) for final in named]
    if len(set(finals)) != len(finals):
        raise ValueError(f"an output is named twice: {finals}")
    held = frozenset(finals)
    with contextlib.ExitStack() as stack:
        for final in sorted(finals, key=str):  # one order for every writer: no two wait on each other
            stack.enter_context(_locked(final))
        for final in finals:
            _recover(final, held)
        stagings = []
        try:
            stagings.extend(_new_staging(final) for final in finals)
            yield list(stagings)
        except BaseException as error:
            for staging in stagings:
                shutil.rmtree(staging, ignore_errors=True)
            _raise_naming(error, named[0])
            raise
        for staging, final in zip(stagings, finals):
            if final.is_dir():
                _keep_modes(staging, final)
        # One output is replaced in one step (or two renames a rerun undoes); several need their journals first.
        journals = _write_journals(list(zip(stagings, finals))) if len(finals) > 1 else []
        try:
            _roll_forward([(staging, final, _inode(staging)) for staging, final in zip(stagings, finals)])
        except BaseException:
            if not journals:  # nothing will roll this one forward: its staging is a leftover now
                shutil.rmtree(stagings[0], ignore_errors=True)
            raise
        for journal in journals:
            journal.unlink()
        for staging in stagings:  # after an exchange, a staging holds the previous output
            shutil.rmtree(staging, ignore_errors=True)
