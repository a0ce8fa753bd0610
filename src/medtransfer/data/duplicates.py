"""Identical images (the same decoded pixels) and whether they fall on both sides of a split.

A copy of a test image in the training (or validation) data lets a model be scored on an image it has seen, which
inflates the test AUC without a trace in the numbers. Images are compared by a sha256 of their decoded, resized
uint8 pixels, so re-encoded or renamed copies are caught whatever the format they came in; near-duplicates are not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtransfer.data.dataset import SPLIT_CODES, SPLIT_NAMES
from medtransfer.errors import DataError

TEST = SPLIT_CODES["test"]


@dataclass(frozen=True)
class DuplicateReport:
    """What `find_duplicates` found.

    groups:   sets of ≥ 2 pixel-identical images, each an ascending (k,) int64 array of image indices
    crossing: indices into `groups` of the sets with members on both sides (train or val vs test) of some fold
    example:  (fold, index on the train/val side, index on the test side) of the first crossing set, or None
    """

    groups: tuple[np.ndarray, ...]
    crossing: tuple[int, ...]
    example: tuple[int, int, int] | None

    @property
    def images(self) -> int:
        """How many images have at least one identical twin."""
        return int(sum(group.size for group in self.groups))


def image_digests(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 → (N,) 'S32' sha256 digests of each image's pixels (shape is the same for all)."""
    digests = np.empty(images.shape[0], dtype="S32")
    for index in range(images.shape[0]):
        digests[index] = hashlib.sha256(np.ascontiguousarray(images[index]).data).digest()
    return digests


def duplicate_groups(digests: np.ndarray) -> tuple[np.ndarray, ...]:
    """(N,) digests → the sets of ≥ 2 indices with equal digests, each ascending, ordered by their first index."""
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # indices grouped by digest, ascending within each
    bounds = np.cumsum(counts)[:-1]
    groups = [members for members in np.split(order, bounds) if members.size > 1]
    return tuple(sorted((members.astype(np.int64) for members in groups), key=lambda members: int(members[0])))


def crossing_groups(groups: Sequence[np.ndarray], splits: np.ndarray) -> tuple[tuple[int, ...], tuple | None]:
    """Which `groups` straddle a split: in some fold of `splits` ((folds, N) int8 SPLIT_CODES) one member is test and
    another train or val. Returns (their positions in `groups`, (fold, train/val index, test index) of the first)."""
    crossing, example = [], None
    for position, members in enumerate(groups):
        parts = splits[:, members]  # (folds, k)
        tested = parts == TEST
        straddles = tested.any(axis=1) & ~tested.all(axis=1)  # (folds,)
        if not straddles.any():
            continue
        crossing.append(position)
        if example is None:
            fold = int(np.flatnonzero(straddles)[0])
            example = (fold, int(members[~tested[fold]][0]), int(members[tested[fold]][0]))
    return tuple(crossing), example


def find_duplicates(images: np.ndarray, splits: np.ndarray) -> DuplicateReport:
    """Pixel-identical images of `images` ((N, H, W, C) uint8) and those that cross `splits` ((folds, N) int8)."""
    groups = duplicate_groups(image_digests(images))
    crossing, example = crossing_groups(groups, splits)
    return DuplicateReport(groups, crossing, example)


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None else f"image #{index}"


def check_duplicates(
    report: DuplicateReport, splits: np.ndarray, names: Sequence[str] | None, *, allowed: bool, where: str, dataset: str
) -> None:
    """Refuse (DataError) identical images on both sides of a split, unless `allowed` (`--allow-duplicates`)."""
    if not report.crossing or allowed:
        return
    fold, seen, tested = report.example  # type: ignore[misc]
    part = SPLIT_NAMES[int(splits[fold, seen])]
    raise DataError(
        f"{len(report.crossing)} set(s) of identical images fall on both sides of a split, e.g. "
        f"{_name(names, seen)} ({part}) = {_name(names, tested)} (test) in fold {fold}",
        where=where,
        fix="remove the copies from the source, or, if they are meant to be there, rerun "
        f"'medtransfer prepare --dataset {dataset} --allow-duplicates' (the manifest records it)",
    )


def duplicates_record(report: DuplicateReport, splits: np.ndarray, labels: np.ndarray, names: Sequence[str] | None,
                      *, allowed: bool) -> dict[str, Any]:
    """The manifest's `duplicates` entry: counts (also of sets whose copies carry different labels, (N,) `labels`),
    whether the escape was used, and an example of each kind."""
    record: dict[str, Any] = {
        "method": "sha256 of the decoded, resized uint8 pixels",
        "sets": len(report.groups),
        "images": report.images,
        "sets_across_split": len(report.crossing),
        "sets_with_two_labels": sum(int(np.unique(labels[group]).size > 1) for group in report.groups),
        "allowed": bool(allowed),
    }
    if report.groups:
        record["example"] = [_name(names, int(index)) for index in report.groups[0][:2]]
    if report.example is not None:
        fold, seen, tested = report.example
        record["example_across_split"] = {
            "fold": fold,
            SPLIT_NAMES[int(splits[fold, seen])]: _name(names, seen),
            "test": _name(names, tested),
        }
    return record
