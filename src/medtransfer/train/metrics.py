"""Classification metrics as pure functions on arrays: ROC AUC (binary, one-vs-rest weighted, micro), accuracy,
balanced accuracy, confusion matrix, ROC curve.

AUC is computed from ranks (the Mann-Whitney U statistic), with ties counted half, which equals the area under
the empirical ROC curve. Written here rather than called from scikit-learn so the per-epoch metrics are cheap and
so that the tests can check them against scikit-learn as an independent oracle.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` (N,) for binary `labels` (N,) in {0, 1}; NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks: ties count one half
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC variants for labels (N,) int and class probabilities (N, K).

    Binary (K = 2): `auc` on P(class 1). Multi-class: `auc_ovr_weighted` (one-vs-rest, weighted by class
    prevalence; the paper's choice) and `auc_micro` (all one-vs-rest decisions pooled; the later code's choice);
    `auc` is the weighted one-vs-rest value.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = probabilities.shape[1]
    if classes == 2:
        return {"auc": binary_auc(labels, probabilities[:, 1])}
    one_hot = labels[:, None] == np.arange(classes)[None, :]
    per_class = np.array([binary_auc(one_hot[:, k], probabilities[:, k]) for k in range(classes)])
    prevalence = one_hot.sum(axis=0)
    present = prevalence > 0
    weighted = float(np.sum(per_class[present] * prevalence[present]) / prevalence[present].sum())
    micro = binary_auc(one_hot.ravel(), probabilities.ravel())
    return {"auc": weighted, "auc_ovr_weighted": weighted, "auc_micro": micro}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and the AUC variants."""
    labels = np.asarray(labels)
    predicted = np.asarray(probabilities).argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, probabilities.shape[1])
    support = matrix.sum(axis=1)
    recalls = np.diag(matrix)[support > 0] / support[support > 0]
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": float(recalls.mean()),
        **roc_auc(labels, probabilities),
    }


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, sorted_labels = np.asarray(scores)[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_labels.size - 1]
    true_positives = np.cumsum(sorted_labels)[distinct]
    false_positives = (distinct + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(labels.sum(), 1)]
    fpr = np.r_[0.0, false_positives / max((~labels).sum(), 1)]
    return fpr, tpr
