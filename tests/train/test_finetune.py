"""finetune and pretrain end to end against a temporary MLflow store: runs, metrics, artifacts, registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medtransfer.config import load_config
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.models.mlflow_models import load_registered_model, register_logged_model
from medtransfer.models.sources import register_source
from medtransfer.train.finetune import FinetuneRequest, run_finetune
from medtransfer.train.pretrain import RECIPE_TAG, pretrain_source

TINY_TRAIN = {"learning_rate": 1e-3, "batch_size": 16, "max_epochs": 2, "patience": 2, "head_max_epochs": 1,
              "augment": True, "seed": 0}


@pytest.fixture
def config(tmp_path, write_params, monkeypatch, blob_npz):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    blob_npz(tmp_path / "data/raw/target.npz", 0)
    blob_npz(tmp_path / "data/raw/pretext.npz", 1, classes=4)
    params = write_params(
        {
            "target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                       "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.2}},
            "pretext": {"format": "medmnist", "path": "data/raw/pretext.npz", "classes": ["q0", "q1", "q2", "q3"]},
        },
        sources={"random": {"kind": "random", "arch": "resnet18", "seed": 0},
                 "tiny": {"kind": "pretrained", "arch": "resnet18", "dataset": "pretext", "seed": 5, "train": TINY_TRAIN}},
        train=TINY_TRAIN,
    )
    loaded = load_config(params)
    prepare_dataset(loaded, "target")
    prepare_dataset(loaded, "pretext")
    return loaded


@pytest.fixture
def timm_config(tmp_path, write_params, monkeypatch, blob_npz):
    """A 32 px target (the ViT's img_size) and random ConvNeXt and ViT sources, trained for one epoch."""
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    blob_npz(tmp_path / "data/raw/small.npz", 0, per_split=(16, 8, 8))
    params = write_params(
        {"small": {"format": "medmnist", "path": "data/raw/small.npz", "classes": ["a", "b"], "image_size": 32}},
        sources={"convnext": {"kind": "random", "arch": "convnext_atto", "seed": 1},
                 "vit": {"kind": "random", "arch": "vit_tiny_patch16_224", "model_args": {"img_size": 32}, "seed": 2}},
        train={**TINY_TRAIN, "max_epochs": 1, "patience": 0, "batch_size": 8},
    )
    loaded = load_config(params)
    prepare_dataset(loaded, "small")
    return loaded


def _stage_outputs(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, stage=stage: outputs.__setitem__(stage, out))
               for stage, module in model.stage_modules().items()]
    with torch.no_grad():
        model.eval()(batch)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("source", ["convnext", "vit"])
def test_a_finetuned_timm_model_reloads_from_the_registry_with_the_same_activations(timm_config, source):
    register_source(timm_config, source)
    result = run_finetune(timm_config, FinetuneRequest("small", source, "full", fold=0, settings=timm_config.train))
    version = register_logged_model(result.model_uri, f"finetuned.{source}", {})
    loaded = load_registered_model(f"models:/finetuned.{source}/{version.version}")
    assert loaded.spec.arch == timm_config.source(source).arch
    assert loaded.spec.model_args == timm_config.source(source).model_args and loaded.spec.num_classes == 2
    batch = loaded.spec.preprocessing.apply(np.array(load_prepared(timm_config, "small").images[:4]))
    in_memory, reloaded = _stage_outputs(result.model.cpu(), batch), _stage_outputs(loaded.model, batch)
    assert list(reloaded) == list(in_memory) == list(result.model.stage_modules()) and len(reloaded) >= 4
    for stage, activations in in_memory.items():
        assert torch.equal(reloaded[stage], activations), stage


@pytest.mark.parametrize("source", ["convnext", "vit"])
def test_the_linear_regime_trains_a_timm_models_head_only(timm_config, source):
    """The regimes are the model's, whatever its architecture: `linear` leaves every backbone tensor of a ConvNeXt
    (LayerNorm, layer scales) or a ViT (position embedding, class token) bit-identical to the source's."""
    register_source(timm_config, source)
    initial = load_registered_model(f"models:/source.{source}@default").model
    result = run_finetune(timm_config, FinetuneRequest("small", source, "linear", fold=0, settings=timm_config.train))
    before, after = initial.backbone.state_dict(), result.model.cpu().backbone.state_dict()
    assert list(before) == list(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert [phase.name for phase in result.phases] == ["linear"]


def test_pretrain_registers_a_source_that_finetune_uses(config):
    registered = pretrain_source(config, "tiny")
    assert not registered.reused
    version = mlflow.MlflowClient().get_model_version_by_alias("source.tiny", "default")
    assert version.tags["origin"] == "pretrained(dataset=pretext, seed=5)"
    assert version.tags["data_fingerprint"] and version.tags[RECIPE_TAG]
    assert pretrain_source(config, "tiny").reused, "an unchanged recipe is not trained again"
    assert register_source(config, "tiny").version == registered.version  # `source --name` takes the same path

    request = FinetuneRequest("target", "tiny", "freeze", fold=1, settings=config.train)
    result = run_finetune(config, request)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["source_version"] == registered.version and run.data.params["regime"] == "freeze"
    assert run.data.tags["dataset"] == "target" and run.data.tags["fold"] == "1"
    for key in ("test_auc", "test_accuracy", "test_balanced_accuracy", "best_val_loss", "head_best_epoch"):
        assert key in run.data.metrics, key
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1)) and len(history) >= 2
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "target"
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id, "predictions")}
    assert artifacts == {"predictions/test_predictions.csv", "predictions/confusion_matrix.json", "predictions/roc_curve.png"}
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="predictions/test_predictions.csv"))
    rows = local.read_text().strip().splitlines()
    assert rows[0] == "index,label,p_a,p_b" and len(rows) - 1 == 44  # fold 1 of 88 images
    model = mlflow.pyfunc.load_model(result.model_uri)
    images = np.zeros((3, 16, 16, 1), dtype=np.uint8)
    assert model.predict(images).shape == (3, 2)


def test_two_runs_with_one_seed_give_identical_metrics(config):
    register_source(config, "random")
    request = FinetuneRequest("target", "random", "full", fold=0, settings=config.train)
    first = run_finetune(config, request, log_model=False)
    second = run_finetune(config, request, log_model=False)
    assert first.test_metrics == second.test_metrics
    assert first.best_val_loss == second.best_val_loss


def test_finetune_without_a_registered_source_is_one_line(config, cli):
    result = cli("--params", str(config.source_file), "finetune", "--dataset", "target", "--source", "random")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "no registered model named 'source.random'" in line and "medtransfer source --name random" in line


@pytest.mark.slow
def test_mlflow_run_finetune_entry_point(config, repo_root):
    register_source(config, "random")
    project = config.root
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=config.tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "finetune", "-P", "dataset=target",
               "-P", "source=random", "--env-manager", "local", "--experiment-name", config.stores.experiment]
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'finetune'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert np.isfinite(runs.iloc[0]["metrics.test_auc"])
