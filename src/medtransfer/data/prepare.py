"""`prepare`: read a dataset, check its version, split it, and write `data/prepared/<name>/` atomically.

The prepared folder is what DVC versions and what every later step reads:

    images.npy     (N, H, W, C) uint8, memory-mappable
    labels.npy     (N,) int64
    groups.npy     (N,) int64, only when the dataset has groups
    splits.npy     (folds, N) int8: 0 train, 1 val, 2 test for each fold
    manifest.json  classes, counts per split, image shape, source path and hash, content fingerprint, the arrays'
                   sha256s (checked by `load_prepared`), identical images found, files the reader passed over

Everything in it is a deterministic function of the source and the params (no timestamps), so DVC sees an
unchanged output when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer import __version__
from medtransfer.atomic_files import atomic_directory, restore_interrupted
from medtransfer.config import Config
from medtransfer.data.dataset import SPLIT_CODES, ImageDataset, content_fingerprint
from medtransfer.data.duplicates import check_duplicates, duplicates_record, find_duplicates
from medtransfer.data.integrity import array_records, stamp_path, verify_arrays, write_stamp
from medtransfer.data.readers import read_dataset
from medtransfer.data.splits import check_split_assignment, fold_indices, make_split_assignment, split_counts
from medtransfer.errors import DataError, warn
from medtransfer.hashing import file_sha256
from medtransfer.layout import LOCK_FOLDER, STEP_PREPARE, Tag

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "medtransfer-prepared-v1"


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset read back from disk; `images` is memory-mapped."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None
    splits: np.ndarray

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_folds(self) -> int:
        return int(self.splits.shape[0])

    def fold(self, fold: int) -> dict[str, np.ndarray]:
        """Image indices of fold `fold`: {'train', 'val', 'test'} → (n,) int arrays."""
        return fold_indices(self.splits, fold)


def prepare_dataset(config: Config, name: str, *, allow_duplicates: bool = False) -> dict[str, Any]:
    """Prepare dataset `name` of `config` into `<prepared_data>/<name>/`; returns the manifest written.

    Identical images on both sides of a split (train or val vs test, in any fold) are refused unless
    `allow_duplicates`; either way the manifest counts them.
    """
    dataset_config = config.dataset(name)
    source = config.resolve(dataset_config.path)
    dataset = read_dataset(dataset_config, source)
    fingerprint = content_fingerprint(dataset)
    if dataset_config.fingerprint is not None and dataset_config.fingerprint.lower() != fingerprint:
        raise DataError(
            f"data version mismatch: params pin fingerprint {dataset_config.fingerprint.lower()} "
            f"but {source} has {fingerprint}",
            where=f"{config.source_file}: datasets.{name}.fingerprint",
            fix="restore the pinned version (git checkout + dvc checkout/pull) or update the pin on purpose",
        )
    splits = make_split_assignment(dataset, dataset_config.split)
    check_split_assignment(splits, dataset.labels, where=f"datasets.{name}")
    duplicates = find_duplicates(dataset.images, splits)
    check_duplicates(duplicates, splits, dataset.names, allowed=allow_duplicates, where=str(source), dataset=name)
    if duplicates.crossing:
        warn(f"{source}: {len(duplicates.crossing)} set(s) of identical images fall on both sides of a split; "
             "kept because of --allow-duplicates (recorded in manifest.json)")
    manifest = build_manifest(config, name, dataset, splits, fingerprint, source)
    manifest["duplicates"] = duplicates_record(duplicates, splits, dataset.labels, dataset.names,
                                               allowed=allow_duplicates)
    manifest["skipped"] = {reason: {"count": count, "example": example} for reason, count, example in dataset.skipped}
    folder = config.prepared_data_dir / name
    write_prepared(folder, dataset, splits, manifest)
    write_stamp(stamp_path(config.root, LOCK_FOLDER, name), folder, manifest["arrays"])
    return manifest


def build_manifest(
    config: Config, name: str, dataset: ImageDataset, splits: np.ndarray, fingerprint: str, source: Path
) -> dict[str, Any]:
    dataset_config = config.dataset(name)
    split = dataset_config.split
    split_record: dict[str, Any] = {"scheme": split.scheme, "folds": int(splits.shape[0])}
    if split.scheme != "given":
        split_record.update(val_fraction=split.val_fraction, seed=split.seed)
    split_record["sha256"] = hashlib.sha256(np.ascontiguousarray(splits).data).hexdigest()
    return {
        "schema": MANIFEST_SCHEMA,
        "dataset": name,
        "format": dataset_config.format,
        "source": {"path": dataset_config.path, "sha256": file_sha256(source) if source.is_file() else None},
        "fingerprint": fingerprint,
        "classes": list(dataset.classes),
        "num_classes": len(dataset.classes),
        "num_images": dataset.num_images,
        "image_shape": list(dataset.image_shape),
        "class_counts": np.bincount(dataset.labels, minlength=len(dataset.classes)).astype(int).tolist(),
        "has_groups": dataset.groups is not None,
        "split": split_record,
        "split_codes": dict(SPLIT_CODES),
        "folds": split_counts(splits, dataset.labels, len(dataset.classes)),
        "medtransfer_version": __version__,
    }


def write_prepared(folder: Path, dataset: ImageDataset, splits: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write the prepared folder; it appears complete or not at all. Adds the arrays' sha256s to `manifest`."""
    with atomic_directory(folder) as staging:
        np.save(staging / "images.npy", np.ascontiguousarray(dataset.images), allow_pickle=False)
        np.save(staging / "labels.npy", dataset.labels.astype(np.int64), allow_pickle=False)
        if dataset.groups is not None:
            np.save(staging / "groups.npy", dataset.groups.astype(np.int64), allow_pickle=False)
        np.save(staging / "splits.npy", splits.astype(np.int8), allow_pickle=False)
        manifest["arrays"] = array_records(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_prepared(config: Config, name: str) -> PreparedDataset:
    """Open `<prepared_data>/<name>/` (images memory-mapped)."""
    config.dataset(name)
    folder = config.prepared_data_dir / name
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        restore_interrupted(folder)  # a prepare killed while replacing the folder left the previous one aside
    if not manifest_path.is_file():
        raise DataError(
            f"prepared data for '{name}' not found",
            where=str(folder),
            fix=f"run 'medtransfer prepare --dataset {name}' (or 'dvc repro', or 'dvc pull' to fetch it)",
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("schema") != MANIFEST_SCHEMA:
            raise ValueError("unknown schema")
    except (OSError, ValueError) as error:
        raise _damaged(folder, name, error) from None
    # The arrays, not only the manifest: a replaced images.npy would otherwise pass under the manifest's fingerprint.
    verify_arrays(folder, manifest.get("arrays"), stamp_path(config.root, LOCK_FOLDER, name), name)
    try:
        images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        groups_path = folder / "groups.npy"
        groups = np.load(groups_path, allow_pickle=False) if groups_path.is_file() else None
        splits = np.load(folder / "splits.npy", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _damaged(folder, name, error) from None
    return PreparedDataset(name, folder, manifest, images, labels, groups, splits)


def _damaged(folder: Path, name: str, error: Exception) -> DataError:
    return DataError(f"prepared data is damaged ({error})", where=str(folder),
                     fix=f"run 'medtransfer prepare --dataset {name}' again")


def log_prepare_run(config: Config, manifest: dict, folder: Path) -> bool:
    """Under `mlflow run` or the whole pipeline, record the prepared dataset in a `prepare` step run (parameters, the
    manifest, the dataset as an input); a plain `medtransfer prepare` logs nothing. Returns whether it logged."""
    from medtransfer.tracking import launched_by_mlflow_run, pipeline_run_id

    if not (launched_by_mlflow_run() or pipeline_run_id()):
        return False
    import mlflow

    from medtransfer.tracking import log_prepared_dataset, step_run

    with step_run(config, step=STEP_PREPARE, run_name=f"prepare {manifest['dataset']}",
                  tags={Tag.DATASET: manifest["dataset"]}):
        mlflow.log_params(
            {
                "dataset": manifest["dataset"],
                "split_scheme": manifest["split"]["scheme"],
                "folds": manifest["split"]["folds"],
                "num_images": manifest["num_images"],
            }
        )
        mlflow.log_artifact(str(folder / "manifest.json"))
        log_prepared_dataset(manifest, folder, context="prepare")
    return True


def describe_prepared(manifest: dict, folder: Path) -> str:
    """What `medtransfer prepare` prints: the images, classes, each fold's train/val/test counts, the fingerprint."""
    counts = ", ".join(
        f"fold {fold['fold']}: " + "/".join(f"{fold['counts'][part]}" for part in ("train", "val", "test"))
        for fold in manifest["folds"]
    )
    duplicates = manifest.get("duplicates") or {}
    noted = ""
    if duplicates.get("sets"):
        noted = (f"\n  identical images: {duplicates['sets']} set(s) of {duplicates['images']} images, "
                 f"{duplicates['sets_across_split']} across a split" + (" (allowed)" if duplicates["allowed"] else "")
                 + (f", {duplicates['sets_with_two_labels']} with two labels" if duplicates.get("sets_with_two_labels")
                    else ""))
    return (
        f"prepared {manifest['dataset']}: {manifest['num_images']} images {tuple(manifest['image_shape'])}, "
        f"{manifest['num_classes']} classes, train/val/test {counts}\n"
        f"  fingerprint {manifest['fingerprint']}{noted}\n  -> {folder}"
    )
