"""Paired statistics against scipy and a hand-worked example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from medtransfer.analysis.paired_statistics import (
    bootstrap_auc_interval,
    corrected_resampled_t,
    interval_over_folds,
    wilcoxon_across_targets,
)


def test_without_the_correction_it_is_the_paired_t_test():
    rng = np.random.default_rng(0)
    first, second = rng.uniform(0.6, 0.9, 5), rng.uniform(0.6, 0.9, 5)
    result = corrected_resampled_t(first, second, test_over_train=0.0)
    reference = scipy.stats.ttest_rel(first, second)
    interval = reference.confidence_interval(0.95)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-10)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high), rel=1e-10)


def test_a_hand_worked_example():
    # Five folds, differences d = (0.02, 0.04, 0.00, 0.06, 0.03): mean 0.03; squared deviations 1e-4, 1e-4, 9e-4,
    # 9e-4, 0, so s² = 2e-3 / 4 = 5e-4. Five-fold CV trains on 4/5 and tests on 1/5: correction 0.25.
    # SE = sqrt((1/5 + 0.25) · 5e-4) = sqrt(2.25e-4) = 0.015, t = 0.03 / 0.015 = 2, 4 degrees of freedom.
    # Student t with 4 df: P(|T| > t) = 1 − (3x/2)(1 − x²/3), x = t / sqrt(t² + 4) = 1/√2, so p = 1 − (3/(2√2))(5/6)
    # = 0.1161165; t(0.975, 4) = 2.7764451, interval 0.03 ± 2.7764451 · 0.015 = (−0.0116467, 0.0716467).
    differences = np.array([0.02, 0.04, 0.00, 0.06, 0.03])
    result = corrected_resampled_t(0.8 + differences, np.full(5, 0.8), test_over_train=0.25)
    assert result.mean == pytest.approx(0.03, abs=1e-12)
    assert result.t == pytest.approx(2.0, rel=1e-9)
    assert result.p == pytest.approx(1 - 3 / (2 * math.sqrt(2)) * 5 / 6, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((-0.0116467, 0.0716467), abs=1e-7)


def test_the_correction_widens_the_interval():
    first, second = np.array([0.81, 0.85, 0.79, 0.88, 0.84]), np.array([0.80, 0.82, 0.80, 0.83, 0.81])
    plain, corrected = corrected_resampled_t(first, second, 0.0), corrected_resampled_t(first, second, 0.25)
    assert corrected.high - corrected.low == pytest.approx((plain.high - plain.low) * math.sqrt(0.45 / 0.2))
    assert corrected.p > plain.p


def test_wilcoxon_across_enough_targets_is_scipys():
    differences = np.array([0.021, -0.004, 0.035, 0.012, 0.047, -0.009, 0.018])
    result = wilcoxon_across_targets(differences)
    reference = scipy.stats.wilcoxon(differences)
    assert result.targets == 7 and result.reason == ""
    assert (result.statistic, result.p) == pytest.approx((reference.statistic, reference.pvalue))


def test_wilcoxon_below_six_targets_says_why_not():
    result = wilcoxon_across_targets(np.array([0.02, 0.03, 0.01, 0.04, 0.05]))
    assert math.isnan(result.p) and "0.0625" in result.reason and "6 targets" in result.reason


def _scores(images, seed):
    """Binary labels (half each) and P(class 1) with a fixed separation: a population AUC near 0.76."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images) % 2
    score = rng.normal(labels * 1.0, 1.0)
    positive = 1 / (1 + np.exp(-score))
    return labels, np.column_stack([1 - positive, positive])


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_images():
    small = bootstrap_auc_interval(*_scores(100, 1), resamples=400, seed=0)
    large = bootstrap_auc_interval(*_scores(1600, 1), resamples=400, seed=0)
    for auc, low, high in (small, large):
        assert low <= auc <= high
    # The interval's width shrinks as 1/sqrt(images): 16 times the images, about a quarter of the width.
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])
    assert bootstrap_auc_interval(*_scores(100, 1), resamples=400, seed=0) == small  # seeded


def test_interval_over_folds_is_a_t_interval():
    values = np.array([0.5, 0.6, 0.7])
    mean, low, high = interval_over_folds(values)
    half = scipy.stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((0.6, 0.6 - half, 0.6 + half))
    assert math.isnan(interval_over_folds(np.array([0.5]))[1])
