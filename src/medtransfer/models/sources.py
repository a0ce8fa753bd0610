"""Pretraining sources: build each declared starting point and register it as `source.<name>`.

A source is data (`sources:` in params.yaml): a kind, an architecture, and where its weights come from. Building
one gives a headless `Classifier` (backbone + pooling) plus an `origin` string for provenance. Registering is
idempotent: the same weights (same sha256) never make a second version.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medtransfer.config import Config, SourceConfig
from medtransfer.errors import ModelError
from medtransfer.hashing import file_sha256
from medtransfer.layout import SOURCE_POINTER_FOLDER, STEP_SOURCE
from medtransfer.models.architectures import TIMM_RESNETS
from medtransfer.models.backbones import Classifier, default_preprocessing, keras_like_init_, seeded_classifier
from medtransfer.models.packaging import ModelSpec, state_dict_bytes
from medtransfer.models.preprocessing import Preprocessing, preprocessing_by_name
from medtransfer.layout import ROLE_SOURCE
from medtransfer.registry import (RegisteredSource, Tag, ensure_default_alias, source_model_description,
                                  source_model_name, source_version_description, version_with_weights)

TIMM_DOWNLOAD_TIMEOUT = 120.0


@dataclass(frozen=True)
class BuiltSource:
    model: Classifier
    spec: ModelSpec
    origin: str


def source_preprocessing(source: SourceConfig) -> Preprocessing:
    if source.preprocessing is not None:
        return preprocessing_by_name(source.preprocessing)
    return default_preprocessing(source.arch)


def build_source(config: Config, name: str) -> BuiltSource:
    """The headless model `sources.<name>` describes, with its weights."""
    source = config.source(name)
    kind = SOURCE_KINDS[source.kind]
    if kind.build is None:
        raise ModelError(
            f"source '{name}' is made by pretraining, not built",
            fix=f"run 'medtransfer pretrain --dataset {source.dataset} --source-name {name}' (or 'medtransfer source --name {name}')",
        )
    model = source_classifier(config, name, num_classes=None)
    origin = kind.build(model, config, name, source)
    spec = ModelSpec(
        arch=source.arch,
        num_classes=None,
        preprocessing=source_preprocessing(source),
        extra={"role": ROLE_SOURCE, "source": name, "kind": source.kind, "origin": origin},
        model_args=dict(source.model_args or {}),
    )
    return BuiltSource(model.eval(), spec, origin)


def source_classifier(config: Config, name: str, num_classes: int | None) -> Classifier:
    """`sources.<name>`'s architecture, built from its seed (see `seeded_classifier`); an architecture or model
    arguments timm refuses are named by their key in the params file."""
    source = config.source(name)
    return seeded_classifier(source.arch, num_classes, source.seed, source.model_args,
                             where=f"{config.source_file}: sources.{name}")


def register_source(config: Config, name: str) -> RegisteredSource:
    """Register `sources.<name>` as `source.<name>` (alias `default`), or reuse the version with the same weights."""
    import mlflow

    from medtransfer.models.mlflow_models import log_packaged_model, register_logged_model
    from medtransfer.tracking import step_run, use_tracking_store

    kind = SOURCE_KINDS[config.source(name).kind]
    if kind.register is not None:
        return kind.register(config, name)
    use_tracking_store(config)
    built = build_source(config, name)
    digest = hashlib.sha256(state_dict_bytes(built.model)).hexdigest()
    model_name = source_model_name(name)
    client = mlflow.MlflowClient()
    existing = version_with_weights(client, model_name, digest)
    if existing is not None:
        ensure_default_alias(client, model_name, existing.version)
        return RegisteredSource(model_name, str(existing.version), digest, reused=True)
    source = config.source(name)
    tags = {
        Tag.ROLE: ROLE_SOURCE,
        Tag.SOURCE: name,
        Tag.ARCH: source.arch,
        Tag.ORIGIN: built.origin,
        Tag.WEIGHTS_SHA256: digest,
        Tag.PREPROCESSING: built.spec.preprocessing.name,
    }
    with step_run(config, step=STEP_SOURCE, run_name=f"source {name}", tags={Tag.SOURCE: name, Tag.ROLE: ROLE_SOURCE}):
        model_args = {"model_args": json.dumps(source.model_args, sort_keys=True)} if source.model_args else {}
        mlflow.log_params({"source": name, "kind": source.kind, "arch": source.arch, "seed": source.seed,
                           "preprocessing": built.spec.preprocessing.name, **model_args})
        model_uri, logged_digest = log_packaged_model(built.model, built.spec)
        if logged_digest != digest:  # pragma: no cover - the package writes the same bytes it was hashed from
            raise ModelError(f"packaged weights changed while logging ({logged_digest} != {digest})")
        version = register_logged_model(
            model_uri, model_name, tags, model_description=source_model_description(name),
            version_description=source_version_description(name, source.arch, built.origin))
    ensure_default_alias(client, model_name, version.version)
    return RegisteredSource(model_name, str(version.version), digest, reused=False)


def write_source_pointer(config: Config, name: str, registered: RegisteredSource) -> Path:
    """results/sources/<name>.json: the registered version and weights hash, a DVC output later stages depend on."""
    from medtransfer.atomic_files import atomic_write_text

    pointer = config.resolve(SOURCE_POINTER_FOLDER) / f"{name}.json"
    record = {"source": name, "registered_model": registered.name, "version": registered.version,
              "weights_sha256": registered.weights_sha256}
    atomic_write_text(pointer, json.dumps(record, indent=2) + "\n")
    return pointer


def _existing_file(config: Config, source: SourceConfig, name: str, key: str = "path") -> Path:
    path = config.resolve(getattr(source, key))
    if not path.is_file():
        raise ModelError(
            "weights file not found",
            where=str(path),
            fix=f"place the file there or fix sources.{name}.{key} in {config.source_file.name}",
        )
    return path


def _load_safetensors_backbone(model: Classifier, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"unreadable safetensors file ({error})", where=str(path)) from None
    prefix = "backbone."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelError(f"weights do not fit architecture '{model.arch}': {detail}", where=str(path)) from None


def _timm_model_name(source: SourceConfig) -> str:
    return f"{source.arch}.{source.timm_tag}" if source.timm_tag else source.arch


def _timm_arguments(model: Classifier) -> dict:
    """What `timm.create_model` needs, beside the name, to build weights that fit `model.backbone.body`: the
    ResNets drop their pooling, other models are built with the source's own model arguments."""
    return {"global_pool": ""} if model.arch in TIMM_RESNETS else dict(model.model_args)


def _load_timm_weights(model: Classifier, source: SourceConfig) -> str:
    """timm's pretrained weights through the Hugging Face hub (or its cache), with a deadline so that a missing
    network fails fast; offline (HF_HUB_OFFLINE=1) without a cached copy it says how to supply a local file."""
    import timm

    name = _timm_model_name(source)
    outcome: dict = {}

    def fetch() -> None:
        try:
            outcome["model"] = timm.create_model(name, pretrained=True, num_classes=0, **_timm_arguments(model))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=fetch, name="medtransfer-timm", daemon=True)
    worker.start()
    worker.join(TIMM_DOWNLOAD_TIMEOUT)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    how = (
        f"without a network, download timm's weights file for '{name}' elsewhere (e.g. its model.safetensors) "
        "and name it with 'file:' in the source, or convert the weights to safetensors and declare "
        "kind: safetensors with their path (or use the Keras ImageNet HDF5 with kind: keras_h5)"
    )
    if worker.is_alive():
        raise ModelError(f"timm weights '{name}' did not arrive within {TIMM_DOWNLOAD_TIMEOUT:g} s", fix=how)
    if "error" in outcome:
        error = outcome["error"]
        state = "offline (HF_HUB_OFFLINE=1) and not cached" if offline else f"{type(error).__name__}"
        raise ModelError(f"cannot load timm's pretrained '{name}': {state}", fix=how) from None
    model.backbone.body.load_state_dict(outcome["model"].state_dict(), strict=True)
    return f"timm:{outcome['model'].pretrained_cfg.get('hf_hub_id') or name}"


def _load_timm_file(model: Classifier, source: SourceConfig, path: Path) -> None:
    """timm's own loader reads the local file, so its filters (e.g. dropping a classifier of another class count)
    apply exactly as for hub weights; no network is touched."""
    import timm

    name = _timm_model_name(source)
    try:
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                   num_classes=0, **_timm_arguments(model))
        model.backbone.body.load_state_dict(loaded.state_dict(), strict=True)
    except Exception as error:  # noqa: BLE001 - timm raises anything from pickle errors to shape mismatches
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise ModelError(f"timm cannot load these weights into '{name}' ({detail})", where=str(path)) from None


# -- the kinds of source: how each gets its weights ------------------------------------------------------------------


def _build_random(model: Classifier, config: Config, name: str, source: SourceConfig) -> str:
    keras_like_init_(model, torch.Generator().manual_seed(source.seed))
    return f"random(seed={source.seed})"


def _build_timm(model: Classifier, config: Config, name: str, source: SourceConfig) -> str:
    if not source.file:
        return _load_timm_weights(model, source)
    path = _existing_file(config, source, name, key="file")
    _load_timm_file(model, source, path)
    return f"timm_file:{file_sha256(path)}"


def _build_keras_h5(model: Classifier, config: Config, name: str, source: SourceConfig) -> str:
    from medtransfer.models.keras_h5 import load_keras_resnet50_h5

    path = _existing_file(config, source, name)
    model.backbone.load_state_dict(load_keras_resnet50_h5(path), strict=True)
    return f"keras_h5:{file_sha256(path)}"


def _build_safetensors(model: Classifier, config: Config, name: str, source: SourceConfig) -> str:
    path = _existing_file(config, source, name)
    _load_safetensors_backbone(model, path)
    return f"safetensors:{file_sha256(path)}"


def _pretrain(config: Config, name: str) -> RegisteredSource:
    from medtransfer.train.pretrain import pretrain_source  # torch training code, loaded only for this kind

    return pretrain_source(config, name)


#: Loads weights into a fresh headless model and returns their origin (provenance) string.
SourceBuilder = Callable[[Classifier, Config, str, SourceConfig], str]


@dataclass(frozen=True)
class SourceKind:
    """How one kind of source gets its weights: `build` loads them into a fresh model (None: the kind is made by a
    training run, not built); `register` replaces build-then-register (None: the built weights are registered)."""

    build: SourceBuilder | None
    register: Callable[[Config, str], RegisteredSource] | None = None


#: Every `sources.<name>.kind` params.yaml may name, with how a source of that kind is made.
SOURCE_KINDS: dict[str, SourceKind] = {
    "random": SourceKind(_build_random),
    "timm": SourceKind(_build_timm),
    "keras_h5": SourceKind(_build_keras_h5),
    "safetensors": SourceKind(_build_safetensors),
    "pretrained": SourceKind(build=None, register=_pretrain),
}
