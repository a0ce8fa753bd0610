"""The across-targets section: one line for a one-target study; k of n targets where a target has no difference."""

from __future__ import annotations

import math

from medtransfer.report_statistics import across_targets_section, paired_section
from medtransfer.tables import write_table

PAIRED_COLUMNS = ["regime", "source_a", "source_b", "folds", "auc_a", "auc_b", "differences", "mean_difference",
                  "low", "high", "t", "p", "correction", "level"]


def _paired(folder, mean_difference, differences="0.01 -0.02"):
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "paired_comparison.csv", PAIRED_COLUMNS, [
        {"regime": "full", "source_a": "medical", "source_b": "natural", "folds": 2, "auc_a": 0.7, "auc_b": 0.7,
         "differences": differences, "mean_difference": mean_difference, "low": -0.1, "high": 0.1, "t": 0.1,
         "p": 0.9, "correction": 0.25, "level": 0.95}])
    return folder


def test_a_target_without_a_difference_is_counted_as_k_of_n(tmp_path, markdown_table):
    folders = {"a": _paired(tmp_path / "a", 0.02), "b": _paired(tmp_path / "b", math.nan), "c": _paired(tmp_path / "c", -0.04)}
    text = across_targets_section(folders)
    (row,) = markdown_table(text, "## Across targets: Wilcoxon signed-rank test on the per-target mean differences")
    assert row["targets"] == "2 of 3" and row["first better on"] == "1 of 2"
    assert row["mean difference ×100"] == "-1.0"


def test_an_undefined_fold_difference_prints_a_dash_not_nan(tmp_path):
    folder = _paired(tmp_path / "t", 0.01, differences="0.01 nan")
    write_table(folder / "auc_intervals.csv", ["source", "regime", "fold", "model", "images", "test_auc", "test_auc_low",
                                               "test_auc_high", "resamples", "level"], [])
    section = paired_section("t", folder)
    assert "+1.0, –" in section and "nan" not in section.lower()
