"""No test waits without a bound, and the slow files start first. Loaded by tests/conftest.py as a plugin.

pytest-timeout fails a test that runs past its timeout (pyproject.toml: a default, method "signal": the test fails
with the traceback of the line it hung on, other threads' stacks are printed, and the session goes on). A test
marked `slow(minutes=N)` gets SECONDS_PER_SLOW_MINUTE per minute of its estimate when that exceeds the default:
a loaded 2-core CI machine takes up to three times the quiet time. A hang that the signal cannot break (a C call
that never returns to Python, SIGALRM blocked) meets the backstop BACKSTOP_SECONDS later: faulthandler prints every
thread's stack and ends the process. Under xdist the dead worker's unfinished file goes to a fresh worker, the hung
test included; tests/worker_guard.py fails that test at setup there instead of running it again.
"""

from __future__ import annotations

import faulthandler
import os

import pytest

SECONDS_PER_SLOW_MINUTE = 5 * 60
BACKSTOP_SECONDS = 120
_ORIGINAL_STDERR = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    # The terminal's stderr, taken while output capture is suspended: the backstop's stack dump must outlive the
    # process that the capture files die with.
    config.stash[_ORIGINAL_STDERR] = os.dup(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test files marked `slow` run first, longest first (`pytest.mark.slow(minutes=...)`, a rough serial estimate),
    so that under `make test`'s parallel workers (`--dist loadfile` hands out files in collection order) the quick
    files fill the gaps instead of one long file starting last. The order inside each file is kept."""
    minutes: dict = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            minutes[item.path] = max(minutes.get(item.path, 0), marker.kwargs.get("minutes", 1))
    items.sort(key=lambda item: -minutes.get(item.path, 0))
    _size_the_timeouts(config, items)


def _default_timeout(config: pytest.Config) -> float:
    """pytest-timeout's default per-test timeout: --timeout, else $PYTEST_TIMEOUT, else pyproject.toml; 0 is none."""
    for value in (config.getoption("timeout", None), os.environ.get("PYTEST_TIMEOUT"), config.getini("timeout")):
        if value not in (None, ""):
            return float(value)
    return 0.0


def _size_the_timeouts(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A timeout marker on every `slow(minutes=N)` test without its own: the default or N minutes times
    SECONDS_PER_SLOW_MINUTE, whichever is longer. Nothing when timeouts are off (--timeout=0, for a debugger)."""
    default = _default_timeout(config)
    if default <= 0:
        return
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(default, SECONDS_PER_SLOW_MINUTE * slow.kwargs.get("minutes", 1))))


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is None:
        return _default_timeout(item.config)
    return float(marker.kwargs.get("timeout", marker.args[0] if marker.args else 0) or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """The backstop: BACKSTOP_SECONDS after the test's own timeout, dump every thread's stack and exit."""
    seconds = _timeout_of(item)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds + BACKSTOP_SECONDS, exit=True,
                                          file=item.config.stash[_ORIGINAL_STDERR])
    try:
        yield
    finally:
        if seconds > 0:
            faulthandler.cancel_dump_traceback_later()
