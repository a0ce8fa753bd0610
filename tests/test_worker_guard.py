"""A test that kills its pytest-xdist worker runs once (tests/worker_guard.py), in a real xdist run of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

INNER = textwrap.dedent("""
    import os
    import signal
    from pathlib import Path

    HERE = Path(__file__).parent


    def test_before():
        pass


    def test_that_kills_its_worker():  # as the backstop ends a hung test, or a crash in native code
        with (HERE / "ran.log").open("a") as log:
            log.write(f"{os.getpid()}\\n")
        os.kill(os.getpid(), signal.SIGKILL)


    def test_after():
        (HERE / "after.log").write_text("done")
""")
# Keeps the other worker busy until the dead worker's file has been finished by its replacement: xdist stops with
# "no active workers" when a worker dies while none other is up. Bounded, and passing either way.
OTHER = textwrap.dedent("""
    import time
    from pathlib import Path


    def test_waits_for_the_other_file():
        deadline = time.monotonic() + 60
        while not (Path(__file__).parent / "after.log").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
""")


def _inner_run(tmp_path: Path, *plugins: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "test_other.py").write_text(OTHER)
    loads = [arg for plugin in plugins for arg in ("-p", plugin)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", *loads, "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile", "-q",
               "test_inner.py", "test_other.py"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_test_that_takes_its_worker_down_is_not_run_again_on_the_next(tmp_path):
    done = _inner_run(tmp_path, "worker_guard")
    output = done.stdout + done.stderr
    runs = (tmp_path / "ran.log").read_text().splitlines()
    assert len(runs) == 1, f"the test ran {len(runs)} times:\n{output[-3000:]}"
    assert "this test took down an earlier test worker of this run" in output, output[-3000:]
    assert "3 passed" in output, output[-3000:]  # the file's other tests, and the other file's, still ran
    assert done.returncode == 1, output[-3000:]
    # The rerun removed the dead test's marker, and the last worker the run's folder: nothing is left behind.
    left = [marker for marker in Path(tempfile.gettempdir()).glob("medtransfer-tests-running-*/*")
            if str(tmp_path) in marker.read_text() or "test_that_kills_its_worker" in marker.read_text()]
    assert left == [], left
