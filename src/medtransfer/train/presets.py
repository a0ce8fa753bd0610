"""The settings of the fixed protocols (their names live in `train.protocols`). `paper` is the original study's
fine-tuning protocol (../shared/PAPER.md, v1 runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError
from medtransfer.train.protocols import PRESET_NAMES, PRESET_PAPER


@dataclass(frozen=True)
class LoopOptions:
    """How the loop trains beyond `TrainConfig`: what a fixed protocol pins (see `loop_options`).

    adam_eps:           Adam's (and AdamW's) epsilon (torch's default 1e-8; Keras' 1e-7).
    head_restores_best: whether the freeze regime's head phase ends on its best epoch (True) or, like a Keras
                        EarlyStopping without restore_best_weights, on its last epoch (False).
    autocast:           bfloat16 autocast on a GPU (True) or float32 throughout (False). A CPU is always float32.
    binary_head:        for two classes, a 2-way softmax with cross-entropy (`softmax`) or one sigmoid unit with
                        binary cross-entropy (`sigmoid`). The sigmoid unit is kept inside the 2-way head, so
                        packaging, extraction and prediction see the usual (N, 2): logit 0 is pinned at zero
                        (weights and bias zero, their gradients zeroed every step), logit 1 is the unit's z, and
                        softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)], whose cross-entropy is exactly the
                        binary cross-entropy of sigmoid(z).
    """

    adam_eps: float = 1e-8
    head_restores_best: bool = True
    autocast: bool = True
    binary_head: Literal["softmax", "sigmoid"] = "softmax"


DEFAULT_LOOP_OPTIONS = LoopOptions()

PAPER = TrainConfig(
    optimizer="adam",
    learning_rate=1e-5,  # Adam 1e-5 for fine-tuning everything
    weight_decay=0.0,
    batch_size=128,
    max_epochs=200,  # up to 200 epochs, early stopping on validation loss with patience 3; the
    # best epoch is kept (their ModelCheckpoint(save_best_only=True) file is the model they log and test)
    patience=3,
    head_learning_rate=1e-3,  # freeze variant, phase 1: head on a frozen backbone, Adam 1e-3,
    head_patience=2,  # early stopping on validation accuracy with patience 2
    head_max_epochs=200,
    augment=True,
)
PRESETS: dict[str, TrainConfig] = {PRESET_PAPER: PAPER}
assert tuple(PRESETS) == PRESET_NAMES, "every preset named in train.protocols has its settings here"

# What the authors' v1 script (DovileDo/revisiting-transfer, src/fine-tuning.py at commit f9672ca) did beyond
# the settings above; README "The `paper` protocol: ours vs the authors'" lists every row with its source.
PAPER_LOOP = LoopOptions(
    adam_eps=1e-7,  # tf.keras.optimizers.Adam's default epsilon (both Adam() calls pass none)
    head_restores_best=False,  # f_es = EarlyStopping(monitor="val_acc", patience=2): no restore_best_weights
    autocast=False,  # Keras trains in float32 unless a mixed-precision policy is set; theirs sets none
    binary_head="sigmoid",  # binary targets: Dense(1, activation="sigmoid") + BinaryCrossentropy()
)
LOOP_OPTIONS: dict[str, LoopOptions] = {PRESET_PAPER: PAPER_LOOP}
assert tuple(LOOP_OPTIONS) == PRESET_NAMES, "every preset named in train.protocols has its loop options here"
#: The random initialisation's head under a preset, where the authors' differs from the pretrained sources':
#: their later script (src/fine-tuning.py at commit 1efcebd; v1 had no random source) builds it as
#: ResNet50(weights=None, include_top=True, classes=K, classifier_activation="softmax"): average pooling and a
#: K-way softmax Dense (2-way for binary targets), no dropout.
RANDOM_HEAD_DROPOUT: dict[str, float] = {PRESET_PAPER: 0.0}
RANDOM_BINARY_HEAD: dict[str, str] = {PRESET_PAPER: "softmax"}


def loop_options(preset: str | None, *, random_source: bool = False) -> LoopOptions:
    """The loop options a run uses: the preset's (if any), for a random source with its own binary head."""
    if preset is None:
        return DEFAULT_LOOP_OPTIONS
    if preset not in LOOP_OPTIONS:
        raise ConfigError(f"unknown preset '{preset}'", fix=f"use one of: {', '.join(LOOP_OPTIONS)}")
    options = LOOP_OPTIONS[preset]
    if random_source and preset in RANDOM_BINARY_HEAD:
        options = dataclasses.replace(options, binary_head=RANDOM_BINARY_HEAD[preset])
    return options


def head_dropout(preset: str | None, default: float, *, random_source: bool = False) -> float:
    """The head's dropout rate: `default` unless the preset gives the random initialisation its own."""
    if random_source and preset in RANDOM_HEAD_DROPOUT:
        return RANDOM_HEAD_DROPOUT[preset]
    return default


def train_settings(base: TrainConfig, preset: str | None, seed: int | None = None) -> TrainConfig:
    """The settings a run uses: a named preset (if any) replacing `base`, with the run's seed."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'", fix=f"use one of: {', '.join(PRESETS)}")
    settings = PRESETS[preset] if preset else base
    return dataclasses.replace(settings, seed=settings.seed if seed is None else seed)
