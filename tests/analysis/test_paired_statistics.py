"""Paired statistics against scipy and a hand-worked example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

from medtransfer.analysis.paired_statistics import (
    BOUND_EPSILON,
    bootstrap_auc_interval,
    bounded_interval_over_folds,
    bounded_t_interval,
    corrected_resampled_t,
    interval_over_folds,
    range_scale,
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


# -- Intervals of measures with a known range ---------------------------------------------------------------------
# Oracles: the transform, t quantile, Nadeau–Bengio factor and back-transform written out with numpy/scipy below.

UNIT, SIGNED = (0.0, 1.0), (-1.0, 1.0)


def _hand_logit_interval(values, correction, bounds=UNIT):
    """The logit interval by hand: clip into the range shrunk by ε·w, logit of (x − low)/w, t-interval with the
    Nadeau–Bengio variance factor, expit, map back; an end within 2ε·w of a bound goes to the bound."""
    low, high = bounds
    width = high - low
    u = (np.clip(values, low + BOUND_EPSILON * width, high - BOUND_EPSILON * width) - low) / width
    z = scipy.special.logit(u)
    k = z.size
    half = scipy.stats.t.ppf(0.975, k - 1) * math.sqrt(1 / k + correction) * z.std(ddof=1)
    ends = low + width * scipy.special.expit(np.array([z.mean() - half, z.mean() + half]))
    near = 2 * BOUND_EPSILON * width
    return (low if ends[0] - low <= near else ends[0]), (high if high - ends[1] <= near else ends[1])


def _fold_values(seed, k):
    """k per-fold values of a [0, 1] measure: near 1, near 0, anywhere, or near 1 with some exactly at 1."""
    rng = np.random.default_rng(seed)
    kind = seed % 4
    if kind == 0:
        return 1 - rng.beta(1, 60, k)
    if kind == 1:
        return rng.beta(1, 60, k)
    if kind == 2:
        return rng.uniform(0, 1, k)
    values = 1 - rng.beta(1, 200, k)
    values[: max(1, k // 2)] = 1.0  # identity-like folds at the bound
    return values


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("k", [2, 3, 4, 5, 10])
@pytest.mark.parametrize("correction", [0.0, 0.5])
def test_bounded_fold_intervals_stay_in_the_range_and_are_the_hand_computed_logit_interval(seed, k, correction):
    values = _fold_values(seed, k)
    mean, low, high, scale = bounded_interval_over_folds(values, UNIT, correction=correction)
    assert scale == "logit" and mean == pytest.approx(values.mean(), abs=1e-15)
    assert 0.0 <= low <= high <= 1.0
    assert (low, high) == pytest.approx(_hand_logit_interval(values, correction), abs=1e-12)
    # contains the mapped-back centre; and the plain mean: guaranteed for k ≤ 4 (see the docstring), and here for
    # any k unless folds exactly at the bound mix with folds off it (the case the docstring names)
    centre = scipy.special.expit(scipy.special.logit(np.clip(values, BOUND_EPSILON, 1 - BOUND_EPSILON)).mean())
    assert low <= centre <= high
    if k <= 4 or not np.any(values == 1.0):
        assert low <= mean <= high


@pytest.mark.parametrize("seed", range(6))
def test_a_debiased_cka_interval_with_negative_values_is_the_fisher_z_interval_inside_minus_one_to_one(seed):
    rng = np.random.default_rng(100 + seed)
    values = rng.uniform(-0.9, 0.3, 3)  # debiased CKA of unrelated networks goes below 0
    mean, low, high, scale = bounded_interval_over_folds(values, SIGNED, correction=0.5)
    z = np.arctanh(values)
    half = scipy.stats.t.ppf(0.975, 2) * math.sqrt(1 / 3 + 0.5) * z.std(ddof=1)
    expected = np.tanh([z.mean() - half, z.mean() + half])
    assert scale == "fisher z" and -1.0 <= low <= mean <= high <= 1.0
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    if seed == 0:  # here the plain interval of the same values leaves [−1, 1]: why the transform is needed
        assert interval_over_folds(values, correction=0.5)[1] < -1.0


def test_values_all_at_a_bound_give_the_point_at_the_bound():
    assert bounded_interval_over_folds(np.ones(3), UNIT) == (1.0, 1.0, 1.0, "logit")
    assert bounded_interval_over_folds(np.zeros(5), UNIT, correction=0.25) == (0.0, 0.0, 0.0, "logit")
    assert bounded_interval_over_folds(np.full(3, -1.0), SIGNED) == (-1.0, -1.0, -1.0, "fisher z")
    # folds within ε of the bound but not equal: the interval reaches the bound and keeps the plain mean
    mean, low, high, _ = bounded_interval_over_folds(np.array([1.0, 1 - 1e-8, 1.0]), UNIT)
    assert high == 1.0 and low <= mean <= high and not math.isnan(low)


def test_a_measure_without_a_known_range_keeps_the_plain_interval():
    values = np.array([0.5, 0.6, 1.7])
    assert range_scale(None) == range_scale((-math.inf, math.inf)) == "plain"
    assert bounded_interval_over_folds(values, None, correction=0.5) == (
        *interval_over_folds(values, correction=0.5), "plain")


def test_a_general_range_is_mapped_onto_zero_one_before_the_logit():
    values = np.array([0.4, 1.1, 1.5])  # a measure in [0, 2]
    _, low, high, scale = bounded_interval_over_folds(values, (0.0, 2.0), correction=0.5)
    assert scale == "logit" and 0.0 <= low <= high <= 2.0
    assert (low, high) == pytest.approx(_hand_logit_interval(values, 0.5, (0.0, 2.0)), abs=1e-12)


def _slope_range(hull, bounds):
    """(min, max) of the transform's slope g' over the interval `hull`: g' = 1/(w u (1 − u)) for the logit,
    1/(1 − x²) for Fisher z, both convex with their minimum at the range's centre, so the maximum is at an end."""
    low, high = bounds
    slope = (lambda x: 1 / (1 - x * x)) if bounds == SIGNED else (
        lambda x: 1 / ((high - low) * ((x - low) / (high - low)) * (1 - (x - low) / (high - low))))
    centre = min(max((low + high) / 2, hull[0]), hull[1])
    return slope(centre), max(slope(hull[0]), slope(hull[1]))


@pytest.mark.parametrize(("bounds", "centre"), [(UNIT, 0.3), (UNIT, 0.55), (SIGNED, -0.2), (SIGNED, 0.4)])
@pytest.mark.parametrize("spread", [0.02, 0.005])
def test_far_from_the_bounds_the_interval_is_close_to_the_plain_one(bounds, centre, spread):
    # First order, by the mean value theorem with G = g' ranging over [G_min, G_max] on the hull of the values and
    # both intervals: the sd on the transformed scale is G·sd (pairwise differences), the mapped-back half-width
    # is that over G again, so width_bounded / width_plain ∈ [G_min/G_max, G_max/G_min]; the mapped-back centre
    # is within (G_max/G_min − 1)·mean|x − x̄| of the plain mean, so each end is within
    # (G_max/G_min − 1)·(mean|x − x̄| + half_plain) of the plain interval's. Both tend to 0 with the spread.
    values = centre + spread * np.array([-1.0, 0.3, 0.9])
    mean, low, high, _ = bounded_interval_over_folds(values, bounds, correction=0.5)
    _, plain_low, plain_high = interval_over_folds(values, correction=0.5)
    hull = (min(low, plain_low, values.min()), max(high, plain_high, values.max()))
    g_min, g_max = _slope_range(hull, bounds)
    ratio = g_max / g_min
    assert ratio - 1 < 0.5  # the tolerance is informative: the values are far from the bounds
    assert 1 / ratio - 1e-12 <= (high - low) / (plain_high - plain_low) <= ratio + 1e-12
    tolerance = (ratio - 1) * (np.abs(values - mean).mean() + (plain_high - plain_low) / 2) + 1e-12
    assert abs(low - plain_low) <= tolerance and abs(high - plain_high) <= tolerance


def test_the_channel_draws_interval_is_the_delta_method_on_the_logit_scale():
    mean, sd, draws = 0.9, 0.03, 5
    low, high, scale = bounded_t_interval(mean, sd, draws, UNIT)
    # delta method: sd of logit(x) ≈ sd · d logit/dx = sd / (m (1 − m))
    half = scipy.stats.t.ppf(0.975, draws - 1) / math.sqrt(draws) * sd / (mean * (1 - mean))
    expected = scipy.special.expit(scipy.special.logit(mean) + np.array([-half, half]))
    assert scale == "logit" and (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < mean < high < 1.0
    # Fisher z: d atanh/dx = 1 / (1 − x²)
    low, high, scale = bounded_t_interval(-0.4, 0.05, 4, SIGNED)
    half = scipy.stats.t.ppf(0.975, 3) / 2 * 0.05 / (1 - 0.16)
    assert scale == "fisher z" and (low, high) == pytest.approx(tuple(np.tanh(np.arctanh(-0.4) + np.array(
        [-half, half]))), abs=1e-12)


@pytest.mark.parametrize("mean", [0.0, 1e-9, 0.02, 0.5, 0.98, 1 - 1e-9, 1.0])
def test_the_channel_draws_interval_stays_in_the_range_and_contains_the_mean(mean):
    for sd in (0.0, 0.001, 0.2):
        low, high, _ = bounded_t_interval(mean, sd, 3, UNIT)
        assert 0.0 <= low <= mean <= high <= 1.0
    assert bounded_t_interval(0.5, 0.1, 1, UNIT)[:2] == pytest.approx((math.nan, math.nan), nan_ok=True)
