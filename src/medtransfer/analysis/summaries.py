"""The tables of `compare` built from the similarity rows: the summary over folds with its noise floors, the
plot-ready layer curves, similarity against transfer gain with Pearson's r, and the few numbers logged to MLflow.
Pure functions on lists of row dicts (the columns below); the step writes them with `medtransfer.tables`."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from medtransfer.analysis.paired_statistics import bounded_interval_over_folds, bounded_t_interval
from medtransfer.analysis.plots import MEASURE_RANGES
from medtransfer.analysis.pairs import ROLE_FINETUNED, StudyModel
from medtransfer.layout import (
    CONTROL_KINDS,
    FINETUNED_VS_FINETUNED,
    PRETRAINED_VS_PRETRAINED,
    RANDOM_VS_RANDOM,
    SHUFFLED,
    SOURCE_VS_FINETUNED,
)

__all__ = [
    "BASELINE_REGIME",
    "CURVE_COLUMNS",
    "GAIN_COLUMNS",
    "GAIN_MEASURES",
    "SIMILARITY_COLUMNS",
    "SUMMARY_COLUMNS",
    "layer_curve_rows",
    "metric_name",
    "pearson",
    "similarity_vs_gain",
    "summarise",
    "summary_metrics",
]

#: Plot-ready layer curves for `dvc plots show` (one CSV per measure), outside the analysis folder so that DVC
#: can declare them as plots of their own.
CURVE_COLUMNS = ["layer", "series", "similarity", "sd"]
#: Measures of the similarity-vs-gain table and figure.
GAIN_MEASURES = ("cca", "cka")
#: The regime of the gain's baseline, as the authors defined it: the random init fine-tuned without freezing.
BASELINE_REGIME = "full"

SIMILARITY_COLUMNS = [
    "pair_kind", "pair", "model_a", "model_b", "fold", "regime", "layer", "layer_b", "measure", "value", "n",
    "images", "c_a", "c_b", "channels_a", "channels_b", "channel_draws", "draw_sd", "rows_per_channel", "reliable",
    "note",
]
SUMMARY_COLUMNS = [
    "pair_kind", "pair", "regime", "layer", "layer_b", "measure", "mean", "sd", "count", "folds", "ci_low", "ci_high",
    "ci_basis", "ci_scale", "reliable_share", "rows_per_channel",
    "random_vs_random_mean", "random_vs_random_sd", "shuffled_mean", "shuffled_sd",
]
GAIN_COLUMNS = [
    "source", "regime", "fold", "layer", "model", "source_model", "random_init_model", "cca", "cka", "test_auc",
    "random_init_test_auc", "relative_gain", "pearson_cca_layer", "pearson_cka_layer", "points_layer",
    "pearson_cca_layer_source", "pearson_cka_layer_source", "points_layer_source", "reliable_cca", "reliable_cka",
]


def stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sd with ddof 1 (NaN for one value), count) of the finite values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return float(finite.mean()), sd, int(finite.size)


#: `ci_basis` of an interval over the folds' values, and of one over a single fold's channel draws.
CI_OVER_FOLDS = "folds"
CI_OVER_DRAWS = "channel draws"


def summarise(rows: Sequence[dict], correction: float = 0.0) -> list[dict]:
    """Mean ± sd over folds (and seeds) per (pair_kind, pair, regime, layer, measure), with the layer's noise
    floors (random-vs-random and shuffled, over all their rows of that layer and measure) alongside.

    Each mean gets a 95 % interval (`ci_low`, `ci_high`, `ci_basis`): over the folds' values, a Student-t interval
    with Nadeau & Bengio's `correction` (n_test / n_train: the folds' models share training images); with channel
    sampling each fold's value is already the mean over its R draws, so the spread of the fold values holds the
    draws' noise too (var = σ²_fold + σ²_draw / R) and one interval covers both. A group with a single value and
    several channel draws gets the t-interval over its draws (`draw_sd`), which covers the draws' noise only."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pair_kind"], row["pair"], row["regime"], row["layer"], row["measure"]), []).append(row)
    floors: dict[tuple, tuple[float, float, int]] = {}
    for kind in (RANDOM_VS_RANDOM, SHUFFLED):
        for layer, measure in {(r["layer"], r["measure"]) for r in rows}:
            floors[(kind, layer, measure)] = stats(
                [r["value"] for r in rows if r["pair_kind"] == kind and r["layer"] == layer and r["measure"] == measure])
    summary = []
    for (kind, pair, regime, layer, measure), members in groups.items():
        mean, sd, count = stats([r["value"] for r in members])
        low, high, basis, scale = _interval(members, correction)
        random_floor = floors[(RANDOM_VS_RANDOM, layer, measure)]
        shuffled_floor = floors[(SHUFFLED, layer, measure)]
        summary.append({
            "pair_kind": kind, "pair": pair, "regime": regime, "layer": layer,
            # model b's stage: the same name, or (across architectures) its stage at the same reduction
            "layer_b": members[0].get("layer_b") or layer, "measure": measure,
            # count: the finite values behind the mean; folds: every fold (and seed) of the group, defined or not
            "mean": mean, "sd": sd, "count": count, "folds": len(members), "ci_low": low, "ci_high": high, "ci_basis": basis,
            "ci_scale": scale,
            "reliable_share": float(np.mean([bool(r["reliable"]) for r in members])),
            "rows_per_channel": float(np.mean([r["rows_per_channel"] for r in members])),
            "random_vs_random_mean": random_floor[0], "random_vs_random_sd": random_floor[1],
            "shuffled_mean": shuffled_floor[0], "shuffled_sd": shuffled_floor[1],
        })
    return summary


def _interval(members: Sequence[dict], correction: float) -> tuple[float, float, str, str]:
    """(low, high, basis, scale) of the 95 % interval of the members' mean value (members: one group's rows, one
    measure); NaN and "" where none can be given.

    A measure with a known range (`MEASURE_RANGES`) gets its interval on an unbounded scale (`scale`: logit for
    [0, 1], Fisher z for [−1, 1]) mapped back: with few folds the plain t-interval, widened by the correction, runs
    outside the range (linear CKA 0.51 [−1.10, 2.13]), and an interval that claims impossible values is no
    interval of the measure. Other measures keep the plain interval ("plain")."""
    bounds = MEASURE_RANGES.get(members[0]["measure"]) if members else None
    values = np.asarray([r["value"] for r in members if _finite(r["value"])], dtype=np.float64)
    if values.size >= 2:
        _, low, high, scale = bounded_interval_over_folds(
            values, bounds, correction=correction if math.isfinite(correction) else 0.0)
        return low, high, CI_OVER_FOLDS, scale
    if values.size == 1:
        only = next(r for r in members if _finite(r["value"]))
        draws, draw_sd = int(only.get("channel_draws") or 0), only.get("draw_sd")
        if draws >= 2 and _finite(draw_sd):
            # the Monte-Carlo error of the channel sampling (delta method on the bounded scale), not fold noise
            low, high, scale = bounded_t_interval(float(values[0]), float(draw_sd), draws, bounds)
            return low, high, CI_OVER_DRAWS, scale
    return math.nan, math.nan, "", ""


def layer_curve_rows(summary: Sequence[dict], measure: str, layers: Sequence[str]) -> list[dict]:
    """One row per (layer, series) of `measure`, in the order of `layers` (the manifest's): the mean over folds of every pair group (identity
    controls left out) and the two noise floors, as one long table that a plot can colour by `series`."""
    rows = [row for row in summary if row["measure"] == measure]
    curves = []
    for layer in layers:
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


def _truthy(value: Any) -> bool:
    """A `reliable` cell as a bool, whether it came from memory (bool) or from a CSV ("True"/"False")."""
    return value.strip().lower() in ("true", "1") if isinstance(value, str) else bool(value)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r over the finite pairs; NaN with fewer than 3 points or no spread."""
    points = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(points) < 3:
        return math.nan
    a, b = (np.asarray(v, dtype=np.float64) for v in zip(*points))
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / scale if scale > 0.0 else math.nan


def similarity_vs_gain(rows: Sequence[dict], by_key: dict[str, StudyModel], layers: Sequence[str], *,
                       predictions_loader: Callable[[StudyModel], Any] | None = None,
                       model_layers: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """Points (non-random source, regime, fold, layer): similarity of the fine-tuned primary to its source, and the
    relative test-AUC gain over the random-init primary of the same fold fine-tuned without freezing (regime
    `BASELINE_REGIME`, the authors' definition, whatever the model's own regime), plus Pearson's r per layer over
    all points (`_layer`) and per source and regime (`_layer_source`, the authors' statistic), for each of
    `layers` (the manifest's). `reliable_<measure>` says whether
    the similarity rests on enough rows per channel (False also where no similarity was computed). AUCs come from the pointer facts
    that `extract` copied into the manifest, else from the saved predictions (`predictions_loader`).

    Studies of several architectures: a model's gain is taken over the random-init model of its own `arch` where
    the study has one (else over the first one), and with `model_layers` ({model key: its stages}, from the
    manifest) its points cover its own stages only."""
    similarity: dict[tuple, float] = {}
    reliable: dict[tuple, bool] = {}
    for row in rows:
        if row["pair_kind"] == SOURCE_VS_FINETUNED and row["measure"] in GAIN_MEASURES:
            similarity[(row["model_b"], row["layer"], row["measure"])] = row["value"]
            reliable[(row["model_b"], row["layer"], row["measure"])] = _truthy(row.get("reliable", True))
    finetuned = [m for m in by_key.values() if m.role == ROLE_FINETUNED and (m.seed_index or 0) == 0]
    any_arch = object()  # the key of the first random-init model, whatever its architecture
    references: dict[tuple, StudyModel] = {}
    for m in sorted(finetuned, key=lambda m: m.source):
        if m.random_init and (m.regime or BASELINE_REGIME) == BASELINE_REGIME:
            references.setdefault((m.fold, any_arch), m)
            references.setdefault((m.fold, m.arch), m)

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
        # The authors' gain, whatever the model's regime: over the random init fine-tuned without freezing
        reference = references.get((m.fold, m.arch)) or references.get((m.fold, any_arch))
        if m.random_init or reference is None:
            continue
        own = set((model_layers or {}).get(m.key, layers))
        auc_model, auc_reference = auc(m), auc(reference)
        gain = (auc_model - auc_reference) / auc_reference if auc_reference and math.isfinite(auc_reference) else math.nan
        for layer in (layer for layer in layers if layer in own):
            points.append({
                "source": m.source, "regime": m.regime or "", "fold": m.fold, "layer": layer, "model": m.key,
                "source_model": m.init_key, "random_init_model": reference.key,
                **{measure: similarity.get((m.key, layer, measure), math.nan) for measure in GAIN_MEASURES},
                "test_auc": auc_model, "random_init_test_auc": auc_reference, "relative_gain": gain,
                # whether the similarity rests on enough rows per channel (figures draw the others hollow)
                **{f"reliable_{measure}": reliable.get((m.key, layer, measure), False) for measure in GAIN_MEASURES},
            })
    for layer in layers:
        here = [p for p in points if p["layer"] == layer]
        _annotate_correlation(here, "layer")
        # the authors' statistic: one r per source and regime, never pooled over the two regimes
        by_series = lambda p: (p["source"], p["regime"])  # noqa: E731
        for _series, group in itertools.groupby(sorted(here, key=by_series), key=by_series):
            _annotate_correlation(list(group), "layer_source")
    return points


def _annotate_correlation(group: list[dict], scope: str) -> None:
    """Give every point of `group` Pearson's r between each gain measure and the relative gain over the group
    (`pearson_<measure>_<scope>`) and the group's size (`points_<scope>`)."""
    for measure in GAIN_MEASURES:
        r = pearson([p[measure] for p in group], [p["relative_gain"] for p in group])
        for p in group:
            p[f"pearson_{measure}_{scope}"] = r
    for p in group:
        p[f"points_{scope}"] = len(group)


# --------------------------------------------------------------------------------------------------------------
# Figures, tracking, the printed summary
# --------------------------------------------------------------------------------------------------------------


def metric_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", "_".join(part.replace(" vs ", "_vs_") for part in parts if part))


def summary_metrics(summary: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """A few numbers for the MLflow run: mean CCA and CKA per layer of the main pair groups (with `_low` / `_high`,
    their 95 % interval, where one was given) and noise floors, and
    the error agreement (observed and chance) per pair of fine-tuned models."""
    metrics = {}
    main = (SOURCE_VS_FINETUNED, PRETRAINED_VS_PRETRAINED, FINETUNED_VS_FINETUNED, RANDOM_VS_RANDOM, SHUFFLED)
    for row in summary:
        if row["measure"] not in GAIN_MEASURES or row["pair_kind"] not in main:
            continue
        label = "" if row["pair_kind"] in (RANDOM_VS_RANDOM, SHUFFLED) else row["pair"]
        name = metric_name(row["measure"], row["layer"], row["pair_kind"], label, row["regime"] if label else "")
        if math.isfinite(row["mean"]):
            if row["pair_kind"] == SHUFFLED:  # one floor per layer: the shuffled rows' overall mean
                metrics[name] = row["shuffled_mean"]
            else:
                metrics[name] = row["mean"]
                if _finite(row.get("ci_low")) and _finite(row.get("ci_high")):  # the 95 % interval of the mean
                    metrics[f"{name}_low"], metrics[f"{name}_high"] = float(row["ci_low"]), float(row["ci_high"])
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in predictions:
        groups.setdefault((row["pair"], row["regime"]), []).append(row)
    for (pair, regime), rows in groups.items():
        for key in ("error_agreement", "error_agreement_chance", "error_consistency"):
            mean, _, count = stats([r[key] for r in rows])
            if count:
                metrics[metric_name(key, pair, regime)] = mean
    return metrics

