"""Coordination of a search's workers on one MLflow parent run."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from medtransfer.search.workers import log_parent_params

PARAMS = {"dataset": "target", "source": "random", "regime": "full", "source_version": 1}


@pytest.fixture
def client(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    return client


def _parent(client):
    return client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id


def test_the_second_worker_logging_the_same_params_is_a_no_op(client):
    run_id = _parent(client)
    log_parent_params(client, run_id, PARAMS)
    log_parent_params(client, run_id, PARAMS)
    assert client.get_run(run_id).data.params == {key: str(value) for key, value in PARAMS.items()}


def test_a_worker_that_loses_the_insert_race_accepts_what_the_winner_logged(client, monkeypatch):
    # Replays PostgreSQL's race: another worker inserts the same keys between our read and our insert, and our
    # insert fails on the unique key. The params must end up logged once, and no error reach the worker.
    run_id = _parent(client)
    real_log_batch = client.log_batch
    calls = []

    def other_worker_first(run, params=()):
        calls.append([param.key for param in params])
        if len(calls) == 1:
            real_log_batch(run, params=[Param(key, str(value)) for key, value in PARAMS.items()])
            raise MlflowException('duplicate key value violates unique constraint "param_pk"')
        return real_log_batch(run, params=params)

    monkeypatch.setattr(client, "log_batch", other_worker_first)
    log_parent_params(client, run_id, PARAMS)
    assert len(calls) == 1, "after the failed insert every key was already there: nothing to insert again"
    assert client.get_run(run_id).data.params == {key: str(value) for key, value in PARAMS.items()}


def test_a_changed_value_is_still_refused(client):
    run_id = _parent(client)
    log_parent_params(client, run_id, PARAMS)
    with pytest.raises(MlflowException):
        log_parent_params(client, run_id, {**PARAMS, "source_version": 2}, attempts=2)
