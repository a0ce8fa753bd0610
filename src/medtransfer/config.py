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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medtransfer.errors import ConfigError

PARAMS_FILE_NAME = "params.yaml"
PARAMS_ENV_VAR = "MEDTRANSFER_PARAMS"


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
    exam) so that no group crosses folds. In both, `val_fraction` of the remaining images (stratified by class,
    or by whole groups) is held out for early stopping; the test fold is only ever used for reporting.
    """

    scheme: Literal["given", "stratified_kfold", "grouped_kfold"] = "given"
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
    """One dataset: where it is, how to read it, its classes, and how to split it."""

    format: Literal["medmnist"]
    path: str
    classes: list[str]
    split: SplitConfig = field(default_factory=SplitConfig)
    multilabel: MultiLabelRule | None = None
    fingerprint: str | None = None
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
        return resolve_store_url(self.stores.tracking_uri, self.root)

    @property
    def artifact_root(self) -> str:
        return resolve_store_url(self.stores.artifact_root, self.root)

    @property
    def optuna_storage(self) -> str:
        return resolve_store_url(self.stores.optuna_storage, self.root)


_SECTIONS: dict[str, type] = {
    "project": ProjectConfig,
    "stores": StoresConfig,
    "paths": PathsConfig,
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
    known = set(_SECTIONS) | {"datasets"}
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
    datasets_raw = raw.get("datasets") or {}
    if not isinstance(datasets_raw, dict):
        raise ConfigError(
            f"expected a mapping of dataset names, got {_describe(datasets_raw)}", where=f"{where}: datasets"
        )
    datasets = {}
    for name, entry in datasets_raw.items():
        if not isinstance(name, str) or not name or not _is_safe_name(name):
            raise ConfigError(
                f"dataset name {name!r} is not usable",
                where=f"{where}: datasets",
                fix="use letters, digits, '-' and '_' only (it becomes a folder name)",
            )
        dataset = _build(DatasetConfig, entry, f"datasets.{name}", where)
        _check_dataset(dataset, f"datasets.{name}", where)
        datasets[name] = dataset
    return Config(root=source_file.parent, source_file=source_file, datasets=datasets, **sections)


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
        if value not in args:
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
        return {
            _coerce(args[0], name, f"{key}.{name}", where): _coerce(args[1], item, f"{key}.{name}", where)
            for name, item in value.items()
        }
    if dataclasses.is_dataclass(expected):
        return _build(expected, value, key, where)
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
    if not 0.0 <= split.val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in [0, 1), got {split.val_fraction}", where=f"{where}: {key}.split.val_fraction"
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
    if dataset.fingerprint is not None and not _looks_like_sha256(dataset.fingerprint):
        raise ConfigError(
            "fingerprint must be the 64-hex-digit sha256 that 'medtransfer prepare' prints",
            where=f"{where}: {key}.fingerprint",
        )


def _looks_like_sha256(text: str) -> bool:
    return len(text) == 64 and all(ch in "0123456789abcdef" for ch in text.lower())
