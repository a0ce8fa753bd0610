"""Packaged models in MLflow: log (pyfunc flavour through our loader module), register, and load back by URI.

Loading for analysis and fine-tuning does not go through pyfunc: it downloads the artifact, reads the package
(spec + safetensors) and rebuilds the real module, so hooks fire; the registry's `weights_sha256` tag must match
the package.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.layout import MODEL_PACKAGE_FOLDER as PACKAGE_FOLDER
from medtransfer.errors import ModelError
from medtransfer.models.backbones import Classifier
from medtransfer.models.packaging import ModelSpec, read_package, write_package
from medtransfer.registry import Tag, resolve_model_version

_log = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"
LOADER_MODULE = "medtransfer.models.pyfunc"
# Given explicitly: MLflow's inference of requirements imports and inspects the environment (~10 s per model).
# The loader module itself lives in medtransfer, which must be installed where the model is served.
MODEL_PIP_REQUIREMENTS = [
    "torch>=2.14,<2.15",
    "timm>=1.0,<2",
    "safetensors>=0.4,<1",
    "numpy>=1.26,<3",
]


@dataclass(frozen=True)
class LoadedModel:
    model: Classifier
    spec: ModelSpec
    weights_sha256: str
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def log_packaged_model(model: Classifier, spec: ModelSpec) -> tuple[str, str]:
    """Log `model` as an MLflow model in the active run; returns (model URI, weights sha256)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = spec.num_classes if spec.num_classes is not None else model.backbone.num_features
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), name="images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs))]),
    )
    with tempfile.TemporaryDirectory(prefix="medtransfer-package-") as staging, warnings.catch_warnings():
        # The signature is exact; an input example would only make MLflow run the model once more.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        folder = Path(staging) / PACKAGE_FOLDER
        digest = write_package(model, spec, folder)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME,
            loader_module=LOADER_MODULE,
            data_path=str(folder),
            pip_requirements=MODEL_PIP_REQUIREMENTS,
            signature=signature,
            metadata={Tag.WEIGHTS_SHA256: digest, Tag.ARCH: spec.arch},
        )
    return info.model_uri, digest


def register_logged_model(model_uri: str, name: str, tags: dict[str, str], *, model_description: str = "",
                          version_description: str = ""):
    """Register `model_uri` as a new version of `name` with `tags` and the descriptions the registry UI shows
    (Markdown); returns the ModelVersion."""
    import mlflow

    client = mlflow.MlflowClient()
    # MLflow prints "Registered model ... already exists. Creating a new version ..." and "Created version ..." to
    # stderr on every registration: kept at debug level, so a normal run's stderr holds only what needs a reader.
    chatter = io.StringIO()
    with contextlib.redirect_stderr(chatter):
        version = mlflow.register_model(model_uri, name, tags=tags)
    for line in chatter.getvalue().splitlines():
        _log.debug("mlflow: %s", line)
    if model_description:
        client.update_registered_model(name, description=model_description)
    if version_description:
        client.update_model_version(name, version.version, description=version_description)
    return client.get_model_version(name, version.version)


def load_registered_model(uri: str) -> LoadedModel:
    """Rebuild the real module behind `models:/name@alias` or `models:/name/version`, checked end to end."""
    import mlflow

    client = mlflow.MlflowClient()
    version = resolve_model_version(client, uri)
    with tempfile.TemporaryDirectory(prefix="medtransfer-model-") as target:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=target))
        folder = _package_folder(local, uri, version.source)
        try:
            model, spec, digest = read_package(folder)
        except ModelError as error:
            # the package was read from a temporary download that is gone by now: name the registered model and
            # the file inside its artifacts instead
            inside = _inside(error.where, folder)
            raise ModelError(error.what, where=f"{uri} ({version.source}{'/' + inside if inside else ''})",
                             fix=error.fix or "re-register the model") from None
    expected = version.tags.get(Tag.WEIGHTS_SHA256)
    if expected is not None and expected != digest:
        raise ModelError(
            f"registry tag weights_sha256={expected} but the artifact holds {digest}",
            where=uri,
            fix="the artifact was replaced after registration; re-register the model",
        )
    return LoadedModel(model, spec, digest, version.name, str(version.version), version.run_id, dict(version.tags))


def _inside(where: str | None, folder: Path) -> str:
    try:
        return str(Path(where).relative_to(folder)) if where else ""
    except ValueError:
        return ""


def _package_folder(local: Path, uri: str, source: str) -> Path:
    if not local.exists() or not any(path.is_file() for path in local.rglob("*")):
        raise ModelError(
            f"the registered model's artifacts are missing: nothing was found at {source}",
            where=uri,
            fix="restore the artifact store (the folder the tracking server stores artifacts in) "
                "or rerun the step that registered the model",
        )
    for candidate in (local / "data" / PACKAGE_FOLDER, local / PACKAGE_FOLDER):
        if candidate.is_dir():
            return candidate
    found = sorted(str(p.relative_to(local)) for p in local.rglob("spec.json"))
    if len(found) == 1:
        return local / Path(found[0]).parent
    raise ModelError(
        "the model artifact holds no medtransfer package (spec.json + weights.safetensors)",
        where=uri,
        fix="only models registered by medtransfer can be loaded this way",
    )


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "name": loaded.name,
        "version": loaded.version,
        "arch": loaded.spec.arch,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": loaded.spec.preprocessing.name,
    }
