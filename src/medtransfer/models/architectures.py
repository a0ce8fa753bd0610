"""Architecture facts: the backbones `backbones.create_backbone` builds and the stages they expose, importable
without PyTorch.

The names below have backbones of their own (stages `stem`, `stage1` … `stage4`); any other name is a timm model,
built by `timm_backbone.TimmBackbone` with timm's own stage names and the source's `model_args`.

Configuration validation needs the names only; keeping them here spares every command that never builds a
network (prepare, demo-data, report, study) the cost of importing torch and timm.
"""

from __future__ import annotations

#: The Keras-faithful ResNet50 of the original study.
KERAS_RESNET50 = "keras_resnet50"
#: timm ResNets built without their classifier.
TIMM_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHITECTURES: tuple[str, ...] = (KERAS_RESNET50, *TIMM_RESNETS)
#: The stage outputs every backbone names alike, the layers the representation analysis compares: `stem` (after the
#: stem ReLU, before max-pool) and `stage1` … `stage4` (after the last block of each residual stage).
STAGE_NAMES: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4")
#: Their reductions (stride from the input): the stem's 7×7/2 convolution, then max-pool and one halving per later
#: stage. Pairs with other architectures match stages by these (`analysis.stage_matching`).
STAGE_REDUCTIONS: dict[str, int] = {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}
#: Keyword arguments `model_args` may not set: the backbone sets them itself (no classifier, random weights; the
#: weights of a source come from its kind).
RESERVED_MODEL_ARGS: tuple[str, ...] = ("pretrained", "num_classes", "features_only", "out_indices", "checkpoint_path",
                                        "pretrained_cfg", "pretrained_cfg_overlay")
