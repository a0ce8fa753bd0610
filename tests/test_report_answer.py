"""The report's first screen states each comparison in words from its interval, never from the means alone."""

from __future__ import annotations

import math

from medtransfer.report_answer import answer_section, difference_statement
from medtransfer.tables import write_table

COLUMNS = ["regime", "source_a", "source_b", "mean_difference", "low", "high"]


def test_an_interval_holding_zero_cannot_tell_the_sources_apart_whatever_the_mean():
    assert difference_statement("medical", "natural", 0.041, -0.395, 0.477) == (
        "the folds cannot tell them apart (+4.1, 95 % -39.5 to +47.7)")
    assert difference_statement("medical", "natural", 0.05, 0.01, 0.09).startswith("medical ahead (+5.0")
    assert difference_statement("medical", "natural", -0.05, -0.09, -0.01).startswith("natural ahead (-5.0")
    assert difference_statement("a", "b", 0.02, math.nan, math.nan) == (
        "the folds cannot tell them apart (+2.0, no interval)")


def test_the_section_lists_every_pair_target_by_target(tmp_path):
    folders = {}
    for target, (low, high) in (("fundus", (-0.3, 0.4)), ("breast", (-0.2, -0.05))):
        folders[target] = tmp_path / target
        folders[target].mkdir()
        write_table(folders[target] / "paired_comparison.csv", COLUMNS, [
            {"regime": "full", "source_a": "medical", "source_b": "natural", "mean_difference": (low + high) / 2,
             "low": low, "high": high}])
    section = answer_section(folders)
    assert section.startswith("## The answer in brief")
    assert ("- **medical vs natural** (full): fundus: the folds cannot tell them apart (+5.0, 95 % -30.0 to +40.0); "
            "breast: natural ahead (-12.5, 95 % -20.0 to -5.0).") in section


def test_without_pairs_the_section_says_so(tmp_path):
    assert "there is no comparison to state" in answer_section({"t": tmp_path})
