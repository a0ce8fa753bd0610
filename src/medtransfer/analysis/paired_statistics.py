"""Do two sources differ beyond fold noise? Paired statistics on cross-validated scores, as pure functions.

- `corrected_resampled_t`: the per-fold differences of two sources' test AUCs (same folds, same regime), their mean
  with a 95 % interval and p-value from the corrected resampled t-test (Nadeau & Bengio 2003). The folds' training
  sets overlap, so the fold differences are correlated and the plain paired t-test is too confident; the correction
  replaces the variance factor 1/k by 1/k + n_test/n_train. With the correction set to 0 it is scipy's `ttest_rel`.
- `wilcoxon_across_targets`: the signed-rank test on per-target mean differences (Demšar 2006), only with at least
  six targets: with n targets the smallest exact two-sided p is 2 / 2ⁿ, which reaches 0.05 only from n = 6.
- `bootstrap_auc_interval`: a seeded percentile interval of one fold's test AUC over its test images.
- `interval_over_folds`: mean and t-interval of any per-fold values (similarity tables), optionally corrected
  for overlapping training sets as above.
- `bounded_interval_over_folds`, `bounded_t_interval`: the same intervals for a measure with a known range
  (similarity measures in [0, 1] or [−1, 1]), computed on an unbounded scale (`range_scale`: logit, Fisher z)
  and mapped back, so that they never leave the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Below this many targets the signed-rank test cannot reach p < 0.05 (smallest exact two-sided p = 2 / 2ⁿ).
WILCOXON_MIN_TARGETS = 6


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the per-fold differences (first − second) with its interval and the test's two-sided p-value."""

    differences: tuple[float, ...]
    mean: float
    low: float
    high: float
    t: float
    p: float
    correction: float
    level: float


def corrected_resampled_t(
    first: np.ndarray, second: np.ndarray, test_over_train: float, level: float = 0.95
) -> PairedComparison:
    """Nadeau & Bengio's corrected resampled t-test of paired per-fold scores.

    first, second: (k,) scores of two methods on the same k folds. test_over_train: n_test / n_train of a fold
    (the correction term; 0 gives the ordinary paired t-test). Variance of the mean: (1/k + test_over_train) s²,
    s² the sample variance (ddof 1) of the differences; Student t with k − 1 degrees of freedom.
    """
    from scipy import stats

    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired scores need the same (k,) shape, got {first.shape} and {second.shape}")
    if test_over_train < 0:
        raise ValueError(f"test_over_train must be at least 0, got {test_over_train}")
    differences = first - second
    k = differences.size
    mean = float(differences.mean()) if k else math.nan
    if k < 2:
        return PairedComparison(tuple(differences.tolist()), mean, math.nan, math.nan, math.nan, math.nan,
                                test_over_train, level)
    variance = float(differences.var(ddof=1))
    standard_error = math.sqrt((1.0 / k + test_over_train) * variance)
    quantile = float(stats.t.ppf(0.5 + level / 2, k - 1))
    if standard_error == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / standard_error
        p = float(2 * stats.t.sf(abs(t), k - 1))
    return PairedComparison(tuple(differences.tolist()), mean, mean - quantile * standard_error,
                            mean + quantile * standard_error, t, p, test_over_train, level)


@dataclass(frozen=True)
class SignedRankResult:
    """The Wilcoxon signed-rank test across targets, or why none is given."""

    targets: int
    statistic: float
    p: float
    reason: str


def wilcoxon_across_targets(mean_differences: np.ndarray) -> SignedRankResult:
    """Two-sided signed-rank test of per-target mean differences (one value per target); none below six targets."""
    from scipy import stats

    values = np.asarray(mean_differences, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < WILCOXON_MIN_TARGETS:
        smallest = 2.0 / 2**values.size if values.size else 1.0
        return SignedRankResult(int(values.size), math.nan, math.nan,
                                f"{values.size} target(s): the smallest exact two-sided p is {smallest:.3g}, so the "
                                f"test cannot reach 0.05 below {WILCOXON_MIN_TARGETS} targets")
    if not np.any(values):
        return SignedRankResult(int(values.size), math.nan, math.nan, "every target's difference is 0")
    result = stats.wilcoxon(values)
    return SignedRankResult(int(values.size), float(result.statistic), float(result.pvalue), "")


def bootstrap_auc_interval(
    labels: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int | list[int], level: float = 0.95
) -> tuple[float, float, float]:
    """(AUC, low, high): the test AUC of one fold and a percentile interval over `resamples` stratified resamples
    of its test images (each class's images drawn with replacement, as many as it has, so every resample keeps
    every class and has an AUC). labels (N,) int; probabilities (N, K)."""
    from medtransfer.train.metrics import roc_auc

    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    point = float(roc_auc(labels, probabilities)["auc"])
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for index in range(resamples):
        pick = np.concatenate([rng.choice(group, size=group.size, replace=True) for group in members])
        values[index] = roc_auc(labels[pick], probabilities[pick])["auc"]
    if not np.all(np.isfinite(values)):
        return point, math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return point, float(low), float(high)


def interval_over_folds(values: np.ndarray, level: float = 0.95, correction: float = 0.0) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval of the mean of per-fold values (NaN with fewer than two).

    correction: Nadeau & Bengio's n_test / n_train for values of models fitted on overlapping training sets; the
    variance of the mean is then (1/k + correction) s² instead of s²/k (0: the textbook interval)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    low, high = t_interval(mean, float(values.std(ddof=1)), int(values.size), level, correction)
    return mean, low, high


def t_interval(mean: float, sd: float, count: int, level: float = 0.95, correction: float = 0.0) -> tuple[float, float]:
    """(low, high) of the Student-t interval (count − 1 degrees of freedom) of a mean of `count` values with sample
    sd `sd`; standard error sqrt((1/count + correction)) · sd. NaN with fewer than two values."""
    from scipy import stats

    if not correction >= 0:
        raise ValueError(f"correction must be at least 0, got {correction}")
    if count < 2 or not math.isfinite(sd):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, count - 1)) * math.sqrt(1.0 / count + correction) * sd
    return mean - half, mean + half


# -- Intervals of measures with a known range ----------------------------------------------------------------------

#: `ci_scale` of an interval computed on the logit of the value mapped from [low, high] onto (0, 1), on Fisher's
#: z (atanh; a measure in [−1, 1]), or on the values themselves (no known range).
SCALE_LOGIT = "logit"
SCALE_FISHER_Z = "fisher z"
SCALE_PLAIN = "plain"
#: Values are clipped to [low + ε·w, high − ε·w] (w = high − low) before the transform: a value at a bound (identity
#: controls give exactly 1.0; rounding can land a hair outside) has an infinite logit or atanh, which would turn the
#: whole interval into NaN. 1e-6 lies beyond what the values resolve (they come from float32 activations, and the
#: report prints two decimals) yet keeps the transformed value moderate (logit ≈ 13.8), so one fold at the bound
#: widens the interval by a finite amount. An end of the mapped-back interval within 2ε·w of a bound is set to
#: the bound: it cannot be told apart from it, and so the interval keeps folds that lay within ε·w of the bound.
BOUND_EPSILON = 1e-6


def range_scale(bounds: tuple[float, float] | None) -> str:
    """The scale an interval of a measure in `bounds` = (low, high) is computed on: Fisher z for [−1, 1], logit
    (after mapping [low, high] onto [0, 1]) for any other finite range, plain without one. On [−1, 1] the two
    agree: atanh(r) = logit((r + 1) / 2) / 2, and a t-interval scaled by 1/2 maps back to the same interval."""
    if bounds is None:
        return SCALE_PLAIN
    low, high = (float(bound) for bound in bounds)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        return SCALE_PLAIN
    return SCALE_FISHER_Z if (low, high) == (-1.0, 1.0) else SCALE_LOGIT


def to_unbounded(values: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """(n,) values on the scale of `range_scale(bounds)`, after clipping to the range shrunk by `BOUND_EPSILON`."""
    from scipy import special

    values = np.asarray(values, dtype=np.float64)
    scale = range_scale(bounds)
    if scale == SCALE_PLAIN:
        return values
    low, high = bounds
    margin = BOUND_EPSILON * (high - low)
    clipped = np.clip(values, low + margin, high - margin)
    if scale == SCALE_FISHER_Z:
        return np.arctanh(clipped)
    return special.logit((clipped - low) / (high - low))


def from_unbounded(values: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """(n,) values of `to_unbounded`'s scale mapped back into [low, high] (the inverse, up to the clipping)."""
    from scipy import special

    values = np.asarray(values, dtype=np.float64)
    scale = range_scale(bounds)
    if scale == SCALE_PLAIN:
        return values
    low, high = bounds
    back = np.tanh(values) if scale == SCALE_FISHER_Z else low + (high - low) * special.expit(values)
    return np.clip(back, low, high)  # only rounding can step outside


def _to_bounds(low: float, high: float, bounds: tuple[float, float] | None) -> tuple[float, float]:
    """An interval mapped back, with an end within 2ε·w of a bound set to that bound (see `BOUND_EPSILON`)."""
    if range_scale(bounds) == SCALE_PLAIN:
        return low, high
    lowest, highest = bounds
    near = 2 * BOUND_EPSILON * (highest - lowest)
    return (lowest if low - lowest <= near else low), (highest if highest - high <= near else high)


def bounded_interval_over_folds(
    values: np.ndarray, bounds: tuple[float, float] | None, level: float = 0.95, correction: float = 0.0
) -> tuple[float, float, float, str]:
    """(mean, low, high, scale) of per-fold values (k,) of a measure in `bounds` (None: no known range).

    The `interval_over_folds` t-interval (k − 1 degrees of freedom, Nadeau & Bengio's `correction`) of the
    transformed values (`to_unbounded`), mapped back (`from_unbounded`): it lies within the range and contains
    the mapped-back mean of the transformed values. `mean` is the plain mean of the values, so the interval is not
    symmetric about it. It still contains it for k ≤ 4 at 95 %: by Samuelson's inequality no value lies more than
    s (k − 1)/√k from the mean, and t_{0.975, k−1} ≥ k − 1 there, so the interval covers every fold's value (and
    the plain mean lies between them); with more folds the gap between the two centres is second order in the
    spread (Jensen) against a first-order half-width. It can miss it only where folds exactly at a bound mix with
    folds off it and k is large (ten folds, half at 1.0 and half near 0.995, no correction: the clipped 1.0 has
    logit 13.8 and pulls the centre to 0.99999); similarities of two different networks do not reach the bound.
    Values all equal give the point (v, v), also at a bound. NaN ends with fewer than two finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    scale = range_scale(bounds)
    if values.size == 0:
        return math.nan, math.nan, math.nan, scale
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan, scale
    if np.all(values == values[0]):
        return mean, float(values[0]), float(values[0]), scale
    _, low, high = interval_over_folds(to_unbounded(values, bounds), level, correction)
    low, high = (float(v) for v in from_unbounded(np.array([low, high]), bounds))
    return (mean, *_to_bounds(low, high, bounds), scale)


def bounded_t_interval(
    mean: float, sd: float, count: int, bounds: tuple[float, float] | None, level: float = 0.95,
    correction: float = 0.0,
) -> tuple[float, float, str]:
    """(low, high, scale): `t_interval` of a mean of `count` values with sample sd `sd` (only these two known, as
    for a fold's channel draws) on the scale of `range_scale(bounds)`, mapped back.

    Delta method: with z = g(x) the transform, the sd on its scale is sd · |g'(mean)| = sd / |dx/dz|, g' taken at
    the (clipped) mean: 1 / (w u (1 − u)) for the logit of u = (x − low) / w, 1 / (1 − x²) for Fisher z. First
    order in sd / (distance to the bound); the interval contains `mean` (its centre maps back to it, up to the
    clipping at the bound). A zero sd gives the point (mean, mean)."""
    scale = range_scale(bounds)
    if count < 2 or not (math.isfinite(mean) and math.isfinite(sd)):
        return math.nan, math.nan, scale
    if sd == 0 or scale == SCALE_PLAIN:
        low, high = t_interval(mean, sd, count, level, correction)
        return low, high, scale
    lowest, highest = bounds
    margin = BOUND_EPSILON * (highest - lowest)
    centre = min(max(mean, lowest + margin), highest - margin)
    if scale == SCALE_FISHER_Z:
        slope = 1.0 / (1.0 - centre * centre)
    else:
        share = (centre - lowest) / (highest - lowest)
        slope = 1.0 / ((highest - lowest) * share * (1.0 - share))
    z = float(to_unbounded(np.array([centre]), bounds)[0])
    low, high = t_interval(z, sd * slope, count, level, correction)
    low, high = (float(v) for v in from_unbounded(np.array([low, high]), bounds))
    return (*_to_bounds(low, high, bounds), scale)
