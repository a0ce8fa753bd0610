"""A killed `medtransfer study` leaves nothing running and nothing open.

`kill -9` gives the study no chance to clean up, so both sides are handled by the processes that outlive it:

- **Its stages stop.** The study hands every stage its process identity (`STUDY_PROCESS_ENV`: pid and the kernel's
  start time of that pid, so a reused pid is not mistaken for it). `watch_study` runs in each stage: once that
  process is gone, the stage is interrupted like Ctrl-C (its MLflow runs end as KILLED, its outputs stay as they
  were: they are written atomically) and exits 130 with one line. `dvc repro` itself gets SIGTERM from the kernel
  when the study dies (`parent_death_signal`).
- **Its run is closed.** The study's run records the same identity (`HOST_TAG`, `PROCESS_TAG`); the next `study`
  on the same host finds runs of its experiment still RUNNING whose process is gone, ends them and their RUNNING
  children as KILLED, and says so (`close_stale_study_runs`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
import _thread
from pathlib import Path

STUDY_PROCESS_ENV = "MEDTRANSFER_STUDY_PROCESS"
HOST_TAG = "host"
PROCESS_TAG = "process"
#: How often a stage looks for its study, and how long it waits for the interrupted main thread before exiting.
POLL_SECONDS = 2.0
EXIT_GRACE_SECONDS = 30.0
#: The signal a stage's watcher sends its main thread, whose handler raises KeyboardInterrupt there: a real signal
#: ends a blocking call (a sleep, a lock or process wait) at once, where `_thread.interrupt_main` is only seen after
#: that call returns, and it works whatever SIGINT's disposition (a study started in the background ignores SIGINT).
STOP_SIGNAL = getattr(signal, "SIGUSR2", None)  # None where the platform has none (Windows)


def process_identity(pid: int | None = None) -> str | None:
    """``"<pid>:<start time>"`` of a live process (start time in clock ticks since boot, from /proc), or None when
    there is no such process or no /proc."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: fields after its closing ')' are plain.
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{pid}:{fields[19]}" if len(fields) > 19 else None


def is_alive(identity: str) -> bool:
    """Whether the process ``identity`` names (`process_identity`) still runs (a reused pid does not count)."""
    pid = int(identity.split(":", 1)[0])
    return process_identity(pid) == identity


def watch_study(command: str, identity: str | None = None) -> threading.Thread | None:
    """In a stage started by a study: a daemon thread that interrupts this process once the study is gone. Returns
    the thread, or None outside a study (or when the study's identity cannot be read)."""
    identity = identity or os.environ.get(STUDY_PROCESS_ENV)
    if not identity or not _has_proc():
        return None
    # Signal handlers can only be set on the main thread; elsewhere the watcher falls back to interrupt_main.
    use_signal = STOP_SIGNAL is not None and threading.current_thread() is threading.main_thread()
    if use_signal:
        signal.signal(STOP_SIGNAL, _raise_interrupt)
    main_thread = threading.main_thread().ident

    def watch() -> None:
        while is_alive(identity):
            time.sleep(POLL_SECONDS)
        try:  # the study read this stage's output: its pipe may be gone with it (EPIPE), which must not stop the stop
            print(f"medtransfer {command}: the study that started this step (process {identity.split(':')[0]}) is "
                  "gone; stopping", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        # KeyboardInterrupt in the main thread: runs end KILLED, the CLI exits 130
        if use_signal:
            signal.pthread_kill(main_thread, STOP_SIGNAL)
        else:
            _thread.interrupt_main()
        time.sleep(EXIT_GRACE_SECONDS)  # a main thread stuck in native code (or blocking the signal) never sees it
        os._exit(130)

    thread = threading.Thread(target=watch, name="study-watch", daemon=True)
    thread.start()
    return thread


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def parent_death_signal() -> None:
    """`preexec_fn` of the study's `dvc repro`: the kernel sends it SIGTERM when the study dies (Linux; a no-op
    elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def close_stale_study_runs(client, experiment_id: str, step: str) -> list[str]:
    """End as KILLED the runs tagged ``step`` in the experiment that are still RUNNING although the process that
    ran them (on this host) is gone, and their RUNNING children; returns the closed study runs' ids."""
    host = socket.gethostname()
    running = client.search_runs([experiment_id], filter_string=f"tags.step = '{step}' and attributes.status = "
                                 "'RUNNING'", max_results=1000)
    closed = []
    for run in running:
        identity = run.data.tags.get(PROCESS_TAG)
        if run.data.tags.get(HOST_TAG) != host or not identity or is_alive(identity):
            continue  # another host's (cannot tell), an older run without identity, or one still running
        children = client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'"))
        for child in children:
            client.set_terminated(child.info.run_id, "KILLED")
        client.set_tag(run.info.run_id, "closed_because", f"its process {identity.split(':')[0]} on {host} was gone")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def _has_proc() -> bool:
    return Path("/proc/self/stat").is_file()
