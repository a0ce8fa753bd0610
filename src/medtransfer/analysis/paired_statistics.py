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
