"""Coordination of a search's workers on one MLflow parent run."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from medtransfer.layout import STEP_SEARCH, Tag
from medtransfer.search.workers import RESUMED_AFTER_TAG, find_or_create_parent, log_parent_params

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


@pytest.mark.parametrize("ended", ["KILLED", "FAILED", "FINISHED"])
def test_a_search_going_on_in_an_ended_parent_says_how_and_when_it_had_ended(client, ended):
    experiment = client.get_experiment_by_name("e").experiment_id
    tags = {Tag.STUDY: "e/target.random.full", Tag.STEP: STEP_SEARCH}
    first = find_or_create_parent(client, experiment, tags[Tag.STUDY], tags)
    assert RESUMED_AFTER_TAG not in client.get_run(first).data.tags, "a new parent resumes nothing"
    assert find_or_create_parent(client, experiment, tags[Tag.STUDY], tags) == first
    assert RESUMED_AFTER_TAG not in client.get_run(first).data.tags, "another worker's running search: no resume"
    client.set_terminated(first, ended, end_time=1_700_000_000_000)  # 2023-11-14 22:13:20 UTC
    assert find_or_create_parent(client, experiment, tags[Tag.STUDY], tags) == first, "the same parent goes on"
    assert client.get_run(first).data.tags[RESUMED_AFTER_TAG] == f"{ended} at 2023-11-14 22:13:20 UTC"
