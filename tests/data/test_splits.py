"""Splits: the given split, stratified k-fold (within one image per class), grouped k-fold (groups never cross)."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.data.splits import (
    TEST,
    TRAIN,
    VAL,
    fold_indices,
    given_split_assignment,
    grouped_kfold_assignment,
    stratified_kfold_assignment,
)
from medtransfer.errors import DataError


def _labels(counts):
    return np.concatenate([np.full(count, cls) for cls, count in enumerate(counts)])


def test_given_split_is_one_fold():
    given = np.array([0, 0, 1, 2, 2, 0], dtype=np.int8)
    assignment = given_split_assignment(given)
    assert assignment.shape == (1, 6)
    parts = fold_indices(assignment, 0)
    assert parts["train"].tolist() == [0, 1, 5] and parts["val"].tolist() == [2] and parts["test"].tolist() == [3, 4]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("folds", [3, 5])
def test_stratified_kfold_is_stratified_within_one_image_per_class(seed, folds):
    counts = [103, 57, 11, 6]
    labels = _labels(counts)
    np.random.default_rng(seed).shuffle(labels)
    assignment = stratified_kfold_assignment(labels, folds, 0.1, seed)
    test_folds = np.argmax(assignment == TEST, axis=0)
    assert (np.sum(assignment == TEST, axis=0) == 1).all(), "each image is tested exactly once"
    for cls, count in enumerate(counts):
        per_fold = np.bincount(test_folds[labels == cls], minlength=folds)
        assert per_fold.max() - per_fold.min() <= 1
        assert abs(per_fold - count / folds).max() < 1
    sizes = np.bincount(test_folds, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for fold in range(folds):
        row = assignment[fold]
        for cls in range(len(counts)):
            in_train_part = np.sum((labels == cls) & (row != TEST))
            assert np.sum((labels == cls) & (row == VAL)) == round(0.1 * in_train_part)


def test_stratified_kfold_is_deterministic_for_a_seed():
    labels = _labels([40, 20])
    first = stratified_kfold_assignment(labels, 5, 0.1, 3)
    np.testing.assert_array_equal(first, stratified_kfold_assignment(labels, 5, 0.1, 3))
    assert not np.array_equal(first, stratified_kfold_assignment(labels, 5, 0.1, 4))


@pytest.mark.parametrize("seed", [0, 5])
def test_grouped_kfold_never_splits_a_group(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 40, size=500)
    folds = 5
    assignment = grouped_kfold_assignment(groups, folds, 0.15, seed)
    assert (np.sum(assignment == TEST, axis=0) == 1).all()
    for fold in range(folds):
        row = assignment[fold]
        for group in np.unique(groups):
            assert np.unique(row[groups == group]).size == 1, "a group sits in two parts of one fold"
        assert np.sum(row == TRAIN) > 0 and np.sum(row == VAL) > 0
        train_part = np.sum(row != TEST)
        assert np.sum(row == VAL) >= 0.15 * train_part
    test_fold_of_group = {int(g): int(np.argmax(assignment[:, groups == g][:, 0] == TEST)) for g in np.unique(groups)}
    sizes = np.bincount([test_fold_of_group[int(g)] for g in groups], minlength=folds)
    assert sizes.max() - sizes.min() <= np.bincount(groups).max(), "folds balanced to within one group"


def test_grouped_kfold_needs_enough_groups():
    with pytest.raises(DataError, match="3 groups cannot make 5 grouped folds"):
        grouped_kfold_assignment(np.array([0, 0, 1, 2]), 5, 0.1, 0)


def test_fold_out_of_range():
    with pytest.raises(DataError, match="fold 3 does not exist"):
        fold_indices(np.zeros((3, 4), dtype=np.int8), 3)
