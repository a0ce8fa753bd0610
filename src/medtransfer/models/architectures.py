"""The names of the backbones `backbones.create_backbone` builds, importable without PyTorch.

Configuration validation needs the names only; keeping them here spares every command that never builds a
network (prepare, demo-data, report, study) the cost of importing torch and timm.
"""

from __future__ import annotations

#: The Keras-faithful ResNet50 of the original study.
KERAS_RESNET50 = "keras_resnet50"
#: timm ResNets built without their classifier.
TIMM_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHITECTURES: tuple[str, ...] = (KERAS_RESNET50, *TIMM_RESNETS)
