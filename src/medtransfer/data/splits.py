"""Fold assignments: the given split, seeded stratified k-fold, seeded grouped k-fold.

A split is an int8 array `(folds, N)`: row k says, for every image, whether fold k uses it for training (0),
validation (1, early stopping only) or test (2, reporting only). The algorithms are written here rather than
taken from scikit-learn so that a seed gives the same folds whatever library version is installed.
"""

from __future__ import annotations

import numpy as np

from medtransfer.config import SplitConfig
from medtransfer.data.dataset import SPLIT_CODES, SPLIT_NAMES, ImageDataset
from medtransfer.errors import DataError

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]


def make_split_assignment(dataset: ImageDataset, split: SplitConfig) -> np.ndarray:
    """The `(folds, N)` assignment that `split` asks for on `dataset`."""
    if split.scheme == "given":
        if dataset.given_split is None:
            raise DataError(
                "split scheme 'given' needs a dataset with its own train/val/test split",
                where=dataset.origin,
                fix="use scheme stratified_kfold or grouped_kfold",
            )
        return given_split_assignment(dataset.given_split)
    if split.scheme == "stratified_kfold":
        return stratified_kfold_assignment(dataset.labels, split.folds, split.val_fraction, split.seed)
    if dataset.groups is None:
        raise DataError(
            "split scheme 'grouped_kfold' needs groups (patient or exam ids), and this dataset has none",
            where=dataset.origin,
            fix="add a group column to the manifest, or use stratified_kfold",
        )
    return grouped_kfold_assignment(dataset.groups, split.folds, split.val_fraction, split.seed)


def given_split_assignment(given_split: np.ndarray) -> np.ndarray:
    """One fold: the dataset's own split. given_split: (N,) int8 codes → (1, N)."""
    return np.asarray(given_split, dtype=np.int8)[np.newaxis, :].copy()


def stratified_kfold_assignment(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> np.ndarray:
    """Stratified k-fold with a stratified validation hold-out inside each fold's training part.

    labels: (N,) int. Each class's images are shuffled and dealt to the folds in turn, continuing the deal
    across classes, so every test fold holds floor or ceil of (class count / folds) images of each class and
    fold sizes differ by at most one. Within the other folds, round(val_fraction × count) images of each class
    go to validation.
    """
    labels = np.asarray(labels)
    _check_enough_images(labels.shape[0], folds)
    rng = np.random.default_rng(seed)
    test_fold = np.empty(labels.shape[0], dtype=np.int64)
    dealt = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_fold[members] = (dealt + np.arange(members.size)) % folds
        dealt += members.size
    assignment = np.empty((folds, labels.shape[0]), dtype=np.int8)
    for fold in range(folds):
        row = np.where(test_fold == fold, TEST, TRAIN).astype(np.int8)
        fold_rng = np.random.default_rng([seed, fold])
        for cls in np.unique(labels):
            candidates = np.flatnonzero((labels == cls) & (row == TRAIN))
            take = int(round(val_fraction * candidates.size))
            row[fold_rng.permutation(candidates)[:take]] = VAL
        assignment[fold] = row
    return assignment


def grouped_kfold_assignment(groups: np.ndarray, folds: int, val_fraction: float, seed: int) -> np.ndarray:
    """Grouped k-fold: no group (patient, exam) ever crosses folds, nor train/val within a fold.

    groups: (N,) int. Groups are shuffled, then placed largest first on the fold with the fewest images, which
    balances fold sizes. Within the other folds, whole groups are moved to validation in shuffled order until
    at least val_fraction of those images are there (always leaving one group to train on).
    """
    groups = np.asarray(groups)
    unique, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if unique.size < folds:
        raise DataError(
            f"{unique.size} groups cannot make {folds} grouped folds",
            fix="lower split.folds or use stratified_kfold",
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(unique.size)
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group = np.empty(unique.size, dtype=np.int64)
    load = np.zeros(folds, dtype=np.int64)
    for group in order:
        target = int(np.argmin(load))
        fold_of_group[group] = target
        load[target] += sizes[group]
    test_fold = fold_of_group[inverse]
    assignment = np.empty((folds, groups.shape[0]), dtype=np.int8)
    for fold in range(folds):
        row = np.where(test_fold == fold, TEST, TRAIN).astype(np.int8)
        train_groups = np.flatnonzero(fold_of_group != fold)
        wanted = val_fraction * sizes[train_groups].sum()
        held = 0
        for group in np.random.default_rng([seed, fold]).permutation(train_groups)[: max(train_groups.size - 1, 0)]:
            if held >= wanted:
                break
            row[inverse == group] = VAL
            held += sizes[group]
        assignment[fold] = row
    return assignment


def fold_indices(assignment: np.ndarray, fold: int) -> dict[str, np.ndarray]:
    """Image indices of each part of `fold`: {'train': (n_train,), 'val': (n_val,), 'test': (n_test,)}."""
    if not 0 <= fold < assignment.shape[0]:
        raise DataError(f"fold {fold} does not exist; the split has folds 0..{assignment.shape[0] - 1}")
    row = assignment[fold]
    return {name: np.flatnonzero(row == code) for name, code in SPLIT_CODES.items()}


def split_counts(assignment: np.ndarray, labels: np.ndarray, num_classes: int) -> list[dict]:
    """Per fold: images per part and per class, for the manifest."""
    summary = []
    for fold in range(assignment.shape[0]):
        parts = fold_indices(assignment, fold)
        summary.append(
            {
                "fold": fold,
                "counts": {name: int(parts[name].size) for name in SPLIT_NAMES},
                "class_counts": {
                    name: np.bincount(labels[parts[name]], minlength=num_classes).astype(int).tolist()
                    for name in SPLIT_NAMES
                },
            }
        )
    return summary


def _check_enough_images(count: int, folds: int) -> None:
    if count < folds:
        raise DataError(f"{count} images cannot make {folds} folds", fix="lower split.folds")
