"""The report's opening, study-level section, read from `results/summary/` (see `analysis/study_summary.py`):
test AUC of every target with the relative gain over random init; with two or more targets, the authors'
similarity-vs-gain correlation pooled per source and the cross-target similarity means next to the random floor."""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

from medtransfer.layout import (
    PAIR_KIND_TITLES,
    FINETUNED_VS_FINETUNED,
    PRETRAINED_VS_PRETRAINED,
    RANDOM_VS_RANDOM,
    SOURCE_VS_FINETUNED,
    AUC_TABLE_FILE,
    CROSS_TARGET_FILE,
    GAIN_CORRELATION_FILE,
)
from medtransfer.analysis.plots import UNRELIABLE_MARK, is_unreliable
from medtransfer.analysis.study_summary import stage_order
from medtransfer.analysis.similarity import RELIABLE_ROWS_PER_CHANNEL
from medtransfer.errors import DataError
from medtransfer.report_cells import UNDEFINED_REASONS, as_float, as_int, mean_sd_cell, shortfall_legend, shortfall_note
from medtransfer.tables import read_table

MAIN_GROUPS = tuple((kind, PAIR_KIND_TITLES[kind]) for kind in (
    SOURCE_VS_FINETUNED,
    PRETRAINED_VS_PRETRAINED,
    FINETUNED_VS_FINETUNED,
    RANDOM_VS_RANDOM,
))


def study_section(folder: Path, targets: list[str], figures: Path) -> str:
    tables = (AUC_TABLE_FILE, GAIN_CORRELATION_FILE, CROSS_TARGET_FILE)
    absent = [name for name in tables if not (folder / name).is_file()]
    if absent:
        raise DataError(f"the study summary lacks {', '.join(absent)}", where=str(folder),
                        fix="run 'medtransfer summary' (or 'dvc repro')")
    lines = ["## The study across targets", ""]
    lines += _auc_table(read_table(folder / AUC_TABLE_FILE))
    if len(targets) < 2:
        lines += ["", f"The cross-target view (similarity vs gain pooled over targets, similarity averaged over "
                      f"targets) needs more than one target; this study has one ({targets[0]}). Its per-target "
                      "sections follow."]
        return "\n".join(lines)
    correlations = read_table(folder / GAIN_CORRELATION_FILE)
    cross_target = read_table(folder / CROSS_TARGET_FILE)
    # stage order, merged over the pair groups (a group may lack a stage); never sorted by name
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for row in cross_target:
        groups[(row["pair_kind"], row["pair"], row["regime"], row["measure"])].append(row)
    layers = stage_order(groups)
    for measure, title in (("cca", "mean CCA"), ("cka", "linear CKA")):
        lines += _gain_table(correlations, measure, title, layers)
        lines += _cross_target_table(cross_target, measure, title, layers, len(targets))
        figure = folder / f"cross_target_{measure}.png"
        if figure.is_file():
            shutil.copyfile(figure, figures / f"study_{figure.name}")
            lines += ["", f"![{title} across targets](figures/study_{figure.name})"]
    return "\n".join(lines)


def _auc_table(rows: list[dict[str, str]]) -> list[str]:
    lines = ["Test AUC ×100 per target (mean ± sd over folds) and the relative gain of the mean over the random-init "
             "model fine-tuned in the same regime; the protocol column names how each was trained (`search`: the "
             "best configuration of an Optuna search; a preset such as `paper`: that fixed protocol):", "",
             "| target | source | regime | protocol | folds | test AUC | gain over random init |",
             "|---|---|---|---|---|---|---|"]
    short: list[str] = []
    for row in rows:
        mean, sd, gain = as_float(row["test_auc_mean"]), as_float(row["test_auc_sd"]), as_float(row["relative_gain"])
        count, total = as_int(row.get("folds")), as_int(row.get("folds_total"))
        auc = mean_sd_cell([mean], sd=sd, digits=1, scale=100)
        if auc != "–" and count is not None and total is not None:
            auc += shortfall_note(count, total, reason=UNDEFINED_REASONS["test_auc"])
            short += [UNDEFINED_REASONS["test_auc"]] if count < total else []
        relative = "–" if not math.isfinite(gain) else f"{100 * gain:+.1f} %"
        if row.get("random_init_source") == row["source"]:
            relative = "(the baseline)"  # the random init against itself: no gain to report
        protocol = row.get("protocol") or "search"  # summaries written before the protocol was recorded
        lines.append(f"| {row['target']} | {row['source']} | {row['regime']} | {protocol} | {row['folds']} | {auc} | "
                     f"{relative} |")
    return lines + shortfall_legend(short)


def _gain_table(rows: list[dict[str, str]], measure: str, title: str, layers: list[str]) -> list[str]:
    selected = [row for row in rows if row["measure"] == measure]
    if not selected:
        return []
    table: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for row in selected:
        table[(row["source"], row["regime"])][row["layer"]] = row
    lines = ["", f"### Similarity ({title}) to the source vs relative gain, pooled over targets and folds", "",
             "Pearson r between each fine-tuned model's similarity to its source and its relative test-AUC gain over "
             "the random-init model fine-tuned without freezing (the authors' statistic), over every target and "
             "fold; in brackets the mean of the per-target r.", "",
             "| source | regime | points | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 3)]
    for (source, regime), by_layer in sorted(table.items()):
        points = max(int(row["points"]) for row in by_layer.values())
        cells = []
        for layer in layers:
            row = by_layer.get(layer)
            if row is None:
                cells.append("–")
                continue
            pooled, per_target = as_float(row["pearson_r"]), as_float(row["mean_per_target_r"])
            cell = "–" if not math.isfinite(pooled) else f"{pooled:.2f}"
            cells.append(cell + (f" ({per_target:.2f})" if math.isfinite(per_target) else ""))
        lines.append(f"| {source} | {regime} | {points} | " + " | ".join(cells) + " |")
    return lines


def _cross_target_table(rows: list[dict[str, str]], measure: str, title: str, layers: list[str],
                        targets: int) -> list[str]:
    order = {kind: index for index, (kind, _) in enumerate(MAIN_GROUPS)}
    selected = [row for row in rows if row["measure"] == measure and row["pair_kind"] in order]
    if not selected:
        return []
    table: dict[tuple[str, str, str], dict[str, dict]] = defaultdict(dict)
    for row in selected:
        table[(row["pair_kind"], row["pair"], row["regime"])][row["layer"]] = row
    lines = ["", f"### {title} per layer, mean ± sd over the {targets} targets", "",
             "| pair | regime | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 2)]
    short: list[str] = []
    for (kind, pair, regime), by_layer in sorted(table.items(), key=lambda item: (order[item[0][0]], item[0])):
        label = dict(MAIN_GROUPS)[kind] + (f": {pair}" if pair and kind != RANDOM_VS_RANDOM else "")
        cells = []
        for layer in layers:
            row = by_layer.get(layer)
            mean, sd = (as_float(row["mean"]), as_float(row["sd"])) if row else (math.nan, math.nan)
            mark = UNRELIABLE_MARK if row and is_unreliable(row) else ""
            cell = mean_sd_cell([mean], sd=sd)
            count, total = (as_int(row.get("targets")), as_int(row.get("targets_with_pair"))) if row else (None, None)
            if cell != "–" and count is not None and total is not None:
                cell += shortfall_note(count, total, unit="targets")
                short += ["not finite on that target"] if count < total else []
            cells.append(cell if cell == "–" else cell + mark)
        lines.append(f"| {label} | {regime or '–'} | " + " | ".join(cells) + " |")
    if any(is_unreliable(row) for row in selected):
        lines += ["", f"{UNRELIABLE_MARK} unreliable: in at least one fold of at least one target the comparison had "
                      f"fewer than {RELIABLE_ROWS_PER_CHANNEL} rows per compared channel, where canonical correlations "
                      "are biased towards 1."]
    return lines + shortfall_legend(short, unit="targets")
