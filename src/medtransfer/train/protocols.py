"""The names of the fine-tuning protocols `study.protocol` may name, importable without the presets' settings.

Configuration validation needs the names only; the settings behind each preset live in `train.presets`, which
builds on the configuration's `TrainConfig`.
"""

from __future__ import annotations

from medtransfer.errors import ConfigError

#: An Optuna search around `train`.
PROTOCOL_SEARCH = "search"
#: The original study's fixed protocol (../shared/PAPER.md, v1 runs).
PRESET_PAPER = "paper"
#: The fixed presets, each a `TrainConfig` in `train.presets.PRESETS`.
PRESET_NAMES: tuple[str, ...] = (PRESET_PAPER,)
#: What `study.protocol` may name: an Optuna search, or one of the fixed presets.
PROTOCOLS = (PROTOCOL_SEARCH, *PRESET_NAMES)
#: How the report describes each protocol's AUCs.
PROTOCOL_DESCRIPTIONS = {
    PROTOCOL_SEARCH: "the best configuration of an Optuna search (params `search`, around `train`) on the search "
    "fold, refit on every fold",
    PRESET_PAPER: "the original study's fixed protocol, no search: Adam 1e-5, batch 128, up to 200 epochs, early "
    "stopping with patience 3 (freeze regime: the head first, on a frozen backbone, at 1e-3)",
}


def preset_of(protocol: str) -> str | None:
    """The preset a protocol names; None for a search."""
    return None if protocol == PROTOCOL_SEARCH else protocol


def preset_for_protocol(protocol: str, where: str) -> str | None:
    """The preset a protocol names (None for a search), or a ConfigError for a protocol that does not exist."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'", where=where, fix=f"use one of: {', '.join(PROTOCOLS)}")
    return preset_of(protocol)
