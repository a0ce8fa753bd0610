"""A run wrapped by `ends_with_outcome` ends with its block's outcome, and so does every run left open inside it."""

from __future__ import annotations

import contextlib

import mlflow
import pytest

from medtransfer.run_scope import ends_with_outcome, outcome_status


class Boom(Exception):
    pass


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("e")
    yield mlflow.MlflowClient()
    while mlflow.active_run() is not None:  # a failed test must not leave runs to the next one
        mlflow.end_run()


def _status(client, run_id):
    return client.get_run(run_id).info.status


@pytest.mark.parametrize(("raised", "status"), [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"), (Boom, "FAILED")])
def test_runs_left_open_inside_end_with_the_wrapped_run_and_its_callers_run_stays(store, raised, status):
    caller = mlflow.start_run()  # e.g. the pipeline's or the launcher's run: not the block's to end
    opened = {}
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with ends_with_outcome(mlflow.start_run(nested=True)) as wrapped:
            opened["wrapped"] = wrapped.info.run_id
            opened["inner"] = mlflow.start_run(nested=True).info.run_id  # never ended by its own code
            opened["innermost"] = mlflow.start_run(nested=True).info.run_id
            if raised:
                raise raised()
    assert {name: _status(store, run_id) for name, run_id in opened.items()} == dict.fromkeys(opened, status)
    assert mlflow.active_run().info.run_id == caller.info.run_id
    assert _status(store, caller.info.run_id) == "RUNNING"
    mlflow.end_run()


def test_a_wrapped_run_the_block_ended_itself_leaves_the_callers_run_alone(store):
    caller = mlflow.start_run()
    with ends_with_outcome(mlflow.start_run(nested=True)) as wrapped:
        mlflow.end_run("FAILED")  # the block ended its own run: its outcome stands
    assert _status(store, wrapped.info.run_id) == "FAILED"
    assert mlflow.active_run().info.run_id == caller.info.run_id
    mlflow.end_run()


def test_the_outcome_of_a_block():
    assert [outcome_status(caught) for caught in (None, KeyboardInterrupt(), Boom(), SystemExit(2))] == [
        "FINISHED", "KILLED", "FAILED", "FAILED"]

