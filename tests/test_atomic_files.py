"""Atomic outputs: a failure leaves the previous result whole and no temporary files behind."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys

import pytest

from medtransfer.atomic_files import (
    atomic_directory, atomic_write, atomic_write_text, current_umask, exchange_paths, lock_path, restore_interrupted,
)


from medtransfer.errors import as_user_error


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "out" / "table.csv"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_atomic_directory_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "prepared"
    with atomic_directory(final) as staging:
        (staging / "one").write_text("1")
    with atomic_directory(final) as staging:
        (staging / "two").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["two"]
    assert _beside(final) == ["prepared"]


def test_atomic_directory_failure_keeps_the_old_folder(tmp_path):
    final = tmp_path / "prepared"
    with atomic_directory(final) as staging:
        (staging / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "half").write_text("written")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in final.iterdir()) == ["old"]
    assert _beside(final) == ["prepared"]


# -- a writer killed at any instant, then a reader and a rerun ------------------------------------------------------

# The child writes FILES into `final`, each holding its label, and dies by SIGKILL just before its Nth call that
# changes the folder tree (mkdir, rename, rmdir, unlink): every instant a kill can leave a different state.
_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from medtransfer.atomic_files import atomic_directory

final, label, kill_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]  # "N": the Nth call; "rename:N": the Nth rename
calls = {}

def dying(function, name):
    def wrapper(*args, **kwargs):
        for key in ("", name):
            calls[key] = calls.get(key, 0) + 1
        if kill_at in (str(calls[""]), f"{name}:{calls[name]}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

for name in ("mkdir", "rename", "replace", "rmdir", "unlink"):
    setattr(os, name, dying(getattr(os, name), name))
import medtransfer.atomic_files as atomic_files
if os.environ.get("TEST_NO_EXCHANGE"):  # the fallback of file systems without RENAME_EXCHANGE: two renames
    atomic_files.exchange_paths = lambda first, second: False
atomic_files.exchange_paths = dying(atomic_files.exchange_paths, "exchange")
with atomic_directory(final) as staging:
    for name in sys.argv[4:]:
        (staging / name).write_text(label)
"""
FILES = ("images.npy", "labels.npy", "manifest.json")


def _write_folder(final, label):
    with atomic_directory(final) as staging:
        for name in FILES:
            (staging / name).write_text(label)


def _beside(final):
    """What is in `final`'s folder, less its writers' lock file (kept on purpose: see `lock_path`)."""
    return sorted(p.name for p in final.parent.iterdir() if p != lock_path(final))


def _labels(final):
    assert sorted(p.name for p in final.iterdir()) == sorted(FILES), "the output is not whole"
    return {(final / name).read_text() for name in FILES}


def _run_killed_writer(final, label, kill_at, exchange=True):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **({} if exchange else {"TEST_NO_EXCHANGE": "1"})}
    return subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(final), label, str(kill_at), *FILES],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "first-write"])
def test_a_writer_killed_at_any_instant_leaves_the_old_or_the_new_output_and_a_rerun_cleans_up(tmp_path, previous,
                                                                                                 exchange, exchange_supported):
    if exchange and not exchange_supported:
        pytest.skip("this file system cannot exchange two folders (RENAME_EXCHANGE)")
    outcomes = []
    for kill_at in range(1, 40):
        folder = tmp_path / str(kill_at)
        final = folder / "prepared"
        if previous:
            _write_folder(final, "old")
            # earlier runs of the same writer were killed too: their leftovers must not confuse this one
        result = _run_killed_writer(final, "new", kill_at, exchange)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        if previous and exchange:
            assert final.exists(), "with RENAME_EXCHANGE the output is never missing, whenever the writer dies"
        restore_interrupted(final)  # what a reader (load_prepared) does when the output is missing
        seen = _labels(final) if final.exists() else set()
        assert seen in ({"old"}, {"new"}) if previous else seen in (set(), {"new"})
        outcomes.append(seen)
        _write_folder(final, "rerun")
        assert _labels(final) == {"rerun"}
        assert _beside(final) == [final.name]
    else:
        pytest.fail("the writer never finished: more kill points than expected")
    assert result.returncode == 0 and _labels(final) == {"new"}
    assert len(outcomes) >= 3  # killed at least while staging, between the renames and while deleting the old one
    if previous:
        assert {"old"} in outcomes and {"new"} in outcomes


def test_a_rerun_puts_back_the_output_a_writer_killed_between_the_renames_had_retired(tmp_path):
    final = tmp_path / "prepared"
    _write_folder(final, "old")
    result = _run_killed_writer(final, "new", "rename:2", exchange=False)  # the first moves the old output aside
    assert result.returncode == -signal.SIGKILL
    assert not final.exists(), "the kill did not land between the two renames"
    assert any(p.name.endswith(".old") for p in tmp_path.iterdir()) and any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError), atomic_directory(final):
        assert _labels(final) == {"old"}  # put back before the new write starts
        raise RuntimeError("this writer fails too")
    assert _labels(final) == {"old"}
    assert _beside(final) == [final.name]


# -- two writers at once -------------------------------------------------------------------------------------------

_RACING_WRITER = """
import sys, time
from pathlib import Path
from medtransfer.atomic_files import atomic_directory

final, writer = Path(sys.argv[1]), sys.argv[2]
for round in range(int(sys.argv[3])):
    with atomic_directory(final) as staging:
        for name in sys.argv[4:]:
            (staging / name).write_text(f"{writer}.{round}")
            time.sleep(0.002)  # widens the window in which another writer could interleave
"""


def test_concurrent_writers_end_with_one_whole_output_and_no_temporaries(tmp_path):
    final = tmp_path / "prepared"
    writers = [
        subprocess.Popen([sys.executable, "-c", _RACING_WRITER, str(final), f"w{index}", "15", *FILES],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, stderr=subprocess.PIPE, text=True)
        for index in range(3)
    ]
    errors = [writer.communicate(timeout=300)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0], errors
    assert len(_labels(final)) == 1
    assert _beside(final) == [final.name]


def test_a_second_writer_waits_for_the_first(tmp_path):
    final = tmp_path / "prepared"
    with atomic_directory(final) as staging:
        (staging / "one").write_text("1")
        with open(lock_path(final), "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock_path(final), "rb") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the write


# -- file modes ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_get_the_umask_mode_like_a_plain_open(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    atomic_write_text(tmp_path / "table.csv", "a\n")
    with atomic_directory(tmp_path / "prepared") as staging:
        (staging / "manifest.json").write_text("{}")
    assert current_umask() == umask
    assert _mode(tmp_path / "table.csv") == _mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "prepared") == _mode(tmp_path / "plain") == 0o777 & ~umask
    assert _mode(tmp_path / "prepared" / "manifest.json") == 0o666 & ~umask


def test_a_replaced_file_or_folder_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "params.yaml"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert _mode(target) == 0o640 and target.read_text() == "new"
    folder = tmp_path / "prepared"
    _write_folder(folder, "old")
    folder.chmod(0o750)
    _write_folder(folder, "new")
    assert _mode(folder) == 0o750


def test_files_of_a_replaced_folder_keep_their_modes_under_an_owner_only_umask(tmp_path):
    folder = tmp_path / "reports"
    with atomic_directory(folder) as staging:
        (staging / "report.md").write_text("old")
    (folder / "report.md").chmod(0o644)
    previous = os.umask(0o077)
    try:
        with atomic_directory(folder) as staging:
            (staging / "report.md").write_text("new")
            (staging / "figure.png").write_bytes(b"new")  # no old counterpart: the umask decides
    finally:
        os.umask(previous)
    assert (folder / "report.md").read_text() == "new"
    assert _mode(folder / "report.md") == 0o644
    assert _mode(folder / "figure.png") == 0o600


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name


def test_a_full_disk_names_the_output_it_was_writing(tmp_path):
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "results" / "table.csv", _disk_full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "results" / "table.csv")
    with pytest.raises(OSError) as caught, atomic_directory(tmp_path / "prepared"):
        _disk_full()
    assert caught.value.filename == str(tmp_path / "prepared")
    fault = as_user_error(caught.value)
    assert "no space left on device" in fault.one_line() and str(tmp_path) in fault.one_line()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [".prepared.lock", "results"]
    assert list((tmp_path / "results").iterdir()) == []


def test_numpys_short_write_on_a_full_disk_is_named_as_one(tmp_path):
    """`np.save` into a full file system raises `OSError("611520 requested and 65408 written")`, without errno."""
    def short_write(_stream):
        raise OSError("611520 requested and 65408 written")

    with pytest.raises(OSError) as caught, atomic_directory(tmp_path / "prepared"):
        short_write(None)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "prepared")
    line = as_user_error(caught.value).one_line()
    assert "no space left on device" in line.lower() and "611520 requested and 65408 written" in line, line
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "table.csv", short_write)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "table.csv")
    with pytest.raises(OSError) as caught, atomic_directory(tmp_path / "other"):
        raise OSError("some other failure")  # not a short write: left as it was
    assert caught.value.errno is None


def test_exchange_swaps_two_folders_and_names_a_missing_one(tmp_path, exchange_supported):
    if not exchange_supported:
        pytest.skip("this file system cannot exchange two folders (RENAME_EXCHANGE)")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from_a").write_text("a")
    (tmp_path / "b").mkdir()
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"] and not list((tmp_path / "a").iterdir())
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")
