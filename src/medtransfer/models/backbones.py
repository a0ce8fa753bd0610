"""One factory for every backbone, one classifier around it, one naming of the stages the analysis hooks.

Backbones are looked up by name: `keras_resnet50` (the Keras-faithful ResNet50 of the original study) or any
timm ResNet (`resnet18`, `resnet34`, `resnet50`, ...). Each exposes the same surface:

- `forward(x)`: (N, 3, H, W) preprocessed input → the last stage's feature map (N, num_features, h, w);
- `stage_modules()`: the five modules whose outputs are the named stages `stem` (after the stem ReLU, before
  max-pool) and `stage1` … `stage4` (after the last block of each residual stage);
- `num_features`: channels of `stage4`.

`Classifier` adds global average pooling and a head of dropout + linear, replaceable for a new class count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medtransfer.errors import ModelError
from medtransfer.models.architectures import KERAS_RESNET50, STAGE_NAMES, TIMM_RESNETS
from medtransfer.models.preprocessing import CAFFE, IMAGENET, Preprocessing

HEAD_DROPOUT = 0.5


class TimmResNet(nn.Module):
    """A timm ResNet without its classifier, with the stage surface above.

    `zero_init_last=False`: timm zero-initialises the last BatchNorm of every residual branch by default, which
    makes a random network's residual branches silent; Keras does not, and neither do we.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", zero_init_last=False)
        self.num_features = int(self.body.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x)

    def stage_modules(self) -> dict[str, nn.Module]:
        body = self.body
        return dict(zip(STAGE_NAMES, (body.act1, body.layer1, body.layer2, body.layer3, body.layer4)))


def _keras_resnet50() -> nn.Module:
    from medtransfer.models.keras_resnet50 import KerasResNet50

    return KerasResNet50()


def _timm_factory(name: str) -> Callable[[], nn.Module]:
    return lambda: TimmResNet(name)


# Adding an architecture means adding its name to architectures.py and an entry here; nothing else changes.
BACKBONES: dict[str, Callable[[], nn.Module]] = {
    KERAS_RESNET50: _keras_resnet50,
    **{name: _timm_factory(name) for name in TIMM_RESNETS},
}
DEFAULT_PREPROCESSING: dict[str, Preprocessing] = {name: IMAGENET for name in BACKBONES} | {KERAS_RESNET50: CAFFE}


def create_backbone(arch: str) -> nn.Module:
    if arch not in BACKBONES:
        raise ModelError(f"unknown architecture '{arch}'", fix=f"use one of: {', '.join(BACKBONES)}")
    return BACKBONES[arch]()


class Classifier(nn.Module):
    """Backbone → global average pool → head (dropout + linear). With `num_classes=None` the head is absent and
    the model outputs pooled features (a pretraining source without a top)."""

    def __init__(self, arch: str, num_classes: int | None, dropout: float = HEAD_DROPOUT) -> None:
        super().__init__()
        self.arch = arch
        self.dropout = dropout
        self.backbone = create_backbone(arch)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_classes: int | None = None
        self.head: nn.Module = nn.Identity()
        if num_classes is not None:
            self.replace_head(num_classes)

    def replace_head(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """A new head for `num_classes` classes (glorot-uniform weights, zero bias, like Keras' Dense)."""
        if num_classes < 2:
            raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
        linear = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.xavier_uniform_(linear.weight, generator=generator)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(self.dropout), linear)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone(x)))

    def stage_modules(self) -> dict[str, nn.Module]:
        return self.backbone.stage_modules()

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.head.parameters()


def keras_like_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Keras' default initialisation, in place, drawn from `generator` only (same seed → same weights on any CPU).

    Conv and linear weights: glorot (Xavier) uniform; biases zero; BatchNorm gamma 1, beta 0, running mean 0,
    running variance 1, batch counter 0. Modules are visited in `named_modules` order. Returns `module`.
    """
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(child.weight, generator=generator)
                if child.bias is not None:
                    nn.init.zeros_(child.bias)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                if child.affine:
                    nn.init.ones_(child.weight)
                    nn.init.zeros_(child.bias)
                if child.track_running_stats:
                    child.reset_running_stats()
    return module
