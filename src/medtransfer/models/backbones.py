"""One factory for every backbone, one classifier around it, one naming of the stages the analysis hooks.

Backbones are looked up by name: `keras_resnet50` (the Keras-faithful ResNet50 of the original study), a timm
ResNet (`resnet18`, `resnet34`, `resnet50`, ...), or any other timm model (`convnext_atto`, `vit_tiny_patch16_224`,
built by `timm_backbone.TimmBackbone` with the source's `model_args`). Each exposes the same surface:

- `forward(x)`: (N, 3, H, W) preprocessed input → features (N, num_features, h, w) (h = w = 1 for timm models,
  already pooled by timm's own head);
- `stage_modules()`: the modules whose outputs are the named stages, in forward order: for the ResNets `stem`
  (after the stem ReLU, before max-pool) and `stage1` … `stage4` (after the last block of each residual stage),
  for other timm models timm's own stage names (`stages.0`, `blocks.11`);
- `num_features`: channels of the features.

`Classifier` adds global average pooling and a head of dropout + linear, replaceable for a new class count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from medtransfer.errors import ModelError
from medtransfer.models.architectures import KERAS_RESNET50, STAGE_NAMES, STAGE_REDUCTIONS, TIMM_RESNETS
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


def default_preprocessing(arch: str) -> Preprocessing:
    """caffe for the Keras ResNet50 (its weights expect BGR minus the ImageNet mean), ImageNet's for the rest."""
    return CAFFE if arch == KERAS_RESNET50 else IMAGENET


def create_backbone(arch: str, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """The backbone `arch` names: one of `BACKBONES`, else the timm model of that name built with `model_args`."""
    if arch in BACKBONES:
        if model_args:
            raise ModelError(f"'{arch}' is built with fixed arguments, it takes no model arguments {dict(model_args)}",
                             where="model_args", fix="remove model_args (they are for other timm models)")
        return BACKBONES[arch]()
    from medtransfer.models.timm_backbone import TimmBackbone

    return TimmBackbone(arch, model_args)


def stage_reductions(model: nn.Module) -> dict[str, int]:
    """{stage: reduction} of a `Classifier` or backbone, in forward order: timm's `feature_info` for a
    `TimmBackbone`, `STAGE_REDUCTIONS` for the ResNets."""
    backbone = getattr(model, "backbone", model)
    declared = getattr(backbone, "stage_reductions", None)
    if declared:
        return dict(declared)
    return {name: STAGE_REDUCTIONS[name] for name in backbone.stage_modules()}


class Classifier(nn.Module):
    """Backbone → global average pool → head (dropout + linear). With `num_classes=None` the head is absent and
    the model outputs pooled features (a pretraining source without a top)."""

    def __init__(self, arch: str, num_classes: int | None, dropout: float = HEAD_DROPOUT,
                 model_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model_args: dict[str, Any] = dict(model_args or {})
        self.dropout = dropout
        self.backbone = create_backbone(arch, self.model_args)
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


def seeded_classifier(arch: str, num_classes: int | None, seed: int, model_args: Mapping[str, Any] | None = None,
                      *, where: str | None = None) -> Classifier:
    """A `Classifier` built with torch's global generator seeded by `seed` (and restored afterwards).

    `keras_like_init_` redraws convolutions, linear layers and BatchNorm only; what it does not visit (a vision
    transformer's position embedding and class token) keeps timm's initialisation, which draws from the global
    generator. Seeding it here makes every parameter a function of `seed`, so the same source builds the same
    weights twice (and registers once). A ModelError names its key under `where` (e.g. `params.yaml: sources.x`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return Classifier(arch, num_classes, model_args=model_args)
        except ModelError as error:
            if where is None:
                raise
            raise ModelError(error.what, where=f"{where}.{error.where or 'arch'}", fix=error.fix) from None


def keras_like_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Keras' default initialisation, in place, drawn from `generator` only (same seed → same weights on any CPU).

    Conv and linear weights: glorot (Xavier) uniform; biases zero; BatchNorm gamma 1, beta 0, running mean 0,
    running variance 1, batch counter 0. Modules are visited in `named_modules` order. Anything else (LayerNorm,
    a transformer's embeddings, layer scales) keeps the initialisation it was built with (see `seeded_classifier`).
    Returns `module`.
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
