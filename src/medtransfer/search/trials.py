"""Reading a study's trials: which count as done, said once."""

from __future__ import annotations

from collections.abc import Iterable


def only_complete(trials: Iterable) -> list:
    """The COMPLETE trials among `trials` (Optuna's FrozenTrial); pruned, failed and running ones do not count."""
    return [trial for trial in trials if trial.state.name == "COMPLETE"]


def complete_trials(study) -> list:
    """The COMPLETE trials of an Optuna study, in their order."""
    return only_complete(study.get_trials(deepcopy=False))
