"""A test that takes its pytest-xdist worker down runs once, not once per fresh worker.

When a worker dies mid-test (the backstop ends a test hung in native code, or the test crashes the interpreter),
xdist reports that test as failed and hands the unfinished part of its file, that test included, to a fresh worker:
the test would run again and take that worker down too, up to xdist's restart limit, a hang costing its timeout
each time. So each test leaves a marker while it runs, in a folder shared by the run's workers and named by the
run's id (removed when the test ends, however it ends, short of its process dying); a test that finds its own marker
from an earlier worker fails at setup without running. A serial run needs none of this: nothing is rerun.

Loaded by tests/conftest.py as a plugin (and by `-p worker_guard` with this folder on the path).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

_TOOK_A_WORKER_DOWN = pytest.StashKey[bool]()


def running_marker(config: pytest.Config, nodeid: str) -> Path | None:
    """The marker of ``nodeid`` in this xdist run's shared folder, or None outside an xdist worker."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return None
    folder = Path(tempfile.gettempdir()) / f"medtransfer-tests-running-{workerinput['testrunuid']}"
    return folder / hashlib.sha256(nodeid.encode()).hexdigest()[:32]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    marker = running_marker(item.config, item.nodeid)
    if marker is None:
        yield
        return
    item.stash[_TOOK_A_WORKER_DOWN] = marker.exists()
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(f"{item.nodeid}\npid {os.getpid()}\n")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.stash.get(_TOOK_A_WORKER_DOWN, False):
        pytest.fail("this test took down an earlier test worker of this run (it crashed it, or hung past its timeout "
                    "and the backstop, which printed its stacks then); it is not run again", pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    marker = running_marker(session.config, "")
    if marker is not None:
        try:
            marker.parent.rmdir()  # empty once every test of every worker has ended; a dead test's marker keeps it
        except OSError:
            pass
