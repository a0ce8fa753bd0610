"""Augmentation: parameters drawn per image, uint8 kept, identity exact, flip exact, ranges as the original."""

from __future__ import annotations

import math

import numpy as np
import torch

from medtransfer.train.augment import AugmentationSettings, affine_matrices, augment_batch, draw_affine_parameters


def _identity_parameters(count=1, flip=False):
    ones = torch.ones(count, dtype=torch.float64)
    return {"angle": ones * 0, "shift_x": ones * 0, "shift_y": ones * 0, "shear": ones * 0, "zoom_x": ones,
            "zoom_y": ones, "flip": torch.full((count,), flip)}


def test_each_image_gets_its_own_parameters_and_uint8_survives():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, size=(1, 32, 32, 1), dtype=np.uint8))
    batch = image.repeat(16, 1, 1, 1)
    out = augment_batch(batch, AugmentationSettings(), torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    distinct = {bytes(out[i].numpy()) for i in range(16)}
    assert len(distinct) == 16, "identical inputs must come out differently"


def test_parameter_ranges_follow_the_original():
    parameters = draw_affine_parameters(20000, AugmentationSettings(), torch.Generator().manual_seed(1))
    assert parameters["angle"].abs().max() <= math.radians(10) and parameters["angle"].abs().max() > math.radians(9.9)
    assert parameters["shear"].abs().max() <= math.radians(0.1)  # Keras measures shear_range in degrees
    assert parameters["shift_x"].abs().max() <= 0.1 and parameters["shift_y"].abs().max() <= 0.1
    assert 0.9 <= parameters["zoom_x"].min() and parameters["zoom_y"].max() <= 1.1
    assert not torch.equal(parameters["zoom_x"], parameters["zoom_y"]), "zoom drawn per axis"
    assert 0.48 < parameters["flip"].float().mean() < 0.52
    no_flip = draw_affine_parameters(100, AugmentationSettings(horizontal_flip=False), torch.Generator().manual_seed(1))
    assert not no_flip["flip"].any()


def test_identity_is_exact_and_flip_mirrors_exactly():
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(1, 3, 12, 12), dtype=np.uint8)).float()
    for flip, expected in ((False, image), (True, image.flip(-1))):
        theta = affine_matrices(_identity_parameters(flip=flip))
        grid = torch.nn.functional.affine_grid(theta, list(image.shape), align_corners=False)
        warped = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(warped.round(), expected)


def test_shift_moves_content_and_fills_with_the_border():
    image = torch.zeros(1, 1, 10, 10)
    image[..., :, 0] = 200.0  # a bright left column
    parameters = _identity_parameters()
    parameters["shift_x"] = torch.tensor([-0.1], dtype=torch.float64)  # sample 1 px to the left: content moves right
    grid = torch.nn.functional.affine_grid(affine_matrices(parameters), [1, 1, 10, 10], align_corners=False)
    warped = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped = warped.round()  # as augment_batch does before returning uint8
    assert torch.all(warped[..., :, 1] == 200.0) and torch.all(warped[..., :, 0] == 200.0), "border replicated"
    assert torch.all(warped[..., :, 2:] == 0.0)
