"""A killed study: its stages stop on their own, and the next study closes its run (real processes, a real store)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import mlflow

from medtransfer.study_guard import close_stale_study_runs, is_alive, process_identity


def _dead_identity() -> str:
    """The identity of a process that ran and is gone."""
    child = subprocess.Popen(["sleep", "60"])
    identity = process_identity(child.pid)
    child.kill()
    child.wait()
    assert identity is not None
    return identity


def test_a_process_identity_tells_a_live_process_from_a_gone_one_and_from_a_reused_pid():
    mine = process_identity()
    assert mine is not None and is_alive(mine)
    assert not is_alive(_dead_identity())
    pid, start = mine.split(":")
    assert not is_alive(f"{pid}:{int(start) + 1}"), "the same pid started at another time is another process"


def test_a_stage_stops_with_one_line_once_its_study_is_gone(tmp_path):
    study = subprocess.Popen(["sleep", "120"])  # stands in for `medtransfer study`
    identity = process_identity(study.pid)
    stage = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from medtransfer.study_guard import watch_study
        watch_study("extract", {identity!r})
        print("ready", flush=True)
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        sys.exit(0)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stage.stdout.readline().strip() == "ready"
        study.kill()  # kill -9
        study.wait()
        stdout, stderr = stage.communicate(timeout=60)
    finally:
        study.kill()
        stage.kill()
    assert stage.returncode == 130
    # Interrupted inside its blocking sleep, not ended by the watcher's last resort (os._exit after a grace period)
    assert stdout.strip() == "interrupted", "the interrupt must end a blocking call"
    assert stderr.strip() == (f"medtransfer extract: the study that started this step (process {study.pid}) is gone; "
                              "stopping")


def test_the_next_study_closes_a_killed_studys_run_and_its_running_children(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    host = socket.gethostname()

    def run(step, identity=None, on_host=host, parent=None):
        tags = {"step": step, "host": on_host, **({"process": identity} if identity else {}),
                **({"mlflow.parentRunId": parent} if parent else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    killed = run("study", _dead_identity())
    stage, finished_stage = run("extract", parent=killed), run("compare", parent=killed)
    client.set_terminated(finished_stage, "FINISHED")
    alive = run("study", process_identity())  # a study still running here
    elsewhere = run("study", _dead_identity(), on_host=f"not-{host}")  # cannot be checked from this host
    older = run("study")  # recorded no identity
    assert close_stale_study_runs(client, experiment, "study") == [killed]
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, stage, finished_stage, alive,
                                                                         elsewhere, older)}
    assert status == {killed: "KILLED", stage: "KILLED", finished_stage: "FINISHED", alive: "RUNNING",
                      elsewhere: "RUNNING", older: "RUNNING"}
    assert "was gone" in client.get_run(killed).data.tags["closed_because"]
    assert close_stale_study_runs(client, experiment, "study") == [], "closed once"
