"""The configuration's domain rules: what the types let through but the study cannot use, found at load time.

Each check receives validated sections (see `config`) and raises `ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import TYPE_CHECKING, Any

from medtransfer.config_coercion import coerce
from medtransfer.errors import ConfigError
from medtransfer.layout import REGIMES
from medtransfer.models.architectures import ARCHITECTURES, KERAS_RESNET50, RESERVED_MODEL_ARGS
from medtransfer.train.protocols import PROTOCOLS

if TYPE_CHECKING:  # annotations only: config imports this module to apply the rules
    from medtransfer.config import (AnalysisConfig, DatasetConfig, SearchConfig, SourceConfig, StoresConfig,
                                    StudyConfig, TrainConfig)

#: The similarity measures `compare` computes. They are defined in medtransfer.analysis.similarity, whose import
#: costs NumPy and SciPy (a third of a second) on every load; tests/test_config_limits.py pins the two equal.
SIMILARITY_MEASURES: tuple[str, ...] = ("cca", "svcca", "pwcca", "cka", "cka_debiased", "procrustes_similarity",
                                         "shape_0", "shape_0.5", "shape_1")
#: Seeds reach NumPy's legacy RandomState through Optuna's TPE sampler, which takes 0 .. 2**32 - 1 only.
MAX_SEED = 2**32 - 1


def at_least(value: int, minimum: int, key: str, where: str, fix: str | None = None) -> None:
    """A count or size the code cannot use below `minimum`."""
    if value < minimum:
        raise ConfigError(f"must be at least {minimum}, got {value}", where=f"{where}: {key}", fix=fix)


def check_analysis(analysis: AnalysisConfig, where: str) -> None:
    """What `extract` and `compare` would refuse (or crash on) hours later, after every model is trained."""
    at_least(analysis.positions_per_layer, 1, "analysis.positions_per_layer", where,
             fix="the original study used 10000")
    if analysis.images is not None:
        at_least(analysis.images, 1, "analysis.images", where,
                 fix="or leave it null to take round(positions_per_layer / (H*W)) images per layer")
    at_least(analysis.channel_sample, 0, "analysis.channel_sample", where,
             fix="0 compares all channels; the original study sampled 64 channels, 5 times")
    at_least(analysis.channel_repeats, 1, "analysis.channel_repeats", where, fix="the original study used 5")
    at_least(analysis.batch_size, 1, "analysis.batch_size", where)
    at_least(analysis.bootstrap_resamples, 1, "analysis.bootstrap_resamples", where,
             fix="1000 is usual for a 95 % interval")
    unknown = [measure for measure in analysis.measures if measure not in SIMILARITY_MEASURES]
    if unknown or not analysis.measures:
        raise ConfigError(f"unknown similarity measure '{unknown[0]}'" if unknown else "no similarity measure given",
                          where=f"{where}: analysis.measures",
                          fix=f"use a non-empty list drawn from: {', '.join(SIMILARITY_MEASURES)}")


def check_seeds(sections: dict[str, Any], datasets: dict[str, DatasetConfig], sources: dict[str, SourceConfig],
                where: str) -> None:
    """Every seed of the file, wherever it sits: an integer type is checked already, its range here."""
    seeds = {f"{name}.seed": sections[name].seed for name in ("project", "train", "search", "analysis")}
    seeds.update({f"search.seeds[{index}]": seed for index, seed in enumerate(sections["search"].seeds)})
    seeds.update({f"datasets.{name}.split.seed": dataset.split.seed for name, dataset in datasets.items()})
    for name, source in sources.items():
        seeds[f"sources.{name}.seed"] = source.seed
        if source.train is not None:
            seeds[f"sources.{name}.train.seed"] = source.train.seed
    for key, seed in seeds.items():
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"a seed must be 0 to {MAX_SEED}, got {seed}", where=f"{where}: {key}",
                              fix="any non-negative integer below 2**32, e.g. 0")


def check_dataset(dataset: DatasetConfig, key: str, where: str) -> None:
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


def check_architecture(source: SourceConfig, key: str, where: str) -> None:
    """`arch` names one of our backbones (no timm import) or a timm model (timm is imported only then, to look the
    name up); `model_args` are for the latter, minus the arguments the backbone sets itself."""
    if source.arch in ARCHITECTURES:
        if source.model_args:
            raise ConfigError(f"'{source.arch}' is built with fixed arguments and takes no model_args",
                              where=f"{where}: {key}.model_args",
                              fix="remove model_args (they are for other timm models)")
        return
    if "." in source.arch:
        raise ConfigError(f"arch names the model only, not its pretrained weights tag ('{source.arch}')",
                          where=f"{where}: {key}.arch", fix="put the part after the '.' in timm_tag")
    from medtransfer.models.timm_backbone import close_timm_names, timm_model_exists

    if not timm_model_exists(source.arch):
        close = close_timm_names(source.arch)
        raise ConfigError(f"unknown architecture '{source.arch}' (neither {', '.join(ARCHITECTURES)} nor a timm model)",
                          where=f"{where}: {key}.arch",
                          fix=f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names")
    reserved = sorted(set(source.model_args) & set(RESERVED_MODEL_ARGS))
    if reserved:
        raise ConfigError(f"model_args may not set '{reserved[0]}': the backbone sets it itself",
                          where=f"{where}: {key}.model_args.{reserved[0]}",
                          fix="weights come from the source's kind; remove the key")


def check_source(source: SourceConfig, key: str, where: str, datasets: dict[str, DatasetConfig]) -> None:
    check_architecture(source, key, where)
    if source.kind in ("keras_h5", "safetensors") and not source.path:
        raise ConfigError(f"kind '{source.kind}' needs a 'path' to the weights file", where=f"{where}: {key}.path")
    if source.kind == "keras_h5" and source.arch != KERAS_RESNET50:
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
    if source.kind == "timm" and source.arch == KERAS_RESNET50:
        raise ConfigError(
            "timm has no keras_resnet50 weights", where=f"{where}: {key}.kind", fix="use kind keras_h5 with the Keras file"
        )
    if source.kind == "pretrained" and source.dataset not in datasets:
        raise ConfigError(
            f"pretrained source needs a dataset declared under 'datasets', got {source.dataset!r}",
            where=f"{where}: {key}.dataset",
        )


def check_paper_twins(datasets: dict[str, DatasetConfig], sources: dict[str, SourceConfig], where: str) -> None:
    """`paper_target` / `paper_source` must name one of the paper's targets / sources (several of ours may share one
    twin, e.g. two random initialisations; the report compares the first by name)."""
    if not any(d.paper_target for d in datasets.values()) and not any(s.paper_source for s in sources.values()):
        return
    from medtransfer.paper_reference import load_paper_results

    paper = load_paper_results()
    for section, entries, key, known in (("datasets", datasets, "paper_target", paper.targets),
                                          ("sources", sources, "paper_source", paper.sources)):
        for name, entry in entries.items():
            twin = getattr(entry, key)
            if twin is not None and twin not in known:
                raise ConfigError(f"'{twin}' is not one of the paper's {section}",
                                  where=f"{where}: {section}.{name}.{key}", fix=f"use one of: {', '.join(known)}")


def check_stores(stores: StoresConfig, where: str) -> None:
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


def check_study_and_search(sections: dict[str, Any], datasets: dict, sources: dict, where: str) -> None:
    study: StudyConfig = sections["study"]
    for key, names, known in (("targets", study.targets, datasets), ("sources", study.sources, sources)):
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"'{name}' is not declared under '{'datasets' if key == 'targets' else 'sources'}'",
                    where=f"{where}: study.{key}",
                )
    for regime in study.regimes:
        if regime not in REGIMES:
            raise ConfigError(f"unknown regime '{regime}'", where=f"{where}: study.regimes",
                              fix=f"use {', '.join(REGIMES[:-1])} or {REGIMES[-1]}")
    if study.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{study.protocol}'", where=f"{where}: study.protocol",
                          fix=f"use one of: {', '.join(PROTOCOLS)}")
    search: SearchConfig = sections["search"]
    train_schema = type(sections["train"])  # TrainConfig, without importing the module that applies these rules
    train_fields = {f.name: f for f in dataclasses.fields(train_schema)}
    hints = typing.get_type_hints(train_schema)
    for name, parameter in search.space.items():
        key = f"{where}: search.space.{name}"
        if name not in train_fields or name == "seed":
            raise ConfigError(f"'{name}' is not a tunable training setting", where=key,
                              fix=f"use one of: {', '.join(n for n in train_fields if n != 'seed')}")
        if parameter.type == "categorical":
            if not parameter.choices:
                raise ConfigError("a categorical parameter needs a non-empty 'choices' list", where=key)
            for choice in parameter.choices:
                coerce(hints[name], choice, f"search.space.{name}.choices", where)
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
    check_search_folds(search, [datasets[name] for name in study.targets], where)


def check_train(train: TrainConfig, key: str, where: str) -> None:
    """Values the types let through but training cannot use: found here, not after the data is loaded."""
    for name in ("batch_size", "max_epochs", "head_max_epochs"):
        at_least(getattr(train, name), 1, f"{key}.{name}", where)
    for name in ("patience", "head_patience"):
        at_least(getattr(train, name), 0, f"{key}.{name}", where)
    for name in ("learning_rate", "head_learning_rate"):
        if not 0 < getattr(train, name) < float("inf"):
            raise ConfigError(f"must be a positive number, got {getattr(train, name)}", where=f"{where}: {key}.{name}",
                              fix="typical values are 1e-5 to 1e-2")
    if not 0 <= train.weight_decay < float("inf") or not 0 <= train.momentum < 1:
        bad = "weight_decay" if not 0 <= train.weight_decay < float("inf") else "momentum"
        raise ConfigError(f"out of range, got {getattr(train, bad)}", where=f"{where}: {key}.{bad}",
                          fix="weight_decay >= 0, 0 <= momentum < 1")


def check_search_folds(search: SearchConfig, targets: list[DatasetConfig], where: str) -> None:
    """Every fold the search tunes on or fits must exist in every target (a `given` split has one fold)."""
    if not targets:
        return
    fewest = min(1 if dataset.split.scheme == "given" else dataset.split.folds for dataset in targets)
    for key, folds in (("search_fold", [search.search_fold]), ("folds", search.folds or [])):
        for fold in folds:
            if not 0 <= fold < fewest:
                raise ConfigError(f"fold {fold} does not exist: the study's targets have folds 0..{fewest - 1}",
                                  where=f"{where}: search.{key}", fix=f"use a fold from 0 to {fewest - 1}")


def check_distinct_initialisations(sources: dict[str, SourceConfig], where: str) -> None:
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
