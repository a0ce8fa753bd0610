"""Cells that average over folds or targets: the mean and sd of the defined values, and how many there are."""

from __future__ import annotations

import math
import statistics

from medtransfer.report_cells import mean_sd_cell, shortfall_legend, shortfall_note


def test_every_value_defined_gives_mean_and_sd_alone():
    values = [0.2, 0.5, 0.9]
    assert mean_sd_cell(values, expected=3) == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_undefined_values_are_left_out_and_counted():
    cell = mean_sd_cell([0.91, math.nan], expected=2, reason="κ undefined")
    assert cell == "0.91 (1 of 2 folds; κ undefined)"
    assert mean_sd_cell([0.4, None, 0.6, math.inf], expected=4, unit="targets") == (
        f"0.50 ± {statistics.stdev([0.4, 0.6]):.2f} (2 of 4 targets)")


def test_nothing_defined_is_a_dash_and_scale_and_given_sd_apply():
    assert mean_sd_cell([math.nan, None], expected=2) == "–"
    assert mean_sd_cell([0.5], sd=0.25, digits=1, scale=100) == "50.0 ± 25.0"
    assert mean_sd_cell([0.5], sd=math.nan) == "0.50"


def test_note_and_legend_only_when_short():
    assert shortfall_note(3, 3) == "" and shortfall_note(3, None) == ""
    assert shortfall_note(0, 2, unit="targets") == " (0 of 2 targets)"
    assert shortfall_legend([]) == []
    (_, line) = shortfall_legend(["a", "b", "a"])
    assert line.endswith("(a; b).") and "not counted as zero" in line
