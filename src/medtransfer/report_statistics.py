"""The report's answer to "do the sources differ beyond fold noise?": per target, each fold's test AUC with its
bootstrap interval and the paired differences with the corrected resampled t-test; across targets, the
signed-rank test on the per-target mean differences (or why none is given). Every number is read from the
`compare` tables `auc_intervals.csv` and `paired_comparison.csv`."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from medtransfer.analysis.paired_statistics import WILCOXON_MIN_TARGETS, wilcoxon_across_targets
from medtransfer.layout import AUC_INTERVAL_FILE, PAIRED_FILE
from medtransfer.tables import read_table


def paired_section(target: str, folder: Path) -> str:
    intervals = read_table(folder / AUC_INTERVAL_FILE)
    paired = read_table(folder / PAIRED_FILE)
    lines = [f"## Do the sources differ beyond fold noise? — {target}", ""]
    if intervals:
        folds = sorted({int(row["fold"]) for row in intervals})
        resamples = intervals[0]["resamples"]
        lines += [f"Test AUC ×100 of each fold, with a 95 % bootstrap interval over the fold's test images "
                  f"({resamples} stratified resamples):", "",
                  "| source | regime | " + " | ".join(f"fold {fold}" for fold in folds) + " |",
                  "|" + "---|" * (len(folds) + 2)]
        table: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
        for row in intervals:
            table[(row["source"], row["regime"])][int(row["fold"])] = row
        for (source, regime), by_fold in sorted(table.items()):
            cells = [_auc_cell(by_fold[fold]) if fold in by_fold else "–" for fold in folds]
            lines.append(f"| {source} | {regime} | " + " | ".join(cells) + " |")
        lines.append("")
    if not paired:
        lines.append("No two sources were fine-tuned on the same folds in the same regime: nothing to pair.")
        return "\n".join(lines)
    correction = _float(paired[0]["correction"])
    lines += [
        "Paired differences of test AUC ×100 (first − second source, fold by fold): the mean with a 95 % interval "
        "and the two-sided p of the corrected resampled t-test (Nadeau & Bengio 2003), whose variance term "
        f"1/k + n_test/n_train (here n_test/n_train = {correction:.3f}) accounts for the folds' overlapping "
        "training sets. An interval that contains 0 means the folds cannot tell the sources apart.",
        "",
        "| regime | first − second | folds | per-fold differences | mean | 95 % interval | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in paired:
        differences = ", ".join(_scaled(value, signed=True) for value in row["differences"].split())
        lines.append(f"| {row['regime']} | {row['source_a']} − {row['source_b']} | {row['folds']} | {differences} | "
                     f"{_scaled(row['mean_difference'], signed=True)} | "
                     f"{_scaled(row['low'], signed=True)} to {_scaled(row['high'], signed=True)} | {_p(row['p'])} |")
    return "\n".join(lines)


def across_targets_section(folders: dict[str, Path]) -> str:
    """The signed-rank test over targets of each (regime, pair)'s mean difference (Demšar 2006)."""
    per_pair: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for target, folder in folders.items():
        for row in read_table(folder / PAIRED_FILE):
            per_pair[(row["regime"], row["source_a"], row["source_b"])][target] = _float(row["mean_difference"])
    lines = ["## Across targets: Wilcoxon signed-rank test on the per-target mean differences", ""]
    if len(folders) < 2:  # a test over targets needs targets: say so once instead of a table of empty rows
        lines.append(f"Needs two or more targets (at least {WILCOXON_MIN_TARGETS} for p < 0.05); this study has "
                     f"{len(folders)}. The paired comparison of each target below compares its sources fold by fold.")
        return "\n".join(lines)
    if not per_pair:
        lines.append("No target pairs two sources on the same folds.")
        return "\n".join(lines)
    lines += [f"Each target counts once (its mean AUC difference over folds), as Demšar (2006) recommends for "
              f"comparing two methods over several data sets; with fewer than {WILCOXON_MIN_TARGETS} targets no "
              "exact two-sided p can reach 0.05, so none is given.", "",
              "| regime | first − second | targets | first better on | mean difference ×100 | W | p |",
              "|---|---|---|---|---|---|---|"]
    for (regime, source_a, source_b), by_target in sorted(per_pair.items()):
        values = [value for value in by_target.values() if math.isfinite(value)]
        result = wilcoxon_across_targets(values)
        wins = sum(value > 0 for value in values)
        mean = sum(values) / len(values) if values else math.nan
        if result.reason:
            statistic, p = "–", f"none: {result.reason}"
        else:
            statistic, p = f"{result.statistic:g}", _p(result.p)
        count = f"{len(values)}" + (f" of {len(by_target)}" if len(values) < len(by_target) else "")
        lines.append(f"| {regime} | {source_a} − {source_b} | {count} | {wins} of {len(values)} | "
                     f"{_scaled(mean, signed=True)} | {statistic} | {p} |")
    return "\n".join(lines)


def _auc_cell(row: dict[str, str]) -> str:
    low, high = _float(row["test_auc_low"]), _float(row["test_auc_high"])
    point = _scaled(row["test_auc"])
    return f"{point} ({_scaled(low)}–{_scaled(high)})" if math.isfinite(low) and math.isfinite(high) else point


def _scaled(value, signed: bool = False) -> str:
    number = _float(value) * 100
    if not math.isfinite(number):
        return "–"
    return f"{number:+.1f}" if signed else f"{number:.1f}"


def _p(value) -> str:
    number = _float(value)
    if not math.isfinite(number):
        return "–"
    return "< 0.001" if number < 0.001 else f"{number:.3f}"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
