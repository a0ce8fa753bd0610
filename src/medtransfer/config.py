"""params.yaml → validated, typed configuration: the one place for every default.

`params.yaml` at the repository root is the single source of truth; DVC reads it, and so does every
`medtransfer` command. It is validated once, at load, into the frozen dataclasses of this module (the schema);
the generic YAML-to-dataclass checks live in `config_coercion`, the rules types cannot express in `config_rules`.
Unknown keys, wrong types and missing values raise `ConfigError` naming the file and the dotted key.

Relative paths and store URLs in the file are resolved against the folder that holds the file (the repository
root for the active `params.yaml`), never against the working directory, so that the CLI, `mlflow run`,
`dvc repro`, `dvc exp run` and the tests all meet the same data, tracking store and Optuna storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medtransfer.config_coercion import build_dataclass, named_entries, read_yaml_mapping  # noqa: F401 - re-exported
from medtransfer.config_rules import (check_analysis, check_dataset, check_distinct_initialisations, check_paper_twins,
                                      check_seeds, check_source, check_stores, check_study_and_search, check_train)
from medtransfer.errors import ConfigError
from medtransfer.layout import DEFAULT_REGIME
from medtransfer.train.protocols import PROTOCOL_SEARCH

PARAMS_FILE_NAME = "params.yaml"
PARAMS_ENV_VAR = "MEDTRANSFER_PARAMS"
TRACKING_URI_ENV_VAR = "MEDTRANSFER_TRACKING_URI"
OPTUNA_STORAGE_ENV_VAR = "MEDTRANSFER_OPTUNA_STORAGE"


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectConfig:
    """What this parameter set is, and the seed everything else derives its randomness from."""

    profile: str
    seed: int = 0
    description: str = ""


@dataclass(frozen=True)
class StoresConfig:
    """Where MLflow and Optuna keep their state. Relative paths resolve against the repository root."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "medtransfer"
    optuna_storage: str = "sqlite:///optuna.db"
    # Database storages only: a worker's heartbeat interval, and how long a trial may go without one before a
    # surviving worker marks it failed and retries it.
    optuna_heartbeat_seconds: int = 30
    optuna_grace_seconds: int = 90


@dataclass(frozen=True)
class PathsConfig:
    """Folders the pipeline reads and writes, relative to the repository root."""

    raw_data: str = "data/raw"
    prepared_data: str = "data/prepared"


@dataclass(frozen=True)
class SplitConfig:
    """How a dataset is cut into folds, each with train / val / test.

    `given` keeps the dataset's own train/val/test split (one fold). `stratified_kfold` pools every image and
    makes `folds` test folds with the class proportions kept; `grouped_kfold` does the same by group (patient,
    exam) so that no group crosses folds; `predefined_folds` takes the test folds from the data's own `fold`
    column (a published split, reproduced exactly). In all three, `val_fraction` of the images (stratified by
    class, or by whole groups when there are groups) is held out for early stopping, taken from the training part
    (`val_from: train`) or from the held-out fold (`val_from: test`, the authors' later split: training keeps
    (K−1)/K of the data); the test images are only ever used for reporting.
    """

    scheme: Literal["given", "stratified_kfold", "grouped_kfold", "predefined_folds"] = "given"
    folds: int = 5
    val_fraction: float = 0.1
    seed: int = 0
    val_from: Literal["train", "test"] = "train"


@dataclass(frozen=True)
class MultiLabelRule:
    """Turns multi-label targets (e.g. ChestMNIST's 14 findings) into one binary label.

    `any`: positive when any finding is present. `column`: the finding in `column` (0-based).
    """

    rule: Literal["any", "column"]
    column: int | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: where it is, how to read it, its classes, and how to split it.

    format:        `medmnist` (a MedMNIST-layout .npz), `image_folder` (one subfolder per raw label) or `csv`
                   (a manifest with columns path,label[,group][,fold]; paths relative to the CSV).
    classes:       class names; a label is the index of its class here.
    label_map:     raw label (folder name, CSV value, e.g. a TI-RADS grade) → class name. Without it, raw labels
                   must be class names (or, in an npz, class indices).
    image_size:    side in pixels every image is resized to (required for folders and CSVs).
    channels:      1 (grey) or 3 (RGB); images of the other kind are converted (required for folders and CSVs).
    resize:        `nearest` (as the original study's Keras loader) or `bilinear`.
    exclude:       glob patterns of files to skip (e.g. BUSI's segmentation masks, `*_mask*`).
    group_pattern: for image folders, a regular expression with one group that extracts the patient or exam
                   id from each file's path relative to the folder.
    horizontal_flip: whether training may mirror images (the original study did, except for chest X-rays).
    paper_target:  the target of Juodelyte et al. (2024) this dataset stands for (e.g. `breast` for BreastMNIST);
                   the report then sets this target's numbers beside the paper's.
    """

    format: Literal["medmnist", "image_folder", "csv"]
    path: str
    classes: list[str]
    split: SplitConfig = field(default_factory=SplitConfig)
    label_map: dict[str, str] | None = None
    image_size: int | None = None
    channels: Literal[1, 3] | None = None
    resize: Literal["nearest", "bilinear"] = "nearest"
    exclude: list[str] = field(default_factory=list)
    group_pattern: str | None = None
    multilabel: MultiLabelRule | None = None
    horizontal_flip: bool = True
    fingerprint: str | None = None
    description: str = ""
    paper_target: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning (and pretraining) hyperparameters; the search samples around these.

    The `full` regime trains everything with `optimizer` at `learning_rate`, early-stopping on validation loss
    after `patience` epochs without improvement and restoring the best epoch. `freeze` first trains the head
    alone on a frozen backbone at `head_learning_rate` (early stop on validation accuracy, `head_patience`),
    then everything as in `full`. `linear` trains the head alone throughout (early stop on validation loss).
    """

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1.0e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    max_epochs: int = 30
    patience: int = 3
    head_learning_rate: float = 1.0e-3
    head_patience: int = 2
    head_max_epochs: int = 30
    augment: bool = True
    seed: int = 0


@dataclass(frozen=True)
class SearchParameter:
    """One hyperparameter of the search space: a TrainConfig field sampled as a float or int range (optionally
    on a log scale) or chosen from `choices`."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass(frozen=True)
class SearchConfig:
    """Optuna searches: one study per (dataset, source, regime), its trials nested MLflow runs.

    Trials tune on fold `search_fold` (train/val only); the best configuration is then fit on every fold listed
    in `folds` (default: all) for every seed in `seeds`, and registered. TPE is seeded and starts with
    `startup_trials` random trials; the median pruner compares validation loss per epoch once
    `pruner_startup_trials` trials have finished and after `pruner_warmup_epochs` epochs. The defaults suit small
    budgets: a 4-trial search still prunes and is not purely random.
    """

    trials: int = 4
    space: dict[str, SearchParameter] = field(default_factory=dict)
    search_fold: int = 0
    folds: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    seed: int = 0
    startup_trials: int = 2
    pruner_startup_trials: int = 1
    pruner_warmup_epochs: int = 1
    max_failed_attempts: int = 3


@dataclass(frozen=True)
class StudyConfig:
    """What the study compares: the targets fine-tuned, the sources they start from, and the regimes.

    protocol: how every (target, source, regime) is trained: `search` (an Optuna search over `search.space`
    around `train`, the best configuration fit on every fold) or a fixed preset such as `paper` (the original
    study's protocol, no search; see medtransfer.train.presets).
    """

    targets: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    regimes: list[str] = field(default_factory=lambda: [DEFAULT_REGIME])
    protocol: str = PROTOCOL_SEARCH


#: How `compare` forms the streamed cross products (analysis/cross_products.py): "float64", the reference, or
#: "float32" blocks summed in float64 (about twice as fast on wide layers, error bounded there and tested).
GramPrecision = Literal["float64", "float32"]


@dataclass(frozen=True)
class AnalysisConfig:
    """How `extract` samples activations and `compare` compares them.

    Datapoints are spatial positions: a layer's activations (N, C, H, W) become (N·H·W, C). As in the original
    study, about `positions_per_layer` datapoints are taken per layer, from N = round(positions_per_layer / (H·W))
    held-out images (at least 1, at most what the fold's test part holds; `images` raises the cap or fixes N).
    The same images, in the same order, feed every model of a pair. `channel_sample` > 0 compares that many
    random channels (the same indices in both networks) `channel_repeats` times and averages, as the original
    did with 64 × 5; 0 compares all channels.
    """

    positions_per_layer: int = 10000
    images: int | None = None
    channel_sample: int = 0
    channel_repeats: int = 5
    measures: list[str] = field(default_factory=lambda: ["cca", "svcca", "pwcca", "cka", "cka_debiased"])
    gram_precision: GramPrecision = "float64"
    batch_size: int = 64
    seed: int = 0
    #: Resamples of each fold's test images for the bootstrap interval of its test AUC (`compare`).
    bootstrap_resamples: int = 1000


@dataclass(frozen=True)
class SourceConfig:
    """A named pretraining starting point, registered as `source.<name>` by `medtransfer source`.

    kind:          `random` (Keras-like initialisation from `seed`), `timm` (timm's pretrained ImageNet weights
                   for `arch`, optionally a `timm_tag` such as `a1_in1k`; from the Hugging Face hub or its
                   cache, or offline from a local weights `file` timm reads, such as the hub's
                   `model.safetensors`), `keras_h5` (a Keras ResNet50 HDF5 file at `path`, e.g. RadImageNet's;
                   arch must be keras_resnet50), `safetensors` (a backbone state dict at `path`) or `pretrained`
                   (our own supervised pretraining on `dataset`, from a Keras-like initialisation drawn from `seed`,
                   with the `train` settings given here, else the top-level ones).
    arch:          `keras_resnet50`, a timm ResNet (`resnet18` … `resnet152`; stages `stem`, `stage1` … `stage4`)
                   or any other timm model name (`convnext_atto`, `vit_tiny_patch16_224`; timm's own stages).
    model_args:    for those other timm models only, keyword arguments of `timm.create_model`, e.g.
                   `{img_size: 32}` for a vision transformer on 32 px images.
    preprocessing: `imagenet` or `caffe`; defaults to the architecture's (caffe for keras_resnet50).
    paper_source:  the paper's source this one stands for (`imagenet`, `radimagenet` or `random`), for the report's
                   comparison with the paper.
    """

    kind: Literal["random", "timm", "keras_h5", "safetensors", "pretrained"]
    arch: str
    seed: int = 0
    path: str | None = None
    timm_tag: str | None = None
    file: str | None = None
    dataset: str | None = None
    train: TrainConfig | None = None
    preprocessing: Literal["imagenet", "caffe"] | None = None
    description: str = ""
    paper_source: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """The validated content of one params file. Build it with `load_config`."""

    root: Path
    source_file: Path
    project: ProjectConfig
    stores: StoresConfig
    paths: PathsConfig
    datasets: dict[str, DatasetConfig]
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def source(self, name: str) -> SourceConfig:
        """The source called `name`, or a ConfigError listing the known names."""
        if name not in self.sources:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(
                f"unknown source '{name}'",
                where=f"{self.source_file}: sources",
                fix=f"use one of: {known}, or declare it under 'sources'",
            )
        return self.sources[name]

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset called `name`, or a ConfigError listing the known names."""
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(
                f"unknown dataset '{name}'",
                where=f"{self.source_file}: datasets",
                fix=f"use one of: {known}, or declare it under 'datasets'",
            )
        return self.datasets[name]

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """A path from the params file, made absolute against the repository root."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self.root / candidate)

    @property
    def prepared_data_dir(self) -> Path:
        return self.resolve(self.paths.prepared_data)

    @property
    def raw_data_dir(self) -> Path:
        return self.resolve(self.paths.raw_data)

    @property
    def tracking_uri(self) -> str:
        """$MEDTRANSFER_TRACKING_URI when set (cluster workers), else stores.tracking_uri."""
        return resolve_store_url(os.environ.get(TRACKING_URI_ENV_VAR) or self.stores.tracking_uri, self.root)

    @property
    def artifact_root(self) -> str:
        return resolve_store_url(self.stores.artifact_root, self.root)

    @property
    def optuna_storage(self) -> str:
        """$MEDTRANSFER_OPTUNA_STORAGE when set (a database URL with its password stays out of params.yaml), else
        stores.optuna_storage."""
        return resolve_store_url(os.environ.get(OPTUNA_STORAGE_ENV_VAR) or self.stores.optuna_storage, self.root)


_SECTIONS: dict[str, type] = {
    "project": ProjectConfig,
    "stores": StoresConfig,
    "paths": PathsConfig,
    "train": TrainConfig,
    "search": SearchConfig,
    "study": StudyConfig,
    "analysis": AnalysisConfig,
}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def find_params_file(start: Path | None = None) -> Path:
    """The params file to use: $MEDTRANSFER_PARAMS, else the nearest params.yaml at or above `start` (cwd)."""
    from_env = os.environ.get(PARAMS_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PARAMS_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {PARAMS_FILE_NAME} found in {here} or any folder above it",
        fix=f"run from the repository, pass --params FILE, or set {PARAMS_ENV_VAR}",
    )


def load_config(params_file: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a params file (default: `find_params_file()`)."""
    path = Path(params_file).expanduser().resolve() if params_file else find_params_file()
    raw = read_yaml_mapping(path)
    return config_from_mapping(raw, source_file=path)


def config_from_mapping(raw: dict[str, Any], *, source_file: Path) -> Config:
    """Validate an already-parsed params mapping; relative paths resolve against `source_file`'s folder."""
    where = str(source_file)
    known = set(_SECTIONS) | {"datasets", "sources"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown top-level key '{unknown[0]}'",
            where=where,
            fix=f"known keys: {', '.join(sorted(known))}",
        )
    if "project" not in raw:
        raise ConfigError("missing required key 'project'", where=where, fix="add a 'project:' section with 'profile:'")
    sections = {
        name: build_dataclass(schema, raw.get(name, {}) if raw.get(name) is not None else {}, name, where)
        for name, schema in _SECTIONS.items()
    }
    datasets = {}
    for name, entry in named_entries(raw, "datasets", where).items():
        dataset = build_dataclass(DatasetConfig, entry, f"datasets.{name}", where)
        check_dataset(dataset, f"datasets.{name}", where)
        datasets[name] = dataset
    sources = {
        name: build_dataclass(SourceConfig, entry, f"sources.{name}", where)
        for name, entry in named_entries(raw, "sources", where).items()
    }
    for name, source in sources.items():
        check_source(source, f"sources.{name}", where, datasets)
    check_distinct_initialisations(sources, where)
    check_train(sections["train"], "train", where)
    for name, source in sources.items():
        if source.train is not None:
            check_train(source.train, f"sources.{name}.train", where)
    check_study_and_search(sections, datasets, sources, where)
    check_stores(sections["stores"], where)
    check_paper_twins(datasets, sources, where)
    check_analysis(sections["analysis"], where)
    check_seeds(sections, datasets, sources, where)
    return Config(root=source_file.parent, source_file=source_file, datasets=datasets, sources=sources, **sections)


def resolve_store_url(url: str, root: Path) -> str:
    """Make a store URL independent of the working directory.

    `sqlite:///relative.db` → `sqlite:////<root>/relative.db`; `journal:relative.log` (Optuna's file journal)
    → `journal:/<root>/relative.log`; a bare relative path → an absolute path under `root`. Absolute paths and
    server URLs (http, postgresql, ...) are returned unchanged.
    """
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            if rest.startswith("/") or rest == ":memory:" or rest == "":
                return url
            return prefix + str((root / rest).resolve())
    if "://" in url or url.startswith("file:"):
        return url
    return str((root / url).resolve()) if not Path(url).is_absolute() else url
