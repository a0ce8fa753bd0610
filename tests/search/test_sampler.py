"""The per-trial seeded TPE: reproducible for one worker, different streams for different trials."""

from __future__ import annotations

import optuna

from medtransfer.search.sampler import TrialSeededTPESampler


def _first_values(seed, trials=4):
    study = optuna.create_study(sampler=TrialSeededTPESampler(seed=seed, n_startup_trials=2))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=trials)
    return [t.params["x"] for t in study.trials]


def test_same_seed_reproduces_the_search_and_trials_differ():
    first = _first_values(0)
    assert first == _first_values(0)
    assert len(set(first)) == len(first)
    assert first != _first_values(1)


def test_two_samplers_on_one_study_do_not_repeat_the_startup_point():
    """Two workers with the same seed on one study (trial numbers 0 and 1) draw different points."""
    storage = optuna.storages.InMemoryStorage()
    worker_a = optuna.create_study(storage=storage, study_name="s", sampler=TrialSeededTPESampler(seed=0, n_startup_trials=5))
    worker_b = optuna.load_study(storage=storage, study_name="s", sampler=TrialSeededTPESampler(seed=0, n_startup_trials=5))
    trial_a, trial_b = worker_a.ask(), worker_b.ask()
    assert trial_a.suggest_float("x", 0, 1) != trial_b.suggest_float("x", 0, 1)
