"""The report's first screen: the study's answer in words, per comparison of two sources, before any table.

Mean AUCs side by side invite a ranking the folds may not support. For each regime and pair of sources fine-tuned on
the same folds, every target's paired difference of test AUC (`paired_comparison.csv`: the corrected resampled
t-test's mean and 95 % interval) is read as one of three statements: the first source ahead (the interval lies above
0), the second ahead (below 0), or "the folds cannot tell them apart" (the interval holds 0, or none could be given).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from medtransfer.layout import PAIRED_FILE
from medtransfer.tables import read_table

TITLE = "## The answer in brief"


def difference_statement(first: str, second: str, mean: float, low: float, high: float) -> str:
    """One comparison on one target in words, with the numbers (AUC ×100) it rests on."""
    numbers = f"{100 * mean:+.1f}, 95 % {100 * low:+.1f} to {100 * high:+.1f}" if math.isfinite(high) \
        else f"{100 * mean:+.1f}, no interval" if math.isfinite(mean) else "no difference computed"
    if math.isfinite(low) and low > 0:
        return f"{first} ahead ({numbers})"
    if math.isfinite(high) and high < 0:
        return f"{second} ahead ({numbers})"
    return f"the folds cannot tell them apart ({numbers})"


def answer_section(folders: Mapping[str, Path]) -> str:
    """The section for the study's targets (`folders`: target -> its analysis folder)."""
    comparisons: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for target, folder in folders.items():
        path = folder / PAIRED_FILE
        for row in read_table(path) if path.is_file() else []:
            first, second = row["source_a"], row["source_b"]
            statement = difference_statement(first, second, _float(row["mean_difference"]), _float(row["low"]),
                                             _float(row["high"]))
            comparisons[(row["regime"], first, second)].append(f"{target}: {statement}")
    lines = [TITLE, ""]
    if not comparisons:
        lines.append("No two sources were fine-tuned on the same folds of any target: there is no comparison to "
                     "state.")
        return "\n".join(lines)
    lines += ["Each pair of sources, target by target: the mean paired difference of test AUC ×100 (first − second) "
              "with its 95 % interval over the folds (corrected resampled t-test). An interval that holds 0 means "
              "this study cannot tell the two apart on that target, whatever their means.", ""]
    for (regime, first, second), statements in sorted(comparisons.items()):
        lines.append(f"- **{first} vs {second}** ({regime}): " + "; ".join(statements) + ".")
    return "\n".join(lines)


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
