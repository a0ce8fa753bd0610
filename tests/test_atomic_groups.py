"""Several output folders replaced as one unit (`atomic_directories`, compare's tables and curves): a writer killed
at any instant leaves every output old or every output new once a reader or the next writer has run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from medtransfer.atomic_files import atomic_directories, restore_interrupted

# The child writes FILES into both outputs, each file holding its label, and dies by SIGKILL just before its Nth
# call that changes the folder tree (as tests/test_atomic_files.py's single-folder writer): every instant a kill
# can leave a different state, the journals' writing and renaming included.
_KILLED_GROUP_WRITER = """
import os, signal, sys
from pathlib import Path
from medtransfer.atomic_files import atomic_directories

first, second, label, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
calls = {"n": 0}

def dying(function):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

for name in ("mkdir", "rename", "replace", "rmdir", "unlink"):
    setattr(os, name, dying(getattr(os, name)))
import medtransfer.atomic_files as atomic_files
if os.environ.get("TEST_NO_EXCHANGE"):  # file systems without RENAME_EXCHANGE: two renames per output
    atomic_files.exchange_paths = lambda first, second: False
atomic_files.exchange_paths = dying(atomic_files.exchange_paths)
with atomic_directories(first, second) as stagings:
    for staging in stagings:
        for name in sys.argv[5:]:
            (staging / name).write_text(label)
"""
FILES = ("similarity.csv", "gain.csv", "layers_cca.png")


def _write_group(outputs, label):
    with atomic_directories(*outputs) as stagings:
        for staging in stagings:
            for name in FILES:
                (staging / name).write_text(label)


def _state(output):
    """The one label every file of `output` holds, or None when the output is missing (a torn output fails)."""
    if not output.exists():
        return None
    assert sorted(p.name for p in output.iterdir()) == sorted(FILES), f"{output} is not whole"
    labels = {(output / name).read_text() for name in FILES}
    assert len(labels) == 1, f"{output} mixes writes: {labels}"
    return labels.pop()


def _beside(output):
    """What lies beside `output` other than the output and its writers' lock file (kept on purpose)."""
    return sorted(p.name for p in output.parent.iterdir() if p.name not in (output.name, f".{output.name}.lock"))


@pytest.mark.parametrize("reader", [0, 1], ids=["reader-of-tables", "reader-of-curves"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "first-write"])
def test_a_group_writer_killed_at_any_instant_leaves_all_old_or_all_new(tmp_path, previous, exchange, reader,
                                                                       exchange_supported):
    if exchange and not exchange_supported:
        pytest.skip("this file system cannot exchange two folders (RENAME_EXCHANGE)")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **({} if exchange else {"TEST_NO_EXCHANGE": "1"})}
    seen = []
    for kill_at in range(1, 80):
        # compare's layout: two outputs of the same name in two folders
        outputs = [tmp_path / str(kill_at) / "results" / kind / "target" for kind in ("analysis", "curves")]
        if previous:
            _write_group(outputs, "old")
        result = subprocess.run([sys.executable, "-c", _KILLED_GROUP_WRITER, *map(str, outputs), "new", str(kill_at),
                                 *FILES], env=env, capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        if previous and exchange:
            assert all(output.exists() for output in outputs), "with RENAME_EXCHANGE no output is ever missing"
        restore_interrupted(outputs[reader])  # what summary and report do before reading the tables
        states = [_state(output) for output in outputs]
        assert states[0] == states[1], f"killed at call {kill_at}: one output {states[0]}, the other {states[1]}"
        assert states[0] in (("old", "new") if previous else (None, "new"))
        seen.append(states[0])
        _write_group(outputs, "rerun")  # the next writer finds nothing to confuse it and leaves nothing behind
        assert [_state(output) for output in outputs] == ["rerun", "rerun"]
        assert [_beside(output) for output in outputs] == [[], []]
    else:
        pytest.fail("the writer never finished: more kill points than expected")
    assert [_state(output) for output in outputs] == ["new", "new"]
    # Killed while staging (the old outputs stay) and after the first output was replaced (rolled forward).
    assert (None if not previous else "old") in seen and "new" in seen


def test_a_reader_leaves_a_group_alone_while_a_writer_holds_one_of_its_outputs(tmp_path):
    outputs = [tmp_path / kind / "target" for kind in ("analysis", "curves")]
    _write_group(outputs, "old")
    killed = subprocess.run([sys.executable, "-c", _KILLED_GROUP_WRITER, *map(str, outputs), "new", "-1", *FILES],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == 0  # kill point -1: never killed; the group is replaced
    assert [_state(output) for output in outputs] == ["new", "new"]
    with atomic_directories(outputs[1]) as (staging,):
        (staging / "x").write_text("held")
        restore_interrupted(outputs[0])  # the curves' lock is held by this writer: the reader must not wait or touch
        assert _state(outputs[0]) == "new"


def test_the_same_output_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="named twice"), atomic_directories(tmp_path / "a", tmp_path / "b" / ".." / "a"):
        pass
