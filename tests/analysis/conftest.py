"""The tiny study that extract and compare run on (tests/analysis/test_extract_compare*.py): two self-made
"pretrained" sources, two random sources, fine-tuned fold models of three sources (one with a second seed) and their
pointer files, in a temporary MLflow store."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medtransfer.config import load_config
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.layout import ROLE_FINETUNED, TEST_PREDICTIONS_FILE as PREDICTIONS_FILE
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.mlflow_models import load_registered_model, log_packaged_model, register_logged_model
from medtransfer.models.packaging import ModelSpec
from medtransfer.models.sources import register_source
from medtransfer.pointers import FoldModel, fold_model_alias
from medtransfer.registry import ALIAS_DEFAULT, Tag, finetuned_model_name, model_uri, source_model_name
from medtransfer.tracking import ensure_experiment, use_tracking_store
from medtransfer.train.finetune import PREDICTIONS_ARTIFACT_DIR
from medtransfer.train.metrics import roc_auc
from medtransfer.train.reporting import write_predictions

DATASET = "target"
PRETRAINED = ("natural", "medical")
FINETUNED_SOURCES = ("natural", "medical", "random")
REGIME = "full"


def _blob_npz(path: Path, seed: int, per_split=(40, 8, 16)) -> None:
    """16 px grey images; the class sets the quadrant of a bright blob (MedMNIST layout)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), per_split):
        labels = np.arange(count) % 2
        images = rng.normal(90, 25, size=(count, 16, 16))
        for index, label in enumerate(labels):
            images[index, 2 + 8 * label : 6 + 8 * label, 3:7] += 110
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _write_backbone(path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    model = Classifier("resnet18", None)
    keras_like_init_(model, torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))


def _probabilities(model: Classifier, preprocessing, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        logits = model(preprocessing.apply(np.ascontiguousarray(images)))
    return torch.softmax(logits, dim=1).double().numpy()


def _register_finetuned(config, prepared, source: str, fold: int, seed: int, alias: str) -> FoldModel:
    """A stand-in for a fine-tuned fold model: the source plus seeded noise and a new head, logged like finetune."""
    loaded = load_registered_model(model_uri(source_model_name(source), alias=ALIAS_DEFAULT))
    model = loaded.model
    generator = torch.Generator().manual_seed(1000 * seed + 10 * fold + len(source))
    model.replace_head(2, generator=generator)
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if parameter.ndim > 1:  # perturb weights, more in deeper stages (fine-tuning changes them most)
                depth = next((stage for stage in range(1, 5) if f"layer{stage}." in name), 0) + 1
                parameter.add_(0.1 * depth * parameter.std() * torch.randn(parameter.shape, generator=generator))
    test = prepared.fold(fold)["test"]
    probabilities = _probabilities(model, loaded.spec.preprocessing, prepared.images[test])
    name = finetuned_model_name(DATASET, source, REGIME)
    spec = ModelSpec("resnet18", 2, loaded.spec.preprocessing, classes=prepared.classes)
    with mlflow.start_run(experiment_id=ensure_experiment(config), run_name=f"ft {source} {fold} {seed}") as run:
        mlflow.set_tags({"step": "finetune", Tag.DATASET: DATASET, Tag.SOURCE: source, Tag.REGIME: REGIME,
                         "fold": str(fold)})
        staging = config.root / "staging" / f"{source}-{fold}-{seed}"
        write_predictions(staging / PREDICTIONS_FILE, test, prepared.labels[test], probabilities, prepared.classes)
        mlflow.log_artifact(str(staging / PREDICTIONS_FILE), artifact_path=PREDICTIONS_ARTIFACT_DIR)
        uri, digest = log_packaged_model(model, spec)
        mlflow.set_tag(Tag.WEIGHTS_SHA256, digest)
        version = register_logged_model(uri, name, {Tag.ROLE: ROLE_FINETUNED, Tag.WEIGHTS_SHA256: digest,
                                                    Tag.SOURCE: source, Tag.REGIME: REGIME})
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version.version))
    auc = roc_auc(prepared.labels[test], probabilities)["auc"]
    return FoldModel(fold, seed, str(version.version), run.info.run_id, digest, alias, float(auc))


def _params(root: Path) -> Path:
    import yaml

    params = {
        "project": {"profile": "test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test", "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": {DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                               "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.2}}},
        "sources": {
            "natural": {"kind": "safetensors", "arch": "resnet18", "path": "weights/natural.safetensors"},
            "medical": {"kind": "safetensors", "arch": "resnet18", "path": "weights/medical.safetensors"},
            "random": {"kind": "random", "arch": "resnet18", "seed": 0},
            "random_b": {"kind": "random", "arch": "resnet18", "seed": 1},
        },
        "analysis": {"positions_per_layer": 200, "channel_sample": 16, "channel_repeats": 2, "batch_size": 8,
                     "measures": ["cca", "svcca", "pwcca", "cka", "cka_debiased"], "seed": 0},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, fits_pointer):
    """The tiny study, built once for the module: prepared data, registered sources and fine-tuned models, pointer
    files. Nothing extracted yet."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(variable, raising=False)
        _blob_npz(root / "data/raw/target.npz", 0)
        for index, name in enumerate(PRETRAINED):
            _write_backbone(root / f"weights/{name}.safetensors", 11 + index)
        config = load_config(_params(root))
        prepare_dataset(config, DATASET)
        prepared = load_prepared(config, DATASET)
        use_tracking_store(config)
        registered = {name: register_source(config, name) for name in config.sources}
        for source in FINETUNED_SOURCES:
            fits = [_register_finetuned(config, prepared, source, fold, 0, fold_model_alias(fold, 0)) for fold in (0, 1)]
            if source == "natural":  # a second seed on fold 0: seed-to-seed pairs
                fits.append(_register_finetuned(config, prepared, source, 0, 1, fold_model_alias(0, 1)))
            fits_pointer(config, prepared, registered[source], DATASET, source, REGIME, fits)
        yield config


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="session")
def csv_table() -> Callable[[Path], tuple[list[str], list[dict]]]:
    """``csv_table(path)``: a CSV file's header and its rows as dicts."""
    return read_csv
