"""Pretraining sources: build each declared starting point and register it as `source.<name>`.

A source is data (`sources:` in params.yaml): a kind, an architecture, and where its weights come from. Building
one gives a headless `Classifier` (backbone + pooling) plus an `origin` string for provenance. Registering is
idempotent: the same weights (same sha256) never make a second version.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from medtransfer.config import Config, SourceConfig
from medtransfer.errors import ModelError
from medtransfer.models.backbones import DEFAULT_PREPROCESSING, Classifier, keras_like_init_
from medtransfer.models.packaging import ModelSpec, state_dict_bytes
from medtransfer.models.preprocessing import Preprocessing, preprocessing_by_name
from medtransfer.registry import (ALIAS_DEFAULT, ROLE_SOURCE, Tag, source_model_description, source_model_name,
                                  source_version_description)

TIMM_DOWNLOAD_TIMEOUT = 120.0


@dataclass(frozen=True)
class BuiltSource:
    model: Classifier
    spec: ModelSpec
    origin: str


@dataclass(frozen=True)
class RegisteredSource:
    name: str  # registered model name
    version: str
    weights_sha256: str
    reused: bool


def source_preprocessing(source: SourceConfig) -> Preprocessing:
    if source.preprocessing is not None:
        return preprocessing_by_name(source.preprocessing)
    return DEFAULT_PREPROCESSING[source.arch]


def build_source(config: Config, name: str) -> BuiltSource:
    """The headless model `sources.<name>` describes, with its weights."""
    source = config.source(name)
    if source.kind == "pretrained":
        raise ModelError(
            f"source '{name}' is made by pretraining, not built",
            fix=f"run 'medtransfer pretrain --dataset {source.dataset} --source-name {name}' (or 'medtransfer source --name {name}')",
        )
    model = Classifier(source.arch, num_classes=None)
    if source.kind == "random":
        keras_like_init_(model, torch.Generator().manual_seed(source.seed))
        origin = f"random(seed={source.seed})"
    elif source.kind == "timm" and source.file:
        path = _existing_file(config, source, name, key="file")
        _load_timm_file(model, source, path)
        origin = f"timm_file:{_file_sha256(path)}"
    elif source.kind == "timm":
        origin = _load_timm_weights(model, source)
    elif source.kind == "keras_h5":
        from medtransfer.models.keras_h5 import load_keras_resnet50_h5

        path = _existing_file(config, source, name)
        model.backbone.load_state_dict(load_keras_resnet50_h5(path), strict=True)
        origin = f"keras_h5:{_file_sha256(path)}"
    else:
        path = _existing_file(config, source, name)
        _load_safetensors_backbone(model, path)
        origin = f"safetensors:{_file_sha256(path)}"
    spec = ModelSpec(
        arch=source.arch,
        num_classes=None,
        preprocessing=source_preprocessing(source),
        extra={"role": ROLE_SOURCE, "source": name, "kind": source.kind, "origin": origin},
    )
    return BuiltSource(model.eval(), spec, origin)


def register_source(config: Config, name: str) -> RegisteredSource:
    """Register `sources.<name>` as `source.<name>` (alias `default`), or reuse the version with the same weights."""
    import mlflow

    from medtransfer.models.mlflow_models import log_packaged_model, register_logged_model
    from medtransfer.tracking import step_run, use_tracking_store

    if config.source(name).kind == "pretrained":
        from medtransfer.train.pretrain import pretrain_source

        return pretrain_source(config, name)
    use_tracking_store(config)
    built = build_source(config, name)
    digest = hashlib.sha256(state_dict_bytes(built.model)).hexdigest()
    model_name = source_model_name(name)
    client = mlflow.MlflowClient()
    existing = _version_with_weights(client, model_name, digest)
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
    with step_run(config, step="source", run_name=f"source {name}", tags={Tag.SOURCE: name, Tag.ROLE: ROLE_SOURCE}):
        mlflow.log_params({"source": name, "kind": source.kind, "arch": source.arch, "seed": source.seed,
                           "preprocessing": built.spec.preprocessing.name})
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
    import json

    from medtransfer.atomic_files import atomic_write_text

    pointer = config.resolve("results/sources") / f"{name}.json"
    record = {"source": name, "registered_model": registered.name, "version": registered.version,
              "weights_sha256": registered.weights_sha256}
    atomic_write_text(pointer, json.dumps(record, indent=2) + "\n")
    return pointer


def registered_versions(client, model_name: str) -> list:
    """Every version of `model_name`, oldest first (empty when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    except MlflowException:
        return []


def _version_with_weights(client, model_name: str, digest: str):
    matching = [v for v in registered_versions(client, model_name) if v.tags.get(Tag.WEIGHTS_SHA256) == digest]
    return matching[0] if matching else None


def ensure_default_alias(client, model_name: str, version: str) -> None:
    """Point alias `default` of `model_name` at `version` (a no-op when it already does)."""
    try:
        current = client.get_model_version_by_alias(model_name, ALIAS_DEFAULT).version
    except Exception:  # noqa: BLE001 - no alias yet
        current = None
    if str(current) != str(version):
        client.set_registered_model_alias(model_name, ALIAS_DEFAULT, str(version))


def _existing_file(config: Config, source: SourceConfig, name: str, key: str = "path") -> Path:
    path = config.resolve(getattr(source, key))
    if not path.is_file():
        raise ModelError(
            "weights file not found",
            where=str(path),
            fix=f"place the file there or fix sources.{name}.{key} in {config.source_file.name}",
        )
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def _load_timm_weights(model: Classifier, source: SourceConfig) -> str:
    """timm's pretrained weights through the Hugging Face hub (or its cache), with a deadline so that a missing
    network fails fast; offline (HF_HUB_OFFLINE=1) without a cached copy it says how to supply a local file."""
    import timm

    name = _timm_model_name(source)
    outcome: dict = {}

    def fetch() -> None:
        try:
            outcome["model"] = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
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
                                   num_classes=0, global_pool="")
        model.backbone.body.load_state_dict(loaded.state_dict(), strict=True)
    except Exception as error:  # noqa: BLE001 - timm raises anything from pickle errors to shape mismatches
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise ModelError(f"timm cannot load these weights into '{name}' ({detail})", where=str(path)) from None
