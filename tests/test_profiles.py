"""Profiles: `profile use` validates a profile and makes it the active params.yaml."""

from __future__ import annotations

import shutil

import pytest

from medtransfer.config import load_config
from medtransfer.errors import ConfigError
from medtransfer.profiles import (
    activate_profile,
    active_profile,
    available_profiles,
    edited_keys,
    render_active_params,
)


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
    # MedMNIST+'s larger files at the paper's sizes: stage 4 keeps 7x7 (224 px) or 4x4 (112 px) positions.
    assert config.dataset("breastmnist").path == "data/raw/medmnist/breastmnist_224.npz"
    assert config.dataset("breastmnist").image_size is None
    for name in ("pneumoniamnist", "dermamnist"):
        assert config.dataset(name).path == f"data/raw/medmnist/{name}_128.npz"
        assert config.dataset(name).image_size == 112
    assert (config.analysis.channel_sample, config.analysis.channel_repeats) == (64, 5)
    assert active_profile(repo_copy) == "medmnist"
    activate_profile(repo_copy, "demo")
    assert load_config(repo_copy / "params.yaml").project.profile == "demo"


def test_hand_edited_params_is_reported_as_no_profile(repo_copy):
    params = repo_copy / "params.yaml"
    params.write_text(params.read_text().replace("  seed: 0\n", "  seed: 1\n", 1))
    assert active_profile(repo_copy) is None


def test_params_rewritten_in_another_layout_is_still_its_profile(repo_copy):
    """`dvc exp run` rewrites params.yaml (block lists, no comments) without changing a value."""
    import yaml

    params = repo_copy / "params.yaml"
    header = params.read_text().splitlines()[0]
    params.write_text(header + "\n" + yaml.safe_dump(yaml.safe_load(params.read_text()), default_flow_style=False))
    assert active_profile(repo_copy) == "demo"


def test_dvc_exp_run_set_params_keeps_the_profile_and_names_its_edits(repo_copy, cli):
    """DVC's own rewriter (what `dvc exp run -S` calls): the same value keeps the profile; another is named."""
    from dvc.utils.hydra import apply_overrides

    params = repo_copy / "params.yaml"
    before = params.read_text()
    apply_overrides(str(params), ["analysis.bootstrap_resamples=1000", "analysis.images=null"])
    assert params.read_text() != before and active_profile(repo_copy) == "demo"
    assert "* demo" in cli("profile", "list", cwd=repo_copy).stdout
    apply_overrides(str(params), ["analysis.bootstrap_resamples=200", "search.trials=3"])
    assert active_profile(repo_copy) is None and edited_keys(repo_copy) == (
        "demo", ["search.trials", "analysis.bootstrap_resamples"])
    listing = cli("profile", "list", cwd=repo_copy)
    assert listing.returncode == 0 and "* " not in listing.stdout
    assert "it is demo with edits to search.trials, analysis.bootstrap_resamples" in listing.stdout


def test_profile_use_refuses_to_overwrite_edits_and_force_sets_them_aside(repo_copy, cli):
    params = repo_copy / "params.yaml"
    edited = params.read_text().replace("  seed: 0\n", "  seed: 1\n", 1)
    params.write_text(edited)
    refused = cli("profile", "use", "medmnist", cwd=repo_copy)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "holds edits that no profile has" in refused.stderr and params.read_text() == edited
    forced = cli("profile", "use", "medmnist", "--force", cwd=repo_copy)
    assert forced.returncode == 0, forced.stderr
    assert (repo_copy / "params.yaml.edited").read_text() == edited and active_profile(repo_copy) == "medmnist"


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


def test_paper_profile_declares_the_seven_targets_with_their_rules(repo_copy):
    activate_profile(repo_copy, "paper")
    config = load_config(repo_copy / "params.yaml")
    assert set(config.datasets) == {"thyroid", "breast", "chest", "mammograms", "knee", "isic", "pcam_small"}
    sizes = {name: dataset.image_size for name, dataset in config.datasets.items()}
    assert sizes["pcam_small"] == 96 and sizes["chest"] == sizes["knee"] == sizes["isic"] == 112
    assert all(224 <= sizes[name] <= 256 for name in ("breast", "thyroid", "mammograms"))
    thyroid = config.dataset("thyroid")
    assert {grade for grade, cls in thyroid.label_map.items() if cls == "malignant"} == {"4", "4a", "4b", "4c", "5"}
    assert config.dataset("breast").label_map["normal"] == config.dataset("breast").label_map["benign"]
    assert config.dataset("mammograms").label_map["BENIGN_WITHOUT_CALLBACK"] == "benign"
    assert len(config.dataset("knee").classes) == 3 and len(config.dataset("isic").classes) == 7
