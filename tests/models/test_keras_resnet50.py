"""KerasResNet50: stage names and shapes, the Keras name mapping, Keras-like init, and parity with real Keras."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtransfer.models.keras_h5 import expected_keras_tensors, load_keras_resnet50_h5
from medtransfer.models.keras_resnet50 import (
    BATCH_NORM_EPS,
    KERAS_STAGE_OUTPUTS,
    STAGE_NAMES,
    KerasResNet50,
    keras_layer_to_module_path,
    keras_weighted_layer_names,
)
from medtransfer.models.backbones import keras_like_init_

# (channels, side) of each stage output for a square input side, as Keras computes them.
STAGE_SHAPES = {
    224: {"stem": (64, 112), "stage1": (256, 56), "stage2": (512, 28), "stage3": (1024, 14), "stage4": (2048, 7)},
    64: {"stem": (64, 32), "stage1": (256, 16), "stage2": (512, 8), "stage3": (1024, 4), "stage4": (2048, 2)},
    32: {"stem": (64, 16), "stage1": (256, 8), "stage2": (512, 4), "stage3": (1024, 2), "stage4": (2048, 1)},
}
# Keras' model.summary() for ResNet50(include_top=False): 23,587,712 parameters, of which 53,120 are BN statistics.
KERAS_TRAINABLE_PARAMETERS = 23_534_592
KERAS_NON_TRAINABLE_PARAMETERS = 53_120
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> KerasResNet50:
    network = keras_like_init_(KerasResNet50(), torch.Generator().manual_seed(0))
    return network.eval()


def test_stage_names_and_modules(model):
    assert STAGE_NAMES == ("stem", "stage1", "stage2", "stage3", "stage4")
    modules = model.stage_modules()
    assert list(modules) == list(STAGE_NAMES)
    assert all(modules[name] is getattr(model, name) for name in STAGE_NAMES)
    assert model.num_features == 2048
    assert [len(model.stage_modules()[f"stage{index}"]) for index in range(1, 5)] == [3, 4, 6, 3]


@pytest.mark.parametrize("side", sorted(STAGE_SHAPES))
def test_stage_output_shapes_through_hooks(model, side):
    captured = {}
    handles = [
        module.register_forward_hook(lambda _module, _inputs, output, name=name: captured.__setitem__(name, output))
        for name, module in model.stage_modules().items()
    ]
    try:
        with torch.no_grad():
            output = model(torch.randn(2, 3, side, side))
    finally:
        for handle in handles:
            handle.remove()
    assert list(captured) == list(STAGE_NAMES)
    for name, (channels, size) in STAGE_SHAPES[side].items():
        assert tuple(captured[name].shape) == (2, channels, size, size), name
    assert torch.equal(output, captured["stage4"])


def test_parameter_counts_match_keras(model):
    trainable = sum(parameter.numel() for parameter in model.parameters())
    statistics = sum(buffer.numel() for name, buffer in model.named_buffers() if "running_" in name)
    assert trainable == KERAS_TRAINABLE_PARAMETERS
    assert statistics == KERAS_NON_TRAINABLE_PARAMETERS


def test_keras_details_bias_stride_and_batch_norm(model):
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 53
    assert all(conv.bias is not None for conv in convs)
    assert all(norm.eps == BATCH_NORM_EPS == 1.001e-5 and norm.momentum == pytest.approx(0.01) for norm in norms)
    first = model.stage2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)  # v1: the stride sits on the 1×1
    assert first.shortcut.conv.stride == (2, 2)
    assert model.stage1[0].conv1.stride == (1, 1) and model.stage1[0].shortcut is not None
    assert model.stage2[1].shortcut is None


def test_max_pool_padding_equals_keras_zero_padding():
    after_relu = torch.relu(torch.randn(2, 4, 9, 10))
    keras_style = nn.functional.max_pool2d(nn.functional.pad(after_relu, (1, 1, 1, 1)), kernel_size=3, stride=2)
    assert torch.equal(nn.MaxPool2d(3, 2, padding=1)(after_relu), keras_style)


def test_layer_name_mapping_examples_and_errors():
    assert keras_layer_to_module_path("conv1_conv") == "stem.conv"
    assert keras_layer_to_module_path("conv1_bn") == "stem.bn"
    assert keras_layer_to_module_path("conv2_block1_0_conv") == "stage1.0.shortcut.conv"
    assert keras_layer_to_module_path("conv3_block2_1_conv") == "stage2.1.conv1"
    assert keras_layer_to_module_path("conv5_block3_3_bn") == "stage4.2.bn3"
    for bad in ("conv2_block4_1_conv", "conv3_block2_0_conv", "conv6_block1_1_conv", "predictions", "conv1_relu"):
        with pytest.raises(KeyError):
            keras_layer_to_module_path(bad)


def test_layer_name_mapping_covers_every_tensor_once(model):
    names = keras_weighted_layer_names()
    assert len(names) == len(set(names)) == 106
    module_paths = dict(model.named_modules())
    assert all(keras_layer_to_module_path(name) in module_paths for name in names)
    covered = [key for key, _shape in expected_keras_tensors().values()]
    state_keys = [key for key in model.state_dict() if not key.endswith("num_batches_tracked")]
    assert len(covered) == len(set(covered))
    assert sorted(covered) == sorted(state_keys)


def test_parameter_names_are_readable(model):
    names = set(model.state_dict())
    for key in ("stem.conv.weight", "stage2.0.conv1.weight", "stage2.0.bn1.running_var", "stage2.0.shortcut.conv.bias"):
        assert key in names


def test_keras_like_init_is_seeded_and_uses_keras_defaults():
    networks = [KerasResNet50() for _ in range(3)]  # construction itself uses torch's global generator
    global_state = torch.random.get_rng_state()
    first, second, other = (
        keras_like_init_(network, torch.Generator().manual_seed(seed)).state_dict()
        for network, seed in zip(networks, (7, 7, 8))
    )
    assert torch.equal(torch.random.get_rng_state(), global_state)  # draws only from the given generator
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["stem.conv.weight"], other["stem.conv.weight"])
    kernel = first["stage3.0.conv2.weight"]  # (256, 256, 3, 3): glorot bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (2 * 256 * 9)) ** 0.5
    assert kernel.abs().max() <= bound and kernel.abs().max() > 0.9 * bound
    assert torch.equal(first["stage3.0.conv2.bias"], torch.zeros(256))
    assert torch.equal(first["stem.bn.weight"], torch.ones(64)) and torch.equal(first["stem.bn.bias"], torch.zeros(64))
    assert torch.equal(first["stem.bn.running_mean"], torch.zeros(64))
    assert torch.equal(first["stem.bn.running_var"], torch.ones(64))

    linear = keras_like_init_(nn.Linear(10, 6), torch.Generator().manual_seed(0))
    assert linear.weight.abs().max() <= (6 / 16) ** 0.5 and torch.equal(linear.bias, torch.zeros(6))


def test_parity_with_real_keras(keras_reference):
    """Weights saved by real Keras, converted, give the same five stage outputs (eval mode)."""
    network = KerasResNet50()
    network.load_state_dict(load_keras_resnet50_h5(keras_reference / "resnet50_model.h5"), strict=True)
    network.eval()
    with np.load(keras_reference / "reference.npz") as reference:
        arrays = {key: reference[key] for key in reference.files}
    for image_set in ("square64", "odd45x37"):
        captured = {}
        handles = [
            module.register_forward_hook(lambda _m, _i, output, name=name: captured.__setitem__(name, output))
            for name, module in network.stage_modules().items()
        ]
        with torch.no_grad():
            network(torch.from_numpy(arrays[f"{image_set}/input"]).permute(0, 3, 1, 2).contiguous())
        for handle in handles:
            handle.remove()
        for stage, keras_layer in KERAS_STAGE_OUTPUTS.items():
            expected = arrays[f"{image_set}/{keras_layer}"]
            ours = captured[stage].permute(0, 2, 3, 1).numpy()
            assert ours.shape == expected.shape, (image_set, stage)
            relative = np.abs(ours - expected).max() / np.abs(expected).max()
            print(f"parity {image_set} {stage} ({keras_layer}): max relative difference {relative:.2e}")
            assert relative <= RELATIVE_TOLERANCE, (image_set, stage, relative)
