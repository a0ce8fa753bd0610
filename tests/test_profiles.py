"""Profiles: `profile use` validates a profile and makes it the active params.yaml."""

from __future__ import annotations

import shutil

import pytest

from medtransfer.config import load_config
from medtransfer.errors import ConfigError
from medtransfer.profiles import activate_profile, active_profile, available_profiles, render_active_params


@pytest.fixture
def repo_copy(repo_root, tmp_path):
    shutil.copytree(repo_root / "profiles", tmp_path / "profiles")
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_default_params_is_the_demo_profile(repo_root):
    assert active_profile(repo_root) == "demo"


def test_switching_profiles_changes_the_active_params(repo_copy):
    assert {"demo", "medmnist"} <= set(available_profiles(repo_copy))
    activate_profile(repo_copy, "medmnist")
    config = load_config(repo_copy / "params.yaml")
    assert config.project.profile == "medmnist"
    assert set(config.datasets) == {"breastmnist", "pneumoniamnist", "dermamnist"}
    assert config.dataset("breastmnist").path == "data/raw/medmnist/breastmnist.npz"
    assert active_profile(repo_copy) == "medmnist"
    activate_profile(repo_copy, "demo")
    assert load_config(repo_copy / "params.yaml").project.profile == "demo"


def test_hand_edited_params_is_reported_as_no_profile(repo_copy):
    params = repo_copy / "params.yaml"
    params.write_text(params.read_text() + "\n# a local tweak\n")
    assert active_profile(repo_copy) is None


def test_unknown_and_invalid_profiles_leave_params_untouched(repo_copy):
    before = (repo_copy / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*demo"):
        activate_profile(repo_copy, "nope")
    (repo_copy / "profiles" / "broken.yaml").write_text("project: {profile: broken}\ndatasets: {x: {format: tiff}}\n")
    with pytest.raises(ConfigError, match="datasets.x.format"):
        activate_profile(repo_copy, "broken")
    assert (repo_copy / "params.yaml").read_text() == before


def test_render_keeps_the_profile_text(repo_root):
    text = (repo_root / "profiles" / "demo.yaml").read_text()
    assert render_active_params("demo", text).endswith(text)


def test_profile_command(cli, repo_copy):
    result = cli("profile", "use", "medmnist", cwd=repo_copy)
    assert result.returncode == 0, result.stderr
    listing = cli("profile", "list", cwd=repo_copy)
    assert "* medmnist" in listing.stdout and "  demo" in listing.stdout
