"""The Keras HDF5 → KerasResNet50 converter: layouts written here with h5py, real Keras files, and every error."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medtransfer.errors import ModelError
from medtransfer.models.keras_h5 import (
    convert_keras_h5_to_safetensors,
    expected_keras_tensors,
    load_keras_resnet50_h5,
)
from medtransfer.models.keras_resnet50 import KerasResNet50

WEIGHTLESS_LAYERS = ("input_1", "conv1_pad", "conv1_relu", "pool1_pad", "pool1_pool")


@pytest.fixture(scope="module")
def keras_tensors() -> dict[str, np.ndarray]:
    """Random float32 values for every backbone tensor, keyed "layer/variable", shaped as Keras stores them."""
    rng = np.random.default_rng(0)
    return {
        name: rng.standard_normal(shape, dtype=np.float32) for name, (_key, shape) in expected_keras_tensors().items()
    }


def write_keras_h5(
    path,
    tensors: dict[str, np.ndarray],
    *,
    layout: str = "weights",
    keras2: bool = True,
    nested: bool = False,
    chunked: bool = False,
):
    """A Keras-style HDF5 file: `layout` "weights" (root) or "model" (`model_weights/`); Keras 2 style uses
    bytes names and the `:0` suffix, Keras 3 style str names without it; `nested` repeats the layer name in
    the weight path (`conv1_conv/conv1_conv/kernel:0`); `chunked` splits `layer_names` into two attributes."""
    layers: dict[str, list[tuple[str, np.ndarray]]] = {name: [] for name in WEIGHTLESS_LAYERS}
    for name, array in tensors.items():
        layer, variable = name.split("/")
        layers.setdefault(layer, []).append((variable, array))

    def encode(names):
        return [name.encode("utf-8") for name in names] if keras2 else list(names)

    with h5py.File(path, "w") as handle:
        root = handle
        if layout == "model":
            handle.attrs["model_config"] = "{}"
            root = handle.create_group("model_weights")
        names = list(layers)
        if chunked:
            root.attrs["layer_names0"] = encode(names[: len(names) // 2])
            root.attrs["layer_names1"] = encode(names[len(names) // 2 :])
        else:
            root.attrs["layer_names"] = encode(names)
        root.attrs["backend"] = "tensorflow"
        for layer, weights in layers.items():
            group = root.create_group(layer)
            weight_names = []
            for variable, array in weights:
                prefix = f"{layer}/{layer}" if nested else layer
                weight_name = f"{prefix}/{variable}{':0' if keras2 else ''}"
                group.create_dataset(weight_name, data=array)
                weight_names.append(weight_name)
            group.attrs["weight_names"] = encode(weight_names) if weight_names else np.array([], dtype=np.float64)
    return path


def without(tensors, *prefixes):
    return {name: array for name, array in tensors.items() if not name.startswith(prefixes)}


def error_message(path, **options) -> str:
    with pytest.raises(ModelError) as caught:
        load_keras_resnet50_h5(path, **options)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def assert_matches(state, tensors):
    expected = expected_keras_tensors()
    assert set(state) == {key for key, _shape in expected.values()}
    for name, (key, _shape) in expected.items():
        array = tensors[name].transpose(3, 2, 0, 1) if name.endswith("/kernel") else tensors[name]
        assert state[key].dtype == torch.float32
        assert np.array_equal(state[key].numpy(), array.astype(np.float32)), name


@pytest.mark.parametrize(
    "options",
    [
        {"layout": "weights", "keras2": True},
        {"layout": "weights", "keras2": False},
        {"layout": "model", "keras2": True},
        {"layout": "model", "keras2": False},
        {"layout": "model", "keras2": True, "nested": True},
        {"layout": "weights", "keras2": False, "nested": True, "chunked": True},
    ],
    ids=["weights-keras2", "weights-keras3", "model-keras2", "model-keras3", "model-nested", "weights-nested-chunked"],
)
def test_layouts_load_into_the_model(tmp_path, keras_tensors, options):
    path = write_keras_h5(tmp_path / "w.h5", keras_tensors, **options)
    state = load_keras_resnet50_h5(path)
    assert_matches(state, keras_tensors)
    model = KerasResNet50()
    model.load_state_dict(state, strict=True)  # num_batches_tracked is left to the module
    assert torch.equal(model.stem.bn.running_var, torch.from_numpy(keras_tensors["conv1_bn/moving_variance"]))
    assert torch.equal(model.stage1[0].shortcut.conv.weight, state["stage1.0.shortcut.conv.weight"])


def test_float64_file_gives_float32(tmp_path, keras_tensors):
    doubles = {name: array.astype(np.float64) for name, array in keras_tensors.items()}
    state = load_keras_resnet50_h5(write_keras_h5(tmp_path / "w.h5", doubles))
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


def test_missing_layer(tmp_path, keras_tensors):
    path = write_keras_h5(tmp_path / "w.h5", without(keras_tensors, "conv5_block3_3_bn/"))
    message = error_message(path)
    assert "1 mismatch with Keras ResNet50 (no top): missing conv5_block3_3_bn --" in message


def test_missing_weight_of_a_layer(tmp_path, keras_tensors):
    path = write_keras_h5(tmp_path / "w.h5", without(keras_tensors, "conv1_bn/moving_variance"))
    assert "missing conv1_bn/moving_variance" in error_message(path)


def test_extra_layer_is_an_error_unless_ignore_top(tmp_path, keras_tensors, capsys):
    tensors = {**keras_tensors, "predictions/kernel": np.zeros((2048, 1000), np.float32)}
    tensors["predictions/bias"] = np.zeros(1000, np.float32)
    path = write_keras_h5(tmp_path / "w.h5", tensors)
    message = error_message(path)
    assert "2 mismatches with Keras ResNet50 (no top): unexpected predictions/kernel; unexpected predictions/bias" in message
    assert "ignore_top=True" in message
    state = load_keras_resnet50_h5(path, ignore_top=True)
    assert_matches(state, keras_tensors)
    assert "ignored 1 layer(s) beyond the ResNet50 backbone: predictions" in capsys.readouterr().err


def test_extra_weight_in_a_backbone_layer_is_always_an_error(tmp_path, keras_tensors):
    tensors = {**keras_tensors, "conv1_conv/kernel_scale": np.ones(64, np.float32)}
    path = write_keras_h5(tmp_path / "w.h5", tensors)
    assert "unexpected conv1_conv/kernel_scale" in error_message(path, ignore_top=True)


def test_mis_shaped_tensor(tmp_path, keras_tensors):
    tensors = dict(keras_tensors)
    tensors["conv2_block1_1_conv/kernel"] = np.zeros((1, 1, 64, 32), np.float32)
    path = write_keras_h5(tmp_path / "w.h5", tensors)
    assert "conv2_block1_1_conv/kernel has shape (1,1,64,32), expected (1,1,64,64)" in error_message(path)


def test_several_mismatches_listed_in_order(tmp_path, keras_tensors):
    tensors = without(keras_tensors, "conv5_block3_3_bn/")
    tensors["conv2_block1_1_conv/kernel"] = np.zeros((1, 1, 64, 32), np.float32)
    tensors["dense/kernel"] = np.zeros((2048, 2), np.float32)
    message = error_message(write_keras_h5(tmp_path / "w.h5", tensors))
    assert (
        "3 mismatches with Keras ResNet50 (no top): conv2_block1_1_conv/kernel has shape (1,1,64,32), "
        "expected (1,1,64,64); missing conv5_block3_3_bn; unexpected dense/kernel"
    ) in message


def test_many_mismatches_are_truncated(tmp_path, keras_tensors):
    message = error_message(write_keras_h5(tmp_path / "w.h5", without(keras_tensors, "conv5_")))
    assert message.count("missing ") == 5
    assert "; and " in message and " more" in message


def test_old_keras_layer_names_get_a_hint(tmp_path, keras_tensors):
    renamed = {name.replace("conv1_conv/", "res2a_branch2a/"): array for name, array in keras_tensors.items()}
    message = error_message(write_keras_h5(tmp_path / "w.h5", renamed))
    assert "missing conv1_conv" in message and "unexpected res2a_branch2a/kernel" in message
    assert "2017 keras ResNet50 layer names" in message


def test_non_finite_values(tmp_path, keras_tensors):
    tensors = dict(keras_tensors)
    tensors["conv1_bn/gamma"] = np.full(64, np.nan, np.float32)
    assert "conv1_bn/gamma has non-finite values" in error_message(write_keras_h5(tmp_path / "w.h5", tensors))


def test_weight_listed_but_not_stored(tmp_path, keras_tensors):
    path = write_keras_h5(tmp_path / "w.h5", keras_tensors)
    with h5py.File(path, "a") as handle:
        del handle["conv1_conv"]["conv1_conv/bias:0"]
    message = error_message(path)
    assert "conv1_conv: weight conv1_conv/bias:0 is listed but not stored" in message
    assert "missing conv1_conv/bias" in message


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("<html>404 not found</html>")
    assert "not an HDF5 file" in error_message(path)


def test_missing_file_and_folder(tmp_path):
    assert "weights file not found" in error_message(tmp_path / "absent.h5")
    (tmp_path / "folder.h5").mkdir()
    assert "weights path is not a file" in error_message(tmp_path / "folder.h5")


def test_hdf5_without_layer_names(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    assert "no 'layer_names' attribute" in error_message(path)


def test_keras3_native_weights_file_is_refused(tmp_path):
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("layers").create_group("conv2d").create_group("vars").create_dataset("0", data=np.zeros(3))
        handle.create_group("vars")
    message = error_message(path)
    assert "Keras 3 '.weights.h5' file" in message and "model.save('model.h5')" in message


def test_convert_to_safetensors(tmp_path, keras_tensors):
    source = write_keras_h5(tmp_path / "w.h5", keras_tensors, layout="model")
    out = tmp_path / "out" / "resnet50.safetensors"
    digest = convert_keras_h5_to_safetensors(source, out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(path.name for path in out.parent.iterdir()) == ["resnet50.safetensors"]  # no temp file left
    assert_matches(load_file(out), keras_tensors)
    assert convert_keras_h5_to_safetensors(source, tmp_path / "again.safetensors") == digest  # deterministic


def test_convert_error_writes_nothing(tmp_path, keras_tensors):
    source = write_keras_h5(tmp_path / "w.h5", without(keras_tensors, "conv1_bn/"))
    out = tmp_path / "out" / "resnet50.safetensors"
    with pytest.raises(ModelError):
        convert_keras_h5_to_safetensors(source, out)
    assert not out.exists()


def test_real_keras_files_have_the_layouts_we_read(keras_reference):
    with h5py.File(keras_reference / "resnet50_model.h5", "r") as handle:
        assert "layer_names" in handle["model_weights"].attrs
        assert list(handle["model_weights/conv1_conv"].attrs["weight_names"]) == ["conv1_conv/kernel", "conv1_conv/bias"]
    whole = load_keras_resnet50_h5(keras_reference / "resnet50_model.h5")
    # keras_reference.py always writes the weights-only layout (the test extras pin a Keras that can), so a
    # missing file fails here instead of dropping the check.
    with h5py.File(keras_reference / "resnet50_weights.h5", "r") as handle:
        assert "layer_names" in handle.attrs and "model_weights" not in handle
    only = load_keras_resnet50_h5(keras_reference / "resnet50_weights.h5")
    assert set(only) == set(whole) and all(torch.equal(only[key], whole[key]) for key in whole)


def test_real_keras_nested_model_with_head(keras_reference, capsys):
    path = keras_reference / "resnet50_nested_model.h5"
    message = error_message(path)
    assert "unexpected head/kernel" in message and "ignore_top=True" in message
    nested = load_keras_resnet50_h5(path, ignore_top=True)
    whole = load_keras_resnet50_h5(keras_reference / "resnet50_model.h5")
    assert set(nested) == set(whole) and all(torch.equal(nested[key], whole[key]) for key in whole)
    assert "ignored 1 layer(s) beyond the ResNet50 backbone: head" in capsys.readouterr().err


def test_real_keras3_native_weights_file_is_refused(keras_reference):
    assert "Keras 3 '.weights.h5' file" in error_message(keras_reference / "tiny.weights.h5")
