"""The one in-memory form every reader produces and every later step consumes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from medtransfer.errors import DataError

# Codes of the split assignment arrays (`(folds, N)` int8): which part of a fold each image belongs to.
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = tuple(SPLIT_CODES)


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set, validated on construction.

    images:      (N, H, W, C) uint8, C = 1 (grey) or 3 (RGB)
    labels:      (N,) int64 class indices in [0, len(classes))
    classes:     class names, index = label
    groups:      (N,) int64 group codes (patient, exam) or None
    given_split: (N,) int8 with SPLIT_CODES values when the source fixes train/val/test, else None
    predefined_fold: (N,) int64 test-fold index 0..K-1 when the source publishes its folds, else None
    origin:      where the data came from, for messages
    names:       (N,) a name for each image in messages (file path, `train_images[3]`), or None
    skipped:     what the reader passed over, as (reason, count, example) per reason; recorded in the manifest
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: np.ndarray | None = None
    given_split: np.ndarray | None = None
    predefined_fold: np.ndarray | None = None
    origin: str = ""
    names: tuple[str, ...] | None = None
    skipped: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        where = self.origin or None
        images, labels = self.images, self.labels
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"images must have shape (N, H, W, 1 or 3), got {images.shape}",
                where=where,
                fix="store grey images as (N, H, W) or (N, H, W, 1) and colour as (N, H, W, 3)",
            )
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {images.dtype}", where=where, fix="store 8-bit images")
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"{labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images",
                where=where,
                fix="give exactly one label per image",
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got {labels.dtype}", where=where)
        if images.shape[0] == 0:
            raise DataError("the dataset holds no images", where=where)
        bad = (labels < 0) | (labels >= len(self.classes))
        if bad.any():
            values = sorted(set(labels[bad].tolist()))[:5]
            raise DataError(
                f"{int(bad.sum())} labels outside the declared range 0..{len(self.classes) - 1} (e.g. {values})",
                where=where,
                fix=f"declare every class under 'classes' (now {list(self.classes)}) or fix the labels",
            )
        for name, extra in (
            ("groups", self.groups),
            ("given_split", self.given_split),
            ("predefined_fold", self.predefined_fold),
        ):
            if extra is not None and extra.shape != labels.shape:
                raise DataError(f"{name} has shape {extra.shape}, expected {labels.shape}", where=where)
        if self.names is not None and len(self.names) != labels.shape[0]:
            raise DataError(f"{len(self.names)} image names for {labels.shape[0]} images", where=where)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(side) for side in self.images.shape[1:])  # type: ignore[return-value]


def content_fingerprint(dataset: ImageDataset) -> str:
    """sha256 (hex) of everything a dataset holds: pixels, labels, class names, groups and the given split.

    It names a data version independently of file format and compression, and of how it is later split into folds.
    """
    digest = hashlib.sha256()
    header = {
        "format": "medtransfer-dataset-v1",
        "image_shape": list(dataset.images.shape),
        "classes": list(dataset.classes),
        "has_groups": dataset.groups is not None,
        "has_given_split": dataset.given_split is not None,
        "has_predefined_fold": dataset.predefined_fold is not None,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(dataset.images).data)
    digest.update(np.ascontiguousarray(dataset.labels, dtype="<i8").data)
    if dataset.groups is not None:
        digest.update(np.ascontiguousarray(dataset.groups, dtype="<i8").data)
    if dataset.given_split is not None:
        digest.update(np.ascontiguousarray(dataset.given_split, dtype="i1").data)
    if dataset.predefined_fold is not None:
        digest.update(np.ascontiguousarray(dataset.predefined_fold, dtype="<i8").data)
    return digest.hexdigest()


def images_as_uint8(images: np.ndarray, key: str, where: str) -> np.ndarray:
    """Images of any numeric dtype as uint8, refusing what cannot be converted without guessing.

    uint8 passes unchanged. Integers must lie in 0..255. Floats must be finite; values within [0, 1] are taken as
    fractions of full scale (×255), values within [0, 255] as 8-bit levels; both are rounded.
    """
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{key} has dtype {images.dtype}; expected numeric images", where=where, fix="store 8-bit images")
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            raise DataError(
                f"{key} holds {int((~finite).sum())} NaN or infinite pixel values",
                where=where,
                fix="clean or re-export the images",
            )
    low, high = float(images.min(initial=0)), float(images.max(initial=0))
    if low < 0 or high > 255:
        raise DataError(
            f"{key} has pixel values in [{low:g}, {high:g}], outside 0..255",
            where=where,
            fix="rescale the images to 8 bits",
        )
    scale = 255.0 if np.issubdtype(images.dtype, np.floating) and high <= 1.0 else 1.0
    return np.round(images.astype(np.float64) * scale).astype(np.uint8)
