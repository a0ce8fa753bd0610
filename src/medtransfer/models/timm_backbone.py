"""Any timm model as a backbone, with the stage outputs its own `feature_info` declares.

timm describes each model's stages (`feature_info`: module name, channels, reduction = stride from the input) and
returns them from `forward_intermediates` in NCHW layout whatever the model: a vision transformer's tokens come
back as a (channels, h, w) grid of patches with its class and register tokens removed, so that, as for a
convolutional network, every spatial position of every image is one datapoint of the analysis.

`TimmBackbone` runs that one forward pass and sends each stage output through an identity module (a tap), so a
forward hook on `stage_modules()[name]` sees a (batch, channels, h, w) tensor for every model, the surface the
extraction already hooks. Its output is timm's own pooled features (`forward_head(pre_logits=True)`), shaped
(batch, features, 1, 1) so that `Classifier`'s global average pool passes it through unchanged.

Stage names are timm's module names in forward order (`stages.0`, `blocks.11`). ResNets keep their own backbone
(`backbones.TimmResNet`, stages `stem`, `stage1` … `stage4`), so existing studies are unchanged.

`stage_reductions` (from `feature_info`) is what `analysis.stage_matching` pairs two architectures' stages by.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medtransfer.errors import ModelError

__all__ = ["TimmBackbone", "close_timm_names", "timm_model_exists"]


def timm_model_exists(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def close_timm_names(name: str) -> list[str]:
    """Up to four timm model names close to `name` (for a misspelt `arch:`)."""
    import timm

    return difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)


class TimmBackbone(nn.Module):
    """timm model `name` (random weights; `model_args` passed to `timm.create_model`, e.g. `img_size=32` for a ViT
    on small images) without its classifier, with one tap per stage of its `feature_info`."""

    def __init__(self, name: str, model_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            close = close_timm_names(name)
            raise ModelError(f"timm has no model named '{name}'", where="arch",
                             fix=f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names")
        try:
            self.body = timm.create_model(name, pretrained=False, num_classes=0, **dict(model_args or {}))
        except (TypeError, ValueError, AssertionError, RuntimeError) as error:
            raise ModelError(f"timm cannot build '{name}' with model arguments {dict(model_args or {})} ({error})",
                             where="model_args", fix="check the argument names and values timm's model accepts") from None
        info = getattr(self.body, "feature_info", None)
        if not info or not hasattr(self.body, "forward_intermediates"):
            raise ModelError(f"timm model '{name}' declares no stages (feature_info / forward_intermediates)",
                             where="arch", fix="choose a model whose stages timm can return")
        entries = list(info.get_dicts()) if hasattr(info, "get_dicts") else list(info)
        self.arch = name
        self.model_args: dict[str, Any] = dict(model_args or {})
        self.stage_names: tuple[str, ...] = tuple(str(entry["module"]) for entry in entries)
        self.stage_reductions: dict[str, int] = {str(e["module"]): int(e["reduction"]) for e in entries}
        self.stage_channels: dict[str, int] = {str(e["module"]): int(e["num_chs"]) for e in entries}
        self.taps = nn.ModuleDict({_tap_key(stage): nn.Identity() for stage in self.stage_names})
        self.num_features = int(self.body.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, stages = self.body.forward_intermediates(x, indices=list(range(len(self.stage_names))),
                                                        output_fmt="NCHW")
        for name, output in zip(self.stage_names, stages):
            self.taps[_tap_key(name)](output)
        return self.body.forward_head(final, pre_logits=True)[:, :, None, None]

    def stage_modules(self) -> dict[str, nn.Module]:
        return {name: self.taps[_tap_key(name)] for name in self.stage_names}


def _tap_key(stage: str) -> str:
    return stage.replace(".", "_")
