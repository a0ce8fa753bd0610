"""`report`: reports/report.md and its figures — the study's answer, every number read from computed outputs.

Sections: test AUC (×100, mean ± sd over folds) per target × source × regime in the paper's layout; layer-wise
similarity of each pair group with its noise floors (random-vs-random networks and shuffled images);
prediction similarity (observed error agreement against its chance level); similarity versus gain; and the
provenance of every number (data fingerprints, registered model versions, code revision). Nothing is typed by
hand: the tables come from the pointer files (`results/models/*.json`) and the analysis CSVs
(`results/analysis/<dataset>/`), the figures are copied from the analysis.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

from medtransfer.layout import (
    ANALYSIS_FOLDER,
    AUC_INTERVAL_FILE,
    CONV1_FIGURE_FILE,
    GAIN_FIGURE_FILE,
    GAIN_FILE,
    LAYER_FIGURE_FILE,
    POINTER_FOLDER,
    PREDICTION_FIGURE_FILE,
    PREDICTIONS_FILE,
    REPORT_FIGURES_FOLDER,
    REPORT_FILE,
    REPORT_HTML_FILE,
    REPORT_FOLDER,
    PAIR_KIND_TITLES,
    PAIRED_FILE,
    FINETUNED_VS_FINETUNED,
    FINETUNED_VS_RANDOM_INIT,
    FOLD_TO_FOLD,
    PRETRAINED_VS_PRETRAINED,
    PRETRAINED_VS_RANDOM,
    RANDOM_VS_RANDOM,
    SHUFFLED,
    SIMILARITY_SUMMARY_FILE,
    STAGE_MATCH_FILE,
    SOURCE_VS_FINETUNED,
    SUMMARY_FOLDER,
)
from medtransfer.analysis.stage_matching import cross_architecture_matches
from medtransfer.atomic_files import atomic_directory, restore_interrupted
from medtransfer.report_answer import answer_section
from medtransfer.report_similarity_cells import interval_legend, similarity_cell, unreliable_legend, unreliable_mark
from medtransfer.report_cells import UNDEFINED_REASONS, as_float, as_int, finite_values, mean_sd_cell, shortfall_legend
from medtransfer.report_paper import paper_section_for_study
from medtransfer.report_html import render_report_html
from medtransfer.revision import code_revision
from medtransfer.report_statistics import across_targets_section, paired_section
from medtransfer.report_summary import study_section
from medtransfer.config import Config
from medtransfer.errors import DataError
from medtransfer.pointers import ModelPointer, pointer_path, pointers_for_dataset

SIMILARITY_GROUPS = tuple((kind, PAIR_KIND_TITLES[kind]) for kind in (
    SOURCE_VS_FINETUNED,
    PRETRAINED_VS_PRETRAINED,
    FINETUNED_VS_FINETUNED,
    PRETRAINED_VS_RANDOM,
    FINETUNED_VS_RANDOM_INIT,
    FOLD_TO_FOLD,
    RANDOM_VS_RANDOM,
))


def write_and_log_report(config: Config) -> Path:
    """`medtransfer report`: `run_report`, then its folder logged to a `report` run spanning the work."""
    from medtransfer.tracking import log_report

    started = time.time()
    report = run_report(config)
    log_report(config, report, started=started)
    return report


def run_report(config: Config, client=None) -> Path:
    """Write reports/report.md (+ figures, + report.html with the figures embedded) for the study's targets; returns the report file.

    Every pointer is checked against the registry (`client`, default: the configured tracking store's) before
    anything is written, as `extract` does: a report must not name versions the registry does not hold."""
    targets = config.study.targets
    if not targets:
        raise DataError("the study names no targets", where=f"{config.source_file}: study.targets")
    analysis_root = config.resolve(ANALYSIS_FOLDER)
    pointers = {target: pointers_for_dataset(config, target) for target in targets}
    missing = [target for target in targets if not pointers[target]]
    if missing:
        raise DataError(
            f"no registered models for target '{missing[0]}'",
            where=str(config.resolve(POINTER_FOLDER)),
            fix="run the searches first ('dvc repro' or 'medtransfer search ...')",
        )
    _verify_pointers(config, pointers, client)
    for target in targets:
        restore_interrupted(analysis_root / target)  # a compare killed while replacing its outputs is finished first
        # Each table must be there: a missing one would read as an empty section ("nothing to compare").
        tables = (SIMILARITY_SUMMARY_FILE, PREDICTIONS_FILE, GAIN_FILE, AUC_INTERVAL_FILE, PAIRED_FILE)
        absent = [name for name in tables if not (analysis_root / target / name).is_file()]
        if absent:
            what = f"no analysis for target '{target}'" if len(absent) == len(tables) else \
                f"the analysis of target '{target}' lacks {', '.join(absent)}"
            raise DataError(
                what,
                where=str(analysis_root / target),
                fix=f"run 'medtransfer extract --dataset {target}' and 'medtransfer compare --dataset {target}'",
            )
    destination = config.resolve(REPORT_FOLDER)
    with atomic_directory(destination) as staging:
        figures = staging / REPORT_FIGURES_FOLDER
        figures.mkdir()
        sections = [_header(config),
                    answer_section({target: analysis_root / target for target in targets}),
                    study_section(config.resolve(SUMMARY_FOLDER), list(targets), figures),
                    _auc_section(config, pointers),
                    across_targets_section({target: analysis_root / target for target in targets})]
        beside_the_paper = paper_section_for_study(config, pointers, analysis_root)
        if beside_the_paper:
            sections.insert(4, beside_the_paper)
        for target in targets:
            folder = analysis_root / target
            sections.append(paired_section(target, folder))
            sections.append(_similarity_section(target, folder, figures))
            sections.append(_predictions_section(target, folder, figures))
            sections.append(_gain_section(target, folder, figures))
        sections.append(_provenance_section(config, pointers))
        markdown = "\n\n".join(sections) + "\n"
        (staging / REPORT_FILE).write_text(markdown, encoding="utf-8")
        (staging / REPORT_HTML_FILE).write_text(
            render_report_html(markdown, staging, f"medtransfer study report — {config.project.profile}"),
            encoding="utf-8")
    return destination / REPORT_FILE


def _verify_pointers(config: Config, pointers: dict[str, list[ModelPointer]], client) -> None:
    if client is None:
        import mlflow

        from medtransfer.tracking import use_tracking_store

        use_tracking_store(config)
        client = mlflow.MlflowClient()
    from medtransfer.models.weights_check import verify_published

    verify_published(client, [pointer for target_pointers in pointers.values() for pointer in target_pointers],
                     lambda pointer: str(pointer_path(config, pointer.dataset, pointer.source, pointer.regime)))


# -- sections ------------------------------------------------------------------------------------------------------


def _header(config: Config) -> str:
    profile = config.project.profile
    targets = [f"- `{name}`: {config.datasets[name].description or 'no description'}"
               for name in config.study.targets if name in config.datasets]
    return (
        f"# medtransfer study report — profile `{profile}`\n\n"
        f"{config.project.description}\n\n"
        + ("Targets:\n\n" + "\n".join(targets) + "\n\n" if targets else "")
        + f"Every number below is read from the study's outputs (the registry pointers in `{POINTER_FOLDER}/` and the "
        f"analysis tables in `{ANALYSIS_FOLDER}/`); rerun `medtransfer report` after the pipeline changes."
    )


def _auc_section(config: Config, pointers: dict[str, list[ModelPointer]]) -> str:
    columns = [(source, regime) for source in config.study.sources for regime in config.study.regimes]
    header = "| target | " + " | ".join(_column_name(source, regime) for source, regime in columns) + " |"
    from medtransfer.train.protocols import PROTOCOL_DESCRIPTIONS

    used = sorted({pointer.protocol for target_pointers in pointers.values() for pointer in target_pointers})
    # One protocol: said once above the table; several: each cell names its own, so no AUC is read for another's.
    tag_cells = len(used) > 1
    lines = [
        "## Test AUC ×100 (mean ± sd over folds)",
        "",
        "Each cell: a model fit on every fold and scored once on the fold's test part (validation drove early "
        "stopping). Layout as the paper's table.",
        "",
        *[f"- protocol `{name}`{' (named in each cell)' if tag_cells else ' (every cell)'}: "
          f"{PROTOCOL_DESCRIPTIONS.get(name, 'a fixed preset')}" for name in used],
        "",
        header,
        "|" + "---|" * (len(columns) + 1),
    ]
    short = []
    for target, target_pointers in pointers.items():
        by_key = {(p.source, p.regime): p for p in target_pointers}
        cells = []
        for key in columns:
            pointer = by_key.get(key)
            aucs = [fit.test_auc for fit in pointer.folds] if pointer else []
            cell = mean_sd_cell(aucs, expected=len(aucs), digits=1, scale=100, reason=UNDEFINED_REASONS["test_auc"])
            if len(finite_values(aucs)) < len(aucs):
                short.append(UNDEFINED_REASONS["test_auc"])
            cells.append(f"{cell} ({pointer.protocol})" if tag_cells and finite_values(aucs) else cell)
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += shortfall_legend(short)
    return "\n".join(lines)


def _similarity_section(target: str, folder: Path, figures: Path) -> str:
    rows = _read_csv(folder / SIMILARITY_SUMMARY_FILE)
    # The layers as compare wrote them, in the manifest's (forward) order: each pair's rows run through them all.
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    lines = [f"## Layer-wise similarity — {target}"]
    lines += _stage_matching_lines(folder)
    for measure, title in (("cca", "mean CCA"), ("cka", "linear CKA"), ("procrustes_similarity", "Procrustes "
                           "similarity 1 − d²/2"), ("shape_0.5", "angular shape similarity 1 − 2θ/π, α = 0.5")):
        selected = [row for row in rows if row["measure"] == measure]
        if not selected:
            continue
        lines += ["", f"### {title} (mean ± sd over folds [95 % interval])", "",
                  "| pair | regime | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 2)]
        table = defaultdict(dict)
        for row in selected:
            table[(row["pair_kind"], row["pair"], row["regime"])][row["layer"]] = row
        order = {kind: index for index, (kind, _) in enumerate(SIMILARITY_GROUPS)}
        random_floors = len({key for key in table if key[0] == RANDOM_VS_RANDOM})
        for (kind, pair, regime), by_layer in sorted(table.items(), key=lambda item: (order.get(item[0][0], 99), item[0])):
            if kind not in order:
                continue
            named = kind != RANDOM_VS_RANDOM or random_floors > 1  # several architectures: several random floors
            label = dict(SIMILARITY_GROUPS)[kind] + (f": {pair}" if pair and named else "")
            cells = [similarity_cell(by_layer[layer]) if layer in by_layer else "–" for layer in layers]
            lines.append(f"| {label} | {regime or '–'} | " + " | ".join(cells) + " |")
        floors = {}
        for row in selected:
            if row["pair_kind"] == SHUFFLED and row["layer"] not in floors and row["shuffled_mean"] not in ("", "nan"):
                floors[row["layer"]] = mean_sd_cell([as_float(row["shuffled_mean"])], sd=as_float(row["shuffled_sd"])) \
                    + unreliable_mark(row)
        if floors:
            lines.append(f"| {PAIR_KIND_TITLES[SHUFFLED]} | – | " + " | ".join(floors.get(layer, "–") for layer in layers) + " |")
        lines += interval_legend(selected)
        lines += unreliable_legend(selected, measure)
        lines += shortfall_legend("not finite on that fold" for row in selected
                                  if as_int(row.get("count")) is not None and as_int(row.get("folds")) is not None
                                  and as_int(row["count"]) < as_int(row["folds"]))
        lines += _embed_figure(folder / LAYER_FIGURE_FILE.format(measure=measure), target, figures, f"{title} per layer, {target}")
    return "\n".join(lines)


def _stage_matching_lines(folder: Path) -> list[str]:
    """Where pairs span two architectures: which stages were compared (by reduction) and which have no partner."""
    path = folder / STAGE_MATCH_FILE
    matches = cross_architecture_matches(_read_csv(path)) if path.exists() else []
    if not matches:
        return []
    lines = ["", "Pairs across architectures compare stages of equal reduction (stride from the input); their cells "
                 "stand under the first model's stage. Stages without a partner are not compared:", "",
             "| architecture a | architecture b | compared (a~b, reduction) | without partner |", "|---|---|---|---|"]
    lines += [f"| {arch_a} | {arch_b} | {', '.join(compared) or '–'} | {', '.join(alone) or '–'} |"
              for arch_a, arch_b, compared, alone in matches]
    return lines


def _predictions_section(target: str, folder: Path, figures: Path) -> str:
    rows = _read_csv(folder / PREDICTIONS_FILE)
    lines = [
        f"## Prediction similarity — {target}",
        "",
        "Error agreement: share of test images both models get right or both get wrong; chance: p₁p₂ + (1−p₁)(1−p₂) "
        "for independent classifiers with those accuracies; error consistency: Cohen's κ of the two (Geirhos et al. "
        "2020). Mean ± sd over folds.",
        "",
        "| pair | regime | error agreement | chance | error consistency κ | label κ | JSD (bits) |",
        "|---|---|---|---|---|---|---|",
    ]
    grouped = defaultdict(list)
    for row in rows:
        grouped[(row["pair"], row["regime"])].append(row)
    short = []
    for (pair, regime), group in sorted(grouped.items()):
        def stat(key: str) -> str:
            values = [as_float(row[key]) for row in group]
            if len(finite_values(values)) < len(values):
                short.append(UNDEFINED_REASONS.get(key, ""))
            return mean_sd_cell(values, expected=len(values), reason=UNDEFINED_REASONS.get(key, ""))

        lines.append(f"| {pair} | {regime} | {stat('error_agreement')} | {stat('error_agreement_chance')} | "
                     f"{stat('error_consistency')} | {stat('label_kappa')} | {stat('jensen_shannon')} |")
    if not grouped:
        lines.append("| (no two fine-tuned sources share a fold and regime) | | | | | | |")
    lines += shortfall_legend(short)
    lines += _embed_figure(folder / PREDICTION_FIGURE_FILE, target, figures, f"prediction agreement, {target}")
    return "\n".join(lines)


def _gain_section(target: str, folder: Path, figures: Path) -> str:
    rows = _read_csv(folder / GAIN_FILE)
    lines = [
        f"## Similarity vs gain — {target}",
        "",
        "Per layer: similarity between each fine-tuned model and its source, against the relative test-AUC gain over "
        "the random-init model of the same fold and architecture fine-tuned without freezing (the authors' "
        "definition, for every regime); Pearson r per source and regime over its folds (the authors' statistic; "
        "never pooled over sources or regimes).",
        "",
        "| layer | source | regime | points | r (mean CCA) | r (CKA) |",
        "|---|---|---|---|---|---|",
    ]
    seen = set()
    for row in rows:
        key = (row["layer"], row["source"], row["regime"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {row['layer']} | {row['source']} | {row['regime'] or '–'} | "
                     f"{row.get('points_layer_source', '')} | {_fmt(as_float(row.get('pearson_cca_layer_source')))} | "
                     f"{_fmt(as_float(row.get('pearson_cka_layer_source')))} |")
    if not seen:
        lines.append("| (needs fine-tuned models from a random initialisation) | | | | | |")
    elif any(not math.isfinite(as_float(row.get("pearson_cca_layer_source"))) for row in rows):
        lines += ["", "– : r needs at least 3 points with spread (folds of one source and regime)."]
    lines += _embed_figure(folder / GAIN_FIGURE_FILE, target, figures, f"similarity vs gain, {target}")
    lines += _embed_figure(folder / CONV1_FIGURE_FILE, target, figures,
                           f"first-layer filters of every source and random initialisation, {target}")
    return "\n".join(lines)


def _embed_figure(figure: Path, target: str, figures: Path, caption: str) -> list[str]:
    """Copy an analysis figure into the report's figures/ (prefixed with its target) and return the Markdown lines
    that show it; nothing when the analysis did not draw it."""
    if not figure.is_file():
        return []
    name = f"{target}_{figure.name}"
    shutil.copyfile(figure, figures / name)
    return ["", f"![{caption}]({REPORT_FIGURES_FOLDER}/{name})"]


def _provenance_section(config: Config, pointers: dict[str, list[ModelPointer]]) -> str:
    lines = [
        "## Provenance",
        "",
        f"- code revision: `{code_revision(config.root)}`",
        f"- params: `{config.source_file.name}` (profile `{config.project.profile}`)",
        "",
        "| registered model | fold versions | source version | data fingerprint | study |",
        "|---|---|---|---|---|",
    ]
    for target_pointers in pointers.values():
        for pointer in target_pointers:
            versions = ", ".join(f"{fit.alias}=v{fit.version}" for fit in pointer.folds)
            lines.append(f"| {pointer.registered_model} | {versions} | {pointer.source_model} v{pointer.source_version} | "
                         f"`{pointer.data_fingerprint[:16]}…` | {pointer.study} |")
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------------------------------


def _column_name(source: str, regime: str) -> str:
    return source if regime == "full" else f"{source} {regime}"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
