"""TPE seeded per trial, so that parallel workers explore different points while one worker stays reproducible.

Every worker builds its own sampler from the same seed; a plain seeded TPESampler would then make each worker draw
the same "random" startup points. Re-deriving the sampler's random state from (seed, trial number) before each
trial — trial numbers are unique within a study, assigned by the storage — gives every trial its own stream,
whichever worker runs it.
"""

from __future__ import annotations

import optuna


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    def __init__(self, *, seed: int, n_startup_trials: int) -> None:
        super().__init__(seed=seed, n_startup_trials=n_startup_trials)
        self._base_seed = seed

    def before_trial(self, study, trial) -> None:
        derived = (self._base_seed * 1_000_003 + trial.number) % 2**32
        # Optuna 5 keeps TPE's state and its random start-up sampler's state in these LazyRandomState objects.
        self._rng.rng.seed(derived)
        self._random_sampler._rng.rng.seed(derived)  # noqa: SLF001
        super().before_trial(study, trial)
