"""The project's promises about itself: one requirement list, entry points that exist, two make targets."""

from __future__ import annotations

import re
import tomllib

import yaml

from medtransfer.cli import build_parser


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_conda_pip_section_matches_pyproject(repo_root):
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    conda = yaml.safe_load((repo_root / "conda.yaml").read_text())
    pip_sections = [item["pip"] for item in conda["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(pip_sections) == 1
    assert not [line for line in pip_sections[0] if line.startswith("-")], "checkouts share the env: no project in it"
    from_conda = {_normalise(line) for line in pip_sections[0]}
    assert from_conda == {_normalise(line) for line in pyproject["project"]["dependencies"]}


def test_torch_pins_admit_a_working_pair(repo_root):
    dependencies = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.14,<2.15" in dependencies and "torchvision>=0.29,<0.30" in dependencies


def test_every_mlproject_entry_point_calls_an_existing_subcommand(repo_root):
    mlproject = yaml.safe_load((repo_root / "MLproject").read_text())
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    prefix = "PYTHONPATH=src:$PYTHONPATH python -m medtransfer "  # the checkout's own code, whatever the env holds
    for name, entry in mlproject["entry_points"].items():
        command = entry["command"]
        assert command.startswith(prefix), name
        assert command[len(prefix):].split()[0] in subcommands, name
        for parameter in entry.get("parameters", {}):
            assert "{" + parameter + "}" in command, f"{name} ignores parameter {parameter}"


def test_dvc_stages_have_matching_entry_points(repo_root):
    stages = set(yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"])
    entry_points = set(yaml.safe_load((repo_root / "MLproject").read_text())["entry_points"])
    assert stages <= entry_points


def test_readme_shows_both_commands_and_ci_runs_them(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (repo_root / ".ci/run").read_text()
    assert "make test" in ci and "make demo" in ci
    for variable in ("DVC_NO_ANALYTICS=1", "HF_HUB_OFFLINE=1", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert variable in ci
    makefile = (repo_root / "Makefile").read_text()
    assert "-rs" in makefile and "--durations=25" in makefile
