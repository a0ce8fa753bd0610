"""The pair × layer engine (analysis/streaming.py) on synthetic activations: controls (identity, shuffled images),
channel sampling, streaming in chunks. No registry, no network file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medtransfer.analysis.streaming as streaming
from medtransfer.analysis.activations import extract_stage_activations, plan_layers, stage_shapes
from medtransfer.analysis.streaming import channel_draws, compare_pair_layer, image_derangement
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.preprocessing import IMAGENET

MEASURES = ["cca", "svcca", "pwcca", "cka", "cka_debiased"]


def _images_with_positions(rng, images: int, positions: int, channels: int) -> np.ndarray:
    """(images·positions, channels) float32 rows with no structure shared across images or positions."""
    return rng.normal(size=(images * positions, channels)).astype(np.float32)


def test_identity_is_one_and_shuffled_images_fall_to_the_independent_level():
    rng = np.random.default_rng(0)
    images, positions, channels = 400, 16, 8
    x = _images_with_positions(rng, images, positions, channels)
    y = (x @ rng.normal(size=(channels, channels)) + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    unrelated = _images_with_positions(rng, images, positions, channels)

    identity = compare_pair_layer(x, x, positions, MEASURES)
    for measure in MEASURES:
        assert identity.values[measure] == pytest.approx(1.0, abs=1e-6), measure
    real = compare_pair_layer(x, y, positions, MEASURES)
    shuffled = compare_pair_layer(x, y, positions, MEASURES, shuffle_rng=np.random.default_rng(1))
    independent = compare_pair_layer(x, unrelated, positions, MEASURES)
    assert real.values["cca"] > 0.9 and real.values["cka"] > 0.5  # CKA is not invariant to a general linear map
    for measure in ("cca", "cka"):
        assert shuffled.values[measure] < 0.1
        assert shuffled.values[measure] == pytest.approx(independent.values[measure], abs=0.03), measure
    assert real.reliable and real.n == images * positions and real.images == images


def test_shuffling_moves_whole_images():
    # y = x exactly; after permuting y's images, row (i, pos) of x meets row (pi(i), pos) of y.
    positions = 3
    x = np.repeat(np.arange(5, dtype=np.float32)[:, None], positions, axis=0)  # image i's rows all hold i
    x = np.hstack([x, np.tile(np.arange(positions, dtype=np.float32), 5)[:, None]])  # and the position
    seen = []

    class Recorder:
        def __init__(self, p, q, **_):
            pass

        def update(self, a, b):
            seen.append((a.copy(), b.copy()))

        def finalize(self, measures):
            from medtransfer.analysis.similarity import SimilarityResult

            return SimilarityResult(n=15, p=2, q=2, p_kept=2, q_kept=2, mean_cca=0.0)

    original = streaming.SimilarityAccumulator
    streaming.SimilarityAccumulator = Recorder
    try:
        compare_pair_layer(x, x, positions, ["cca"], shuffle_rng=np.random.default_rng(2))
    finally:
        streaming.SimilarityAccumulator = original
    a = np.vstack([chunk[0] for chunk in seen])
    b = np.vstack([chunk[1] for chunk in seen])
    np.testing.assert_array_equal(a[:, 1], b[:, 1])  # same positions
    pairs = {(int(i), int(j)) for i, j in zip(a[:, 0], b[:, 0])}
    assert len(pairs) == 5 and all(i != j for i, j in pairs)  # each image meets one other image, all its rows


def test_a_derangement_has_no_fixed_point():
    for images in (2, 3, 10, 57):
        permutation = image_derangement(images, np.random.default_rng(images))
        assert sorted(permutation.tolist()) == list(range(images))
        assert not np.any(permutation == np.arange(images))
    assert image_derangement(1, np.random.default_rng(0)) is None
    single = compare_pair_layer(np.ones((4, 2), np.float32), np.ones((4, 2), np.float32), 4, ["cca"],
                                shuffle_rng=np.random.default_rng(0))
    assert single.values["cca"] is None and "one image" in single.note


def _resnet18(seed: int) -> Classifier:
    model = Classifier("resnet18", None)
    keras_like_init_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def test_two_nets_one_the_other_plus_noise():
    """A network and a noisy copy are similar; on shuffled images their mean CCA falls to (or, at the stem, below)
    the level of two unrelated networks on the same images (the random level). Mean CKA keeps some similarity under shuffling in
    the middle stages (positional structure such as zero-padding borders is shared by all images), so only its
    stem value is checked."""
    base, unrelated = _resnet18(0), _resnet18(5)
    noisy = Classifier("resnet18", None)
    noisy.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in noisy.parameters():
            if parameter.ndim > 1:
                parameter.add_(0.2 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    images = np.random.default_rng(0).integers(0, 256, size=(120, 32, 32, 3), dtype=np.uint8)
    order = np.arange(len(images))
    shapes = stage_shapes(base, IMAGENET, images[0])
    plans = plan_layers({layer: shape[1:] for layer, shape in shapes.items()}, len(order), positions_per_layer=2000)
    x, y, z = (extract_stage_activations(model, IMAGENET, images, order, plans, batch_size=40)
               for model in (base, noisy.eval(), unrelated))
    for layer in ("stem", "stage1", "stage2", "stage3"):
        positions = plans[layer].positions

        def measure(first, second, shuffle=None):
            return compare_pair_layer(first[layer], second[layer], positions, ["cca", "cka"], channel_sample=32,
                                      channel_repeats=2, rng_channels=np.random.default_rng(0), shuffle_rng=shuffle).values

        real, shuffled, random_level = measure(x, y), measure(x, y, np.random.default_rng(1)), measure(x, z)
        assert real["cca"] > 0.7 and real["cka"] > 0.9, layer
        assert shuffled["cca"] < real["cca"] - 0.3, layer
        assert shuffled["cca"] < random_level["cca"] + 0.05, layer  # at or below two unrelated networks
        if layer != "stem":  # where both see the same images, unrelated stems still share input-driven similarity
            assert shuffled["cca"] == pytest.approx(random_level["cca"], abs=0.1), layer
        if layer == "stem":
            assert shuffled["cka"] < 0.1


def test_channel_draws_share_indices_when_channel_counts_match():
    rng = np.random.default_rng(0)
    draws = channel_draws(512, 512, 64, 5, rng)
    assert len(draws) == 5
    for a, b in draws:
        assert a is b and len(a) == 64 and len(set(a.tolist())) == 64
    assert not np.array_equal(draws[0][0], draws[1][0])
    different = channel_draws(256, 512, 64, 2, np.random.default_rng(0))
    assert all(len(a) == 64 and len(b) == 64 and a.max() < 256 for a, b in different)
    assert channel_draws(512, 512, 0, 5, rng) == [(None, None)]  # 0 = all channels
    assert channel_draws(64, 64, 64, 5, rng) == [(None, None)]  # nothing to sample


def test_channel_sampling_averages_over_draws():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 40)).astype(np.float32)
    y = (x + rng.normal(size=x.shape)).astype(np.float32)
    result = compare_pair_layer(x, y, 1, ["cca"], channel_sample=8, channel_repeats=3,
                                rng_channels=np.random.default_rng(7))
    from medtransfer.analysis.similarity import compute_similarity

    expected = np.mean([compute_similarity(x[:, a], y[:, b], ["cca"]).mean_cca
                        for a, b in channel_draws(40, 40, 8, 3, np.random.default_rng(7))])
    assert result.values["cca"] == pytest.approx(expected, rel=1e-9)
    assert (result.c_a, result.c_b, result.channels_a, result.draws) == (8, 8, 40, 3)


def test_streaming_in_small_chunks_gives_the_same_values(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 12)).astype(np.float32) + 5.0
    y = (x[:, :10] * 2.0 + rng.normal(size=(3000, 10))).astype(np.float32)
    whole = compare_pair_layer(x, y, 6, MEASURES, shuffle_rng=np.random.default_rng(0))
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 1000)
    chunked = compare_pair_layer(x, y, 6, MEASURES, shuffle_rng=np.random.default_rng(0))
    for measure in MEASURES:
        assert chunked.values[measure] == pytest.approx(whole.values[measure], rel=1e-8, abs=1e-10)


def test_each_channel_draw_takes_its_own_images_when_the_layer_holds_them():
    # 3 draws of 2 of 5 channels over 3 disjoint blocks of 40 images (4 positions each): each draw's value must be
    # the engine's value on exactly its block's rows and its channels, recomputed here block by block.
    from medtransfer.analysis.similarity import compute_similarity

    rng = np.random.default_rng(3)
    positions, images, per_draw = 4, 120, 40
    x = _images_with_positions(rng, images, positions, 5)
    y = x @ rng.standard_normal((5, 5)) + 0.5 * _images_with_positions(rng, images, positions, 5)
    result = compare_pair_layer(x, y, positions, ["cka"], channel_sample=2, channel_repeats=3,
                                rng_channels=np.random.default_rng(11), images_per_draw=per_draw)
    draws = channel_draws(5, 5, 2, 3, np.random.default_rng(11))
    expected = []
    for r, (a, b) in enumerate(draws):
        rows = slice(r * per_draw * positions, (r + 1) * per_draw * positions)
        expected.append(compute_similarity(x[rows][:, a].astype(np.float64), y[rows][:, b].astype(np.float64),
                                           ["cka"]).value("cka"))
    assert result.values["cka"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert result.draw_sd["cka"] == pytest.approx(np.std(expected, ddof=1), rel=1e-6)  # spread over the draws
    assert result.n == per_draw * positions and result.images == per_draw and result.draws == 3
    # the same draws all on the first block give another number: the blocks are really used
    same = compare_pair_layer(x[: per_draw * positions], y[: per_draw * positions], positions, ["cka"],
                              channel_sample=2, channel_repeats=3, rng_channels=np.random.default_rng(11))
    assert same.values["cka"] != pytest.approx(result.values["cka"], rel=1e-6)
    assert "share images" not in result.note


def test_draws_share_images_when_the_layer_holds_one_draw_and_say_so():
    rng = np.random.default_rng(4)
    x = _images_with_positions(rng, 30, 1, 6)
    y = x + 0.1 * _images_with_positions(rng, 30, 1, 6)
    result = compare_pair_layer(x, y, 1, ["cka"], channel_sample=3, channel_repeats=5,
                                rng_channels=np.random.default_rng(0), images_per_draw=30)
    assert result.draws == 5 and result.images == 30
    assert "the 5 channel draws share images: the layer holds 1 draw(s) of 30 images" in result.note


def test_all_channels_in_one_draw_still_repeat_over_fresh_images():
    # 4 channels, a sample of 64: one draw of every channel, repeated over the layer's 3 blocks of images
    from medtransfer.analysis.similarity import compute_similarity

    rng = np.random.default_rng(5)
    x = _images_with_positions(rng, 60, 2, 4)
    y = x @ rng.standard_normal((4, 4)) + _images_with_positions(rng, 60, 2, 4)
    result = compare_pair_layer(x, y, 2, ["cka"], channel_sample=64, channel_repeats=5,
                                rng_channels=np.random.default_rng(0), images_per_draw=20)
    blocks = [compute_similarity(x[r * 40:(r + 1) * 40].astype(np.float64), y[r * 40:(r + 1) * 40].astype(np.float64),
                                 ["cka"]).value("cka") for r in range(3)]
    assert result.draws == 3 and result.values["cka"] == pytest.approx(np.mean(blocks), rel=1e-9)
    one = compare_pair_layer(x, y, 2, ["cka"])
    assert one.draws == 1 and one.draw_sd["cka"] is None  # one draw: no spread to give
