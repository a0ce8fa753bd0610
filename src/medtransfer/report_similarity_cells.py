"""The cells and legends of the report's layer-wise similarity tables: mean ± sd over folds with its 95 % interval
and marks (‡ channel-sampling error, † too few rows per channel), and the lines under each table that say what the
intervals and marks are. Read from `similarity_summary.csv` rows as `compare` wrote them."""

from __future__ import annotations

import math

from medtransfer.analysis.plots import UNRELIABLE_MARK, is_unreliable
from medtransfer.analysis.similarity import RELIABLE_ROWS_PER_CHANNEL
from medtransfer.analysis.summaries import CI_OVER_DRAWS
from medtransfer.report_cells import as_float, as_int, mean_sd_cell, shortfall_note


#: Beside an interval of one fold's value over its channel draws: the Monte-Carlo error of the channel sampling,
#: not a confidence interval for the similarity (there is no spread over folds to give).
DRAWS_INTERVAL_MARK = "‡"


def similarity_cell(row: dict[str, str]) -> str:
    """mean ± sd over folds, the 95 % interval of the mean in brackets where compare gave one (tables written
    before the interval columns existed show mean ± sd alone; the interval is computed on a bounded scale, so it
    need not be symmetric about the mean), `DRAWS_INTERVAL_MARK` where it is the channel sampling's error of a
    single fold, then the marks."""
    count, total = as_int(row.get("count")), as_int(row.get("folds"))
    cell = mean_sd_cell([as_float(row["mean"])], sd=as_float(row["sd"]))
    if cell != "–" and count is not None and total is not None:
        cell += shortfall_note(count, total)
    low, high = as_float(row.get("ci_low", "")), as_float(row.get("ci_high", ""))
    if math.isfinite(low) and math.isfinite(high):
        cell += f" [{low:.2f}, {high:.2f}]"
        if row.get("ci_basis") == CI_OVER_DRAWS:
            cell += DRAWS_INTERVAL_MARK
    return cell + unreliable_mark(row)


def interval_legend(rows: list[dict[str, str]]) -> list[str]:
    """What the bracketed intervals are, when the table holds any: over the folds, on which scale and why, and
    whether they rest on so few folds (under 5) that they are wide for that reason; the ‡ ones, what they are."""
    from scipy import stats

    from medtransfer.analysis.paired_statistics import SCALE_FISHER_Z, SCALE_LOGIT

    shown = [row for row in rows if math.isfinite(as_float(row.get("ci_low", "")))]
    if not shown:
        return []
    over_folds = [row for row in shown if row.get("ci_basis") != CI_OVER_DRAWS]
    text = ("[ ] 95 % interval of the mean: Student t over the folds (k − 1 degrees of freedom), widened by Nadeau & "
            "Bengio's correction (variance factor 1/k + n_test/n_train, as the folds' models share training "
            "images); with channel sampling each fold's value is the mean over its draws, so the interval holds "
            "the draws' noise too.")
    for scale, name in ((SCALE_LOGIT, "the logit scale, as the measure lies in [0, 1]"),
                        (SCALE_FISHER_Z, "Fisher's z scale (atanh), as the measure lies in [−1, 1]")):
        if any(row.get("ci_scale") == scale for row in shown):
            text += (f" It is computed on {name}, and mapped back: a t-interval of the values themselves runs "
                     "past the bounds when the folds are few; this one stays inside them and is not symmetric about "
                     "the mean.")
    folds = sorted({k for k in (as_int(row.get("count")) for row in over_folds) if k is not None and k >= 2})
    if folds and folds[0] < 5:
        k = folds[0]
        text += (f" {'With as few as' if len(folds) > 1 else 'With only'} {k} folds the intervals are wide for that "
                 f"reason: the t quantile with {k - 1} degrees of freedom is {stats.t.ppf(0.975, k - 1):.2f} (1.96 "
                 "with many folds) and the Nadeau–Bengio factor keeps n_test/n_train in the variance however many "
                 "folds there are; a wide interval says how little the folds can tell, not that the similarity "
                 "varies that much.")
    if len(over_folds) < len(shown):
        text += (f" {DRAWS_INTERVAL_MARK} one fold only: not a confidence interval for the similarity but the "
                 "Monte-Carlo error of the channel sampling, a 95 % t-interval over that fold's channel draws (on the "
                 "same scale, by the delta method); it leaves out the fold-to-fold noise.")
    return ["", text]


def unreliable_mark(row: dict[str, str]) -> str:
    """`UNRELIABLE_MARK` when any fold's comparison behind a summary row had too few rows per channel."""
    return UNRELIABLE_MARK if is_unreliable(row) else ""


#: What too few rows per channel does to each measure the report tabulates.
FEW_ROWS_BIAS = {"cca": "canonical correlations are biased towards 1",
                 "cka": "linear CKA is biased upward (its debiased form, `cka_debiased`, corrects for this)"}


def unreliable_legend(rows: list[dict[str, str]], measure: str = "cca") -> list[str]:
    marked = [row for row in rows if unreliable_mark(row)]
    if not marked:
        return []
    fewest = min(as_float(row.get("rows_per_channel", "")) for row in marked)
    fewest_text = f" (here as few as {fewest:.1f})" if math.isfinite(fewest) else ""
    return ["", f"{UNRELIABLE_MARK} unreliable: in at least one fold the comparison had fewer than "
                f"{RELIABLE_ROWS_PER_CHANNEL} rows (image positions) per compared channel{fewest_text}, where "
                f"{FEW_ROWS_BIAS.get(measure, 'the measure is biased')}; sample channels "
                "(`analysis.channel_sample`) or use more or larger images."]
