"""Safe model packages: safetensors weights + a JSON spec; loading rebuilds the real `nn.Module`.

A package is a folder:

    spec.json            architecture and its model arguments, class count and names, preprocessing, the
                         model's stage names in forward order, weights sha256
    weights.safetensors  the state dict (no code, no pickle)

Loading reads the spec, builds the architecture from our own factory, checks the weights' sha256 against the
spec and loads them strictly, so forward hooks fire on the real modules; the rebuilt model must name the stages
the spec lists (a timm release that renamed them would otherwise mislabel every layer). Nothing from the artifact
is executed. Specs written before `model_args` existed read as having none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtransfer import __version__
from medtransfer.layout import MODEL_SPEC_FILE as SPEC_FILE, MODEL_WEIGHTS_FILE as WEIGHTS_FILE
from medtransfer.errors import ModelError
from medtransfer.models.backbones import HEAD_DROPOUT, Classifier
from medtransfer.models.preprocessing import Preprocessing

PACKAGE_FORMAT = "medtransfer-model-v1"


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a packaged model."""

    arch: str
    num_classes: int | None
    preprocessing: Preprocessing
    classes: list[str] | None = None
    dropout: float = HEAD_DROPOUT
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: source, dataset, origin, ...
    model_args: dict[str, Any] = field(default_factory=dict)  # timm.create_model arguments (e.g. img_size)

    def to_dict(self, weights_sha256: str, stage_names: list[str]) -> dict[str, Any]:
        return {
            "format": PACKAGE_FORMAT,
            "arch": self.arch,
            "model_args": self.model_args,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "dropout": self.dropout,
            "preprocessing": self.preprocessing.to_dict(),
            "stage_names": list(stage_names),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": weights_sha256,
            "extra": self.extra,
            "medtransfer_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelSpec:
        if data.get("format") != PACKAGE_FORMAT:
            raise ModelError(f"not a {PACKAGE_FORMAT} spec (format {data.get('format')!r})", where=where)
        try:
            return cls(
                arch=str(data["arch"]),
                num_classes=None if data["num_classes"] is None else int(data["num_classes"]),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                classes=data.get("classes"),
                dropout=float(data.get("dropout", HEAD_DROPOUT)),
                extra=dict(data.get("extra") or {}),
                model_args=dict(data.get("model_args") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"malformed model spec ({error!r})", where=where) from None


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict serialised with safetensors (deterministic for the same weights)."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return save(tensors)


def write_package(model: Classifier, spec: ModelSpec, folder: Path) -> str:
    """Write spec.json and weights.safetensors into `folder`; returns the weights' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    (folder / WEIGHTS_FILE).write_bytes(payload)
    record = spec.to_dict(digest, stage_names=list(model.stage_modules()))
    (folder / SPEC_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return digest


def build_model(spec: ModelSpec) -> Classifier:
    return Classifier(spec.arch, spec.num_classes, dropout=spec.dropout, model_args=spec.model_args)


def read_package(folder: Path) -> tuple[Classifier, ModelSpec, str]:
    """Rebuild (model in eval mode, spec, weights sha256) from a package folder; refuses any mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise ModelError(f"model package lacks {path.name}", where=str(folder), fix="re-register the model")
    try:
        raw_spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelError(f"spec.json is not valid JSON ({error})", where=str(spec_path)) from None
    spec = ModelSpec.from_dict(raw_spec, str(spec_path))
    payload = weights_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != raw_spec.get("weights_sha256"):
        raise ModelError(
            f"weights sha256 {digest} does not match the spec's {raw_spec.get('weights_sha256')}",
            where=str(weights_path),
            fix="the artifact was altered or is incomplete; re-register the model",
        )
    try:
        state = load(payload)
    except (SafetensorError, ValueError) as error:
        raise ModelError(f"unreadable safetensors file ({error})", where=str(weights_path)) from None
    model = _rebuild(spec, raw_spec, spec_path)
    missing, unexpected = _compare_keys(model.state_dict(), state)
    if missing or unexpected:
        details = [f"missing {key}" for key in missing[:3]] + [f"unexpected {key}" for key in unexpected[:3]]
        raise ModelError(
            f"weights do not fit architecture '{spec.arch}': {'; '.join(details)}", where=str(weights_path)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ModelError(f"weights do not fit architecture '{spec.arch}': {first}", where=str(weights_path)) from None
    return model.eval(), spec, digest


def _rebuild(spec: ModelSpec, raw_spec: dict[str, Any], spec_path: Path) -> Classifier:
    """The spec's architecture, refused when it cannot be built here or names other stages than the spec lists."""
    try:
        model = build_model(spec)
    except ModelError as error:
        raise ModelError(error.what, where=f"{spec_path}: {error.where}" if error.where else str(spec_path),
                         fix=error.fix) from None
    expected, built = raw_spec.get("stage_names"), list(model.stage_modules())
    if expected is not None and list(expected) != built:
        raise ModelError(f"the package names the stages {', '.join(map(str, expected))}, the rebuilt "
                         f"'{spec.arch}' names {', '.join(built)}", where=str(spec_path),
                         fix="register the model again with the installed timm (its stages changed)")
    return model


def _compare_keys(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
