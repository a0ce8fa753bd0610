"""The search space declared in params (`search.space`) → Optuna suggestions → training settings."""

from __future__ import annotations

import dataclasses

from medtransfer.config import SearchParameter, TrainConfig


def suggest(trial, space: dict[str, SearchParameter]) -> dict:
    """One value per declared parameter, drawn by `trial` (an optuna.Trial)."""
    values = {}
    for name, parameter in space.items():
        if parameter.type == "categorical":
            values[name] = trial.suggest_categorical(name, list(parameter.choices))
        elif parameter.type == "int":
            values[name] = trial.suggest_int(name, int(parameter.low), int(parameter.high), log=parameter.log)
        else:
            values[name] = trial.suggest_float(name, float(parameter.low), float(parameter.high), log=parameter.log)
    return values


def settings_with(base: TrainConfig, values: dict) -> TrainConfig:
    """`base` with the searched values applied."""
    return dataclasses.replace(base, **values)
