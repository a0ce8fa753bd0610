"""The search tests' project: a two-fold blob target with a random source, settings small enough to train in
seconds, and the MLflow runs it leaves."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from medtransfer.config import load_config
from medtransfer.data.prepare import prepare_dataset
from medtransfer.models.sources import register_source

BIN = Path(sys.executable).parent
TRAIN = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 2, "patience": 2, "augment": False, "seed": 0}
SEARCH = {
    "trials": 2,
    "space": {"learning_rate": {"type": "float", "low": 1.0e-9, "high": 3.0e-3, "log": True}},
    "startup_trials": 1,
    "pruner_startup_trials": 1,
    "pruner_warmup_epochs": 1,
}


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def search_project(tmp_path, write_params, blob_npz, clean_mlflow_env) -> Callable[..., object]:
    """Writes the project into tmp_path, prepares the target and registers the source; returns its config.

    Keywords: tracking_uri (default a SQLite file), storage (the Optuna storage), experiment, and any further
    params.yaml section (e.g. ``study={...}``)."""
    def make(tracking_uri=None, storage="sqlite:///optuna.db", experiment="search-test", **sections):
        blob_npz(tmp_path / "data/raw/target.npz", 0)
        stores = {"tracking_uri": tracking_uri or "sqlite:///mlflow.db", "experiment": experiment,
                  "optuna_storage": storage}
        params = write_params(
            {"target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                        "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}}},
            sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0}},
            train=TRAIN, search=SEARCH, stores=stores, **sections,
        )
        config = load_config(params)
        prepare_dataset(config, "target")
        register_source(config, "random")
        return config

    return make


@pytest.fixture
def config(search_project):
    return search_project()


def runs_of(config, filter_string=""):
    experiment = mlflow.MlflowClient().get_experiment_by_name(config.stores.experiment)
    return mlflow.MlflowClient().search_runs([experiment.experiment_id], filter_string=filter_string, max_results=500)


@pytest.fixture(scope="session")
def search_runs() -> Callable[..., list]:
    """``search_runs(config, filter_string="")``: the runs of the config's experiment (at most 500)."""
    return runs_of


def environment_for_the_cli(extra=None) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}, **(extra or {}))
    return env


@pytest.fixture(scope="session")
def cli_env() -> Callable[..., dict]:
    """``cli_env(extra=None)``: this environment without MLFLOW_* variables, the venv's bin first on PATH, telemetry
    off, plus ``extra``."""
    return environment_for_the_cli
