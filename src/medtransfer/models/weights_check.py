"""Is a registered version's weights file still the one the registry recorded? Checked before a report publishes it.

`extract` rebuilds every model and so catches weights changed or deleted in the artifact store, but only after
loading them all; `report` and `summary` publish versions and hashes without loading anything. This check hashes
the `weights.safetensors` of each version where it lies (a local artifact store: read in place, tens of MB a
model) or from a download (a tracking server's store), and compares it with the registry's `weights_sha256` tag.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from medtransfer.errors import ModelError
from medtransfer.hashing import file_sha256
from medtransfer.layout import MODEL_WEIGHTS_FILE as WEIGHTS_FILE, Tag


def verify_registered_weights(client, name: str, version: str) -> None:
    """Raise `ModelError` (one line) unless version `version` of registered model `name` still holds the weights
    its `weights_sha256` tag records. Versions registered without the tag are not checked."""
    record = client.get_model_version(name, version)
    expected = record.tags.get(Tag.WEIGHTS_SHA256)
    if not expected:
        return
    where = f"models:/{name}/{version}"
    location = _artifact_location(client, record)
    if not location:
        return  # nothing says where the files are (a registry without sources): nothing to compare
    folder = _local_folder(location)
    if folder is not None:
        _compare(_weights_file(folder, where, location), expected, where)
        return
    import mlflow

    with tempfile.TemporaryDirectory(prefix="medtransfer-weights-") as target:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=target))
        except Exception:  # noqa: BLE001 -- any failure to fetch is the same finding: the artifacts are not there
            raise _missing(where, location) from None
        _compare(_weights_file(local, where, location), expected, where)


def verify_published(client, pointers, where_of) -> None:
    """Everything a report or summary publishes about the models of `pointers` (ModelPointer list), checked: the
    registry agrees with each pointer (`verify_pointer`), and every fold version and source version still holds its
    recorded weights. `where_of(pointer)` names the pointer file for messages."""
    from medtransfer.pointers import verify_pointer

    for pointer in pointers:
        verify_pointer(client, pointer, where_of(pointer))
        for fit in pointer.folds:
            verify_registered_weights(client, pointer.registered_model, str(fit.version))
        verify_registered_weights(client, pointer.source_model, str(pointer.source_version))


def _artifact_location(client, record) -> str:
    """Where the version's files live: its logged model's artifact location (MLflow 3), else its source URI."""
    source = getattr(record, "source", None) or ""
    if source.startswith("models:/m-"):
        try:
            return client.get_logged_model(source.rsplit("/", 1)[-1]).artifact_location
        except Exception:  # noqa: BLE001 -- an older store without logged models: fall back to the source
            return source
    return source


def _local_folder(location: str) -> Path | None:
    parts = urlsplit(location)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "" and location:
        return Path(location)
    return None


def _weights_file(folder: Path, where: str, location: str) -> Path:
    found = sorted(folder.rglob(WEIGHTS_FILE)) if folder.is_dir() else []
    if not found:
        raise _missing(where, location)
    return found[0]


def _missing(where: str, location: str) -> ModelError:
    return ModelError(f"the registered model's weights are missing: no {WEIGHTS_FILE} at {location}", where=where,
                      fix="restore the artifact store, or rerun the step that registered the model ('dvc repro')")


def _compare(path: Path, expected: str, where: str) -> None:
    digest = file_sha256(path)
    if digest != expected:
        raise ModelError(f"the registered weights changed after registration: {path} holds {digest[:16]}…, the "
                         f"registry recorded {expected[:16]}…", where=where,
                         fix="restore the artifact store, or rerun the step that registered the model ('dvc repro')")
