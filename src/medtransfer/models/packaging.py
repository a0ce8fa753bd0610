"""Safe model packages: safetensors weights + a JSON spec; loading rebuilds the real `nn.Module`.

A package is a folder:

    spec.json            architecture, class count and names, preprocessing, stage names, weights sha256
    weights.safetensors  the state dict (no code, no pickle)

Loading reads the spec, builds the architecture from our own factory, checks the weights' sha256 against the
spec and loads them strictly, so forward hooks fire on the real modules. Nothing from the artifact is executed.
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
from medtransfer.models.backbones import HEAD_DROPOUT, STAGE_NAMES, Classifier
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

    def to_dict(self, weights_sha256: str) -> dict[str, Any]:
        return {
            "format": PACKAGE_FORMAT,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "dropout": self.dropout,
            "preprocessing": self.preprocessing.to_dict(),
            "stage_names": list(STAGE_NAMES),
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
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(digest), indent=2) + "\n", encoding="utf-8")
    return digest


def build_model(spec: ModelSpec) -> Classifier:
    return Classifier(spec.arch, spec.num_classes, dropout=spec.dropout)


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
    model = build_model(spec)
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


def _compare_keys(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
