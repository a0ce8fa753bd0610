"""`summary`: the study's answer across targets, from every target's `compare` tables and the model pointers.

Written to `results/summary/` (a DVC output after the per-target compares):
- `gain_correlation.csv`: per source, regime, layer and measure, Pearson's r between similarity to the source and
  the relative test-AUC gain, pooled over every target and fold. The gain is the authors' statistic: relative to
  the random-init model fine-tuned *without* freezing on the same target and fold, whatever the regime. The mean of
  the per-target r (each target's own points, as `compare` computed it) is kept beside it.
- `cross_target_similarity.csv`: per pair group, pair, regime, layer and measure, the mean ± sd over targets of
  each target's mean over folds, next to the random-vs-random floor averaged the same way.
- `auc_table.csv`: test AUC (mean and sd over folds) per target × source × regime, with the relative gain of the
  mean over the random-init model of the same regime.
and `results/metrics/study/<source>.<regime>.json`, the study-level rows of `dvc metrics show`: per source and
regime, the mean over targets of the test AUC and of the relative gain over random init. Only these few numbers are
DVC metrics (git tracks them, so every `dvc exp run` commit holds them); the pooled r and cross-target means stay
in the CSV tables above and are logged as metrics to the summary's run and the study's MLflow parent run.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.analysis.plots import add_unreliable_legend, draw_series, is_unreliable
from medtransfer.analysis.summaries import BASELINE_REGIME, pearson
from medtransfer.layout import (
    ANALYSIS_FOLDER,
    FINETUNED_VS_FINETUNED,
    GAIN_FILE,
    PRETRAINED_VS_PRETRAINED,
    RANDOM_VS_RANDOM,
    SIMILARITY_SUMMARY_FILE,
    SOURCE_VS_FINETUNED,
    SUMMARY_FOLDER,
    pair_kind_title,
    GAIN_CORRELATION_FILE,
    CROSS_TARGET_FILE,
    AUC_TABLE_FILE,
    STUDY_METRICS_FOLDER,
)
from medtransfer.config import Config
from medtransfer.errors import DataError
from medtransfer.tables import read_table, write_table

GAIN_CORRELATION_COLUMNS = ["source", "regime", "layer", "measure", "points", "targets", "pearson_r",
                            "mean_per_target_r", "baseline"]
CROSS_TARGET_COLUMNS = ["pair_kind", "pair", "regime", "layer", "measure", "targets", "targets_with_pair", "mean", "sd",
                        "random_vs_random_mean", "random_vs_random_sd", "reliable_share"]
AUC_TABLE_COLUMNS = ["target", "source", "regime", "protocol", "folds", "folds_total", "test_auc_mean", "test_auc_sd",
                     "random_init_source",
                     "relative_gain"]
GAIN_MEASURES = ("cca", "cka")
#: The pair groups of the metrics and figures (the floor last).
MAIN_KINDS = (SOURCE_VS_FINETUNED, PRETRAINED_VS_PRETRAINED, FINETUNED_VS_FINETUNED, RANDOM_VS_RANDOM)


def stage_order(tables: dict[str, list[dict[str, str]]]) -> list[str]:
    """Every layer of the targets' tables in forward order: each table lists its layers as `compare` wrote them (the
    models' stage order, stem first); targets are merged in turn, a layer first seen later placed after the layers
    that precede it in its own table. Never sorted by name (that would run stage1 … stage4, stem)."""
    order: list[str] = []
    for rows in tables.values():
        previous = None
        for layer in dict.fromkeys(row["layer"] for row in rows):
            if layer not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, layer)
            previous = layer
    return order


def pooled_gain_correlations(gain_tables: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    """The authors' statistic from every target's `similarity_vs_gain.csv` rows (see the module docstring): one r
    per (source, regime, layer, measure) over every target's and fold's points, each point's gain as `compare` took
    it (over the random init of the model's own architecture, fine-tuned without freezing). Rows in stage order."""
    layers = stage_order(gain_tables)
    groups: dict[tuple[str, str, str], list[tuple[str, dict[str, str]]]] = defaultdict(list)
    for target, rows in gain_tables.items():
        for row in rows:
            groups[(row["source"], row["regime"], row["layer"])].append((target, row))
    result = []
    for (source, regime, layer), members in sorted(groups.items(), key=lambda item: (
            item[0][0], item[0][1], _position(layers, item[0][2]))):
        for measure in GAIN_MEASURES:
            similarity = [_float(row[measure]) for _, row in members]
            gain = [_float(row["relative_gain"]) for _, row in members]
            per_target = {target: _float(row.get(f"pearson_{measure}_layer_source", "nan")) for target, row in members}
            finite_r = [r for r in per_target.values() if math.isfinite(r)]
            usable = sum(math.isfinite(a) and math.isfinite(b) for a, b in zip(similarity, gain))
            result.append({
                "source": source, "regime": regime, "layer": layer, "measure": measure, "points": usable,
                "targets": len(per_target), "pearson_r": pearson(similarity, gain),
                "mean_per_target_r": float(np.mean(finite_r)) if finite_r else math.nan,
                "baseline": f"random init of the same architecture, {BASELINE_REGIME}",
            })
    return result


def cross_target_similarity(summaries: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    """Mean ± sd over targets of each target's fold-mean similarity, with the random-vs-random floor, and the share
    of reliable comparisons behind it (the mean of the targets' shares: below 1 when any fold of any target had
    fewer than 10 rows per channel)."""
    groups: dict[tuple[str, str, str, str, str], dict[str, tuple[float, float, float]]] = defaultdict(dict)
    for target, rows in summaries.items():
        for row in rows:
            key = (row["pair_kind"], row["pair"], row["regime"], row["layer"], row["measure"])
            groups[key][target] = (_float(row["mean"]), _float(row["random_vs_random_mean"]),
                                   _float(row.get("reliable_share", "nan")))
    layers = stage_order(summaries)
    result = []
    for (kind, pair, regime, layer, measure), by_target in sorted(groups.items(), key=lambda item: (
            *item[0][:3], item[0][4], _position(layers, item[0][3]))):
        means = [value for value, _, _ in by_target.values() if math.isfinite(value)]
        floors = [floor for _, floor, _ in by_target.values() if math.isfinite(floor)]
        shares = [share for _, _, share in by_target.values() if math.isfinite(share)]
        mean, sd = _mean_sd(means)
        floor_mean, floor_sd = _mean_sd(floors)
        result.append({"pair_kind": kind, "pair": pair, "regime": regime, "layer": layer, "measure": measure,
                       # targets: those with a finite mean; targets_with_pair: every target that has the pair
                       "targets": len(means), "targets_with_pair": len(by_target), "mean": mean, "sd": sd,
                       "random_vs_random_mean": floor_mean, "random_vs_random_sd": floor_sd,
                       "reliable_share": float(np.mean(shares)) if shares else math.nan})
    return result


def auc_table(config: Config, pointers: dict[str, list]) -> list[dict[str, Any]]:
    """Per target × source × regime: test AUC over folds (primary fits) and the relative gain over random init."""
    # The first random source by name, as `compare` picks the random-init reference of similarity vs gain.
    random_sources = sorted(name for name in config.study.sources if config.sources.get(name) is not None
                            and config.sources[name].kind == "random")
    rows = []
    for target, target_pointers in pointers.items():
        means: dict[tuple[str, str], tuple[float, float, int, int]] = {}
        protocols = {(pointer.source, pointer.regime): pointer.protocol for pointer in target_pointers}
        for pointer in target_pointers:
            fits = [fit for fit in pointer.folds if fit.seed == pointer.folds[0].seed]
            aucs = [fit.test_auc for fit in fits if fit.test_auc is not None and math.isfinite(fit.test_auc)]
            means[(pointer.source, pointer.regime)] = (*_mean_sd(aucs), len(aucs), len(fits))
        for (source, regime), (mean, sd, folds, folds_total) in sorted(means.items()):
            reference_source = next((name for name in random_sources if (name, regime) in means), "")
            reference = means.get((reference_source, regime), (math.nan,))[0]
            gain = (mean - reference) / reference if reference_source and reference else math.nan
            rows.append({"target": target, "source": source, "regime": regime,
                         "protocol": protocols[(source, regime)], "folds": folds, "folds_total": folds_total,
                         "test_auc_mean": mean,
                         "test_auc_sd": sd, "random_init_source": reference_source, "relative_gain": gain})
    return rows


def study_metrics(aucs: Sequence[dict]) -> dict[str, dict[str, float]]:
    """The study-level rows of `dvc metrics show` from `auc_table` rows, one per `<source>.<regime>`: the mean over
    targets of each target's fold-mean test AUC (`test_auc_mean`, the searches' column) and of the relative gain over
    random init (none for the baseline itself). Rows, not columns: `dvc metrics show` prints the union of every
    file's keys as columns, so a study with more sources or regimes gets longer, never wider. A number that is not
    finite is left out (JSON has no NaN; DVC shows "-"); auc_table.csv says which targets and folds stand behind it."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in aucs:
        groups[f"{row['source']}.{row['regime']}"].append(row)
    rows = {}
    for name, members in sorted(groups.items()):
        means = [row["test_auc_mean"] for row in members if math.isfinite(row["test_auc_mean"])]
        gains = [row["relative_gain"] for row in members
                 if row["random_init_source"] != row["source"] and math.isfinite(row["relative_gain"])]
        rows[name] = {**({"test_auc_mean": float(np.mean(means))} if means else {}),
                      **({"relative_gain": float(np.mean(gains))} if gains else {})}
    return rows


def summary_metrics(correlations: Sequence[dict], cross_target: Sequence[dict]) -> dict[str, float]:
    """The pooled r per source/regime/layer/measure and the cross-target mean of the main pair groups: MLflow
    metrics of the summary's run (too many for `dvc metrics show`; `study_metrics` gives its rows)."""
    metrics = {}
    for row in correlations:
        if math.isfinite(row["pearson_r"]):
            metrics[f"gain_r_{row['measure']}_{row['layer']}_{row['source']}_{row['regime']}"] = row["pearson_r"]
    for row in cross_target:
        if row["pair_kind"] in MAIN_KINDS and math.isfinite(row["mean"]):
            label = "_".join(part for part in (row["pair_kind"], row["pair"].replace(" vs ", "_vs_"), row["regime"])
                             if part)
            metrics[f"cross_target_{row['measure']}_{row['layer']}_{label}"] = row["mean"]
    return {key.replace(" ", "_"): value for key, value in metrics.items()}


def run_summary(config: Config, client=None) -> Path:
    """`medtransfer summary`: check every model it publishes against the registry and the artifact store (`client`,
    default: the configured tracking store's), write the tables (`write_summary`), then log them to MLflow; returns
    the folder."""
    started = time.time()
    _verify_published_models(config, client)
    destination, metrics = write_summary(config)
    _log_summary(config, destination, metrics, len(config.study.targets), started)
    return destination


def write_summary(config: Config) -> tuple[Path, dict[str, float]]:
    """Write results/summary/ and the study's DVC metrics from every target's analysis tables and pointers; returns the
    folder and the MLflow metrics (`summary_metrics`)."""
    from medtransfer.atomic_files import atomic_directory, restore_interrupted
    from medtransfer.pointers import pointers_for_dataset

    targets = list(config.study.targets)
    if not targets:
        raise DataError("the study names no targets", where=f"{config.source_file}: study.targets")
    analysis_root = config.resolve(ANALYSIS_FOLDER)
    summaries, gains = {}, {}
    for target in targets:
        folder = analysis_root / target
        restore_interrupted(folder)  # a compare killed while replacing its outputs is finished first
        for name in (SIMILARITY_SUMMARY_FILE, GAIN_FILE):
            if not (folder / name).is_file():
                raise DataError(f"no analysis table {name} for target '{target}'", where=str(folder),
                                fix=f"run 'medtransfer compare --dataset {target}' (or 'dvc repro')")
        summaries[target] = read_table(folder / SIMILARITY_SUMMARY_FILE)
        gains[target] = read_table(folder / GAIN_FILE)
    pointers = {target: pointers_for_dataset(config, target) for target in targets}
    correlations = pooled_gain_correlations(gains)
    cross_target = cross_target_similarity(summaries)
    aucs = auc_table(config, pointers)
    metrics = summary_metrics(correlations, cross_target)
    destination = config.resolve(SUMMARY_FOLDER)
    with atomic_directory(destination) as staging:
        write_table(staging / GAIN_CORRELATION_FILE, GAIN_CORRELATION_COLUMNS, correlations)
        write_table(staging / CROSS_TARGET_FILE, CROSS_TARGET_COLUMNS, cross_target)
        write_table(staging / AUC_TABLE_FILE, AUC_TABLE_COLUMNS, aucs)
        _write_figures(staging, cross_target, stage_order(summaries))
    with atomic_directory(config.resolve(STUDY_METRICS_FOLDER)) as staging:
        for name, row in study_metrics(aucs).items():
            (staging / f"{name}.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return destination, metrics


def _write_figures(staging: Path, cross_target: Sequence[dict], layers: Sequence[str]) -> None:
    """One figure per measure: the cross-target mean per layer (x in stage order) of each pair group, with the random
    floor; the y axis spans the measure's range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medtransfer.analysis.plots import MEASURE_RANGES

    layers = list(layers)
    for measure in sorted({row["measure"] for row in cross_target}):
        series: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
        for row in cross_target:
            if row["measure"] == measure and row["pair_kind"] in MAIN_KINDS:
                label = pair_kind_title(row["pair_kind"]) + (f": {row['pair']}" if row["pair"] else "") + \
                    (f" ({row['regime']})" if row["regime"] else "")
                series[label][row["layer"]] = (row["mean"], row["sd"], is_unreliable(row))
        if not series:
            continue
        figure, axis = plt.subplots(figsize=(10, 4.5), dpi=110)
        positions = np.arange(len(layers))
        any_hollow = False
        for label, by_layer in sorted(series.items()):
            means = np.array([by_layer.get(layer, (math.nan, math.nan, False))[0] for layer in layers])
            sds = np.nan_to_num(np.array([by_layer.get(layer, (math.nan, math.nan, False))[1] for layer in layers]))
            hollow = np.array([by_layer.get(layer, (math.nan, math.nan, False))[2] for layer in layers])
            style = {"linestyle": ":", "color": "grey"} if label.startswith(pair_kind_title(RANDOM_VS_RANDOM)) else {}
            any_hollow |= draw_series(axis, positions, means, sds, hollow, measure, capsize=3, label=label, **style)
        if any_hollow:
            add_unreliable_legend(axis)
        low, high = MEASURE_RANGES.get(measure, (0.0, 1.0))
        axis.set(xticks=positions, xticklabels=layers, xlabel="layer", ylabel=f"{measure}, mean over targets",
                 ylim=(low - 0.05 * (high - low), high + 0.05 * (high - low)),
                 title=f"{measure} across targets (error bars: sd over targets)")
        # one entry per series, outside the data
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        figure.savefig(staging / f"cross_target_{measure}.png")
        plt.close(figure)


def _verify_published_models(config: Config, client) -> None:
    """The summary publishes each target's versions and AUCs: refuse (one line) when the registry disagrees with a
    pointer or a version's weights changed in the artifact store, as `report` does."""
    from medtransfer.models.weights_check import verify_published
    from medtransfer.pointers import pointer_path, pointers_for_dataset

    if client is None:
        import mlflow

        from medtransfer.tracking import use_tracking_store

        use_tracking_store(config)
        client = mlflow.MlflowClient()
    pointers = [pointer for target in config.study.targets for pointer in pointers_for_dataset(config, target)]
    verify_published(client, pointers, lambda p: str(pointer_path(config, p.dataset, p.source, p.regime)))


def _log_summary(config: Config, folder: Path, metrics: dict[str, float], targets: int, started: float) -> None:
    """Log to the summary's own run (spanning the work since ``started``) and, under `medtransfer study`, to the
    study's parent run too."""
    import mlflow

    from medtransfer.tracking import pipeline_run_id, step_run

    with step_run(config, step="summary", run_name="summary", tags={"targets": str(targets)}, started=started):
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), artifact_path="summary")
    parent = pipeline_run_id()
    if parent and metrics:
        client = mlflow.MlflowClient()
        client.log_batch(parent, metrics=[mlflow.entities.Metric(key, value, 0, 0) for key, value in metrics.items()])


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return math.nan, math.nan
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _position(order: Sequence[str], layer: str) -> int:
    return order.index(layer) if layer in order else len(order)
