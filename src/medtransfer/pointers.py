"""Where the MLflow Model Registry and DVC meet: small pointer files naming registered model versions.

A search writes `results/models/<dataset>.<source>.<regime>.json` (a DVC output) naming the registered model,
the version of every fold (and seed) fit, their runs and weight hashes, the source version they started from and
the data fingerprint. Later stages depend on these files, so DVC reruns them exactly when the registered models
change, and they refuse to run when the registry no longer agrees with a pointer.

Beside it, `results/metrics/<dataset>.<source>.<regime>.json` holds only the search's metrics (test AUC per fold
model, mean, sd): the file `dvc metrics show` reads, so its table is not widened by hashes, run ids and versions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtransfer.layout import POINTER_FOLDER, METRICS_FOLDER
from medtransfer.atomic_files import atomic_write_text
from medtransfer.config import Config
from medtransfer.errors import ModelError
from medtransfer.registry import Tag, finetuned_model_name, fold_alias

POINTER_FORMAT = "medtransfer-models-v1"


@dataclass(frozen=True)
class FoldModel:
    """One registered fit of the best configuration: a fold (and seed) of a study."""

    fold: int
    seed: int
    version: str
    run_id: str
    weights_sha256: str
    alias: str
    test_auc: float | None = None


@dataclass(frozen=True)
class ModelPointer:
    registered_model: str
    dataset: str
    source: str
    regime: str
    source_model: str
    source_version: str
    source_weights_sha256: str
    data_fingerprint: str
    study: str
    champion_version: str
    folds: list[FoldModel] = field(default_factory=list)
    test_auc_mean: float | None = None
    test_auc_sd: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    #: How the fits were trained: `search` (best_params came from an Optuna search) or a fixed preset's name.
    protocol: str = "search"

    def fold_model(self, fold: int, seed: int | None = None) -> FoldModel:
        matches = [f for f in self.folds if f.fold == fold and (seed is None or f.seed == seed)]
        if not matches:
            raise ModelError(f"{self.registered_model} has no registered model for fold {fold}")
        return sorted(matches, key=lambda f: f.seed)[0]

    def to_dict(self) -> dict[str, Any]:
        return {"format": POINTER_FORMAT, **dataclasses.asdict(self)}


def pointer_path(config: Config, dataset: str, source: str, regime: str) -> Path:
    return config.resolve(POINTER_FOLDER) / f"{finetuned_model_name(dataset, source, regime)}.json"


def metrics_path(config: Config, dataset: str, source: str, regime: str) -> Path:
    return config.resolve(METRICS_FOLDER) / f"{finetuned_model_name(dataset, source, regime)}.json"


def write_pointer(config: Config, pointer: ModelPointer) -> Path:
    """Write the pointer and its metrics file (the search stage declares both); returns the pointer's path."""
    path = pointer_path(config, pointer.dataset, pointer.source, pointer.regime)
    atomic_write_text(path, json.dumps(pointer.to_dict(), indent=2, sort_keys=False) + "\n")
    metrics = {"test_auc": {fit.alias: fit.test_auc for fit in pointer.folds},
               "test_auc_mean": pointer.test_auc_mean, "test_auc_sd": pointer.test_auc_sd}
    atomic_write_text(metrics_path(config, pointer.dataset, pointer.source, pointer.regime),
                      json.dumps(metrics, indent=2) + "\n")
    return path


def read_pointer(path: Path) -> ModelPointer:
    where = str(path)
    if not Path(path).is_file():
        raise ModelError("model pointer not found", where=where, fix="run the search that writes it ('medtransfer search ...')")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.pop("format", None) != POINTER_FORMAT:
            raise ValueError("unknown format")
        raw["folds"] = [FoldModel(**entry) for entry in raw["folds"]]
        # Pointers written before the protocol was recorded: a preset's study name ends in /<preset>.
        raw.setdefault("protocol", _protocol_from_study(str(raw.get("study", ""))))
        pointer = ModelPointer(**raw)
    except (ValueError, TypeError, KeyError) as error:
        raise ModelError(f"malformed model pointer ({error})", where=where, fix="run the search again to rewrite it") from None
    problem = _content_problem(pointer)
    if problem:
        raise ModelError(f"malformed model pointer ({problem})", where=where, fix="run the search again to rewrite it")
    return pointer


def _protocol_from_study(study: str) -> str:
    from medtransfer.train.presets import PRESETS
    from medtransfer.train.protocols import PROTOCOL_SEARCH

    suffix = study.rsplit("/", 1)[-1]
    return suffix if "/" in study and suffix in PRESETS else PROTOCOL_SEARCH


def _content_problem(pointer: ModelPointer) -> str | None:
    """What the JSON types let through but later steps would misreport: no fits at all (an empty AUC cell), or an
    AUC that is not a number (a traceback in the report's arithmetic)."""
    if not isinstance(pointer.folds, list) or not pointer.folds:
        return "'folds' names no registered fit"
    for fit in pointer.folds:
        if isinstance(fit.fold, bool) or not isinstance(fit.fold, int) or fit.fold < 0:
            return f"fold {fit.fold!r} is not a fold number"
        if not isinstance(fit.version, (str, int)) or not str(fit.version).isdigit():
            return f"fold {fit.fold} names version {fit.version!r}, not a registry version number"
        auc = fit.test_auc
        if auc is not None and (isinstance(auc, bool) or not isinstance(auc, (int, float)) or not 0 <= auc <= 1):
            return f"fold {fit.fold} has test_auc {auc!r}, not a number between 0 and 1"
    return None


def pointers_for_dataset(config: Config, dataset: str) -> list[ModelPointer]:
    """The pointers of `dataset` for the sources and regimes the active profile's study names (every pointer of
    `dataset` when `study.sources` names none: searches run by hand), sorted by source and regime. Pointers another
    profile left in the folder (other sources or regimes) are not the study's: they are skipped, so extract, summary
    and report see the same models whichever profiles ran before."""
    study = config.study
    wanted = {pointer_path(config, dataset, source, regime).name for source in study.sources
              for regime in study.regimes}
    folder = config.resolve(POINTER_FOLDER)
    paths = [path for path in sorted(folder.glob(f"{dataset}.*.json")) if not wanted or path.name in wanted]
    return [p for p in (read_pointer(path) for path in paths) if p.dataset == dataset]


def verify_pointer(client, pointer: ModelPointer, where: str) -> None:
    """Refuse (one line) when the registry disagrees with the pointer: a version missing, another weight hash,
    an alias moved, or the source version's weights changed."""
    from mlflow.exceptions import MlflowException

    def disagree(detail: str) -> ModelError:
        return ModelError(
            f"the registry disagrees with the model pointer: {detail}",
            where=where,
            fix="rerun the search ('dvc repro') so that the pointer and the registry match again",
        )

    for fit in pointer.folds:
        try:
            version = client.get_model_version(pointer.registered_model, fit.version)
        except MlflowException:
            raise disagree(f"{pointer.registered_model} version {fit.version} does not exist") from None
        if version.tags.get(Tag.WEIGHTS_SHA256) != fit.weights_sha256:
            raise disagree(f"{pointer.registered_model} v{fit.version} holds weights {version.tags.get(Tag.WEIGHTS_SHA256)}, "
                           f"the pointer says {fit.weights_sha256}")
        try:
            aliased = client.get_model_version_by_alias(pointer.registered_model, fit.alias).version
        except MlflowException:
            aliased = None
        if str(aliased) != str(fit.version):
            raise disagree(f"alias {fit.alias} of {pointer.registered_model} points to {aliased}, not {fit.version}")
    try:
        source_version = client.get_model_version(pointer.source_model, pointer.source_version)
    except MlflowException:
        raise disagree(f"{pointer.source_model} version {pointer.source_version} does not exist") from None
    if source_version.tags.get(Tag.WEIGHTS_SHA256) != pointer.source_weights_sha256:
        raise disagree(f"{pointer.source_model} v{pointer.source_version} changed its weights")


def fold_model_alias(fold: int, seed_index: int) -> str:
    """`fold<k>` for the first seed of a fold, `fold<k>-seed<i>` for further seeds."""
    return fold_alias(fold) if seed_index == 0 else f"{fold_alias(fold)}-seed{seed_index}"

