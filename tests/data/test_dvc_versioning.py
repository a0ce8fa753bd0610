"""DVC versions prepared data: a second repro runs nothing; push to a local remote, wipe, pull, bit-equal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN_DIR = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MEDTRANSFER_PARAMS", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def dvc_project(tmp_path, repo_root, medmnist_npz):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo_root / name, project / name)
    shutil.copytree(repo_root / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    medmnist_npz(project / "data/raw/d.npz", sizes=(40, 10, 10))
    params = {
        "project": {"profile": "test", "seed": 0, "description": ""},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "sources": {},  # dvc.yaml's foreach and matrix need the keys, even empty
        "study": {"targets": [], "sources": [], "regimes": ["full"], "protocol": "search"},
        "datasets": {"d": {"format": "medmnist", "path": "data/raw/d.npz", "classes": ["a", "b"],
                           "split": {"scheme": "stratified_kfold", "folds": 3}}},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run("git", "init", "-q", cwd=project)
    _run(str(BIN_DIR / "dvc"), "init", "-q", cwd=project)
    return project


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_repro_push_wipe_pull_restores_identical_bytes(dvc_project, tmp_path):
    dvc = str(BIN_DIR / "dvc")
    _run(dvc, "repro", "prepare@d", cwd=dvc_project)
    prepared = dvc_project / "data/prepared/d"
    original = _snapshot(prepared)
    mtimes = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}

    second = _run(dvc, "repro", "prepare@d", cwd=dvc_project)
    assert "didn't change, skipping" in second or "up to date" in second, second
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == mtimes, "nothing was rewritten"

    remote = tmp_path / "remote"
    _run(dvc, "remote", "add", "-d", "local", str(remote), cwd=dvc_project)
    _run(dvc, "push", "prepare@d", cwd=dvc_project)
    shutil.rmtree(dvc_project / ".dvc/cache")
    shutil.rmtree(prepared)
    _run(dvc, "pull", "prepare@d", cwd=dvc_project)
    assert _snapshot(prepared) == original


def test_changing_the_dataset_params_reruns_prepare(dvc_project):
    dvc = str(BIN_DIR / "dvc")
    _run(dvc, "repro", "prepare@d", cwd=dvc_project)
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["datasets"]["d"]["split"]["folds"] = 4
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = _run(dvc, "repro", "prepare@d", cwd=dvc_project)
    assert "Running stage 'prepare@d'" in output
    import json

    assert json.loads((dvc_project / "data/prepared/d/manifest.json").read_text())["split"]["folds"] == 4
