"""Bounded waits on the processes tests start: a process out of time prints its Python stacks, then dies with its
whole group, and its output is never waited for without a bound. tests/conftest.py loads it and hands it out (the
`process_waits`, `cli` and `cli_without_root_file_access` fixtures).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

STACK_DUMP_SECONDS = 15  # for a process group sent SIGABRT to print its stacks and die
DRAIN_SECONDS = 30  # for the pipes of a killed process group to close


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def kill_process_group(process: subprocess.Popen, signum: int = signal.SIGKILL,
                       drain_seconds: float = DRAIN_SECONDS) -> str:
    """Send `signum` to the process group of `process` (started with start_new_session=True) and return all its output
    (stdout, then stderr), bounded: a descendant that left the group can hold a pipe open forever, so after
    `drain_seconds` the pipes are closed and the process itself is waited for as long again."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
        if signum != signal.SIGKILL:
            os.killpg(process.pid, signal.SIGCONT)  # a stopped process takes no other signal until continued
    try:
        out, err = process.communicate(timeout=drain_seconds)
    except subprocess.TimeoutExpired as held:
        out, err = held.output, held.stderr
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL never takes that long; the caller sends it
            process.wait(timeout=drain_seconds)
    return _text(out) + _text(err)


def finish_process(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait at most `timeout` for `process` (started with start_new_session=True, output piped) and return its stdout
    and stderr. Past `timeout` its process group gets SIGABRT, so that its Python processes print their stacks
    (PYTHONFAULTHANDLER), then SIGKILL; everything they printed, stacks last, goes to this test's captured stderr
    (shown with the failure) and TimeoutExpired is raised. Any other way out of the wait (the test's own timeout)
    kills the group as well: no child outlives a failed test."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = kill_process_group(process, signal.SIGABRT, drain_seconds=STACK_DUMP_SECONDS)
        output = kill_process_group(process) or output
        sys.stderr.write(f"{process.args} ran out of its {timeout:g} s; what it printed, its stacks last:\n{output}\n")
        raise subprocess.TimeoutExpired(process.args, timeout, output=output) from None
    except BaseException:
        kill_process_group(process)
        raise
    return _text(out), _text(err)


def run_bounded(command: list[str], cwd: Path | None, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout)`, except that a command out of time
    prints its stacks first (`finish_process`); TimeoutExpired is raised as before."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    out, err = finish_process(process, timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)
