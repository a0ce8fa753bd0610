"""A `kind: timm` source read from a local weights file (`file:`), offline: the registered backbone gives the same
features as timm's own model built from that file; a missing or unreadable file, or the key on the wrong kind,
stops with one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from medtransfer.config import load_config
from medtransfer.errors import ConfigError
from medtransfer.models.mlflow_models import load_registered_model
from medtransfer.registry import ALIAS_DEFAULT, Tag

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def write_timm_weights(path: Path, seed: int) -> Path:
    """A whole timm resnet18 state dict (1000-class head included, as on the hub) with every tensor drawn from
    `seed`, BatchNorm statistics too: timm's own initialisation zeroes the last BatchNorm of each block and leaves
    the statistics at 0/1, which would let a wrongly mapped tensor go unnoticed."""
    import timm
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        drawn = torch.rand(tensor.shape, generator=generator)
        state[key] = 0.5 + drawn if key.endswith("running_var") else 0.2 * (drawn - 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def write_project(root: Path, sources: dict) -> Path:
    params = {"project": {"profile": "test", "seed": 0},
              "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test"},
              "sources": sources}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty hub cache, in this process and in the CLI's."""
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "empty-hf-cache")}
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    return env


def test_offline_source_from_a_local_timm_file_matches_timm(tmp_path, cli, offline_hub):
    import mlflow
    import timm

    weights = write_timm_weights(tmp_path / "weights" / "resnet18.safetensors", seed=7)
    params = write_project(tmp_path, {"imagenet_file": {"kind": "timm", "arch": "resnet18",
                                                        "file": "weights/resnet18.safetensors"}})
    result = cli("--params", str(params), "source", "--name", "imagenet_file", env=offline_hub, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("source.imagenet_file", ALIAS_DEFAULT)
    assert version.tags[Tag.ORIGIN] == f"timm_file:{hashlib.sha256(weights.read_bytes()).hexdigest()}"
    assert version.tags[Tag.PREPROCESSING] == "imagenet"
    loaded = load_registered_model("models:/source.imagenet_file@default")
    reference = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                  num_classes=0).eval()
    inputs = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(inputs), reference(inputs))
    # The file's own tensors, not timm's initialisation, came through.
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert torch.equal(loaded.model.backbone.body.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])


def test_missing_timm_file_is_one_line_naming_it(tmp_path, cli, offline_hub):
    params = write_project(tmp_path, {"imagenet_file": {"kind": "timm", "arch": "resnet18", "file": "absent.pth"}})
    result = cli("--params", str(params), "source", "--name", "imagenet_file", env=offline_hub, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'absent.pth'}: weights file not found" in line
    assert "sources.imagenet_file.file" in line


def test_unreadable_timm_file_is_one_line_naming_it(tmp_path, cli, offline_hub):
    (tmp_path / "broken.safetensors").write_text("<html>404 not found</html>")
    params = write_project(tmp_path, {"imagenet_file": {"kind": "timm", "arch": "resnet18",
                                                        "file": "broken.safetensors"}})
    result = cli("--params", str(params), "source", "--name", "imagenet_file", env=offline_hub, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'broken.safetensors'}: timm cannot load these weights into 'resnet18'" in line


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"kind": "timm", "arch": "resnet18", "path": "w.safetensors"},
         "kind 'timm' reads a local weights file from 'file'"),
        ({"kind": "keras_h5", "arch": "keras_resnet50", "path": "w.h5", "file": "w.h5"},
         "'file' is for kind timm only"),
    ],
    ids=["path-on-timm", "file-on-keras_h5"],
)
def test_a_weights_key_the_kind_ignores_is_refused(tmp_path, source, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_project(tmp_path, {"s": source}))


def test_a_vit_source_from_a_local_timm_file_is_built_with_its_model_args(tmp_path, offline_hub):
    """timm's loader fits 224 px weights to `img_size: 32` (it resamples the position embedding); the source's
    backbone must be built with the same arguments to take them."""
    import timm
    from safetensors.torch import save_file

    from medtransfer.models.sources import build_source

    state = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(tmp_path / "vit.safetensors"))
    params = write_project(tmp_path, {"vit_file": {"kind": "timm", "arch": "vit_tiny_patch16_224",
                                                   "model_args": {"img_size": 32}, "file": "vit.safetensors"}})
    built = build_source(load_config(params), "vit_file")
    assert built.spec.model_args == {"img_size": 32} and built.origin.startswith("timm_file:")
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.safetensors"))).eval()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(built.model(inputs).flatten(1), reference(inputs), rtol=0, atol=0)
