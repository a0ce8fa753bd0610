"""params.yaml → validated, typed configuration: the one place for every default.

`params.yaml` at the repository root is the single source of truth; DVC reads it, and so does every
`medtransfer` command. It is validated once, here, into frozen dataclasses. Unknown keys, wrong types and
missing values raise `ConfigError` naming the file and the dotted key.

Relative paths and store URLs in the file are resolved against the folder that holds the file (the repository
root for the active `params.yaml`), never against the working directory, so that the CLI, `mlflow run`,
`dvc repro`, `dvc exp run` and the tests all meet the same data, tracking store and Optuna storage.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medtransfer.errors import ConfigError

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
    column (a published split, reproduced exactly). In all three, `val_fraction` of the remaining images
    (stratified by class, or by whole groups when there are groups) is held out for early stopping; the test
    fold is only ever used for reporting.
    """

    scheme: Literal["given", "stratified_kfold", "grouped_kfold", "predefined_folds"] = "given"
    folds: int = 5
    val_fraction: float = 0.1
    seed: int = 0


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
    regimes: list[str] = field(default_factory=lambda: ["full"])
    protocol: str = "search"


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
    preprocessing: `imagenet` or `caffe`; defaults to the architecture's (caffe for keras_resnet50).
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
        name: _build(schema, raw.get(name, {}) if raw.get(name) is not None else {}, name, where)
        for name, schema in _SECTIONS.items()
    }
    datasets = {}
    for name, entry in _named_entries(raw, "datasets", where).items():
        dataset = _build(DatasetConfig, entry, f"datasets.{name}", where)
        _check_dataset(dataset, f"datasets.{name}", where)
        datasets[name] = dataset
    sources = {
        name: _build(SourceConfig, entry, f"sources.{name}", where)
        for name, entry in _named_entries(raw, "sources", where).items()
    }
    for name, source in sources.items():
        _check_source(source, f"sources.{name}", where)
        if source.kind == "pretrained" and source.dataset not in datasets:
            raise ConfigError(
                f"pretrained source needs a dataset declared under 'datasets', got {source.dataset!r}",
                where=f"{where}: sources.{name}.dataset",
            )
    _check_distinct_initialisations(sources, where)
    _check_train(sections["train"], "train", where)
    for name, source in sources.items():
        if source.train is not None:
            _check_train(source.train, f"sources.{name}.train", where)
    _check_study_and_search(sections, datasets, sources, where)
    _check_stores(sections["stores"], where)
    return Config(root=source_file.parent, source_file=source_file, datasets=datasets, sources=sources, **sections)


def _named_entries(raw: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    entries = raw.get(section) or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"expected a mapping of names, got {_describe(entries)}", where=f"{where}: {section}")
    for name in entries:
        if not isinstance(name, str) or not name or not _is_safe_name(name):
            raise ConfigError(
                f"name {name!r} is not usable",
                where=f"{where}: {section}",
                fix="use letters, digits, '-' and '_' only (it becomes part of file and model names)",
            )
    return entries


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; duplicate keys are an error (YAML would keep the last)."""
    if not path.is_file():
        raise ConfigError("params file not found", where=str(path), fix="create it, or pick a profile with 'medtransfer profile use demo'")
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(error.what, where=str(path), fix=error.fix) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"not valid YAML{line}: {problem}", where=str(path), fix="fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=str(path), fix="save it as UTF-8 YAML") from None
    except OSError as error:
        raise ConfigError(f"cannot read it ({(error.strerror or str(error)).lower()})", where=str(path),
                          fix="make it readable by the user running medtransfer") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top, got {_describe(data)}", where=str(path))
    return data


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


# --------------------------------------------------------------------------------------------------------------
# Validation machinery: dataclass schemas checked key by key
# --------------------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping."""


def _construct_mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1}",
                fix="each name may appear once per section; rename or remove one",
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


def _is_safe_name(name: str) -> bool:
    return all(ch.isalnum() or ch in "-_" for ch in name) and not name.startswith("-")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _build(schema: type, data: Any, key: str, where: str) -> Any:
    """Instantiate dataclass `schema` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {_describe(data)}", where=f"{where}: {key}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}'",
            where=f"{where}: {key}.{unknown[0]}",
            fix=f"known keys here: {', '.join(fields)}",
        )
    values = {}
    for name, spec in fields.items():
        dotted = f"{key}.{name}"
        if name in data:
            values[name] = _coerce(hints[name], data[name], dotted, where)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{name}'", where=f"{where}: {dotted}", fix=f"add '{name}:' under '{key}'")
    return schema(**values)


def _coerce(expected: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    location = f"{where}: {key}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, key, where)
        raise TypeError(f"unsupported union in schema at {key}")  # pragma: no cover - schema bug
    if origin is Literal:
        if isinstance(value, bool) or value not in args:  # True == 1 in Python; a flag is never a choice here
            choices = ", ".join(repr(arg) for arg in args)
            raise ConfigError(f"expected one of {choices}, got {_describe(value)}", where=location)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_describe(value)}", where=location)
        return [_coerce(args[0], item, f"{key}[{index}]", where) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {_describe(value)}", where=location)
        # YAML reads `4: malignant` with an integer key; raw labels are compared as text.
        return {
            _coerce(args[0], str(name) if isinstance(name, int) and args[0] is str else name, f"{key}.{name}", where):
            _coerce(args[1], item, f"{key}.{name}", where)
            for name, item in value.items()
        }
    if dataclasses.is_dataclass(expected):
        return _build(expected, value, key, where)
    if expected is Any:
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_describe(value)}", where=location)
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_describe(value)}", where=location)
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {_describe(value)}", where=location)
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_describe(value)}", where=location)
        return value
    raise TypeError(f"unsupported type {expected!r} in schema at {key}")  # pragma: no cover - schema bug


def _check_dataset(dataset: DatasetConfig, key: str, where: str) -> None:
    """Cross-field rules that a type alone cannot express."""
    if len(dataset.classes) < 2:
        raise ConfigError("a dataset needs at least 2 classes", where=f"{where}: {key}.classes", fix="list every class name")
    if len(set(dataset.classes)) != len(dataset.classes):
        raise ConfigError("class names repeat", where=f"{where}: {key}.classes", fix="give each class a distinct name")
    split = dataset.split
    if split.scheme != "given" and split.folds < 2:
        raise ConfigError(f"k-fold needs at least 2 folds, got {split.folds}", where=f"{where}: {key}.split.folds")
    if not 0.0 < split.val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in (0, 1), got {split.val_fraction}",
            where=f"{where}: {key}.split.val_fraction",
            fix="every fold needs validation images for early stopping",
        )
    rule = dataset.multilabel
    if rule is not None:
        if rule.rule == "column" and (rule.column is None or rule.column < 0):
            raise ConfigError(
                "rule 'column' needs a non-negative 'column'", where=f"{where}: {key}.multilabel.column"
            )
        if len(dataset.classes) != 2:
            raise ConfigError(
                "a multi-label rule makes a binary label, so exactly 2 classes are needed",
                where=f"{where}: {key}.classes",
            )
    if dataset.format in ("image_folder", "csv"):
        for needed in ("image_size", "channels"):
            if getattr(dataset, needed) is None:
                raise ConfigError(
                    f"format '{dataset.format}' needs '{needed}' (images come in mixed sizes and modes)",
                    where=f"{where}: {key}.{needed}",
                    fix="e.g. image_size: 112 and channels: 1",
                )
    if dataset.image_size is not None and not 8 <= dataset.image_size <= 4096:
        raise ConfigError(f"image_size must be 8..4096, got {dataset.image_size}", where=f"{where}: {key}.image_size")
    if dataset.label_map is not None:
        unknown = sorted({name for name in dataset.label_map.values() if name not in dataset.classes})
        if unknown:
            raise ConfigError(
                f"label_map maps to '{unknown[0]}', which is not among the classes {dataset.classes}",
                where=f"{where}: {key}.label_map",
            )
    if dataset.group_pattern is not None:
        try:
            groups = re.compile(dataset.group_pattern).groups
        except re.error as error:
            raise ConfigError(f"not a regular expression: {error}", where=f"{where}: {key}.group_pattern") from None
        if groups != 1:
            raise ConfigError(
                f"group_pattern needs exactly one capturing group, it has {groups}",
                where=f"{where}: {key}.group_pattern",
                fix="e.g. '^(\\d+)_' for files named <patient>_<n>.png",
            )
    if dataset.fingerprint is not None and not _looks_like_sha256(dataset.fingerprint):
        raise ConfigError(
            "fingerprint must be the 64-hex-digit sha256 that 'medtransfer prepare' prints",
            where=f"{where}: {key}.fingerprint",
        )


def _check_source(source: SourceConfig, key: str, where: str) -> None:
    from medtransfer.models.architectures import ARCHITECTURES  # the names only: no torch import here

    if source.arch not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture '{source.arch}'", where=f"{where}: {key}.arch", fix=f"use one of: {', '.join(ARCHITECTURES)}"
        )
    if source.kind in ("keras_h5", "safetensors") and not source.path:
        raise ConfigError(f"kind '{source.kind}' needs a 'path' to the weights file", where=f"{where}: {key}.path")
    if source.kind == "keras_h5" and source.arch != "keras_resnet50":
        raise ConfigError(
            "Keras HDF5 weights fit only arch keras_resnet50", where=f"{where}: {key}.arch", fix="set arch: keras_resnet50"
        )
    if source.kind == "pretrained" and not source.dataset:
        raise ConfigError("kind 'pretrained' needs a 'dataset' to pretrain on", where=f"{where}: {key}.dataset")
    # Each kind reads its weights from one key; a key the kind ignores would silently load other weights.
    if source.kind == "timm" and source.path:
        raise ConfigError("kind 'timm' reads a local weights file from 'file', not 'path'",
                          where=f"{where}: {key}.path", fix="rename the key to 'file'")
    if source.kind != "timm" and source.file:
        raise ConfigError(f"'file' is for kind timm only; kind '{source.kind}' ignores it",
                          where=f"{where}: {key}.file", fix="remove it (weights files of other kinds go in 'path')")
    if source.kind == "timm" and source.arch == "keras_resnet50":
        raise ConfigError(
            "timm has no keras_resnet50 weights", where=f"{where}: {key}.kind", fix="use kind keras_h5 with the Keras file"
        )


def _check_stores(stores: StoresConfig, where: str) -> None:
    if stores.optuna_heartbeat_seconds < 1:
        raise ConfigError(f"must be at least 1 second, got {stores.optuna_heartbeat_seconds}",
                          where=f"{where}: stores.optuna_heartbeat_seconds")
    if stores.optuna_grace_seconds <= stores.optuna_heartbeat_seconds:
        raise ConfigError(
            f"must be longer than the heartbeat interval ({stores.optuna_heartbeat_seconds} s), "
            f"got {stores.optuna_grace_seconds}",
            where=f"{where}: stores.optuna_grace_seconds",
            fix="a few heartbeats, e.g. 3 x optuna_heartbeat_seconds",
        )


def _check_study_and_search(sections: dict[str, Any], datasets: dict, sources: dict, where: str) -> None:
    study: StudyConfig = sections["study"]
    for key, names, known in (("targets", study.targets, datasets), ("sources", study.sources, sources)):
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"'{name}' is not declared under '{'datasets' if key == 'targets' else 'sources'}'",
                    where=f"{where}: study.{key}",
                )
    for regime in study.regimes:
        if regime not in ("full", "freeze", "linear"):
            raise ConfigError(f"unknown regime '{regime}'", where=f"{where}: study.regimes", fix="use full, freeze or linear")
    from medtransfer.train.protocols import PROTOCOLS

    if study.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{study.protocol}'", where=f"{where}: study.protocol",
                          fix=f"use one of: {', '.join(PROTOCOLS)}")
    search: SearchConfig = sections["search"]
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for name, parameter in search.space.items():
        key = f"{where}: search.space.{name}"
        if name not in train_fields or name == "seed":
            raise ConfigError(f"'{name}' is not a tunable training setting", where=key,
                              fix=f"use one of: {', '.join(n for n in train_fields if n != 'seed')}")
        if parameter.type == "categorical":
            if not parameter.choices:
                raise ConfigError("a categorical parameter needs a non-empty 'choices' list", where=key)
            for choice in parameter.choices:
                _coerce(hints[name], choice, f"search.space.{name}.choices", where)
        else:
            if parameter.low is None or parameter.high is None or not parameter.low < parameter.high:
                raise ConfigError("a range needs 'low' < 'high'", where=key)
            if parameter.log and parameter.low <= 0:
                raise ConfigError("a log-scale range needs 'low' > 0", where=key)
            if hints[name] is int and parameter.type != "int" or hints[name] is float and parameter.type != "float":
                raise ConfigError(f"'{name}' is {hints[name].__name__}-valued; set type: {hints[name].__name__}", where=key)
    if search.trials < 1:
        raise ConfigError("trials must be at least 1", where=f"{where}: search.trials")
    if not search.seeds:
        raise ConfigError("at least one seed is needed for the final fits", where=f"{where}: search.seeds")
    _check_search_folds(search, [datasets[name] for name in study.targets], where)


def _check_train(train: TrainConfig, key: str, where: str) -> None:
    """Values the types let through but training cannot use: found here, not after the data is loaded."""
    for name in ("batch_size", "max_epochs", "head_max_epochs"):
        if getattr(train, name) < 1:
            raise ConfigError(f"must be at least 1, got {getattr(train, name)}", where=f"{where}: {key}.{name}")
    for name in ("patience", "head_patience"):
        if getattr(train, name) < 0:
            raise ConfigError(f"must be 0 or more, got {getattr(train, name)}", where=f"{where}: {key}.{name}")
    for name in ("learning_rate", "head_learning_rate"):
        if not 0 < getattr(train, name) < float("inf"):
            raise ConfigError(f"must be a positive number, got {getattr(train, name)}", where=f"{where}: {key}.{name}",
                              fix="typical values are 1e-5 to 1e-2")
    if not 0 <= train.weight_decay < float("inf") or not 0 <= train.momentum < 1:
        bad = "weight_decay" if not 0 <= train.weight_decay < float("inf") else "momentum"
        raise ConfigError(f"out of range, got {getattr(train, bad)}", where=f"{where}: {key}.{bad}",
                          fix="weight_decay >= 0, 0 <= momentum < 1")


def _check_search_folds(search: SearchConfig, targets: list[DatasetConfig], where: str) -> None:
    """Every fold the search tunes on or fits must exist in every target (a `given` split has one fold)."""
    if not targets:
        return
    fewest = min(1 if dataset.split.scheme == "given" else dataset.split.folds for dataset in targets)
    for key, folds in (("search_fold", [search.search_fold]), ("folds", search.folds or [])):
        for fold in folds:
            if not 0 <= fold < fewest:
                raise ConfigError(f"fold {fold} does not exist: the study's targets have folds 0..{fewest - 1}",
                                  where=f"{where}: search.{key}", fix=f"use a fold from 0 to {fewest - 1}")


def _check_distinct_initialisations(sources: dict[str, SourceConfig], where: str) -> None:
    """Two sources drawn from the same seed on the same architecture start identical, which inflates their
    similarity (and two pretrained sources would share their initialisation); refuse it."""
    seen: dict[tuple[str, int], str] = {}
    for name, source in sources.items():
        if source.kind not in ("random", "pretrained"):
            continue
        key = (source.arch, source.seed)
        if key in seen:
            raise ConfigError(
                f"sources '{seen[key]}' and '{name}' both start from seed {source.seed} on {source.arch}",
                where=f"{where}: sources.{name}.seed",
                fix="give every random or pretrained source its own seed",
            )
        seen[key] = name


def _looks_like_sha256(text: str) -> bool:
    return len(text) == 64 and all(ch in "0123456789abcdef" for ch in text.lower())
