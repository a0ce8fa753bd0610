"""Sources in the MLflow Model Registry: register, reuse, reload by alias with hooks, pyfunc predict, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medtransfer.config import load_config
from medtransfer.errors import ModelError
from medtransfer.models.mlflow_models import load_registered_model
from medtransfer.models.sources import build_source, register_source
from medtransfer.registry import ALIAS_DEFAULT, Tag

SOURCES = {
    "random": {"kind": "random", "arch": "resnet18", "seed": 0},
    "random_b": {"kind": "random", "arch": "resnet18", "seed": 1},
    "imagenet": {"kind": "timm", "arch": "resnet18"},
    "convnext": {"kind": "random", "arch": "convnext_atto", "seed": 2},
    "vit": {"kind": "random", "arch": "vit_tiny_patch16_224", "model_args": {"img_size": 32}, "seed": 3},
    "vit_misspelt": {"kind": "random", "arch": "vit_tiny_patch16_224", "model_args": {"imgsize": 32}, "seed": 4},
}
#: (channels, side) of every stage on 32 px images, in forward order: ConvNeXt's four stages (reductions 4 … 32),
#: the ViT's twelve blocks as 2 x 2 patch grids (patch 16, class token left out).
TIMM_STAGES = {
    "convnext": {"stages.0": (40, 8), "stages.1": (80, 4), "stages.2": (160, 2), "stages.3": (320, 1)},
    "vit": {f"blocks.{index}": (192, 2) for index in range(12)},
}


@pytest.fixture
def config(write_params, monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    return load_config(write_params({}, sources=SOURCES))


def test_register_reuse_reload_and_hooks(config):
    first = register_source(config, "random")
    again = register_source(config, "random")
    assert not first.reused and again.reused and again.version == first.version == "1"
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'source.random'")
    assert len(versions) == 1, "the same weights never make a second version"
    version = client.get_model_version_by_alias("source.random", ALIAS_DEFAULT)
    assert version.tags[Tag.ROLE] == "source" and version.tags[Tag.ARCH] == "resnet18"
    assert version.tags[Tag.ORIGIN] == "random(seed=0)" and version.tags[Tag.WEIGHTS_SHA256] == first.weights_sha256

    loaded = load_registered_model("models:/source.random@default")
    reference = build_source(config, "random").model
    for (name, tensor), expected in zip(loaded.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(tensor, expected), name
    fired = []
    for name, module in loaded.model.stage_modules().items():
        module.register_forward_hook(lambda _m, _i, out, name=name: fired.append((name, out.shape[1])))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    assert fired == [("stem", 64), ("stage1", 64), ("stage2", 128), ("stage3", 256), ("stage4", 512)]


@pytest.mark.parametrize("name", sorted(TIMM_STAGES))
def test_a_random_timm_source_registers_and_reloads_as_itself_with_hooks_on_its_own_stages(config, name):
    first = register_source(config, name)
    assert register_source(config, name).reused, "built from its seed, every parameter is the same twice"
    loaded = load_registered_model(f"models:/source.{name}@default")
    assert loaded.spec.arch == config.source(name).arch and loaded.spec.model_args == config.source(name).model_args
    assert loaded.weights_sha256 == first.weights_sha256 and loaded.spec.preprocessing.name == "imagenet"
    reference = build_source(config, name).model
    assert list(loaded.model.state_dict()) == list(reference.state_dict())
    for (key, tensor), expected in zip(loaded.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(tensor, expected), key
    fired = []
    for stage, module in loaded.model.stage_modules().items():
        module.register_forward_hook(lambda _m, _i, out, stage=stage: fired.append((stage, tuple(out.shape))))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))
    assert fired == [(stage, (2, channels, side, side)) for stage, (channels, side) in TIMM_STAGES[name].items()]


def test_misspelt_model_args_stop_the_source_command_with_one_line(config, cli):
    result = cli("--params", str(config.source_file), "source", "--name", "vit_misspelt", timeout=180)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "sources.vit_misspelt.model_args" in line and "'imgsize'" in line


def test_an_unknown_architecture_stops_the_command_with_one_line(config, cli, write_params):
    params = write_params({}, sources={"s": {"kind": "random", "arch": "convnext_attto"}})
    result = cli("--params", str(params), "source", "--name", "s", timeout=180)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "unknown architecture 'convnext_attto'" in line and "sources.s.arch" in line and "convnext_atto" in line


def test_two_seeds_make_two_different_sources(config):
    a = register_source(config, "random")
    b = register_source(config, "random_b")
    assert a.weights_sha256 != b.weights_sha256


def test_pyfunc_predict_on_uint8_images_without_code_execution(config, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_MODEL_CODE_EXECUTION", "false")
    register_source(config, "random")
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    features = mlflow.pyfunc.load_model("models:/source.random@default").predict(images)
    loaded = load_registered_model("models:/source.random@default")
    with torch.no_grad():
        expected = loaded.model(loaded.spec.preprocessing.apply(images)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    artifact = Path(mlflow.artifacts.download_artifacts("models:/source.random@default"))
    assert not list(artifact.rglob("*.pkl")) and not list(artifact.rglob("*.pickle"))


def test_missing_model_or_alias_is_one_line(config):
    register_source(config, "random")
    with pytest.raises(ModelError, match="no registered model named 'source.nope'.*medtransfer source --name nope"):
        load_registered_model("models:/source.nope@default")
    with pytest.raises(ModelError, match="has no alias 'champion'"):
        load_registered_model("models:/source.random@champion")
    with pytest.raises(ModelError, match="not a registered-model URI"):
        load_registered_model("runs:/abc/model")


def test_tampered_artifact_is_refused(config, tmp_path):
    register_source(config, "random")
    (weights,) = (tmp_path / "mlartifacts").rglob("weights.safetensors")
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match"):
        load_registered_model("models:/source.random@default")


def test_offline_imagenet_fails_fast_with_one_line(config, cli, tmp_path):
    # A hang fails the test: the subprocess timeout raises TimeoutExpired.
    result = cli("--params", str(config.source_file), "source", "--name", "imagenet",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-cache")}, timeout=180)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "cannot load timm's pretrained 'resnet18': offline (HF_HUB_OFFLINE=1) and not cached" in line
    assert "kind: safetensors" in line


@pytest.mark.slow
def test_mlflow_run_source_entry_point_twice(tmp_path, repo_root):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)
    (project / "params.yaml").write_text(
        "project: {profile: test}\nstores: {tracking_uri: 'sqlite:///mlflow.db', experiment: test}\n"
        "sources:\n  random: {kind: random, arch: resnet18, seed: 0}\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "source", "-P", "name=random",
               "--env-manager", "local", "--experiment-name", "test"]
    for _ in range(2):
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'source.random'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias("source.random", ALIAS_DEFAULT)
    assert version.tags[Tag.ROLE] == "source" and version.tags[Tag.WEIGHTS_SHA256]
    assert (project / "results/sources/random.json").is_file()


def test_pyfunc_returns_class_probabilities_for_a_classifier(config):
    from medtransfer.models.backbones import Classifier, keras_like_init_
    from medtransfer.models.mlflow_models import log_packaged_model
    from medtransfer.models.packaging import ModelSpec
    from medtransfer.models.preprocessing import IMAGENET
    from medtransfer.tracking import ensure_experiment, use_tracking_store

    model = Classifier("resnet18", num_classes=2)
    keras_like_init_(model, torch.Generator().manual_seed(0))
    use_tracking_store(config)
    with mlflow.start_run(experiment_id=ensure_experiment(config)):
        uri, _ = log_packaged_model(model.eval(), ModelSpec("resnet18", 2, IMAGENET, classes=["no", "yes"]))
    grey = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 1), dtype=np.uint8)
    probabilities = mlflow.pyfunc.load_model(uri).predict(grey)
    assert probabilities.shape == (4, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_a_damaged_artifact_is_named_by_its_registered_model_not_by_a_deleted_download(config, tmp_path):
    register_source(config, "random")
    (weights,) = (tmp_path / "mlartifacts").rglob("weights.safetensors")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError) as info:
        load_registered_model("models:/source.random@default")
    message = str(info.value)
    assert "\n" not in message
    assert "models:/source.random@default" in message and "weights.safetensors" in message
    assert "medtransfer-model-" not in message, "the temporary download is gone when the user reads this"


def test_a_missing_artifact_store_is_named_as_missing(config, tmp_path):
    import shutil

    register_source(config, "random")
    shutil.rmtree(tmp_path / "mlartifacts")
    with pytest.raises(ModelError) as info:
        load_registered_model("models:/source.random@default")
    message = str(info.value)
    assert "\n" not in message
    assert "missing" in message and "registered by medtransfer" not in message

def test_every_kind_params_may_name_has_an_entry_in_the_table_of_kinds():
    import typing

    from medtransfer.config import SourceConfig
    from medtransfer.models.sources import SOURCE_KINDS

    assert set(typing.get_args(typing.get_type_hints(SourceConfig)["kind"])) == set(SOURCE_KINDS)
