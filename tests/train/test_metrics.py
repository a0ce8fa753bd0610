"""Our rank-based AUC variants, accuracy and balanced accuracy against scikit-learn as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from medtransfer.train.metrics import binary_auc, classification_metrics, confusion_matrix, roc_auc, roc_curve


@pytest.mark.parametrize("seed", range(4))
def test_binary_auc_with_ties_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # rounding makes many ties
    assert binary_auc(labels, scores) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_weighted_ovr_and_micro_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=500, p=[0.5, 0.3, 0.15, 0.05])
    logits = rng.normal(size=(500, 4)) + 1.5 * np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = roc_auc(labels, probabilities)
    assert ours["auc_ovr_weighted"] == pytest.approx(
        sk.roc_auc_score(labels, probabilities, multi_class="ovr", average="weighted"), abs=1e-12
    )
    one_hot = np.eye(4)[labels]
    assert ours["auc_micro"] == pytest.approx(sk.roc_auc_score(one_hot, probabilities, average="micro"), abs=1e-12)


def test_accuracy_balanced_accuracy_and_confusion_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probabilities = rng.dirichlet(np.ones(3), size=200)
    predicted = probabilities.argmax(1)
    ours = classification_metrics(labels, probabilities)
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert ours["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, predicted))
    np.testing.assert_array_equal(confusion_matrix(labels, predicted, 3), sk.confusion_matrix(labels, predicted))


def test_roc_curve_matches_sklearn_points():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    scores = np.round(rng.random(100), 2)
    fpr, tpr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_auc_is_nan_with_one_class():
    assert np.isnan(binary_auc(np.ones(5), np.arange(5)))
