"""What `mlflow run` hands a step, checked once at the step's start.

MLflow creates the launcher's run before the entry point starts, in the experiment of `--experiment-name` (else
MLflow's Default) and the store of MLFLOW_TRACKING_URI (else MLflow's default in the working folder), and the
step cannot move it afterwards. A run outside the active profile's store or experiment would be invisible where
the study, the report and the UI instructions look, so the step refuses it before doing any work, with one line
naming the flag or variable that puts it right. An MLproject entry point also always passes its parameters, so an
optional one arrives as '' when the user gave none.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from medtransfer.config import Config, load_config, resolve_store_url
from medtransfer.errors import ConfigError, warn


def launched_by_mlflow_run() -> bool:
    """True inside an `mlflow run` entry point (the launcher exports the run id)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def load_step_config(params_file: str | None) -> Config:
    """The validated params of a step; under `mlflow run`, refused unless the launcher's run is the profile's."""
    config = load_config(params_file)
    check_launched_run(config)
    return config


def check_launched_run(config: Config) -> None:
    """Under `mlflow run`: raise `ConfigError` when the launcher's run is in another store or experiment than the
    profile names; warn when its artifacts fall outside the profile's artifact root."""
    import mlflow

    if not launched_by_mlflow_run():
        return
    run_id = os.environ["MLFLOW_RUN_ID"]
    launcher_uri = os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri
    profile_uri = config.tracking_uri
    if resolve_store_url(launcher_uri, Path.cwd()) != profile_uri:
        raise ConfigError(
            f"mlflow run logs to {launcher_uri}, the active profile to {profile_uri}",
            where=f"{config.source_file}: stores.tracking_uri",
            fix=f"export MLFLOW_TRACKING_URI={profile_uri} before 'mlflow run'",
        )
    client = mlflow.MlflowClient(tracking_uri=launcher_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(
            f"the run mlflow run started ({run_id}) is not in {profile_uri}",
            where=f"{config.source_file}: stores.tracking_uri",
            fix=f"export MLFLOW_TRACKING_URI={profile_uri} before 'mlflow run'",
        ) from None
    experiment = client.get_experiment(run.info.experiment_id)
    wanted = config.stores.experiment
    if experiment.name != wanted:
        raise ConfigError(
            f"mlflow run started this step in experiment '{experiment.name}', the active profile logs to '{wanted}'",
            where=f"{config.source_file}: stores.experiment",
            fix=f"pass --experiment-name {wanted} to 'mlflow run'",
        )
    if not profile_uri.startswith(("http://", "https://")):  # a tracking server places artifacts itself
        root = _as_uri(config.artifact_root).rstrip("/")
        artifacts = _as_uri(run.info.artifact_uri)
        if artifacts != root and not artifacts.startswith(root + "/"):
            warn(f"this run's artifacts go to {artifacts}, outside the profile's artifact root {root}: 'mlflow run' "
                 f"created experiment '{wanted}' before medtransfer could; to keep them together, delete it and let "
                 "a medtransfer step (e.g. 'medtransfer study') create it")


#: The `step` of an `mlflow run -e search` launcher's run: the search logs under a parent shared by its workers
#: (`step=search`), so the launcher's own run is only the entry point.
STEP_LAUNCHER = "launcher"


def label_launched_run(config: Config, command: str, details: list[object]) -> None:
    """Under `mlflow run`, after `check_launched_run`: give the experiment its kind and description
    (`tracking.experiment_tags`), name the launcher's run (`mlflow run source random`) and tag
    its `step` unless it has them, so a step that logs nothing of its own (a source already registered, a search,
    whose runs hang below the shared parent) leaves no randomly named run without a step. A step that logs into the
    launcher's run (`tracking.step_run`) renames it after its own work."""
    import mlflow

    from medtransfer.experiment_tags import tag_experiment

    if not launched_by_mlflow_run():
        return
    run_id = os.environ["MLFLOW_RUN_ID"]
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)  # the launcher's, as check_launched_run found
    run = client.get_run(run_id)
    tag_experiment(client, client.get_experiment(run.info.experiment_id), config)  # made by `mlflow run`, untagged
    tags = run.data.tags
    if "step" in tags:  # labelled already
        return
    client.set_tag(run_id, "step", STEP_LAUNCHER if command == "search" else command)
    client.update_run(run_id, name=" ".join(["mlflow run", command, *(str(d) for d in details if d not in (None, ""))]))


def optional_count(text: str) -> int | None:
    """argparse type of an optional positive count: '' (an MLproject parameter left at its default) is unset."""
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _as_uri(location: str) -> str:
    return location if "://" in location or location.startswith("file:") else Path(location).resolve().as_uri()
