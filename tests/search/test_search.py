"""Optuna searches as MLflow runs: pruning, resume, superseded fits, registration, pointers, the paper protocol
(the searches as processes are in test_search_processes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from medtransfer.pointers import pointer_path, read_pointer, verify_pointer
from medtransfer.search.storage import create_storage
from medtransfer.search.study import SearchRequest, run_search, study_name


def test_a_hopeless_trial_is_pruned(config, monkeypatch):
    """The pruning machinery (report, median rule, KILLED run, a replacement trial) on validation curves forced by
    the test: the real fine-tuning runs, but each epoch reports a scripted loss by learning rate, so which trial is
    worse never depends on how training happened to go on this machine."""
    import medtransfer.search.study as search_study

    real_finetune = search_study.run_finetune

    def scripted_curves(config_, request_, *, on_epoch_end=None, **kwargs):
        loss = 5.0 if request_.settings.learning_rate < 1e-6 else 0.3

        def report(phase, epoch, metrics):
            if on_epoch_end is not None:
                on_epoch_end(phase, epoch, {**metrics, "val_loss": loss})

        return real_finetune(config_, request_, on_epoch_end=report, **kwargs)

    monkeypatch.setattr(search_study, "run_finetune", scripted_curves)
    request = SearchRequest("target", "random", "full", trials=2)
    study = optuna.create_study(storage=create_storage(config.optuna_storage), study_name=study_name(config, request),
                                direction="minimize")
    study.enqueue_trial({"learning_rate": 3e-3})  # reports 0.3 each epoch
    study.enqueue_trial({"learning_rate": 1e-9})  # reports 5.0: worse than the median, pruned after the warm-up
    # The first configuration again: the same curve as the first trial, and the median rule (prune when worse)
    # lets it complete the requested two.
    study.enqueue_trial({"learning_rate": 3e-3})
    outcome = run_search(config, request)
    trials = optuna.load_study(study_name=outcome.study, storage=create_storage(config.optuna_storage)).get_trials()
    assert trials[1].params["learning_rate"] == pytest.approx(1e-9)
    assert trials[1].state == TrialState.PRUNED
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    pruned_run = mlflow.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["optuna_state"] == "PRUNED"


def test_resume_reuses_the_parent_and_every_run_is_nested(config, search_runs):
    first = run_search(config, SearchRequest("target", "random", "full", trials=1))
    second = run_search(config, SearchRequest("target", "random", "full", trials=2))
    assert first.parent_run_id == second.parent_run_id and second.complete_trials == 2
    parents = search_runs(config, "tags.step = 'search'")
    assert [run.info.run_id for run in parents] == [first.parent_run_id]
    children = [run for run in search_runs(config) if run.data.tags.get("step") in ("trial", "final_fit")]
    assert len(children) >= 2 + 2
    assert all(run.data.tags.get("mlflow.parentRunId") == first.parent_run_id for run in children)
    assert not search_runs(config, "attributes.status = 'RUNNING'")
    parent = mlflow.get_run(first.parent_run_id)
    assert {"test_auc_mean", "test_auc_sd", "best_val_loss"} <= set(parent.data.metrics)
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed_after"].startswith("FINISHED at ")
    # Whichever trial won each time: the fits the pointer names are current, every other final fit is superseded,
    # and the README's filter returns one fit per fold.
    current = {fold.run_id for fold in second.pointer.folds}
    fits = search_runs(config, "tags.step = 'final_fit'")
    assert {run.info.run_id for run in fits if run.data.tags.get("superseded") == "false"} == current
    assert all(run.data.tags.get("superseded") == "true" for run in fits if run.info.run_id not in current)
    shown = search_runs(config, "tags.step = 'final_fit' and tags.superseded = 'false'")
    assert sorted(run.data.tags["fold"] for run in shown) == ["0", "1"]


def test_an_earlier_fit_is_tagged_superseded_and_only_changed_tags_are_written(tmp_path, monkeypatch):
    from medtransfer.search.promotion import mark_superseded

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")

    def fit(dataset="target", source="random", regime="full", **extra):
        tags = {"step": "final_fit", "dataset": dataset, "source": source, "regime": regime, **extra}
        return client.create_run(experiment, tags=tags).info.run_id

    old, new = fit(superseded="false"), fit()
    other_source, other_step = fit(source="natural"), client.create_run(experiment, tags={"step": "trial"}).info.run_id
    writes = []
    monkeypatch.setattr(client, "set_tag", lambda *args: (writes.append(args), type(client).set_tag(client, *args)))
    mark_superseded(client, experiment, SearchRequest("target", "random", "full"), {new})
    tags = {run_id: client.get_run(run_id).data.tags.get("superseded") for run_id in (old, new, other_source, other_step)}
    assert tags == {old: "true", new: "false", other_source: None, other_step: None}
    writes.clear()
    mark_superseded(client, experiment, SearchRequest("target", "random", "full"), {new})
    assert writes == [], "nothing changed, nothing written"


def test_pointer_matches_the_registry(config):
    outcome = run_search(config, SearchRequest("target", "random", "full", trials=1))
    path = pointer_path(config, "target", "random", "full")
    pointer = read_pointer(path)
    assert pointer == outcome.pointer and len(pointer.folds) == 2
    manifest = json.loads((config.prepared_data_dir / "target/manifest.json").read_text())
    client = mlflow.MlflowClient()
    fold0 = client.get_model_version_by_alias("target.random.full", "fold0")
    assert fold0.tags["data_fingerprint"] == manifest["fingerprint"] == pointer.data_fingerprint
    assert fold0.tags["study"] == outcome.study and json.loads(fold0.tags["params"]) == outcome.best_params
    assert str(client.get_model_version_by_alias("target.random.full", "champion").version) == pointer.champion_version
    verify_pointer(client, pointer, str(path))  # agrees
    client.set_registered_model_alias("target.random.full", "fold0", pointer.folds[1].version)
    from medtransfer.errors import ModelError

    with pytest.raises(ModelError, match="registry disagrees with the model pointer: alias fold0"):
        verify_pointer(client, pointer, str(path))


def test_a_retry_queued_after_the_target_was_reached_is_recorded_as_surplus_not_left_waiting(config):
    """A stale trial failed while the other workers completed the study re-queues a retry nobody needs: the search
    takes it from the queue and records it as surplus (PRUNED, never run), so no trial is left WAITING."""
    from optuna.distributions import FloatDistribution

    from medtransfer.search.workers import SURPLUS_ATTR

    request = SearchRequest("target", "random", "full", trials=1)
    study = optuna.create_study(storage=create_storage(config.optuna_storage), study_name=study_name(config, request),
                                direction="minimize")
    study.add_trial(optuna.trial.create_trial(
        params={"learning_rate": 1e-3}, distributions={"learning_rate": FloatDistribution(1e-9, 3e-3, log=True)},
        value=0.5))  # the one requested trial, complete
    study.enqueue_trial({"learning_rate": 2e-3})  # the retry, queued after it
    run_search(config, request)
    trials = optuna.load_study(study_name=study.study_name, storage=create_storage(config.optuna_storage)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].user_attrs[SURPLUS_ATTR] is True and "mlflow_run_id" not in trials[1].user_attrs


def test_preset_paper_registers_without_searching(config, monkeypatch):
    import dataclasses

    from medtransfer.train import presets

    quick = dataclasses.replace(presets.PAPER, max_epochs=1, head_max_epochs=1, batch_size=16)
    monkeypatch.setitem(presets.PRESETS, "paper", quick)
    outcome = run_search(config, SearchRequest("target", "random", "freeze", preset="paper"))
    assert outcome.complete_trials == 0 and outcome.study.endswith("/paper")
    version = mlflow.MlflowClient().get_model_version_by_alias("target.random.freeze", "fold1")
    assert version.tags["trial"] == "paper"


def test_a_failed_model_upload_fails_the_fit_and_registers_nothing(config, search_runs, monkeypatch):
    """The artifact store refuses the model (disk full) in the first final fit: that run ends FAILED, so does the
    search, no version is registered and no pointer is written."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    upload = LocalArtifactRepository.log_artifacts

    def refuse_models(self, local_dir, artifact_path=None):
        if "models" in Path(self.artifact_dir).parts:  # MLflow 3 keeps logged models under <experiment>/models/
            raise OSError(28, "No space left on device")
        return upload(self, local_dir, artifact_path)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", refuse_models)
    with pytest.raises(OSError, match="No space left"):
        run_search(config, SearchRequest("target", "random", "full"))
    fits = search_runs(config, "tags.step = 'final_fit'")
    assert len(fits) == 1 and fits[0].info.status == "FAILED"
    assert [run.info.status for run in search_runs(config, "tags.step = 'search'")] == ["FAILED"]
    assert not mlflow.MlflowClient().search_model_versions("name = 'target.random.full'")
    assert not pointer_path(config, "target", "random", "full").exists()


def test_best_trial_and_champion_are_the_lowest_validation_losses_in_the_runs(config, search_runs):
    """Checked against what the MLflow runs recorded, not against the pointer or aliases the same code wrote."""
    request = SearchRequest("target", "random", "full", trials=2)
    study = optuna.create_study(storage=create_storage(config.optuna_storage), study_name=study_name(config, request),
                                direction="minimize")
    study.enqueue_trial({"learning_rate": 1e-4})
    study.enqueue_trial({"learning_rate": 3e-3})
    outcome = run_search(config, request)
    runs = search_runs(config)
    complete = [run for run in runs if run.data.tags.get("step") == "trial"
                and run.data.tags.get("optuna_state") == "COMPLETE"]
    assert len(complete) == 2
    best = min(complete, key=lambda run: run.data.metrics["objective_val_loss"])
    fits = [run for run in runs if run.data.tags.get("step") == "final_fit"]
    assert len(fits) == 2 and {run.data.tags["trial"] for run in fits} == {best.data.tags["trial"]}
    for run in fits:
        assert float(run.data.params["learning_rate"]) == pytest.approx(float(best.data.params["search_learning_rate"]))
    lowest = min(run.data.metrics["best_val_loss"] for run in fits)
    champion = mlflow.MlflowClient().get_model_version_by_alias("target.random.full", "champion")
    # any fit at the lowest loss (two folds can tie exactly, e.g. both at a loss of 0)
    assert champion.run_id in {run.info.run_id for run in fits if run.data.metrics["best_val_loss"] == lowest}
    assert outcome.parent_run_id == fits[0].data.tags["mlflow.parentRunId"]


def test_the_paper_protocol_of_the_study_reaches_the_trainer_on_every_fold(search_project, search_runs, monkeypatch,
                                                                           repo_root):
    """dvc.yaml's search stage, as DVC would render it for a profile with `study.protocol: paper`, fits the preset's
    settings (here a 1-epoch stand-in) on every fold, logs them, and records the protocol in the pointer."""
    import dataclasses
    import shlex

    import yaml

    from medtransfer import cli
    from medtransfer.search import promotion
    from medtransfer.train import presets

    config = search_project(experiment="paper-protocol", study={"targets": ["target"], "sources": ["random"],
                                                                "regimes": ["freeze"], "protocol": "paper"})
    quick = dataclasses.replace(presets.PAPER, max_epochs=1, head_max_epochs=1, batch_size=16)
    monkeypatch.setitem(presets.PRESETS, "paper", quick)
    handed = []
    real_finetune = promotion.run_finetune
    monkeypatch.setattr(promotion, "run_finetune", lambda cfg, request, **kw: handed.append(request) or
                        real_finetune(cfg, request, **kw))

    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["search"]
    assert "study.protocol" in stage["params"]  # DVC reruns the searches when the protocol changes
    command = stage["cmd"].replace("${item.dataset}", "target").replace("${item.source}", "random") \
        .replace("${item.regime}", "freeze").replace("${study.protocol}", config.study.protocol)
    words = shlex.split(command)
    assert words[:2] == ["medtransfer", "search"]
    monkeypatch.chdir(config.root)
    assert cli.main(["--params", str(config.source_file), *words[1:]]) == 0

    assert sorted(request.fold for request in handed) == [0, 1]  # every fold, and no search trial before them
    assert all(request.preset == "paper" for request in handed)
    assert all(dataclasses.replace(request.settings, seed=quick.seed) == quick for request in handed)
    pointer = read_pointer(pointer_path(config, "target", "random", "freeze"))
    assert pointer.protocol == "paper" and pointer.best_params == {}
    fits = search_runs(config, "tags.step = 'final_fit'")
    assert sorted(run.data.params["fold"] for run in fits) == ["0", "1"]
    for run in fits:
        logged = run.data.params
        assert logged["preset"] == "paper"
        assert {key: logged[key] for key in ("learning_rate", "batch_size", "max_epochs", "patience",
                                             "head_learning_rate", "head_patience", "optimizer")} == \
            {key: str(getattr(quick, key)) for key in ("learning_rate", "batch_size", "max_epochs", "patience",
                                                       "head_learning_rate", "head_patience", "optimizer")}
    (parent,) = search_runs(config, "tags.step = 'search'")
    assert parent.data.params["protocol"] == "paper"
    assert not search_runs(config, "tags.step = 'trial'")


def test_search_runs_and_versions_explain_themselves(config, search_runs):
    """Source and regime in run names, code revision and profile on every run, the parent's description, space
    and Optuna plots, registry descriptions linking each fit to its source version."""
    from medtransfer.tracking import CODE_REVISION_TAG, PROFILE_TAG

    outcome = run_search(config, SearchRequest("target", "random", "full", trials=2))
    client = mlflow.MlflowClient()

    runs = search_runs(config)
    by_step = {}
    for run in runs:
        by_step.setdefault(run.data.tags["step"], []).append(run)
    assert sorted(run.info.run_name for run in by_step["final_fit"]) == ["fit random/full fold0", "fit random/full fold1"]
    assert by_step["trial"] and all(run.info.run_name == f"trial {run.data.tags['trial']} random/full"
                                    for run in by_step["trial"])
    assert {"search", "trial", "final_fit", "source"} <= set(by_step)
    for run in runs:
        assert run.data.tags[PROFILE_TAG] == config.project.profile, run.info.run_name
        assert run.data.tags[CODE_REVISION_TAG], run.info.run_name

    parent = client.get_run(outcome.parent_run_id)
    description = parent.data.tags["mlflow.note.content"]
    assert "source `random`, regime `full`" in description and "`learning_rate` float [1e-09, 0.003] log" in description
    assert parent.data.params["space_learning_rate"] == "float [1e-09, 0.003] log"
    plots = {artifact.path for artifact in client.list_artifacts(outcome.parent_run_id, "optuna")}
    assert plots == {"optuna/optimization_history.png", "optuna/param_importances.png"}

    source_version = outcome.pointer.source_version
    assert "Pretraining source `random`" in client.get_registered_model("source.random").description
    assert "`resnet18` with weights from `random(seed=0)`" in client.get_model_version("source.random", source_version).description
    assert "fine-tuned from source `random` ([source.random](#/models/source.random))" in \
        client.get_registered_model("target.random.full").description
    for fit in outcome.pointer.folds:
        version_description = client.get_model_version("target.random.full", fit.version).description
        link = f"[source.random v{source_version}](#/models/source.random/versions/{source_version})"
        assert f"fold {fit.fold} (seed 0)" in version_description and link in version_description
        assert f"test AUC {fit.test_auc:.3f}" in version_description
