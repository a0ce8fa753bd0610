"""The README's `mlflow run` lines, run exactly as printed from a fresh shell (no .venv on PATH), in a tiny project
with the demo profile's stores: every run lands in the profile's experiment, with artifacts under its root."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow(minutes=2)

# What the tiny project can afford; extract, compare, report and main need a whole study (tests/test_study_server.py).
RUN_HERE = ("prepare", "source", "finetune", "search", "similarity")
FRESH_PATH = "/usr/bin:/bin"
_RUN_ID = re.compile(r"Run \(ID '([0-9a-f]+)'\)")


def readme_commands(readme: Path) -> tuple[list[str], dict[str, str]]:
    """The README's code block of `mlflow run` lines: the lines before them (activation), and each line by entry."""
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.DOTALL):
        lines = [line for line in block.splitlines() if line.strip()]
        runs = [line for line in lines if line.startswith("mlflow run ")]
        if any(" -e prepare " in line for line in runs):
            setup = lines[: lines.index(runs[0])]
            by_entry = {}
            for line in runs:
                words = shlex.split(line, comments=True)
                by_entry[words[words.index("-e") + 1] if "-e" in words else "main"] = line
            return setup, by_entry
    raise AssertionError("README.md has no code block of 'mlflow run . -e prepare ...' lines")


def _fresh_env() -> dict[str, str]:
    """A new login's environment: nothing of the venv, MLflow or medtransfer that this test process carries."""
    keep = {key: os.environ[key] for key in ("HOME", "TMPDIR", "LANG") if key in os.environ}
    return {**keep, "PATH": FRESH_PATH, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1"}


def _shell(script: str, cwd: Path, timeout: float = 600, extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env={**_fresh_env(), **(extra or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def readme(repo_root):
    return readme_commands(repo_root / "README.md")


@pytest.fixture(scope="module")
def profile_stores(repo_root):
    return yaml.safe_load((repo_root / "profiles/demo.yaml").read_text())["stores"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, blob_npz, profile_stores):
    """The README's world after `make demo`: the demo profile's stores, its experiment created by medtransfer, the
    project's .venv, a target named fundus_vessels and a random source, and two matrices a.npy and b.npy."""
    root = tmp_path_factory.mktemp("project")
    for name in ("MLproject", "conda.yaml", "dvc.yaml"):
        shutil.copy(repo_root / name, root / name)
    shutil.copytree(repo_root / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests do not run from a virtualenv ({venv}); the README activates .venv")
    (root / ".venv").symlink_to(venv)
    blob_npz(root / "data/raw/fundus_vessels.npz", 0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    np.save(root / "a.npy", a)
    np.save(root / "b.npy", a[:, :4] @ rng.normal(size=(4, 4)) + 0.1 * rng.normal(size=(200, 4)))
    tiny = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 1, "patience": 1, "augment": False, "seed": 0}
    params = {
        "project": {"profile": "demo", "seed": 0},
        "stores": profile_stores,
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "train": tiny,
        # One trial here; the MLproject's old default (4) would have overridden it.
        "search": {"trials": 1, "space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
                   "startup_trials": 1, "pruner_startup_trials": 1, "pruner_warmup_epochs": 1},
        "sources": {"random": {"kind": "random", "arch": "resnet18", "seed": 0}},
        "datasets": {"fundus_vessels": {"format": "medmnist", "path": "data/raw/fundus_vessels.npz",
                                        "classes": ["no_vessel", "vessel"],
                                        "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    create = _shell(". .venv/bin/activate && python -c 'from medtransfer.config import load_config; "
                    "from medtransfer.tracking import ensure_experiment, use_tracking_store; "
                    "config = load_config(); use_tracking_store(config); ensure_experiment(config)'", root)
    assert create.returncode == 0, create.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def client(project, profile_stores):
    uri = profile_stores["tracking_uri"]
    assert uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"), "a store relative to params.yaml"
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / uri[len('sqlite:///'):]}")


@pytest.fixture(scope="module")
def launched(project, readme):
    """Each runnable README line, in the README's order, as a fresh shell runs it: entry -> (run id, output)."""
    setup, by_entry = readme
    assert _shell("command -v mlflow", project).returncode != 0, "the fresh shell must not find mlflow by itself"
    done = {}
    for entry, line in by_entry.items():
        if entry not in RUN_HERE:
            continue
        result = _shell("\n".join([*setup, line]), project, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{line}\n{output[-4000:]}"
        (run_id,) = set(_RUN_ID.findall(output))
        done[entry] = (run_id, output)
    assert set(done) == set(RUN_HERE), f"README lacks lines for {set(RUN_HERE) - set(done)}"
    return done


def test_the_readme_activates_the_environment_and_names_the_experiment(readme, profile_stores):
    setup, by_entry = readme
    assert setup, "a fresh shell has no mlflow: the README must say how to get it"
    for entry, line in by_entry.items():
        words = shlex.split(line, comments=True)
        assert words[words.index("--env-manager") + 1] == "local", entry
        assert words[words.index("--experiment-name") + 1] == profile_stores["experiment"], entry


def test_every_run_lands_in_the_profiles_experiment_with_artifacts_in_its_store(launched, client, project,
                                                                                 profile_stores):
    experiment = client.get_experiment_by_name(profile_stores["experiment"])
    artifact_root = (project / profile_stores["artifact_root"]).resolve().as_uri() + "/"
    for entry, (run_id, _) in launched.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED", entry
        assert run.info.experiment_id == experiment.experiment_id, entry
        assert run.info.artifact_uri.startswith(artifact_root), f"{entry}: {run.info.artifact_uri}"
    every_run = client.search_runs([experiment.experiment_id], max_results=1000)
    assert all(run.info.artifact_uri.startswith(artifact_root) for run in every_run), "trials and fits too"
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id]), "nothing in MLflow's Default"
    assert not (project / "mlruns").exists(), "no artifacts in MLflow's default folder"


def test_similarity_logs_its_measures_and_inputs_on_a_named_run(launched, client):
    run = client.get_run(launched["similarity"][0])
    assert run.info.run_name == "similarity a.npy vs b.npy" and run.data.tags["step"] == "similarity"
    assert set(run.data.metrics) == {"cca", "svcca", "pwcca", "cka", "cka_debiased"}
    assert all(0 < value <= 1 + 1e-9 for value in run.data.metrics.values()), run.data.metrics
    params = run.data.params
    assert (params["n"], params["p"], params["q"]) == ("200", "6", "4")
    assert params["x"].endswith("a.npy") and params["y"].endswith("b.npy")


def test_search_without_trials_runs_the_trials_of_params_yaml(launched, client, project):
    launcher = client.get_run(launched["search"][0])
    study = launcher.data.tags["study"]
    experiment_id = launcher.info.experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.step = 'search' and tags.study = '{study}'")
    trials = client.search_runs([experiment_id], f"tags.step = 'trial' and tags.study = '{study}'")
    wanted = yaml.safe_load((project / "params.yaml").read_text())["search"]["trials"]
    assert parent.data.metrics["complete_trials"] == wanted and len(trials) == wanted


def test_steps_name_and_tag_the_launchers_runs(launched, client):
    for entry, name in (("prepare", "prepare fundus_vessels"), ("source", "source random")):
        run = client.get_run(launched[entry][0])
        assert run.info.run_name == name and run.data.tags["step"] == entry, entry


def test_a_step_launched_into_another_experiment_stops_with_one_line_naming_the_flag(launched, project, readme,
                                                                                     client, profile_stores):
    setup, by_entry = readme
    as_the_issue_ran_it = re.sub(r"\s+--experiment-name\s+\S+", "", by_entry["prepare"])
    result = _shell("\n".join([*setup, as_the_issue_ran_it]), project)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("medtransfer")]
    assert line.startswith("medtransfer prepare: error:")
    assert f"pass --experiment-name {profile_stores['experiment']} to 'mlflow run'" in line
    (run_id,) = set(_RUN_ID.findall(result.stdout + result.stderr))
    assert client.get_run(run_id).info.status == "FAILED"


def test_the_step_itself_exits_2_with_one_line(launched, project, client, profile_stores):
    """What `mlflow run` hands the step, without MLflow around it: the exit code and stderr are the step's own."""
    stray = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    handed = {"MLFLOW_RUN_ID": stray.info.run_id, "MLFLOW_EXPERIMENT_ID": stray.info.experiment_id}
    cases = {
        f"--experiment-name {profile_stores['experiment']}": client.tracking_uri,
        f"export MLFLOW_TRACKING_URI={client.tracking_uri} before": f"sqlite:///{project}/other.db",
    }
    for expected, store in cases.items():
        result = _shell(". .venv/bin/activate && python -m medtransfer prepare --dataset fundus_vessels", project,
                        extra={**handed, "MLFLOW_TRACKING_URI": store})
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("medtransfer prepare: error:") and expected in line, line
