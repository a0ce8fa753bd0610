"""Fixed protocols. `paper` is the original study's fine-tuning protocol (../shared/PAPER.md, v1 runs)."""

from __future__ import annotations

import dataclasses

from medtransfer.config import TrainConfig
from medtransfer.errors import ConfigError

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
PRESETS: dict[str, TrainConfig] = {"paper": PAPER}
#: What `study.protocol` may name: an Optuna search, or one of the fixed presets.
PROTOCOL_SEARCH = "search"
PROTOCOLS = (PROTOCOL_SEARCH, *PRESETS)
#: How the report describes each protocol's AUCs.
PROTOCOL_DESCRIPTIONS = {
    PROTOCOL_SEARCH: "the best configuration of an Optuna search (params `search`, around `train`) on the search "
    "fold, refit on every fold",
    "paper": "the original study's fixed protocol, no search: Adam 1e-5, batch 128, up to 200 epochs, early "
    "stopping with patience 3 (freeze regime: the head first, on a frozen backbone, at 1e-3)",
}


def preset_of(protocol: str) -> str | None:
    """The preset a protocol names; None for a search."""
    return None if protocol == PROTOCOL_SEARCH else protocol


def train_settings(base: TrainConfig, preset: str | None, seed: int | None = None) -> TrainConfig:
    """The settings a run uses: a named preset (if any) replacing `base`, with the run's seed."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'", fix=f"use one of: {', '.join(PRESETS)}")
    settings = PRESETS[preset] if preset else base
    return dataclasses.replace(settings, seed=settings.seed if seed is None else seed)
