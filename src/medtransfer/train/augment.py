"""Training augmentation equivalent to the original study's Keras `ImageDataGenerator`, on uint8 batches.

Per image, independently: rotation uniform in ±10°, horizontal and vertical shift uniform in ±10 % of the side,
shear uniform in ±0.1 *degrees* (Keras measures `shear_range` in degrees, so this is nearly no shear — as in the
original), zoom drawn independently per axis from [0.9, 1.1], and a horizontal flip with probability 1/2 unless
the dataset disables it (chest X-rays). As in Keras, the affine map is taken about the image centre, sampled with
bilinear interpolation (Keras' default order 1), and pixels from outside are filled with the nearest border pixel
(`fill_mode="nearest"`). The whole batch is warped in one `grid_sample` call, so it is fast on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentationSettings:
    rotation_degrees: float = 10.0
    shift_fraction: float = 0.1
    shear_degrees: float = 0.1
    zoom_range: tuple[float, float] = (0.9, 1.1)
    horizontal_flip: bool = True


def draw_affine_parameters(count: int, settings: AugmentationSettings, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image parameters, each (count,): angle and shear in radians, shifts as fractions, zooms, flip flags."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)

    return {
        "angle": torch.deg2rad(uniform(-settings.rotation_degrees, settings.rotation_degrees)),
        "shift_x": uniform(-settings.shift_fraction, settings.shift_fraction),
        "shift_y": uniform(-settings.shift_fraction, settings.shift_fraction),
        "shear": torch.deg2rad(uniform(-settings.shear_degrees, settings.shear_degrees)),
        "zoom_x": uniform(*settings.zoom_range),
        "zoom_y": uniform(*settings.zoom_range),
        "flip": (torch.rand(count, generator=generator) < 0.5) if settings.horizontal_flip else torch.zeros(count, dtype=torch.bool),
    }


def affine_matrices(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 2, 3) maps from output to input coordinates, in the normalised [-1, 1] frame of `affine_grid`.

    Composed as in Keras: rotation · shift · shear · zoom, about the centre. In the normalised frame a shift of
    a fraction f of the side is 2f, and for square images rotation and shear need no aspect correction.
    """
    angle, shear = parameters["angle"], parameters["shear"]
    count = angle.shape[0]
    rotation = _stack_3x3(torch.cos(angle), -torch.sin(angle), torch.zeros(count), torch.sin(angle), torch.cos(angle), torch.zeros(count))
    shift = _stack_3x3(torch.ones(count), torch.zeros(count), 2 * parameters["shift_x"], torch.zeros(count), torch.ones(count), 2 * parameters["shift_y"])
    shearing = _stack_3x3(torch.ones(count), -torch.sin(shear), torch.zeros(count), torch.zeros(count), torch.cos(shear), torch.zeros(count))
    zoom = _stack_3x3(parameters["zoom_x"], torch.zeros(count), torch.zeros(count), torch.zeros(count), parameters["zoom_y"], torch.zeros(count))
    matrix = rotation @ shift @ shearing @ zoom
    flip = torch.where(parameters["flip"], -1.0, 1.0).to(matrix.dtype)
    matrix[:, :, 0] *= flip[:, None]  # mirror the output's x axis
    return matrix[:, :2, :].to(torch.float32)


def _stack_3x3(a, b, c, d, e, f) -> torch.Tensor:
    count = a.shape[0]
    zeros, ones = torch.zeros(count, dtype=torch.float64), torch.ones(count, dtype=torch.float64)
    rows = [a, b, c, d, e, f, zeros, zeros, ones]
    return torch.stack([r.to(torch.float64) for r in rows], dim=1).view(count, 3, 3)


def augment_batch(images: torch.Tensor, settings: AugmentationSettings, generator: torch.Generator) -> torch.Tensor:
    """(N, H, W, C) uint8 → (N, H, W, C) uint8, each image with its own random affine warp and flip."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {tuple(images.shape)} {images.dtype}")
    batch = images.permute(0, 3, 1, 2).to(torch.float32)
    theta = affine_matrices(draw_affine_parameters(batch.shape[0], settings, generator))
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    warped = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
