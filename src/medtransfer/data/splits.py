"""Fold assignments: the given split, seeded stratified k-fold, seeded grouped k-fold.

A split is an int8 array `(folds, N)`: row k says, for every image, whether fold k uses it for training (0),
validation (1, early stopping only) or test (2, reporting only). The algorithms are written here rather than
taken from scikit-learn so that a seed gives the same folds whatever library version is installed.

Validation comes from the training part (`val_from: train`, the default: val_fraction of the other folds) or from
the held-out fold (`val_from: test`: val_fraction of the test fold, so training keeps all (K-1)/K of the data),
as the authors' later split script does (DovileDo/revisiting-transfer, src/make_dataframe.py: GroupKFold(4),
i.e. a quarter, of the held-out fold's groups, or StratifiedKFold(5), a fifth, of its images, go to validation).
"""

from __future__ import annotations

import numpy as np

from medtransfer.config import SplitConfig
from medtransfer.data.dataset import SPLIT_CODES, SPLIT_NAMES, ImageDataset
from medtransfer.errors import DataError, warn

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]
#: Where validation is carved from: the training part (default) or the held-out (test) fold.
VAL_FROM = {"train": TRAIN, "test": TEST}


def _val_source(val_from: str) -> int:
    if val_from not in VAL_FROM:
        raise DataError(f"unknown split.val_from '{val_from}'", fix=f"use one of: {', '.join(VAL_FROM)}")
    return VAL_FROM[val_from]


def make_split_assignment(dataset: ImageDataset, split: SplitConfig) -> np.ndarray:
    """The `(folds, N)` assignment that `split` asks for on `dataset`."""
    val_from = getattr(split, "val_from", "train")  # a SplitConfig without the field holds out from training
    if split.scheme == "given":
        if dataset.given_split is None:
            raise DataError(
                "split scheme 'given' needs a dataset with its own train/val/test split",
                where=dataset.origin,
                fix="use scheme stratified_kfold or grouped_kfold",
            )
        return given_split_assignment(dataset.given_split)
    if split.scheme == "stratified_kfold":
        return stratified_kfold_assignment(dataset.labels, split.folds, split.val_fraction, split.seed, val_from)
    if split.scheme == "predefined_folds":
        if dataset.predefined_fold is None:
            raise DataError(
                "split scheme 'predefined_folds' needs a 'fold' column in the CSV manifest",
                where=dataset.origin,
                fix="add a fold column, or use stratified_kfold / grouped_kfold",
            )
        available = int(dataset.predefined_fold.max()) + 1
        if available != split.folds:
            raise DataError(
                f"the fold column has {available} folds, but split.folds asks for {split.folds}",
                where=dataset.origin,
                fix=f"set split.folds: {available}, or fix the fold column",
            )
        return predefined_folds_assignment(
            dataset.predefined_fold, dataset.labels, dataset.groups, split.val_fraction, split.seed, val_from
        )
    if dataset.groups is None:
        raise DataError(
            "split scheme 'grouped_kfold' needs groups (patient or exam ids), and this dataset has none",
            where=dataset.origin,
            fix="add a group column to the manifest, or use stratified_kfold",
        )
    return grouped_kfold_assignment(dataset.groups, split.folds, split.val_fraction, split.seed, val_from)


def given_split_assignment(given_split: np.ndarray) -> np.ndarray:
    """One fold: the dataset's own split. given_split: (N,) int8 codes → (1, N)."""
    return np.asarray(given_split, dtype=np.int8)[np.newaxis, :].copy()


def stratified_kfold_assignment(labels: np.ndarray, folds: int, val_fraction: float, seed: int,
                                val_from: str = "train") -> np.ndarray:
    """Stratified k-fold with a stratified validation hold-out inside each fold's training part.

    labels: (N,) int. Each class's images are shuffled and dealt to the folds in turn, continuing the deal
    across classes, so every test fold holds floor or ceil of (class count / folds) images of each class and
    fold sizes differ by at most one. Within the other folds (or, with val_from "test", within the test fold),
    round(val_fraction × count) images of each class go to validation.
    """
    source = _val_source(val_from)
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
        _hold_out_stratified(row, labels, val_fraction, np.random.default_rng([seed, fold]), source)
        assignment[fold] = row
    return assignment


def grouped_kfold_assignment(groups: np.ndarray, folds: int, val_fraction: float, seed: int,
                             val_from: str = "train") -> np.ndarray:
    """Grouped k-fold: no group (patient, exam) ever crosses folds, nor train/val within a fold.

    groups: (N,) int. Groups are shuffled, then placed largest first on the fold with the fewest images, which
    balances fold sizes. Within the other folds (or, with val_from "test", within the test fold), whole groups
    are moved to validation in shuffled order until at least val_fraction of those images are there (always
    leaving one group where it was).
    """
    source = _val_source(val_from)
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
        _hold_out_groups(row, groups, val_fraction, np.random.default_rng([seed, fold]), source)
        assignment[fold] = row
    return assignment


def predefined_folds_assignment(
    test_fold: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int,
    val_from: str = "train",
) -> np.ndarray:
    """The data's own folds (a published split): test_fold (N,) int 0..K-1. Validation is held out of the
    other folds (or, with val_from "test", of the test fold) by whole groups when there are groups, else
    stratified by class."""
    source = _val_source(val_from)
    folds = int(test_fold.max()) + 1
    assignment = np.empty((folds, test_fold.shape[0]), dtype=np.int8)
    for fold in range(folds):
        row = np.where(test_fold == fold, TEST, TRAIN).astype(np.int8)
        rng = np.random.default_rng([seed, fold])
        if groups is None:
            _hold_out_stratified(row, labels, val_fraction, rng, source)
        else:
            _hold_out_groups(row, groups, val_fraction, rng, source)
        assignment[fold] = row
    return assignment


def _hold_out_stratified(row: np.ndarray, labels: np.ndarray, val_fraction: float, rng: np.random.Generator,
                         source: int = TRAIN) -> None:
    """Move round(val_fraction × count) `source` (training, or test) images of each class to validation (in
    place)."""
    for cls in np.unique(labels):
        candidates = np.flatnonzero((labels == cls) & (row == source))
        take = int(round(val_fraction * candidates.size))
        row[rng.permutation(candidates)[:take]] = VAL


def _hold_out_groups(row: np.ndarray, groups: np.ndarray, val_fraction: float, rng: np.random.Generator,
                     source: int = TRAIN) -> None:
    """Move whole `source` (training, or test) groups, in shuffled order, to validation until val_fraction is
    reached (in place), always leaving at least one group where it was."""
    train_groups, sizes = np.unique(groups[row == source], return_counts=True)
    wanted = val_fraction * sizes.sum()
    held = 0
    for position in rng.permutation(train_groups.size)[: max(train_groups.size - 1, 0)]:
        if held >= wanted:
            break
        row[(groups == train_groups[position]) & (row == source)] = VAL
        held += sizes[position]


def check_split_assignment(assignment: np.ndarray, labels: np.ndarray, where: str) -> None:
    """Refuse folds that cannot train or be reported; warn when validation sees one class only."""
    for fold in range(assignment.shape[0]):
        parts = fold_indices(assignment, fold)
        for name in SPLIT_NAMES:
            if parts[name].size == 0:
                raise DataError(
                    f"fold {fold} has an empty {name} split",
                    where=where,
                    fix="use fewer folds, a larger val_fraction, or a dataset with more images",
                )
        train_classes = np.unique(labels[parts["train"]])
        if train_classes.size < 2:
            raise DataError(
                f"fold {fold}: the train split holds only class {int(train_classes[0])}",
                where=where,
                fix="check the labels and the label map; a classifier needs two classes to learn",
            )
        val_classes = np.unique(labels[parts["val"]])
        if val_classes.size < 2:
            warn(f"{where}: fold {fold}: the validation split holds only class {int(val_classes[0])}; "
                 "validation loss still works, validation AUC is undefined")


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
