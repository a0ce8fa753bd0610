"""Model packages: safetensors + JSON spec round-trip to the real module; any tampering is refused."""

from __future__ import annotations

import json

import pytest
import torch

from medtransfer.errors import ModelError
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.packaging import SPEC_FILE, WEIGHTS_FILE, ModelSpec, read_package, write_package
from medtransfer.models.preprocessing import IMAGENET


@pytest.fixture
def package(tmp_path):
    model = Classifier("resnet18", num_classes=3)
    keras_like_init_(model, torch.Generator().manual_seed(3))
    spec = ModelSpec("resnet18", 3, IMAGENET, classes=["a", "b", "c"], extra={"source": "random"})
    digest = write_package(model, spec, tmp_path / "pkg")
    return model.eval(), spec, digest, tmp_path / "pkg"


def test_round_trip_rebuilds_the_same_module(package):
    model, spec, digest, folder = package
    loaded, loaded_spec, loaded_digest = read_package(folder)
    assert loaded_digest == digest and loaded_spec.classes == ["a", "b", "c"]
    assert loaded_spec.preprocessing == IMAGENET
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == [SPEC_FILE, WEIGHTS_FILE], "no pickle, no code"


def test_altered_weights_are_refused(package):
    _, _, _, folder = package
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="weights sha256 .* does not match the spec"):
        read_package(folder)


def test_spec_naming_another_architecture_is_refused(package):
    _, _, _, folder = package
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec["arch"] = "resnet34"
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="weights do not fit architecture 'resnet34'"):
        read_package(folder)


def test_missing_files_and_bad_json(package):
    _, _, _, folder = package
    (folder / SPEC_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="spec.json is not valid JSON"):
        read_package(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="lacks weights.safetensors"):
        read_package(folder)


def test_a_spec_without_model_args_from_before_they_existed_still_reads(package):
    model, _, _, folder = package
    spec = json.loads((folder / SPEC_FILE).read_text())
    assert spec["stage_names"] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    del spec["model_args"]
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    loaded, loaded_spec, _ = read_package(folder)
    assert loaded_spec.model_args == {}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_timm_model_keeps_its_arguments_and_its_own_stage_names(tmp_path):
    model = Classifier("vit_tiny_patch16_224", num_classes=2, model_args={"img_size": 32})
    spec = ModelSpec("vit_tiny_patch16_224", 2, IMAGENET, classes=["a", "b"], model_args={"img_size": 32})
    write_package(model, spec, tmp_path / "pkg")
    written = json.loads((tmp_path / "pkg" / SPEC_FILE).read_text())
    assert written["model_args"] == {"img_size": 32}
    assert written["stage_names"] == [f"blocks.{index}" for index in range(12)]
    loaded, loaded_spec, _ = read_package(tmp_path / "pkg")
    assert loaded_spec.model_args == {"img_size": 32} and list(loaded.stage_modules()) == written["stage_names"]
    written["stage_names"] = written["stage_names"][::-1]
    (tmp_path / "pkg" / SPEC_FILE).write_text(json.dumps(written))
    with pytest.raises(ModelError, match="the package names the stages blocks.11, .* the rebuilt"):
        read_package(tmp_path / "pkg")


def test_model_args_for_a_resnet_are_refused_where_the_spec_is(package):
    _, _, _, folder = package
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec["model_args"] = {"img_size": 32}
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ModelError) as caught:
        read_package(folder)
    assert "takes no model arguments" in caught.value.one_line() and str(folder / SPEC_FILE) in caught.value.one_line()
