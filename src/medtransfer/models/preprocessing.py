"""Input preprocessing as data: each source carries the transform its weights were trained with.

Keras ResNet50 (ImageNet and RadImageNet) uses "caffe" preprocessing: RGB → BGR and subtract the ImageNet BGR
means, no scaling. timm/torchvision ResNets use ImageNet mean/std on [0, 1] RGB. Grey images are replicated to the
three channels first. The spec travels inside every packaged model, so training, analysis and serving apply the
same transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medtransfer.errors import ModelError


@dataclass(frozen=True)
class Preprocessing:
    """uint8 images → network input: (pixel[order] - mean) / std, with mean and std in 0..255 pixel units."""

    name: str
    channel_order: str  # "RGB" or "BGR": the order the network expects
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # the resolution the weights were trained at (informative; targets use their own size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        try:
            spec = cls(
                name=str(data["name"]),
                channel_order=str(data["channel_order"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                input_size=int(data["input_size"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"malformed preprocessing spec ({error!r})") from None
        if spec.channel_order not in ("RGB", "BGR") or len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise ModelError(f"malformed preprocessing spec {data}")
        return spec

    def apply(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, H, W, C) or (N, H, W) uint8, C in {1, 3} → (N, 3, H, W) float32 network input."""
        batch = torch.as_tensor(images)
        if batch.ndim == 3:
            batch = batch.unsqueeze(-1)
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise ModelError(f"images must be (N, H, W) or (N, H, W, 1 or 3), got {tuple(batch.shape)}")
        batch = batch.permute(0, 3, 1, 2).to(torch.float32)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        if self.channel_order == "BGR":
            batch = batch.flip(1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((batch - mean) / std).contiguous()


IMAGENET = Preprocessing(
    name="imagenet",
    channel_order="RGB",
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    input_size=224,
)
CAFFE = Preprocessing(
    name="caffe", channel_order="BGR", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), input_size=224
)
PREPROCESSING: dict[str, Preprocessing] = {spec.name: spec for spec in (IMAGENET, CAFFE)}


def preprocessing_by_name(name: str) -> Preprocessing:
    if name not in PREPROCESSING:
        raise ModelError(f"unknown preprocessing '{name}'", fix=f"use one of: {', '.join(PREPROCESSING)}")
    return PREPROCESSING[name]
