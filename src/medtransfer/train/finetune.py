"""`finetune`: one (dataset, source, regime, fold, seed) run — load the source from the registry, replace its head,
train with the regime's phases, report on the fold's test split, and log everything to MLflow.

Validation drives early stopping; the test split is touched once, after training, for reporting only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.layout import PREDICTIONS_ARTIFACT_DIR, STEP_FINETUNE
from medtransfer.config import Config, TrainConfig
from medtransfer.data.prepare import PreparedDataset, load_prepared
from medtransfer.errors import ConfigError
from medtransfer.models.backbones import Classifier
from medtransfer.models.packaging import ModelSpec
from medtransfer.registry import ALIAS_DEFAULT, Tag, model_uri, source_model_name
from medtransfer.train.augment import AugmentationSettings
from medtransfer.train.loop import REGIMES, EpochCallback, PhaseResult, Split, Trainer, head_linear
from medtransfer.train.presets import LoopOptions, head_dropout, loop_options
from medtransfer.layout import CONFUSION_FILE, ROC_FILE, TEST_PREDICTIONS_FILE
from medtransfer.train.reporting import write_confusion, write_predictions, write_roc_plot



@dataclass(frozen=True)
class FinetuneRequest:
    dataset: str
    source: str
    regime: str
    fold: int
    settings: TrainConfig
    preset: str | None = None
    source_version: str | None = None  # pin a registered version; default: the source's `default` alias


@dataclass
class FinetuneResult:
    run_id: str
    model_uri: str | None
    weights_sha256: str | None
    source_version: str
    test_metrics: dict[str, float]
    best_val_loss: float
    phases: list[PhaseResult]
    model: Classifier

    def describe(self, request: FinetuneRequest) -> str:
        """What `medtransfer finetune` prints: the source version, the test metrics, the run and the model."""
        metrics = ", ".join(f"{key} {value:.4f}" for key, value in sorted(self.test_metrics.items()))
        return (f"fine-tuned {request.dataset} from source.{request.source} v{self.source_version} ({request.regime}, "
                f"fold {request.fold}): {metrics}\n  run {self.run_id}, model {self.model_uri}")


def fold_splits(prepared: PreparedDataset, fold: int) -> dict[str, tuple[np.ndarray, Split]]:
    """{'train'|'val'|'test': (dataset indices, Split)} of one fold, images loaded into memory."""
    parts = prepared.fold(fold)
    return {
        name: (indices, Split(np.ascontiguousarray(prepared.images[indices]), prepared.labels[indices]))
        for name, indices in parts.items()
    }


def seeded_head(model: Classifier, num_classes: int, seed: int, options: LoopOptions | None = None) -> None:
    """A new head drawn from `seed`. With `options.binary_head == "sigmoid"` and two classes, the head is one
    sigmoid unit inside the 2-way linear layer (`LoopOptions`): logit 0 zero, logit 1 glorot-uniform as a Keras
    Dense(1) (fan-out 1)."""
    generator = torch.Generator().manual_seed(seed)
    model.replace_head(num_classes, generator=generator)
    if options is not None and options.binary_head == "sigmoid" and num_classes == 2:
        linear = head_linear(model)
        bound = (6.0 / (linear.in_features + 1)) ** 0.5
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[1].uniform_(-bound, bound, generator=generator)


def prepare_model(model: Classifier, num_classes: int, seed: int, preset: str | None,
                  random_source: bool) -> LoopOptions:
    """Give `model` the head a run trains (the preset's dropout and binary head) and return the loop options."""
    options = loop_options(preset, random_source=random_source)
    model.dropout = head_dropout(preset, model.dropout, random_source=random_source)
    seeded_head(model, num_classes, seed, options)
    return options


def run_finetune(
    config: Config,
    request: FinetuneRequest,
    *,
    on_epoch_end: EpochCallback | None = None,
    log_model: bool = True,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
    use_active_run: bool = False,
) -> FinetuneResult:
    """Fine-tune and log one run: a new run nested under the active run, if any, or — with `use_active_run` —
    into the active run itself (a caller that manages the run's life, such as a search trial). See the module
    docstring."""
    import mlflow

    from medtransfer.models.mlflow_models import load_registered_model, log_packaged_model
    from medtransfer.tracking import log_prepared_dataset, run_identity_tags, step_run, use_tracking_store

    if request.regime not in REGIMES:
        raise ConfigError(f"unknown regime '{request.regime}'", fix=f"use one of: {', '.join(REGIMES)}")
    dataset_config = config.dataset(request.dataset)
    prepared = load_prepared(config, request.dataset)
    splits = fold_splits(prepared, request.fold)
    use_tracking_store(config)
    if request.source_version is None:
        source_uri = model_uri(source_model_name(request.source), alias=ALIAS_DEFAULT)
    else:
        source_uri = model_uri(source_model_name(request.source), version=request.source_version)
    source = load_registered_model(source_uri)
    model = source.model
    torch.manual_seed(request.settings.seed)
    random_source = config.sources[request.source].kind == "random" if request.source in config.sources else False
    options = prepare_model(model, len(prepared.classes), request.settings.seed, request.preset, random_source)
    augmentation = AugmentationSettings(horizontal_flip=dataset_config.horizontal_flip)

    tags = {
        Tag.STEP: STEP_FINETUNE,
        Tag.DATASET: request.dataset,
        Tag.SOURCE: request.source,
        Tag.REGIME: request.regime,
        Tag.FOLD: str(request.fold),
        Tag.DATA_FINGERPRINT: prepared.fingerprint,
        **run_identity_tags(config),  # trials and final fits log into runs step_run did not open
        **(extra_tags or {}),
    }
    active = mlflow.active_run()
    name = run_name or f"finetune {request.dataset} {request.source} {request.regime} fold{request.fold}"
    if use_active_run:
        if active is None:
            raise RuntimeError("use_active_run needs an active MLflow run")
        mlflow.set_tags(tags)
        context = contextlib.nullcontext(active)
    else:
        context = step_run(config, step=tags[Tag.STEP], run_name=name, tags=tags)
    with context as run:
        mlflow.log_params(_run_params(request, source.version, options, model.dropout))
        log_prepared_dataset(prepared.manifest, prepared.folder, context="training")
        epoch_counter = {"step": 0}

        def log_epoch(phase: str, epoch: int, metrics: dict[str, float]) -> None:
            epoch_counter["step"] += 1
            finite = {f"{_split_of(key)}": value for key, value in metrics.items() if np.isfinite(value)}
            mlflow.log_metrics(finite, step=epoch_counter["step"])
            if on_epoch_end is not None:
                on_epoch_end(phase, epoch, metrics)

        trainer = Trainer(model, source.spec.preprocessing, request.settings, augmentation, on_epoch_end=log_epoch,
                          label=name, options=options)
        phases = trainer.fit(request.regime, splits["train"][1], splits["val"][1])
        final_val = trainer.evaluate(splits["val"][1]).metrics
        test_indices, test_split = splits["test"]
        evaluation = trainer.evaluate(test_split)
        test_metrics = {f"test_{key}": value for key, value in evaluation.metrics.items()}
        mlflow.log_metrics({key: value for key, value in test_metrics.items() if np.isfinite(value)})
        mlflow.log_metrics({"best_val_loss": final_val["loss"], "epochs": float(epoch_counter["step"])})
        for phase in phases:
            mlflow.log_metric(f"{phase.name}_best_epoch", phase.best_epoch)
        with tempfile.TemporaryDirectory(prefix="medtransfer-finetune-") as staging:
            folder = Path(staging)
            write_predictions(folder / TEST_PREDICTIONS_FILE, test_indices, test_split.labels, evaluation.probabilities, prepared.classes)
            write_confusion(folder / CONFUSION_FILE, test_split.labels, evaluation.probabilities, prepared.classes)
            write_roc_plot(folder / ROC_FILE, test_split.labels, evaluation.probabilities, prepared.classes, title=name)
            mlflow.log_artifacts(str(folder), artifact_path=PREDICTIONS_ARTIFACT_DIR)
            # the UI's run comparison offers only top-level files side by side: the ROC curve goes there too
            mlflow.log_artifact(str(folder / ROC_FILE))
        uri, digest = None, None
        if log_model:
            spec = ModelSpec(
                arch=source.spec.arch,
                num_classes=len(prepared.classes),
                preprocessing=source.spec.preprocessing,
                classes=prepared.classes,
                dropout=model.dropout,
                extra={"role": "finetuned", "dataset": request.dataset, "source": request.source,
                       "source_version": source.version, "regime": request.regime, "fold": request.fold,
                       "data_fingerprint": prepared.fingerprint},
                model_args=dict(source.spec.model_args),
            )
            uri, digest = log_packaged_model(trainer.model.cpu(), spec)
            mlflow.set_tag(Tag.WEIGHTS_SHA256, digest)
    return FinetuneResult(run.info.run_id, uri, digest, source.version, test_metrics, final_val["loss"], phases, trainer.model)


def _split_of(key: str) -> str:
    """Per-epoch metric names as logged: train_* for the training pass, val_* for validation."""
    return key if key.startswith("val_") else f"train_{key}"


def _run_params(request: FinetuneRequest, source_version: str, options: LoopOptions,
                head_dropout_rate: float) -> dict[str, Any]:
    return {
        "dataset": request.dataset,
        "source": request.source,
        "source_version": source_version,
        "regime": request.regime,
        "fold": request.fold,
        "preset": request.preset or "none",
        **dataclasses.asdict(request.settings),
        **{f"loop_{key}": value for key, value in dataclasses.asdict(options).items()},
        "head_dropout": head_dropout_rate,
    }
