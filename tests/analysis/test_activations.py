"""Forward hooks, datapoint sampling and activation files, checked against direct forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.analysis.activations import (
    LayerPlan,
    extract_stage_activations,
    first_conv_weights,
    images_per_layer,
    model_key,
    open_activations,
    plan_layers,
    sample_order,
    save_array,
    stage_hooks,
    stage_shapes,
)
from medtransfer.errors import DataError, ModelError
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.preprocessing import CAFFE, IMAGENET

RESNET18_32PX = {  # (C, H, W) of each stage for a 32 px input
    "stem": (64, 16, 16),
    "stage1": (64, 8, 8),
    "stage2": (128, 4, 4),
    "stage3": (256, 2, 2),
    "stage4": (512, 1, 1),
}
#: The stages the ResNet family names, in forward order (the hooks report them in this order).
LAYERS = list(RESNET18_32PX)


@pytest.fixture(scope="module")
def resnet18():
    model = Classifier("resnet18", None)
    keras_like_init_(model, torch.Generator().manual_seed(3))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 1), dtype=np.uint8)


def _direct_stage_outputs(model, preprocessing, batch: np.ndarray) -> dict[str, torch.Tensor]:
    """The oracle: plain hooks that keep whole stage outputs of one forward pass of the full model."""
    outputs = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.clone()))
               for name, module in model.stage_modules().items()]
    try:
        with torch.no_grad():
            model(preprocessing.apply(batch))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_hooks_capture_the_five_stages_with_their_shapes(resnet18, images):
    assert stage_shapes(resnet18, IMAGENET, images[0]) == RESNET18_32PX
    seen = []
    with stage_hooks(resnet18, lambda layer, output: seen.append((layer, tuple(output.shape)))):
        with torch.inference_mode():
            resnet18(IMAGENET.apply(images[:2]))
    assert seen == [(layer, (2, *RESNET18_32PX[layer])) for layer in LAYERS]
    assert all(not module._forward_hooks for module in resnet18.stage_modules().values())  # removed on exit


def test_saved_matrices_are_the_stage_outputs_reshaped_to_positions(resnet18, images):
    order = np.array([7, 2, 11, 5])
    plans = {layer: LayerPlan(layer, 3 if layer != "stage4" else 4, h, w) for layer, (_, h, w) in RESNET18_32PX.items()}
    saved = extract_stage_activations(resnet18, IMAGENET, images, order, plans, batch_size=3)
    direct = _direct_stage_outputs(resnet18, IMAGENET, images[order])
    for layer, (channels, height, width) in RESNET18_32PX.items():
        plan = plans[layer]
        assert saved[layer].shape == (plan.images * height * width, channels) and saved[layer].dtype == np.float32
        # Row r = (image i, h, w) with r = (i*H + h)*W + w.
        expected = direct[layer][: plan.images].permute(0, 2, 3, 1).reshape(-1, channels).numpy()
        np.testing.assert_allclose(saved[layer], expected, rtol=1e-5, atol=1e-6)
        i, h, w = plan.images - 1, height - 1, 0
        np.testing.assert_allclose(saved[layer][(i * height + h) * width + w], direct[layer][i, :, h, w].numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_the_result(resnet18, images):
    order = sample_order(np.arange(len(images)), seed=0, fold=1)
    plans = plan_layers({layer: shape[1:] for layer, shape in RESNET18_32PX.items()}, len(order), positions_per_layer=40)
    one = extract_stage_activations(resnet18, IMAGENET, images, order, plans, batch_size=1)
    many = extract_stage_activations(resnet18, IMAGENET, images, order, plans, batch_size=64)
    for layer in LAYERS:
        np.testing.assert_allclose(one[layer], many[layer], rtol=1e-5, atol=1e-6)


def test_each_model_applies_its_own_preprocessing(resnet18, images):
    order = np.arange(4)
    plans = {"stem": LayerPlan("stem", 4, 16, 16)}
    imagenet = extract_stage_activations(resnet18, IMAGENET, images, order, plans, batch_size=4)["stem"]
    caffe = extract_stage_activations(resnet18, CAFFE, images, order, plans, batch_size=4)["stem"]
    expected = _direct_stage_outputs(resnet18, CAFFE, images[:4])["stem"].permute(0, 2, 3, 1).reshape(-1, 64).numpy()
    np.testing.assert_allclose(caffe, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(imagenet, caffe)


def test_images_per_layer_follows_the_original_rule():
    # round(10000 / (H*W)), at least 1, at most the test images available.
    assert images_per_layer(56 * 56, 500, positions_per_layer=10000) == 3
    assert images_per_layer(7 * 7, 500, positions_per_layer=10000) == 204
    assert images_per_layer(7 * 7, 150, positions_per_layer=10000) == 150
    assert images_per_layer(112 * 112, 500, positions_per_layer=10000) == 1
    assert images_per_layer(1, 20000, positions_per_layer=10000) == 10000
    assert images_per_layer(7 * 7, 500, positions_per_layer=10000, fixed_images=30) == 30
    assert images_per_layer(7 * 7, 20, positions_per_layer=10000, fixed_images=30) == 20
    plans = plan_layers({"stem": (16, 16), "stage4": (1, 1)}, 300, positions_per_layer=10000)
    assert (plans["stem"].images, plans["stem"].rows) == (39, 39 * 256)
    assert (plans["stage4"].images, plans["stage4"].rows) == (300, 300)


def test_sample_order_is_a_seeded_permutation_of_the_test_images():
    test = np.array([40, 3, 17, 8, 99, 21])
    order = sample_order(test, seed=5, fold=2)
    assert sorted(order.tolist()) == sorted(test.tolist())
    np.testing.assert_array_equal(order, sample_order(test, seed=5, fold=2))
    assert not np.array_equal(order, sample_order(test, seed=5, fold=3))


def test_first_conv_is_found_in_module_order():
    name, weights = first_conv_weights(Classifier("resnet18", None))
    assert name == "backbone.body.conv1" and weights.shape == (64, 3, 7, 7) and weights.dtype == np.float32
    name, weights = first_conv_weights(Classifier("keras_resnet50", None))
    assert name == "backbone.stem.conv" and weights.shape == (64, 3, 7, 7)


def test_a_spatial_size_other_than_planned_is_refused(resnet18, images):
    plans = {"stem": LayerPlan("stem", 2, 8, 8)}
    with pytest.raises(ModelError, match="cannot be paired"):
        extract_stage_activations(resnet18, IMAGENET, images, np.arange(2), plans, batch_size=2)


def test_activation_files_are_written_whole_and_memory_mapped(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(6, 2)
    path = tmp_path / "fold0" / model_key("source.natural", 3) / "stem.npy"
    assert path.parent.name == "source.natural.v3"
    save_array(path, array)
    assert [p.name for p in path.parent.iterdir()] == ["stem.npy"]  # no temporary left behind
    loaded = open_activations(tmp_path, 0, "source.natural.v3", "stem")
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, array)
    with pytest.raises(DataError, match="missing"):
        open_activations(tmp_path, 0, "source.natural.v3", "stage1")
    save_array(path, array.astype(np.float64))
    with pytest.raises(DataError, match="float32"):
        open_activations(tmp_path, 0, "source.natural.v3", "stem")


def test_image_draws_are_disjoint_blocks_while_the_layer_holds_them():
    from medtransfer.analysis.activations import image_draws

    assert image_draws(100, 20, 5) == [slice(0, 20), slice(20, 40), slice(40, 60), slice(60, 80), slice(80, 100)]
    assert image_draws(50, 20, 5) == [slice(0, 20), slice(20, 40), slice(0, 20), slice(20, 40), slice(0, 20)]
    assert image_draws(15, 20, 3) == [slice(0, 15)] * 3  # fewer images than one draw: all of them, every time
    assert image_draws(20, 20, 1) == [slice(0, 20)]


def test_plans_keep_an_image_block_per_draw_as_far_as_the_fold_allows():
    from medtransfer.analysis.activations import plan_layers

    plans = plan_layers({"stem": (10, 10), "stage4": (1, 1)}, 300, positions_per_layer=1000, draws=5)
    assert (plans["stem"].images_per_draw, plans["stem"].images) == (10, 50)
    assert (plans["stage4"].images_per_draw, plans["stage4"].images) == (300, 300)  # one draw's worth: shared
    single = plan_layers({"stem": (10, 10)}, 300, positions_per_layer=1000)
    assert (single["stem"].images_per_draw, single["stem"].images) == (10, 10)
