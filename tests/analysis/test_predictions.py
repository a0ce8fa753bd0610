"""Prediction-similarity metrics against independent oracles (scikit-learn, SciPy) and hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr
from sklearn.metrics import cohen_kappa_score

from medtransfer.analysis.predictions import (
    CORRELATION_ALL,
    CORRELATION_BINARY,
    cohen_kappa,
    error_agreement,
    error_agreement_chance,
    error_consistency,
    jensen_shannon_divergence,
    prediction_similarity,
    probability_correlation,
)


def _random_probabilities(rng, n: int, k: int) -> np.ndarray:
    logits = rng.normal(size=(n, k)) * 2.0
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_label_kappa_agrees_with_scikit_learn(classes):
    rng = np.random.default_rng(classes)
    a = rng.integers(0, classes, size=200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, classes, size=200))
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_error_consistency_agrees_with_scikit_learn_on_right_wrong_outcomes():
    rng = np.random.default_rng(1)
    right_a, right_b = rng.random(300) < 0.8, rng.random(300) < 0.7
    # Kappa on two binary outcomes uses the same marginals as p1·p2 + (1−p1)(1−p2).
    assert error_consistency(right_a, right_b) == pytest.approx(cohen_kappa_score(right_a, right_b), abs=1e-12)


def test_error_consistency_by_hand():
    # 10 images. A right on 8, B right on 6; both right on 5, both wrong on 1 → observed agreement 0.6.
    right_a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    right_b = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    assert error_agreement(right_a, right_b) == pytest.approx(0.6)
    chance = 0.8 * 0.6 + 0.2 * 0.4  # 0.56
    assert error_agreement_chance(0.8, 0.6) == pytest.approx(chance)
    assert error_consistency(right_a, right_b) == pytest.approx((0.6 - chance) / (1 - chance))  # 0.0909...
    assert error_consistency(right_a, right_b) == pytest.approx(1 / 11)


def test_the_chance_level_uses_each_models_own_accuracy():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    perfect = np.eye(2)[labels]
    half = np.eye(2)[np.array([0, 0, 0, 0, 0, 0, 0, 0])]  # right on the four zeros
    result = prediction_similarity(labels, perfect, half)
    assert (result.accuracy_a, result.accuracy_b) == (1.0, 0.5)
    assert result.error_agreement_chance == pytest.approx(1.0 * 0.5 + 0.0 * 0.5)
    assert result.error_agreement == pytest.approx(0.5)
    assert math.isnan(error_consistency(np.ones(4, bool), np.ones(4, bool)))  # chance 1: undefined


@pytest.mark.parametrize("classes", [2, 5])
def test_jensen_shannon_agrees_with_scipy_squared_in_bits(classes):
    rng = np.random.default_rng(classes)
    p, q = _random_probabilities(rng, 50, classes), _random_probabilities(rng, 50, classes)
    expected = np.array([jensenshannon(p[i], q[i], base=2) ** 2 for i in range(50)])
    np.testing.assert_allclose(jensen_shannon_divergence(p, q), expected, rtol=1e-9, atol=1e-12)
    disjoint = jensen_shannon_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert disjoint[0] == pytest.approx(1.0)  # base 2: the maximum is 1 bit


def test_probability_correlation_binary_and_multiclass():
    rng = np.random.default_rng(3)
    a, b = _random_probabilities(rng, 40, 2), _random_probabilities(rng, 40, 2)
    r, what = probability_correlation(a, b)
    assert what == CORRELATION_BINARY and r == pytest.approx(pearsonr(a[:, 1], b[:, 1])[0])
    a, b = _random_probabilities(rng, 40, 4), _random_probabilities(rng, 40, 4)
    r, what = probability_correlation(a, b)
    assert what == CORRELATION_ALL and r == pytest.approx(pearsonr(a.ravel(), b.ravel())[0])


def test_identical_predictions_agree_completely():
    rng = np.random.default_rng(4)
    probabilities = _random_probabilities(rng, 60, 3)
    labels = rng.integers(0, 3, size=60)
    result = prediction_similarity(labels, probabilities, probabilities.copy())
    assert result.error_agreement == 1.0 and result.label_agreement == 1.0
    assert result.label_kappa == pytest.approx(1.0) and result.error_consistency == pytest.approx(1.0)
    assert result.jensen_shannon == pytest.approx(0.0, abs=1e-12) and result.jensen_shannon_base == 2
    assert result.probability_correlation == pytest.approx(1.0)
    assert result.images == 60


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        prediction_similarity(np.zeros(3, int), np.full((3, 2), 0.5), np.full((4, 2), 0.5))
