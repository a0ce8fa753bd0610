"""The environment `medtransfer study` gives the DVC stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from medtransfer.pipeline import stage_environment


def test_the_stages_find_this_interpreters_medtransfer_from_a_plain_shell():
    """`.venv/bin/medtransfer study` from a shell whose PATH lacks the venv: the stages still call ours."""
    plain_shell = {"PATH": "/usr/bin:/bin", "MLFLOW_RUN_ID": "launcher", "HOME": "/root"}
    env = stage_environment(plain_shell, "run-1", "sqlite:///x.db")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["MEDTRANSFER_STUDY_RUN_ID"] == "run-1" and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert "MLFLOW_RUN_ID" not in env and env["HOME"] == "/root"
    found = subprocess.run(["sh", "-c", "command -v medtransfer"], env=env, capture_output=True, text=True, timeout=30)
    assert Path(found.stdout.strip()).parent == Path(sys.executable).parent


def test_an_empty_path_gets_the_bin_folder_alone():
    assert stage_environment({}, "r", "u")["PATH"] == str(Path(sys.executable).parent)


def test_an_up_to_date_study_names_the_run_it_kept_or_the_launchers():
    from medtransfer.pipeline import PipelineOutcome

    own = PipelineOutcome("a" * 32, [], ["prepare", "report"], None).describe()
    assert own == f"study: every step was up to date (2 stages), nothing logged; the study's last MLflow run is {'a' * 32}"
    launched = PipelineOutcome("b" * 32, [], ["prepare", "report"], None, launched=True).describe()
    assert launched == (f"study: every step was up to date (2 stages); only 'mlflow run' logged a run, {'b' * 32}, "
                        "which records that")
    assert PipelineOutcome(None, [], ["prepare"], None).describe().endswith("no MLflow run was kept")
