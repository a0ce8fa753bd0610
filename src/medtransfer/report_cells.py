"""Table cells that average over folds or targets, and say so when a value is missing.

A measure can be undefined on one fold (Cohen's κ when both models are right on every image, a correlation when one
model's probabilities are constant) while defined on another. Averaging the defined folds alone is right, but a cell
that prints that mean as if it were the mean over every fold misleads: "0.91" over one fold of two reads like a
two-fold result. Every cell here names how many of the expected folds (or targets) it rests on whenever that is
fewer than all, and `shortfall_legend` gives the reasons once under the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: Why a prediction-similarity measure can be undefined on a fold (the column in predictions.csv -> the reason).
UNDEFINED_REASONS = {
    "error_consistency": "κ undefined where both models are always right (or both always wrong)",
    "label_kappa": "κ undefined where both models predict one and the same class for every image",
    "probability_correlation": "r undefined where a model's probabilities are constant",
    "test_auc": "no test AUC where a fold's test part holds one class only",
}


def finite_values(values: Iterable[float | None]) -> list[float]:
    return [float(value) for value in values if value is not None and math.isfinite(float(value))]


def mean_sd_cell(values: Sequence[float | None], *, expected: int | None = None, unit: str = "folds",
                 digits: int = 2, sd: float | None = None, reason: str = "", scale: float = 1.0) -> str:
    """'mean ± sd' of the finite `values` (× `scale`), with '(k of n unit; reason)' appended when only k of the
    `expected` n values are finite; 'mean' alone where no sd can be given (one value, `sd` not finite); '–' when
    none is finite. `sd` given: printed as is (a spread computed elsewhere, e.g. over channel draws)."""
    finite = [scale * value for value in finite_values(values)]
    if not finite:
        return "–"
    mean = sum(finite) / len(finite)
    if sd is None:
        sd = math.sqrt(sum((value - mean) ** 2 for value in finite) / (len(finite) - 1)) if len(finite) > 1 \
            else math.nan
    else:
        sd = scale * sd
    cell = f"{mean:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{mean:.{digits}f}"
    return cell + shortfall_note(len(finite), expected, unit=unit, reason=reason)


def shortfall_note(count: int, expected: int | None, *, unit: str = "folds", reason: str = "") -> str:
    """' (k of n unit; reason)' when `count` < `expected`, else ''."""
    if expected is None or count >= expected:
        return ""
    return f" ({count} of {expected} {unit}" + (f"; {reason}" if reason else "") + ")"


def shortfall_legend(reasons: Iterable[str], unit: str = "folds") -> list[str]:
    """The lines under a table some of whose cells rest on fewer than every fold (or target); [] when none does."""
    distinct = list(dict.fromkeys(reason for reason in reasons if reason is not None))
    if not distinct:
        return []
    why = "; ".join(reason for reason in distinct if reason)
    return ["", f"(k of n {unit}): the mean and sd rest on the k {unit} where the value is defined; the other "
                f"{unit} are left out, not counted as zero" + (f" ({why})." if why else ".")]


def as_float(text) -> float:
    """A table cell (text, number or None) as a float; NaN where it holds none."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def as_int(text) -> int | None:
    """A table cell as an int; None where it holds none."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
