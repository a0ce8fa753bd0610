"""MLflow set-up: the configured sqlite store and experiment, and dataset lineage on a run."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from medtransfer.config import load_config
from medtransfer.tracking import ensure_experiment, log_prepared_dataset, use_tracking_store


@pytest.fixture
def config(write_params, monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    return load_config(write_params({}))


def test_store_and_experiment_live_under_the_repository_root(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # the working folder must not matter
    uri = use_tracking_store(config)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    experiment_id = ensure_experiment(config)
    experiment = mlflow.MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "test"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert ensure_experiment(config) == experiment_id, "found again, not created twice"
    assert (tmp_path / "mlflow.db").is_file()


def test_launcher_experiment_is_kept(config, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "42")
    assert ensure_experiment(config) == "42"


def test_prepared_dataset_is_logged_as_a_run_input(config, tmp_path):
    use_tracking_store(config)
    manifest = {"dataset": "d", "fingerprint": "ab" * 32}
    with mlflow.start_run(experiment_id=ensure_experiment(config)) as run:
        log_prepared_dataset(manifest, tmp_path / "data/prepared/d", context="training")
    logged = mlflow.get_run(run.info.run_id)
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == "d"
    assert dataset_input.dataset.digest == ("ab" * 32)[:32]
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    assert tags["data_fingerprint"] == "ab" * 32 and tags["mlflow.data.context"] == "training"
    assert logged.data.tags["data_fingerprint.d"] == "ab" * 32


def test_a_dataset_logged_by_another_worker_in_between_is_reused(config, tmp_path, monkeypatch):
    """The race of two workers logging the same new dataset: the first insert wins, the loser's retry reuses it."""
    use_tracking_store(config)
    manifest = {"dataset": "d", "fingerprint": "cd" * 32}
    log_input = mlflow.log_input
    calls = []

    def lose_the_race_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("UNIQUE constraint failed: datasets.experiment_id, name, digest")
        return log_input(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lose_the_race_once)
    with mlflow.start_run(experiment_id=ensure_experiment(config)) as run:
        log_prepared_dataset(manifest, tmp_path / "data/prepared/d", context="training")
    assert len(calls) == 2
    assert [i.dataset.name for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs] == ["d"]


def test_an_experiment_created_by_another_worker_in_between_is_used(config, monkeypatch):
    use_tracking_store(config)
    client = mlflow.MlflowClient()
    theirs = client.create_experiment("test")
    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name",
                        _first_call_returns_none(mlflow.MlflowClient.get_experiment_by_name))
    assert ensure_experiment(config) == theirs


def _first_call_returns_none(method):
    calls = []

    def patched(self, name):
        calls.append(name)
        return None if len(calls) == 1 else method(self, name)

    return patched


def test_under_mlflow_run_the_launchers_run_gets_the_steps_readable_name(config, monkeypatch):
    from medtransfer.tracking import step_run

    use_tracking_store(config)
    launcher = mlflow.MlflowClient().create_run(ensure_experiment(config), run_name="judicious-jay-891")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    with step_run(config, step="study", run_name="study demo") as run:
        assert run.info.run_id == launcher.info.run_id
    finished = mlflow.get_run(launcher.info.run_id)
    assert finished.info.run_name == "study demo" and finished.data.tags["step"] == "study"


def _launched(monkeypatch, run, tracking_uri):
    """The environment `mlflow run` hands an entry point."""
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", run.info.experiment_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)


def test_a_launcher_run_in_the_profiles_experiment_and_store_is_accepted(config, monkeypatch):
    from medtransfer.mlflow_project import check_launched_run

    use_tracking_store(config)
    _launched(monkeypatch, mlflow.MlflowClient().create_run(ensure_experiment(config)), config.tracking_uri)
    check_launched_run(config)


def test_a_launcher_run_in_another_experiment_is_refused_naming_the_flag(config, monkeypatch):
    from medtransfer.errors import ConfigError
    from medtransfer.mlflow_project import check_launched_run

    use_tracking_store(config)
    client = mlflow.MlflowClient()
    _launched(monkeypatch, client.create_run(client.get_experiment_by_name("Default").experiment_id),
              config.tracking_uri)
    with pytest.raises(ConfigError, match="in experiment 'Default'.*pass --experiment-name test to 'mlflow run'"):
        check_launched_run(config)


def test_a_launcher_run_in_another_store_is_refused_naming_the_variable(config, tmp_path, monkeypatch):
    from medtransfer.errors import ConfigError
    from medtransfer.mlflow_project import check_launched_run

    other = f"sqlite:///{tmp_path / 'other.db'}"
    client = mlflow.MlflowClient(tracking_uri=other)
    _launched(monkeypatch, client.create_run(client.get_experiment_by_name("Default").experiment_id), other)
    with pytest.raises(ConfigError, match=f"export MLFLOW_TRACKING_URI={config.tracking_uri} before"):
        check_launched_run(config)


def test_the_experiment_opens_the_model_training_view_and_describes_the_study(config):
    from medtransfer.experiment_tags import EXPERIMENT_KIND

    use_tracking_store(config)
    tags = mlflow.MlflowClient().get_experiment(ensure_experiment(config)).tags
    assert tags["mlflow.experimentKind"] == EXPERIMENT_KIND == "custom_model_development"
    assert f"profile `{config.project.profile}`" in tags["mlflow.note.content"]
    assert "tags.superseded = 'false'" in tags["mlflow.note.content"], "the description shows the current-fits filter"


def test_an_experiment_made_elsewhere_gets_the_kind_but_keeps_its_own_description(config):
    use_tracking_store(config)
    client = mlflow.MlflowClient()
    made = client.create_experiment(config.stores.experiment, tags={"mlflow.note.content": "mine"})
    assert ensure_experiment(config) == made
    tags = client.get_experiment(made).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and tags["mlflow.note.content"] == "mine"


def test_a_step_run_given_its_start_spans_the_work_under_the_pipeline_run(config, monkeypatch):
    import time

    from medtransfer.tracking import PIPELINE_RUN_ENV, step_run

    use_tracking_store(config)
    client = mlflow.MlflowClient()
    pipeline = client.create_run(ensure_experiment(config), run_name="study demo")
    monkeypatch.setenv(PIPELINE_RUN_ENV, pipeline.info.run_id)
    began = time.time() - 100.0  # the work began 100 s before the run is opened to log it
    with step_run(config, step="compare", run_name="compare t", started=began) as run:
        mlflow.log_metric("m", 1.0)
    logged = client.get_run(run.info.run_id)
    assert logged.info.start_time == int(began * 1000)
    assert logged.info.end_time - logged.info.start_time >= 100_000
    assert logged.info.run_name == "compare t" and logged.info.status == "FINISHED"
    assert logged.data.tags["mlflow.parentRunId"] == pipeline.info.run_id and logged.data.tags["step"] == "compare"
    with mlflow.start_run(run_id=pipeline.info.run_id):  # inside an active run: nested below it
        with step_run(config, step="summary", run_name="summary", started=began) as nested:
            pass
    assert client.get_run(nested.info.run_id).data.tags["mlflow.parentRunId"] == pipeline.info.run_id


@pytest.mark.parametrize(("command", "details", "step", "name"), [
    ("source", [None, None, "random", None], "source", "mlflow run source random"),
    ("search", ["target", "random", None, "full"], "launcher", "mlflow run search target random full"),
])
def test_a_launcher_run_is_named_and_tagged_before_the_step_works(config, monkeypatch, command, details, step, name):
    from medtransfer.mlflow_project import label_launched_run

    use_tracking_store(config)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(config.stores.experiment)  # as `mlflow run --experiment-name` makes it
    _launched(monkeypatch, client.create_run(experiment, run_name="judicious-jay-891"), config.tracking_uri)
    label_launched_run(config, command, details)
    mlflow_run_id = os.environ["MLFLOW_RUN_ID"]
    run = client.get_run(mlflow_run_id)
    assert run.info.run_name == name and run.data.tags["step"] == step
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_tag(mlflow_run_id, "step", "source")
    label_launched_run(config, command, ["other"])  # labelled already (a step renamed it): left alone
    assert client.get_run(mlflow_run_id).info.run_name == name



def test_an_mlflow_tracking_uri_the_study_does_not_use_is_named_once(config, monkeypatch, capsys):
    import medtransfer
    from medtransfer import tracking

    monkeypatch.setattr(tracking, "_NAMED_UNUSED_URI", set())
    monkeypatch.setattr(medtransfer, "MLFLOW_TRACKING_URI_AT_START", "http://alice:secret@127.0.0.1:9")
    uri = use_tracking_store(config)
    use_tracking_store(config)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"medtransfer: note: $MLFLOW_TRACKING_URI (http://alice:***@127.0.0.1:9) is not used; runs go "
                     f"to {uri} ({config.source_file}: stores.tracking_uri) -- to log there, set "
                     "$MEDTRANSFER_TRACKING_URI or stores.tracking_uri instead"]


def test_the_same_store_named_another_way_or_a_studys_own_export_is_not_named(config, monkeypatch, capsys):
    import medtransfer
    from medtransfer import tracking

    monkeypatch.setattr(tracking, "_NAMED_UNUSED_URI", set())
    uri = use_tracking_store(config)
    database = Path(uri.removeprefix("sqlite:///"))
    monkeypatch.chdir(database.parent)
    for same in (uri, "sqlite:///" + database.name, uri + "/"):  # relative to the working folder, as MLflow reads it
        monkeypatch.setattr(medtransfer, "MLFLOW_TRACKING_URI_AT_START", same)
        use_tracking_store(config)
    monkeypatch.setattr(medtransfer, "MLFLOW_TRACKING_URI_AT_START", "http://127.0.0.1:9")
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "0" * 32)  # a stage of a study: the study exported its own store
    use_tracking_store(config)
    assert capsys.readouterr().err == ""


def test_the_uri_is_read_before_mlflow_can_export_its_own(tmp_path):
    """In a fresh interpreter: the variable as the process found it, although MLflow rewrites it on first use."""
    import subprocess
    import sys

    probe = ("import medtransfer, mlflow, os; mlflow.set_tracking_uri('sqlite:///x.db'); "
             "print(medtransfer.MLFLOW_TRACKING_URI_AT_START, os.environ['MLFLOW_TRACKING_URI'])")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MLFLOW_TRACKING_URI": "http://h:1"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["http://h:1", "sqlite:///x.db"]
