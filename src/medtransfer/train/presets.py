"""The settings of the fixed protocols (their names live in `train.protocols`). `paper` is the original study's
fine-tuning protocol (../shared/PAPER.md, v1 runs)."""

from __future__ import annotations

import dataclasses

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError
from medtransfer.train.protocols import PRESET_NAMES, PRESET_PAPER

PAPER = TrainConfig(
    optimizer="adam",
    learning_rate=1e-5,  # Adam 1e-5 for fine-tuning everything
    weight_decay=0.0,
    batch_size=128,
    max_epochs=200,  # up to 200 epochs, early stopping on validation loss with patience 3, best weights restored
    patience=3,
    head_learning_rate=1e-3,  # freeze variant, phase 1: head on a frozen backbone, Adam 1e-3,
    head_patience=2,  # early stopping on validation accuracy with patience 2
    head_max_epochs=200,
    augment=True,
)
PRESETS: dict[str, TrainConfig] = {PRESET_PAPER: PAPER}
assert tuple(PRESETS) == PRESET_NAMES, "every preset named in train.protocols has its settings here"


def train_settings(base: TrainConfig, preset: str | None, seed: int | None = None) -> TrainConfig:
    """The settings a run uses: a named preset (if any) replacing `base`, with the run's seed."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'", fix=f"use one of: {', '.join(PRESETS)}")
    settings = PRESETS[preset] if preset else base
    return dataclasses.replace(settings, seed=settings.seed if seed is None else seed)
