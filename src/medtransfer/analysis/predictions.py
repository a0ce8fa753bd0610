"""Prediction similarity of two classifiers on the same test images: pure functions on arrays.

Inputs: `labels` (N,) int true classes; `probabilities_a`, `probabilities_b` (N, K) class probabilities of the two
models for the same N images in the same order. A model's predicted label is the argmax of its row.

* error agreement: the share of images on which both models are right or both are wrong. Two independent
  classifiers with accuracies p1 and p2 agree by chance with probability p1·p2 + (1 − p1)(1 − p2) (Geirhos et al.
  2020). Each model's own accuracy enters; the original code used the ImageNet model's accuracy for both.
* error consistency: Cohen's kappa on the right/wrong outcomes, (observed − chance) / (1 − chance) with the chance
  level above; NaN when chance = 1 (both models always right, or always wrong).
* label agreement and Cohen's kappa between the two predicted labels (chance from the two label marginals).
* probability correlation: Pearson's r of P(class 1) for binary tasks, of all (N·K) entries otherwise.
* Jensen–Shannon divergence between the two predicted distributions of each image, in bits (log base 2, so each
  value lies in [0, 1]), averaged over the images. SciPy's `jensenshannon` returns the square root of this
  (the Jensen–Shannon distance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

JSD_LOG_BASE = 2
CORRELATION_BINARY = "p(class 1)"
CORRELATION_ALL = "all probabilities"


def predicted_labels(probabilities: np.ndarray) -> np.ndarray:
    """(N, K) probabilities → (N,) argmax labels."""
    return np.asarray(probabilities).argmax(axis=1)


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Share of (N,) `predicted` equal to (N,) `labels`."""
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def error_agreement(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Share of images where both models are right or both wrong; inputs (N,) booleans (True = right)."""
    return float(np.mean(np.asarray(correct_a, dtype=bool) == np.asarray(correct_b, dtype=bool)))


def error_agreement_chance(accuracy_a: float, accuracy_b: float) -> float:
    """Expected error agreement of independent classifiers: p1·p2 + (1 − p1)(1 − p2)."""
    return accuracy_a * accuracy_b + (1.0 - accuracy_a) * (1.0 - accuracy_b)


def kappa(observed: float, chance: float) -> float:
    """(observed − chance) / (1 − chance); NaN when chance is 1 (no disagreement is possible)."""
    if not chance < 1.0:
        return math.nan
    return (observed - chance) / (1.0 - chance)


def error_consistency(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Geirhos et al.'s error consistency: kappa of the error agreement against its chance level from the two
    models' accuracies; inputs (N,) booleans (True = right)."""
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    chance = error_agreement_chance(float(correct_a.mean()), float(correct_b.mean()))
    return kappa(error_agreement(correct_a, correct_b), chance)


def label_agreement(predicted_a: np.ndarray, predicted_b: np.ndarray) -> float:
    """Share of images with the same predicted label; inputs (N,) ints."""
    return float(np.mean(np.asarray(predicted_a) == np.asarray(predicted_b)))


def cohen_kappa(predicted_a: np.ndarray, predicted_b: np.ndarray) -> float:
    """Cohen's kappa between two (N,) label vectors: chance = sum over classes of the product of the marginals."""
    predicted_a = np.asarray(predicted_a)
    predicted_b = np.asarray(predicted_b)
    classes = np.union1d(predicted_a, predicted_b)
    share_a = (predicted_a[:, None] == classes[None, :]).mean(axis=0)
    share_b = (predicted_b[:, None] == classes[None, :]).mean(axis=0)
    return kappa(label_agreement(predicted_a, predicted_b), float(share_a @ share_b))


def probability_correlation(probabilities_a: np.ndarray, probabilities_b: np.ndarray) -> tuple[float, str]:
    """(Pearson r, what was correlated): P(class 1) when K = 2, all N·K entries otherwise; NaN if one side is
    constant."""
    probabilities_a = np.asarray(probabilities_a, dtype=np.float64)
    probabilities_b = np.asarray(probabilities_b, dtype=np.float64)
    if probabilities_a.shape[1] == 2:
        x, y, what = probabilities_a[:, 1], probabilities_b[:, 1], CORRELATION_BINARY
    else:
        x, y, what = probabilities_a.ravel(), probabilities_b.ravel(), CORRELATION_ALL
    x = x - x.mean()
    y = y - y.mean()
    scale = math.sqrt(float(x @ x) * float(y @ y))
    return (float(x @ y) / scale if scale > 0.0 else math.nan), what


def jensen_shannon_divergence(probabilities_a: np.ndarray, probabilities_b: np.ndarray) -> np.ndarray:
    """(N,) Jensen–Shannon divergence in bits between row i of (N, K) `probabilities_a` and of `probabilities_b`.

    Rows are renormalised to sum to 1 (stored probabilities are rounded); 0·log 0 counts as 0.
    """
    p = _normalised(probabilities_a)
    q = _normalised(probabilities_b)
    m = 0.5 * (p + q)
    return np.clip(0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m), 0.0, 1.0)


def _normalised(probabilities: np.ndarray) -> np.ndarray:
    rows = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    return rows / rows.sum(axis=1, keepdims=True)


def _kl_bits(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Row-wise KL(p ‖ m) in bits, where m > 0 wherever p > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0.0, p * (np.log2(p) - np.log2(np.where(p > 0.0, m, 1.0))), 0.0)
    return terms.sum(axis=1)


@dataclass(frozen=True)
class PredictionSimilarity:
    """Every prediction-similarity measure of one pair of models on the same `images` test images."""

    images: int
    accuracy_a: float
    accuracy_b: float
    error_agreement: float
    error_agreement_chance: float
    error_consistency: float
    label_agreement: float
    label_kappa: float
    probability_correlation: float
    probability_correlation_of: str
    jensen_shannon: float
    jensen_shannon_base: int = JSD_LOG_BASE

    def to_dict(self) -> dict:
        return asdict(self)


def prediction_similarity(labels: np.ndarray, probabilities_a: np.ndarray, probabilities_b: np.ndarray) -> PredictionSimilarity:
    """All measures for (N,) `labels` and two (N, K) probability matrices of the same images."""
    labels = np.asarray(labels)
    probabilities_a = np.asarray(probabilities_a, dtype=np.float64)
    probabilities_b = np.asarray(probabilities_b, dtype=np.float64)
    if probabilities_a.shape != probabilities_b.shape or probabilities_a.ndim != 2 or len(labels) != len(probabilities_a):
        raise ValueError(
            f"expected labels (N,) and two (N, K) probability matrices, got {labels.shape}, "
            f"{probabilities_a.shape} and {probabilities_b.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no images to compare")
    predicted_a, predicted_b = predicted_labels(probabilities_a), predicted_labels(probabilities_b)
    correct_a, correct_b = predicted_a == labels, predicted_b == labels
    accuracy_a, accuracy_b = float(correct_a.mean()), float(correct_b.mean())
    agreement = error_agreement(correct_a, correct_b)
    chance = error_agreement_chance(accuracy_a, accuracy_b)
    correlation, correlated = probability_correlation(probabilities_a, probabilities_b)
    return PredictionSimilarity(
        images=int(len(labels)),
        accuracy_a=accuracy_a,
        accuracy_b=accuracy_b,
        error_agreement=agreement,
        error_agreement_chance=chance,
        error_consistency=kappa(agreement, chance),
        label_agreement=label_agreement(predicted_a, predicted_b),
        label_kappa=cohen_kappa(predicted_a, predicted_b),
        probability_correlation=correlation,
        probability_correlation_of=correlated,
        jensen_shannon=float(np.mean(jensen_shannon_divergence(probabilities_a, probabilities_b))),
    )
