"""`compare --dataset NAME`: every pair × layer × measure from the saved activations, the prediction similarity of
the fine-tuned models, and similarity against transfer gain; tables, figures and one MLflow run.

Reads only `activations/<NAME>/` (written by `extract`): no network is loaded, and the registry is not needed.
The pairs come from `pairs.plan_pairs` over the manifest's model list (see pairs.py for the kinds). Each pair's two
memory-mapped matrices are streamed in row chunks through `similarity.SimilarityAccumulator` (float64 statistics,
memory O(channels²), not O(rows)).

Controls on every layer: the `identity` pair (a model against itself: 1), `random_vs_random` (two random
initialisations) and `shuffled` (a `source_vs_finetuned` pair with one side's images permuted, whole images at a
time, so that no image meets itself: the similarity that finite samples give without any correspondence). Each
row also carries its rows-per-channel ratio n / max(c_a, c_b) and the engine's reliability flag (n ≥ 10 × kept
channels, the CCA family's condition; CKA rows carry the same flag for the layer).

Channel sampling (`analysis.channel_sample` > 0): `channel_repeats` draws of that many channels per side (the same
indices on both sides when the channel counts match), seeded by (analysis.seed, fold, layer) so that every pair
of a fold and layer uses the same draws; the measures are averaged over the draws. 0 compares all channels.

Outputs, written together into `results/analysis/<NAME>/` (atomically):

* `similarity.csv`: one row per pair × layer × measure (controls included), columns `SIMILARITY_COLUMNS`;
* `similarity_summary.csv`: mean ± sd over folds per pair group × layer × measure, with the random-vs-random and
  shuffled noise floors of that layer and measure alongside, columns `SUMMARY_COLUMNS`;
* `predictions.csv`: prediction similarity of fine-tuned models of different sources, same fold and regime,
  columns `PREDICTION_COLUMNS` (see predictions.py);
* `similarity_vs_gain.csv`: per non-random source, regime, fold and layer, mean CCA and linear CKA of the
  fine-tuned model vs its source against its relative test-AUC gain over the random-init fine-tuned model of the
  same fold and regime, (AUC − AUC_random) / AUC_random, with Pearson's r per layer over all points and per
  source (NaN with fewer than 3 points), columns `GAIN_COLUMNS`;
* PNGs: `layers_<measure>.png`, `prediction_agreement.png`, `conv1_<source>.png`, `similarity_vs_gain.png`.

All of it is logged to one MLflow run (nested under the active run, if any): tags `step=compare`, `dataset`, and
`model.<model_key>=<version>` per model used; artifacts under `analysis/`; summary metrics such as
`cca_stage4_source_vs_finetuned_<source>_<regime>`.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.layout import (
    ANALYSIS_FOLDER as RESULTS_FOLDER,
    CURVES_FOLDER,
    SIMILARITY_FILE,
    SIMILARITY_SUMMARY_FILE as SUMMARY_FILE,
    PREDICTIONS_FILE,
    GAIN_FILE,
)
from medtransfer.progress import item_line, progress_line
from medtransfer.analysis.activations import LAYERS, open_activations, read_manifest
from medtransfer.analysis.pairs import (
    CONTROL_KINDS,
    FINETUNED_VS_FINETUNED,
    IDENTITY,
    PRETRAINED_VS_PRETRAINED,
    RANDOM_VS_RANDOM,
    ROLE_FINETUNED,
    SEED_TO_SEED,
    SHUFFLED,
    SOURCE_VS_FINETUNED,
    Pair,
    StudyModel,
    plan_pairs,
    prediction_pairs,
)
from medtransfer.analysis.predictions import prediction_similarity
from medtransfer.analysis.similarity import ALL_MEASURES, SimilarityAccumulator
from medtransfer.atomic_files import atomic_directory
from medtransfer.config import AnalysisConfig, Config
from medtransfer.analysis.source_comparison import (
    AUC_INTERVAL_COLUMNS,
    AUC_INTERVAL_FILE,
    PAIRED_COLUMNS,
    PAIRED_FILE,
    auc_interval_rows,
    correction_term,
    paired_rows,
)
from medtransfer.errors import ConfigError, DataError, warn
from medtransfer.tables import write_table
from medtransfer.models.preprocessing import IMAGENET, PREPROCESSING

__all__ = [
    "GAIN_COLUMNS",
    "PREDICTION_COLUMNS",
    "SIMILARITY_COLUMNS",
    "SUMMARY_COLUMNS",
    "compare_pair_layer",
    "results_folder",
    "run_compare",
]

#: Plot-ready layer curves for `dvc plots show` (one CSV per measure), outside the analysis folder so that DVC
#: can declare them as plots of their own.
CURVE_COLUMNS = ["layer", "series", "similarity", "sd"]
#: Bytes of each side's rows read per streamed chunk; module-level so tests can shrink it.
CHUNK_BYTES = 32 << 20
#: Measures of the similarity-vs-gain table and figure.
GAIN_MEASURES = ("cca", "cka")

SIMILARITY_COLUMNS = [
    "pair_kind", "pair", "model_a", "model_b", "fold", "regime", "layer", "measure", "value", "n", "images",
    "c_a", "c_b", "channels_a", "channels_b", "channel_draws", "rows_per_channel", "reliable", "note",
]
SUMMARY_COLUMNS = [
    "pair_kind", "pair", "regime", "layer", "measure", "mean", "sd", "count", "reliable_share", "rows_per_channel",
    "random_vs_random_mean", "random_vs_random_sd", "shuffled_mean", "shuffled_sd",
]
PREDICTION_COLUMNS = [
    "pair", "model_a", "model_b", "fold", "regime", "images", "accuracy_a", "accuracy_b", "error_agreement",
    "error_agreement_chance", "error_consistency", "label_agreement", "label_kappa", "probability_correlation",
    "probability_correlation_of", "jensen_shannon", "jensen_shannon_base",
]
GAIN_COLUMNS = [
    "source", "regime", "fold", "layer", "model", "source_model", "random_init_model", "cca", "cka", "test_auc",
    "random_init_test_auc", "relative_gain", "pearson_cca_layer", "pearson_cka_layer", "points_layer",
    "pearson_cca_layer_source", "pearson_cka_layer_source", "points_layer_source",
]


def results_folder(config: Config, dataset: str) -> Path:
    """`results/analysis/<dataset>/` under the repository root."""
    return config.resolve(RESULTS_FOLDER) / dataset


def curves_folder(config: Config, dataset: str) -> Path:
    """`results/curves/<dataset>/` under the repository root."""
    return config.resolve(CURVES_FOLDER) / dataset


def layer_curve_rows(summary: Sequence[dict], measure: str) -> list[dict]:
    """One row per (layer, series) of `measure`, in layer order: the mean over folds of every pair group (identity
    controls left out) and the two noise floors, as one long table that a plot can colour by `series`."""
    rows = [row for row in summary if row["measure"] == measure]
    curves = []
    for layer in LAYERS:
        at_layer = [row for row in rows if row["layer"] == layer]
        for row in sorted(at_layer, key=lambda r: (r["pair_kind"], r["pair"], r["regime"])):
            if row["pair_kind"] in CONTROL_KINDS:
                continue
            series = f"{row['pair_kind'].replace('_', ' ')}: {row['pair']}" + (f" ({row['regime']})" if row["regime"] else "")
            curves.append({"layer": layer, "series": series, "similarity": row["mean"], "sd": row["sd"]})
        for kind, label in ((RANDOM_VS_RANDOM, "noise floor: random vs random"), (SHUFFLED, "noise floor: shuffled images")):
            values = [row for row in at_layer if _finite(row.get(f"{kind}_mean"))]
            if values:
                curves.append({"layer": layer, "series": label, "similarity": values[0][f"{kind}_mean"],
                               "sd": values[0][f"{kind}_sd"]})
    return curves


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# One pair, one layer
# --------------------------------------------------------------------------------------------------------------


def channel_draws(
    channels_a: int, channels_b: int, sample: int, repeats: int, rng: np.random.Generator
) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """Column selections [(indices_a, indices_b)], None = all channels.

    `sample` = 0, or no side larger than `sample`: one draw of all channels. Otherwise `repeats` draws of
    min(sample, C) sorted channel indices per side, the same indices on both sides when the counts match.
    """
    if sample <= 0 or max(channels_a, channels_b) <= sample:
        return [(None, None)]
    draws = []
    for _ in range(max(1, repeats)):
        a = np.sort(rng.choice(channels_a, size=min(sample, channels_a), replace=False)) if channels_a > sample else None
        if channels_b == channels_a:
            b = a
        else:
            b = np.sort(rng.choice(channels_b, size=min(sample, channels_b), replace=False)) if channels_b > sample else None
        draws.append((a, b))
    return draws


def image_derangement(images: int, rng: np.random.Generator) -> np.ndarray | None:
    """A permutation of `images` with no fixed point (image i meets image π(i) ≠ i); None for a single image."""
    if images < 2:
        return None
    cycle = rng.permutation(images)
    permutation = np.empty(images, dtype=np.int64)
    permutation[cycle] = np.roll(cycle, -1)  # one cycle through all images: nobody stays in place
    return permutation


@dataclass(frozen=True)
class LayerComparison:
    """The measures of one pair on one layer (averaged over channel draws; None = undefined)."""

    values: dict[str, float | None]
    n: int
    images: int
    c_a: int
    c_b: int
    channels_a: int
    channels_b: int
    draws: int
    reliable: bool
    note: str


def compare_pair_layer(
    x: np.ndarray,
    y: np.ndarray,
    positions: int,
    measures: Sequence[str],
    *,
    channel_sample: int = 0,
    channel_repeats: int = 1,
    rng_channels: np.random.Generator | None = None,
    shuffle_rng: np.random.Generator | None = None,
) -> LayerComparison:
    """Stream (n, p) `x` and (n, q) `y` (memory maps are read chunk by chunk) through the similarity engine.

    positions: rows per image (H·W); rows r of x and y belong to the same image and position, unless
    `shuffle_rng` is given: then y's images are permuted (`image_derangement`) and image i of x meets image π(i)
    of y at the same positions.
    """
    if x.shape[0] != y.shape[0]:
        raise DataError(f"paired activation matrices have {x.shape[0]} and {y.shape[0]} rows",
                        fix="run 'medtransfer extract' again")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    images = n // positions
    draws = channel_draws(p, q, channel_sample, channel_repeats, rng_channels or np.random.default_rng(0))
    permutation = None
    if shuffle_rng is not None:
        permutation = image_derangement(images, shuffle_rng)
        if permutation is None:
            return LayerComparison({m: None for m in measures}, n, images, p, q, p, q, 0, False,
                                   "one image only: nothing to shuffle")
    accumulators = [SimilarityAccumulator(p if a is None else len(a), q if b is None else len(b)) for a, b in draws]
    step = max(1, CHUNK_BYTES // (positions * 4 * max(p, q)))  # images per chunk
    offsets = np.arange(positions)
    for first in range(0, images, step):
        last = min(first + step, images)
        x_rows = np.asarray(x[first * positions : last * positions])
        if permutation is None:
            y_rows = np.asarray(y[first * positions : last * positions])
        else:
            y_rows = y[(permutation[first:last, None] * positions + offsets[None, :]).ravel()]
        for accumulator, (a, b) in zip(accumulators, draws):
            accumulator.update(x_rows if a is None else x_rows[:, a], y_rows if b is None else y_rows[:, b])
    results = [accumulator.finalize(measures) for accumulator in accumulators]
    values: dict[str, float | None] = {}
    notes = []
    for measure in measures:
        got = [r.value(measure) for r in results if r.value(measure) is not None]
        values[measure] = float(np.mean(got)) if got else None
        if not got:
            reasons = {r.undefined.get(measure, "undefined") for r in results}
            notes.append(f"{measure}: {'; '.join(sorted(reasons))}")
    warnings = {r.warning for r in results if r.warning}
    reliable = all(r.reliable for r in results)
    if warnings and not notes:
        notes.extend(sorted(warnings))
    first_draw = draws[0]
    c_a = p if first_draw[0] is None else len(first_draw[0])
    c_b = q if first_draw[1] is None else len(first_draw[1])
    return LayerComparison(values, n, images, c_a, c_b, p, q, len(draws), reliable, " | ".join(notes))


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


def run_compare(config: Config, dataset: str) -> Path:
    """Compute every table and figure of `dataset`'s analysis from its activations; returns the results folder.

    Raises ConfigError (unknown dataset or measure), DataError (no or stale or damaged activations), each one line.
    """
    from medtransfer.analysis.activations import ACTIVATIONS_FOLDER

    config.dataset(dataset)
    measures = _measures(config)
    started = time.perf_counter()
    folder = config.resolve(ACTIVATIONS_FOLDER) / dataset
    manifest = read_manifest(folder, dataset)
    _check_pointers_unchanged(config, dataset, manifest, folder)
    models = [StudyModel.from_dict(record) for record in manifest["models"].values()]
    by_key = {m.key: m for m in models}
    pairs = plan_pairs(models, manifest["random_baselines"])
    similarity_rows = []
    for index, pair in enumerate(pairs, start=1):
        progress_line(item_line(f"compare {dataset}", index, len(pairs),
                                f"{pair.kind}: {pair.label} fold {pair.fold}{' (shuffled)' if pair.shuffled else ''}"))
        similarity_rows.extend(_pair_rows(folder, manifest, pair, measures, config.analysis))
    summary_rows = summarise(similarity_rows)
    predictions = _prediction_rows(folder, manifest, models)
    gain_rows = similarity_vs_gain(similarity_rows, by_key, predictions_loader=lambda m: _load_predictions(folder, manifest, m))
    auc_rows = auc_interval_rows(models, lambda m: _load_predictions(folder, manifest, m),
                                 config.analysis.bootstrap_resamples, config.analysis.seed)
    paired = paired_rows(auc_rows, correction_term(manifest["folds"]))
    target = results_folder(config, dataset)
    with atomic_directory(target) as staging:
        write_table(staging / SIMILARITY_FILE, SIMILARITY_COLUMNS, similarity_rows)
        write_table(staging / SUMMARY_FILE, SUMMARY_COLUMNS, summary_rows)
        write_table(staging / PREDICTIONS_FILE, PREDICTION_COLUMNS, predictions)
        write_table(staging / GAIN_FILE, GAIN_COLUMNS, gain_rows)
        write_table(staging / AUC_INTERVAL_FILE, AUC_INTERVAL_COLUMNS, auc_rows)
        write_table(staging / PAIRED_FILE, PAIRED_COLUMNS, paired)
        _write_figures(staging, folder, manifest, dataset, measures, summary_rows, predictions, gain_rows)
    with atomic_directory(curves_folder(config, dataset)) as staging:
        for measure in measures:
            write_table(staging / f"{measure}.csv", CURVE_COLUMNS, layer_curve_rows(summary_rows, measure))
    _log_compare_run(config, dataset, manifest, target, measures, summary_rows, predictions, paired)
    print(format_summary(dataset, summary_rows, measures, len(pairs), time.perf_counter() - started, target))
    return target


def _measures(config: Config) -> list[str]:
    """The requested measures, after checking the comparison settings (ConfigError naming the key)."""
    analysis = config.analysis
    where = f"{config.source_file}: analysis"
    if analysis.channel_sample < 0:
        raise ConfigError(f"channel_sample must be 0 (all channels) or more, got {analysis.channel_sample}",
                          where=f"{where}.channel_sample", fix="the original study compared 64 channels, 5 times")
    if analysis.channel_repeats < 1:
        raise ConfigError(f"channel_repeats must be at least 1, got {analysis.channel_repeats}",
                          where=f"{where}.channel_repeats")
    if analysis.bootstrap_resamples < 1:
        raise ConfigError(f"bootstrap_resamples must be at least 1, got {analysis.bootstrap_resamples}",
                          where=f"{where}.bootstrap_resamples", fix="1000 is usual for a 95 % interval")
    measures = list(dict.fromkeys(analysis.measures))
    unknown = [m for m in measures if m not in ALL_MEASURES]
    if unknown or not measures:
        raise ConfigError(
            f"unknown similarity measure '{unknown[0]}'" if unknown else "no similarity measure given",
            where=f"{config.source_file}: analysis.measures",
            fix=f"use a list drawn from: {', '.join(ALL_MEASURES)}",
        )
    return measures


def _check_pointers_unchanged(config: Config, dataset: str, manifest: dict[str, Any], folder: Path) -> None:
    """Refuse activations extracted for other model versions than the current pointers name (when pointers are
    present; compare itself needs only the activations)."""
    from medtransfer.pointers import pointers_for_dataset

    current = {
        (p.registered_model, str(p.source_version), tuple(sorted(str(f.version) for f in p.folds)))
        for p in pointers_for_dataset(config, dataset)
    }
    if not current:
        return
    extracted = {
        (p["registered_model"], str(p["source_version"]), tuple(sorted(p["versions"]))) for p in manifest.get("pointers", [])
    }
    if current != extracted:
        changed = sorted({name for name, *_ in current ^ extracted})
        raise DataError(
            f"the activations were extracted for other model versions than results/models names ({', '.join(changed)})",
            where=str(folder),
            fix=f"run 'medtransfer extract --dataset {dataset}' again (or 'dvc repro')",
        )


def _layer_index(layer: str) -> int:
    return LAYERS.index(layer)


def _pair_rows(folder: Path, manifest: dict[str, Any], pair: Pair, measures: list[str], analysis: AnalysisConfig) -> list[dict]:
    rows = []
    fold_info = manifest["folds"][str(pair.fold)]
    for layer in LAYERS:
        layer_info = fold_info["layers"][layer]
        x = open_activations(folder, pair.fold, pair.model_a, layer)
        y = x if pair.model_b == pair.model_a else open_activations(folder, pair.fold, pair.model_b, layer)
        positions = int(layer_info["height"]) * int(layer_info["width"])
        if x.shape[0] != int(layer_info["rows"]) or y.shape[0] != int(layer_info["rows"]):
            raise DataError(
                f"{layer} of {pair.model_a} / {pair.model_b} has {x.shape[0]} / {y.shape[0]} rows, the manifest "
                f"says {layer_info['rows']}",
                where=str(folder),
                fix="run 'medtransfer extract' again",
            )
        seed = [analysis.seed, pair.fold, _layer_index(layer)]
        result = compare_pair_layer(
            x, y, positions, measures,
            channel_sample=analysis.channel_sample, channel_repeats=analysis.channel_repeats,
            rng_channels=np.random.default_rng(seed),
            shuffle_rng=np.random.default_rng([*seed, 1]) if pair.shuffled else None,
        )
        del x, y
        for measure in measures:
            value = result.values[measure]
            rows.append({
                "pair_kind": pair.kind, "pair": pair.label, "model_a": pair.model_a, "model_b": pair.model_b,
                "fold": pair.fold, "regime": pair.regime, "layer": layer, "measure": measure,
                "value": math.nan if value is None else value, "n": result.n, "images": result.images,
                "c_a": result.c_a, "c_b": result.c_b, "channels_a": result.channels_a, "channels_b": result.channels_b,
                "channel_draws": result.draws, "rows_per_channel": result.n / max(result.c_a, result.c_b),
                "reliable": result.reliable, "note": result.note,
            })
    return rows


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sd with ddof 1 (NaN for one value), count) of the finite values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return float(finite.mean()), sd, int(finite.size)


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean ± sd over folds (and seeds) per (pair_kind, pair, regime, layer, measure), with the layer's noise
    floors (random-vs-random and shuffled, over all their rows of that layer and measure) alongside."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pair_kind"], row["pair"], row["regime"], row["layer"], row["measure"]), []).append(row)
    floors: dict[tuple, tuple[float, float, int]] = {}
    for kind in (RANDOM_VS_RANDOM, SHUFFLED):
        for layer, measure in {(r["layer"], r["measure"]) for r in rows}:
            floors[(kind, layer, measure)] = _stats(
                [r["value"] for r in rows if r["pair_kind"] == kind and r["layer"] == layer and r["measure"] == measure])
    summary = []
    for (kind, pair, regime, layer, measure), members in groups.items():
        mean, sd, count = _stats([r["value"] for r in members])
        random_floor = floors[(RANDOM_VS_RANDOM, layer, measure)]
        shuffled_floor = floors[(SHUFFLED, layer, measure)]
        summary.append({
            "pair_kind": kind, "pair": pair, "regime": regime, "layer": layer, "measure": measure,
            "mean": mean, "sd": sd, "count": count,
            "reliable_share": float(np.mean([bool(r["reliable"]) for r in members])),
            "rows_per_channel": float(np.mean([r["rows_per_channel"] for r in members])),
            "random_vs_random_mean": random_floor[0], "random_vs_random_sd": random_floor[1],
            "shuffled_mean": shuffled_floor[0], "shuffled_sd": shuffled_floor[1],
        })
    return summary


def _load_predictions(folder: Path, manifest: dict[str, Any], model: StudyModel):
    """(indices, labels, probabilities) of a fine-tuned model's test predictions, from the copy `extract` saved
    beside the activations (compare never reads the tracking store); a missing copy stops the step."""
    from medtransfer.train.reporting import read_predictions

    saved = manifest["models"].get(model.key, {}).get("predictions")
    if not saved or not (folder / saved).is_file():
        raise DataError(f"the activations hold no test predictions of {model.key}", where=str(folder),
                        fix=f"run 'medtransfer extract --dataset {manifest.get('dataset', '<dataset>')}' again")
    return read_predictions(folder / saved)


def _aligned(first, second, keys: tuple[str, str]):
    """Rows of two prediction tables on the same test images, aligned by dataset index."""
    indices_a, labels_a, probabilities_a = first
    indices_b, labels_b, probabilities_b = second
    common, where_a, where_b = np.intersect1d(indices_a, indices_b, assume_unique=False, return_indices=True)
    if not np.array_equal(labels_a[where_a], labels_b[where_b]):
        raise DataError(f"{keys[0]} and {keys[1]} give different true labels for the same test images",
                        fix="the models were evaluated on different data versions; rerun the search")
    if probabilities_a.shape[1] != probabilities_b.shape[1]:
        raise DataError(f"{keys[0]} and {keys[1]} predict different numbers of classes")
    return labels_a[where_a], probabilities_a[where_a], probabilities_b[where_b]


def _prediction_rows(folder: Path, manifest: dict[str, Any], models: Sequence[StudyModel]) -> list[dict]:
    by_key = {m.key: m for m in models}
    cache: dict[str, Any] = {}

    def load(key: str):
        if key not in cache:
            cache[key] = _load_predictions(folder, manifest, by_key[key])
        return cache[key]

    rows = []
    for pair in prediction_pairs(models):
        first, second = load(pair.model_a), load(pair.model_b)
        labels, probabilities_a, probabilities_b = _aligned(first, second, (pair.model_a, pair.model_b))
        if len(labels) == 0:
            warn(f"{pair.model_a} and {pair.model_b} share no test images; skipped")
            continue
        measures = prediction_similarity(labels, probabilities_a, probabilities_b)
        rows.append({"pair": pair.label, "model_a": pair.model_a, "model_b": pair.model_b, "fold": pair.fold,
                     "regime": pair.regime, **measures.to_dict()})
    return rows


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r over the finite pairs; NaN with fewer than 3 points or no spread."""
    points = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(points) < 3:
        return math.nan
    a, b = (np.asarray(v, dtype=np.float64) for v in zip(*points))
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / scale if scale > 0.0 else math.nan


def similarity_vs_gain(rows: Sequence[dict], by_key: dict[str, StudyModel], *, predictions_loader=None) -> list[dict]:
    """Points (non-random source, regime, fold, layer): similarity of the fine-tuned primary to its source, and the
    relative test-AUC gain over the random-init fine-tuned primary of the same fold and regime, plus Pearson's r
    per layer (all points; and per source). AUCs come from the pointers, else from the saved predictions."""
    similarity: dict[tuple, float] = {}
    for row in rows:
        if row["pair_kind"] == SOURCE_VS_FINETUNED and row["measure"] in GAIN_MEASURES:
            similarity[(row["model_b"], row["layer"], row["measure"])] = row["value"]
    finetuned = [m for m in by_key.values() if m.role == ROLE_FINETUNED and (m.seed_index or 0) == 0]
    references = {}
    for m in sorted(finetuned, key=lambda m: m.source):
        if m.random_init:
            references.setdefault((m.fold, m.regime), m)

    def auc(model: StudyModel) -> float:
        if model.test_auc is not None and math.isfinite(float(model.test_auc)):
            return float(model.test_auc)
        loaded = predictions_loader(model) if predictions_loader else None
        if loaded is None:
            return math.nan
        from medtransfer.train.metrics import roc_auc

        _, labels, probabilities = loaded
        return float(roc_auc(labels, probabilities)["auc"])

    points = []
    for m in sorted(finetuned, key=lambda m: (m.source, m.regime or "", m.fold)):
        reference = references.get((m.fold, m.regime))
        if m.random_init or reference is None:
            continue
        auc_model, auc_reference = auc(m), auc(reference)
        gain = (auc_model - auc_reference) / auc_reference if auc_reference and math.isfinite(auc_reference) else math.nan
        for layer in LAYERS:
            points.append({
                "source": m.source, "regime": m.regime or "", "fold": m.fold, "layer": layer, "model": m.key,
                "source_model": m.init_key, "random_init_model": reference.key,
                **{measure: similarity.get((m.key, layer, measure), math.nan) for measure in GAIN_MEASURES},
                "test_auc": auc_model, "random_init_test_auc": auc_reference, "relative_gain": gain,
            })
    for layer in LAYERS:
        here = [p for p in points if p["layer"] == layer]
        _annotate_correlation(here, "layer")
        for _source, group in itertools.groupby(sorted(here, key=lambda p: p["source"]), key=lambda p: p["source"]):
            _annotate_correlation(list(group), "layer_source")
    return points


def _annotate_correlation(group: list[dict], scope: str) -> None:
    """Give every point of `group` Pearson's r between each gain measure and the relative gain over the group
    (`pearson_<measure>_<scope>`) and the group's size (`points_<scope>`)."""
    for measure in GAIN_MEASURES:
        r = _pearson([p[measure] for p in group], [p["relative_gain"] for p in group])
        for p in group:
            p[f"pearson_{measure}_{scope}"] = r
    for p in group:
        p[f"points_{scope}"] = len(group)


# --------------------------------------------------------------------------------------------------------------
# Figures, tracking, the printed summary
# --------------------------------------------------------------------------------------------------------------


def _write_figures(staging: Path, folder: Path, manifest: dict[str, Any], dataset: str, measures: list[str],
                   summary: list[dict], predictions: list[dict], gain: list[dict]) -> None:
    from medtransfer.analysis import plots

    for measure in measures:
        plots.plot_layer_curves(summary, measure, LAYERS, staging / f"layers_{measure}.png",
                                title=f"{dataset}: {measure} per layer (mean ± sd over folds)",
                                floor_kinds=(RANDOM_VS_RANDOM, SHUFFLED), skip_kinds=(IDENTITY,))
    plots.plot_prediction_agreement(predictions, staging / "prediction_agreement.png",
                                    title=f"{dataset}: error agreement of fine-tuned models")
    for source, record in sorted(manifest.get("conv1", {}).items()):
        model = manifest["models"].get(record["model_key"], {})
        if model.get("random_init"):
            continue
        weights = np.load(folder / record["file"], allow_pickle=False)
        # Manifests written before the channel order was recorded: the model's named preprocessing says it.
        order = record.get("channel_order") or PREPROCESSING.get(model.get("preprocessing"), IMAGENET).channel_order
        plots.plot_conv1_filters(weights, staging / f"conv1_{source}.png", channel_order=order,
                                 title=f"{source} ({record['model_key']}): {record['module']}, drawn in RGB")
    measure = "cca" if "cca" in measures else "cka"
    plots.plot_similarity_vs_gain(gain, LAYERS, measure, staging / "similarity_vs_gain.png",
                                  title=f"{dataset}: {measure}(fine-tuned, its source) vs relative AUC gain over random init")


def _metric_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", "_".join(part.replace(" vs ", "_vs_") for part in parts if part))


def summary_metrics(summary: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """A few numbers for the MLflow run: mean CCA and CKA per layer of the main pair groups and noise floors, and
    the error agreement (observed and chance) per pair of fine-tuned models."""
    metrics = {}
    main = (SOURCE_VS_FINETUNED, PRETRAINED_VS_PRETRAINED, FINETUNED_VS_FINETUNED, RANDOM_VS_RANDOM, SHUFFLED)
    for row in summary:
        if row["measure"] not in GAIN_MEASURES or row["pair_kind"] not in main:
            continue
        label = "" if row["pair_kind"] in (RANDOM_VS_RANDOM, SHUFFLED) else row["pair"]
        name = _metric_name(row["measure"], row["layer"], row["pair_kind"], label, row["regime"] if label else "")
        if math.isfinite(row["mean"]):
            if row["pair_kind"] == SHUFFLED:  # one floor per layer: the shuffled rows' overall mean
                metrics[name] = row["shuffled_mean"]
            else:
                metrics[name] = row["mean"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in predictions:
        groups.setdefault((row["pair"], row["regime"]), []).append(row)
    for (pair, regime), rows in groups.items():
        for key in ("error_agreement", "error_agreement_chance", "error_consistency"):
            mean, _, count = _stats([r[key] for r in rows])
            if count:
                metrics[_metric_name(key, pair, regime)] = mean
    return metrics


def _log_compare_run(config: Config, dataset: str, manifest: dict[str, Any], target: Path, measures: list[str],
                     summary: list[dict], predictions: list[dict], paired: list[dict]) -> None:
    import mlflow

    from medtransfer.tracking import DATA_FINGERPRINT_TAG, step_run

    tags = {"dataset": dataset, DATA_FINGERPRINT_TAG: manifest.get("data_fingerprint", "")}
    tags.update({f"model.{key}": str(record["version"]) for key, record in manifest["models"].items()
                 if record.get("channels")})
    with step_run(config, step="compare", run_name=f"compare {dataset}", tags=tags):
        analysis = config.analysis
        mlflow.log_params({
            "measures": ",".join(measures), "channel_sample": analysis.channel_sample,
            "channel_repeats": analysis.channel_repeats, "positions_per_layer": manifest["sampling"]["positions_per_layer"],
            "images": manifest["sampling"]["images"], "seed": manifest["sampling"]["seed"],
            "models": sum(1 for record in manifest["models"].values() if record.get("channels")),
            "folds": len(manifest["folds"]),
        })
        metrics = summary_metrics(summary, predictions)
        for row in paired:
            label = _metric_name("auc_difference", f"{row['source_a']} vs {row['source_b']}", row["regime"])
            metrics.update({label: row["mean_difference"], f"{label}_low": row["low"], f"{label}_high": row["high"],
                            f"{label}_p": row["p"]})
        metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(target), artifact_path="analysis")


def format_summary(dataset: str, summary: Sequence[dict], measures: Sequence[str], pairs: int, seconds: float,
                   target: Path) -> str:
    """A short table: the first measure's mean per layer for each pair group, controls last."""
    measure = "cca" if "cca" in measures else measures[0]
    rows = [r for r in summary if r["measure"] == measure and r["pair_kind"] not in (SEED_TO_SEED,)]
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        groups.setdefault((row["pair_kind"], row["pair"], row["regime"]), {})[row["layer"]] = row["mean"]
    order = sorted(groups, key=lambda key: (key[0] in CONTROL_KINDS, key))
    names = [f"{kind}: {pair}" + (f" ({regime})" if regime else "") for kind, pair, regime in order]
    width = max([len("pair"), *map(len, names)])
    lines = [f"compare {dataset}: {pairs} pairs x {len(LAYERS)} layers x {len(measures)} measures; {seconds:.0f} s",
             f"  {measure} (mean over folds)",
             f"  {'pair':<{width}}  " + "  ".join(f"{layer:>6}" for layer in LAYERS)]
    for name, key in zip(names, order):
        values = groups[key]
        lines.append(f"  {name:<{width}}  " + "  ".join(
            f"{values.get(layer, math.nan):6.3f}" if math.isfinite(values.get(layer, math.nan)) else f"{'n/a':>6}"
            for layer in LAYERS))
    lines.append(f"  -> {target}")
    return "\n".join(lines)
