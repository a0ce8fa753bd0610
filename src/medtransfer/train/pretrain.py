"""`pretrain`: supervised training from a seeded Keras-like initialisation on a prepared dataset, registered as a
source (`source.<name>`) with its provenance. This is how the offline demo gets two genuinely different sources.

Each pretrained source draws its initialisation from its own seed (the config refuses shared seeds): two sources
grown from one initialisation would look more similar than they are. A source is retrained only when its recipe
(source settings, training settings, data fingerprint, training code) changes; otherwise the registered version
is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from medtransfer.config import Config
from medtransfer.data.prepare import load_prepared
from medtransfer.errors import ConfigError
from medtransfer.layout import STEP_PRETRAIN
from medtransfer.models.backbones import default_preprocessing, keras_like_init_, seeded_classifier
from medtransfer.models.packaging import ModelSpec
from medtransfer.models.preprocessing import preprocessing_by_name
from medtransfer.layout import ROLE_SOURCE
from medtransfer.registry import (RegisteredSource, Tag, ensure_default_alias, registered_versions,
                                  source_model_description, source_model_name, source_version_description)
from medtransfer.train.augment import AugmentationSettings
from medtransfer.train.finetune import fold_splits
from medtransfer.train.loop import Trainer

RECIPE_TAG = "recipe_sha256"
_CODE_FOLDERS = ("train", "models")


def check_pretrain_request(config: Config, name: str, dataset: str) -> None:
    """`medtransfer pretrain --dataset D --source-name N` must name a source declared as pretrained on D."""
    source = config.source(name)
    if source.kind != "pretrained" or source.dataset != dataset:
        raise ConfigError(
            f"source '{name}' is not declared as pretrained on '{dataset}'",
            where=f"{config.source_file}: sources.{name}",
            fix=f"declare it with kind: pretrained and dataset: {dataset}",
        )


def pretrain_recipe(config: Config, name: str) -> dict:
    source = config.source(name)
    prepared = load_prepared(config, source.dataset)
    return {
        "source": dataclasses.asdict(source),
        "train": dataclasses.asdict(source.train or config.train),
        "data_fingerprint": prepared.fingerprint,
        "splits_sha256": prepared.manifest["split"]["sha256"],
        "code_sha256": _code_sha256(),
    }


def pretrain_source(config: Config, name: str) -> RegisteredSource:
    """Train and register `sources.<name>` (kind `pretrained`), or reuse the version with the same recipe."""
    import mlflow

    from medtransfer.models.mlflow_models import log_packaged_model, register_logged_model
    from medtransfer.tracking import log_prepared_dataset, step_run, use_tracking_store

    source = config.source(name)
    if source.kind != "pretrained":
        raise ConfigError(f"source '{name}' is of kind '{source.kind}', not 'pretrained'", where=f"{config.source_file}: sources.{name}.kind")
    recipe = pretrain_recipe(config, name)
    recipe_digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    model_name = source_model_name(name)
    use_tracking_store(config)
    client = mlflow.MlflowClient()
    for version in registered_versions(client, model_name):
        if version.tags.get(RECIPE_TAG) == recipe_digest:
            ensure_default_alias(client, model_name, version.version)
            return RegisteredSource(model_name, str(version.version), version.tags[Tag.WEIGHTS_SHA256], reused=True)

    prepared = load_prepared(config, source.dataset)
    splits = fold_splits(prepared, 0)
    settings = source.train or config.train
    preprocessing = (preprocessing_by_name(source.preprocessing) if source.preprocessing
                     else default_preprocessing(source.arch))
    model = seeded_classifier(source.arch, len(prepared.classes), source.seed, source.model_args,
                              where=f"{config.source_file}: sources.{name}")
    keras_like_init_(model, torch.Generator().manual_seed(source.seed))
    torch.manual_seed(source.seed)
    augmentation = AugmentationSettings(horizontal_flip=config.dataset(source.dataset).horizontal_flip)
    origin = f"pretrained(dataset={source.dataset}, seed={source.seed})"
    with step_run(config, step=STEP_PRETRAIN, run_name=f"pretrain {name} on {source.dataset}",
                  tags={Tag.SOURCE: name, Tag.DATASET: source.dataset, Tag.ROLE: ROLE_SOURCE}):
        mlflow.log_params({"source": name, "arch": source.arch, "seed": source.seed, "dataset": source.dataset,
                           **{f"train_{k}": v for k, v in dataclasses.asdict(settings).items()}})
        log_prepared_dataset(prepared.manifest, prepared.folder, context="pretraining")
        step = {"n": 0}

        def log_epoch(_phase: str, _epoch: int, metrics: dict[str, float]) -> None:
            step["n"] += 1
            mlflow.log_metrics({(k if k.startswith("val_") else f"train_{k}"): v for k, v in metrics.items() if v == v},
                               step=step["n"])

        trainer = Trainer(model, preprocessing, settings, augmentation, on_epoch_end=log_epoch,
                          label=f"pretrain {name}")
        trainer.fit("full", splits["train"][1], splits["val"][1])
        test = trainer.evaluate(splits["test"][1]).metrics
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items() if v == v})
        spec = ModelSpec(
            arch=source.arch,
            num_classes=len(prepared.classes),
            preprocessing=preprocessing,
            classes=prepared.classes,
            extra={"role": ROLE_SOURCE, "source": name, "kind": "pretrained", "origin": origin,
                   "data_fingerprint": prepared.fingerprint},
            model_args=dict(source.model_args),
        )
        uri, digest = log_packaged_model(trainer.model.cpu().eval(), spec)
        tags = {
            Tag.ROLE: ROLE_SOURCE,
            Tag.SOURCE: name,
            Tag.ARCH: source.arch,
            Tag.ORIGIN: origin,
            Tag.WEIGHTS_SHA256: digest,
            Tag.PREPROCESSING: preprocessing.name,
            Tag.DATASET: source.dataset,
            Tag.DATA_FINGERPRINT: prepared.fingerprint,
            RECIPE_TAG: recipe_digest,
        }
        version = register_logged_model(
            uri, model_name, tags, model_description=source_model_description(name),
            version_description=source_version_description(name, source.arch, origin))
    ensure_default_alias(client, model_name, version.version)
    return RegisteredSource(model_name, str(version.version), digest, reused=False)


def _code_sha256() -> str:
    """Hash of the training and model code, so that changing how a source is trained retrains it."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in _CODE_FOLDERS:
        for path in sorted((package / folder).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
