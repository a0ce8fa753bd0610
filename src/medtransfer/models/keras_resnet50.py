"""ResNet50 v1 exactly as Keras builds it (`tf.keras.applications.ResNet50(include_top=False)`), in PyTorch.

This is not torchvision's ResNet50 (v1.5): every convolution has a bias, the stride of a downsampling bottleneck
sits on its first 1×1 convolution (not the 3×3), and BatchNorm uses eps 1.001e-5. Those details matter for
loading Keras weights (RadImageNet, Keras ImageNet) and getting the same activations.

The network is cut into the five stage outputs the representation analysis compares (`STAGE_NAMES`):

    stem    zero-pad 3, 7×7/2 conv, BN, ReLU             Keras output `conv1_relu`        (N, 64,   H/2,  W/2)
    stage1  3×3/2 max-pool, 3 bottlenecks (stride 1)      Keras output `conv2_block3_out`  (N, 256,  H/4,  W/4)
    stage2  4 bottlenecks (first stride 2)                Keras output `conv3_block4_out`  (N, 512,  H/8,  W/8)
    stage3  6 bottlenecks (first stride 2)                Keras output `conv4_block6_out`  (N, 1024, H/16, W/16)
    stage4  3 bottlenecks (first stride 2)                Keras output `conv5_block3_out`  (N, 2048, H/32, W/32)

(sizes rounded up: each stride-2 step maps a side s to ceil(s/2)). The input is an already preprocessed float
tensor (N, 3, H, W); Keras' "caffe" preprocessing lives with the pretraining sources, not here.

Keras layer names map to our module paths in one place, `keras_layer_to_module_path`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from medtransfer.models.architectures import STAGE_NAMES

KERAS_STAGE_OUTPUTS = {
    "stem": "conv1_relu",
    "stage1": "conv2_block3_out",
    "stage2": "conv3_block4_out",
    "stage3": "conv4_block6_out",
    "stage4": "conv5_block3_out",
}

BLOCKS_PER_STAGE = (3, 4, 6, 3)
FILTERS_PER_STAGE = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
STEM_CHANNELS = 64
NUM_FEATURES = FILTERS_PER_STAGE[-1] * BOTTLENECK_EXPANSION

# Keras' BatchNormalization(epsilon=1.001e-5) in resnet.py; Keras momentum 0.99 weighs the *old* running value,
# torch momentum weighs the *new* batch statistic, so the equivalent torch momentum is 1 - 0.99.
BATCH_NORM_EPS = 1.001e-5
BATCH_NORM_MOMENTUM = 0.01


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)


class Stem(nn.Module):
    """Keras `conv1_pad` + `conv1_conv` + `conv1_bn` + `conv1_relu`: (N, 3, H, W) → (N, 64, ceil(H/2), ceil(W/2))."""

    def __init__(self) -> None:
        super().__init__()
        # ZeroPadding2D(3) followed by a 'valid' 7×7 stride-2 conv is the same as a conv with padding=3.
        self.conv = nn.Conv2d(3, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=True)
        self.bn = _batch_norm(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Shortcut(nn.Module):
    """The projection shortcut of a stage's first bottleneck (Keras `*_block1_0_conv` / `*_block1_0_bn`)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=True)
        self.bn = _batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Bottleneck(nn.Module):
    """Keras `resnet.block1`: 1×1 (stride s) → 3×3 → 1×1 (4·filters), each with bias and BN; add shortcut; ReLU.

    (N, in_channels, H, W) → (N, 4·filters, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, in_channels: int, filters: int, stride: int, projection: bool) -> None:
        super().__init__()
        out_channels = BOTTLENECK_EXPANSION * filters
        self.conv1 = nn.Conv2d(in_channels, filters, kernel_size=1, stride=stride, bias=True)
        self.bn1 = _batch_norm(filters)
        # Keras 'same' padding with stride 1 and an odd kernel is symmetric padding of kernel // 2.
        self.conv2 = nn.Conv2d(filters, filters, kernel_size=3, stride=1, padding=1, bias=True)
        self.bn2 = _batch_norm(filters)
        self.conv3 = nn.Conv2d(filters, out_channels, kernel_size=1, stride=1, bias=True)
        self.bn3 = _batch_norm(out_channels)
        self.shortcut = Shortcut(in_channels, out_channels, stride) if projection else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class Stage(nn.Module):
    """An optional max-pool followed by bottlenecks registered as `0`, `1`, … (so names read `stage2.0.conv1`)."""

    def __init__(self, in_channels: int, filters: int, blocks: int, stride: int, max_pool: bool) -> None:
        super().__init__()
        # Keras pads with zeros (`pool1_pad`) before a 'valid' 3×3/2 max-pool. The input comes straight from the
        # stem ReLU, so it is >= 0 and every window holds at least one real value: a zero in the padding can never
        # exceed the window's maximum, and zero padding gives the same result as the -inf padding of MaxPool2d.
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if max_pool else None
        out_channels = BOTTLENECK_EXPANSION * filters
        for index in range(blocks):
            first = index == 0
            self.add_module(
                str(index),
                Bottleneck(
                    in_channels if first else out_channels, filters, stride if first else 1, projection=first
                ),
            )
        self.num_blocks = blocks

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> Bottleneck:
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(f"stage has {self.num_blocks} blocks, no index {index}")
        return getattr(self, str(index % self.num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        for index in range(self.num_blocks):
            x = self[index](x)
        return x


class KerasResNet50(nn.Module):
    """ResNet50 v1 without top, layer for layer as Keras builds it; `forward` returns the stage4 map.

    forward: (N, 3, H, W) preprocessed float → (N, 2048, ceil(H/32), ceil(W/32)).
    """

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        stages = []
        in_channels = STEM_CHANNELS
        for index, (blocks, filters) in enumerate(zip(BLOCKS_PER_STAGE, FILTERS_PER_STAGE)):
            first = index == 0
            stages.append(Stage(in_channels, filters, blocks, stride=1 if first else 2, max_pool=first))
            in_channels = BOTTLENECK_EXPANSION * filters
        self.stage1, self.stage2, self.stage3, self.stage4 = stages

    def stage_modules(self) -> dict[str, nn.Module]:
        """The five modules whose outputs are the named stage outputs, in forward order."""
        return {name: getattr(self, name) for name in STAGE_NAMES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.stage_modules().values():
            x = module(x)
        return x


_BLOCK_LAYER = re.compile(r"conv(?P<stage>[2-5])_block(?P<block>[1-9])_(?P<part>[0-3])_(?P<kind>conv|bn)")


def keras_layer_to_module_path(layer_name: str) -> str:
    """Our module path for a weighted Keras ResNet50 layer: `conv3_block2_1_conv` → `stage2.1.conv1`.

    `conv1_conv`/`conv1_bn` are the stem; `conv{s}_block{b}_{p}_{conv,bn}` is bottleneck b-1 of stage s-1, with
    part 0 the projection shortcut and parts 1-3 the three convolutions. Raises KeyError for any other name,
    including block numbers beyond the stage's block count.
    """
    if layer_name in ("conv1_conv", "conv1_bn"):
        return "stem." + layer_name.removeprefix("conv1_")
    match = _BLOCK_LAYER.fullmatch(layer_name)
    if match is None:
        raise KeyError(layer_name)
    stage, block, part = int(match["stage"]) - 1, int(match["block"]) - 1, int(match["part"])
    kind = match["kind"]
    if block >= BLOCKS_PER_STAGE[stage - 1] or (part == 0 and block != 0):
        raise KeyError(layer_name)
    if part == 0:
        return f"stage{stage}.{block}.shortcut.{kind}"
    return f"stage{stage}.{block}.{kind}{part}"


def keras_weighted_layer_names() -> list[str]:
    """Every weighted Keras ResNet50 (no top) layer name, in Keras' order (conv before its BN, shortcut first)."""
    names = ["conv1_conv", "conv1_bn"]
    for stage, blocks in enumerate(BLOCKS_PER_STAGE, start=2):
        for block in range(1, blocks + 1):
            parts = (0, 1, 2, 3) if block == 1 else (1, 2, 3)
            for part in parts:
                names += [f"conv{stage}_block{block}_{part}_conv", f"conv{stage}_block{block}_{part}_bn"]
    return names
