"""compare's tables from similarity rows (analysis/summaries.py): the summary over folds with its noise floors,
the layer curves, the similarity-vs-gain table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medtransfer.analysis.pairs import StudyModel
from medtransfer.analysis.summaries import layer_curve_rows, similarity_vs_gain, summarise

#: The ResNet family's stages, as an activations manifest names them.
LAYERS = ["stem", "stage1", "stage2", "stage3", "stage4"]


def _row(kind, pair, fold, layer, value, model_b="m", measure="cca"):
    return {"pair_kind": kind, "pair": pair, "model_a": "a", "model_b": model_b, "fold": fold, "regime": "full",
            "layer": layer, "measure": measure, "value": value, "reliable": True, "rows_per_channel": 10.0}


def test_summary_gives_mean_and_sd_over_folds_with_the_noise_floors():
    rows = [_row("source_vs_finetuned", "natural", fold, "stem", value) for fold, value in enumerate([0.8, 0.9, 1.0])]
    rows += [_row("random_vs_random", "random vs random_b", fold, "stem", value) for fold, value in enumerate([0.4, 0.5, 0.6])]
    rows += [_row("shuffled", "natural", fold, "stem", value) for fold, value in enumerate([0.1, 0.2, math.nan])]
    summary = {(r["pair_kind"], r["layer"]): r for r in summarise(rows)}
    main = summary[("source_vs_finetuned", "stem")]
    assert main["mean"] == pytest.approx(0.9) and main["sd"] == pytest.approx(0.1) and main["count"] == 3
    assert main["random_vs_random_mean"] == pytest.approx(0.5) and main["random_vs_random_sd"] == pytest.approx(0.1)
    assert main["shuffled_mean"] == pytest.approx(0.15)  # NaN rows (undefined values) are left out


def test_layer_curves_list_each_pair_group_and_noise_floor_in_layer_order():
    rows = []
    for layer, offset in (("stage1", 0.0), ("stem", 0.1)):  # given out of order
        rows += [_row("source_vs_finetuned", "natural", f, layer, 0.7 + offset + 0.1 * f) for f in range(2)]
        rows += [_row("identity", "natural", f, layer, 1.0) for f in range(2)]
        rows += [_row("random_vs_random", "random vs random_b", f, layer, 0.3) for f in range(2)]
        rows += [_row("shuffled", "natural", f, layer, 0.05) for f in range(2)]
    rows.append(_row("source_vs_finetuned", "natural", 0, "stem", 0.5, measure="cka"))
    curves = layer_curve_rows(summarise(rows), "cca", LAYERS)
    assert [c["layer"] for c in curves] == ["stem"] * 3 + ["stage1"] * 3
    assert [c["series"] for c in curves[:3]] == [
        "source vs finetuned: natural (full)", "noise floor: random vs random", "noise floor: shuffled images"]
    assert curves[0]["similarity"] == pytest.approx(0.85) and curves[3]["similarity"] == pytest.approx(0.75)
    assert curves[1]["similarity"] == pytest.approx(0.3) and curves[2]["similarity"] == pytest.approx(0.05)


def _finetuned(source, fold, auc, random_init=False):
    return StudyModel(f"t.{source}.v{fold}", f"t.{source}", str(fold), "h", "finetuned", source, random_init,
                      regime="full", fold=fold, seed=0, seed_index=0, init_key=f"source.{source}.v1", test_auc=auc)


def test_similarity_vs_gain_is_relative_to_the_random_init_model_of_the_same_fold():
    models = [_finetuned("natural", 0, 0.9), _finetuned("natural", 1, 0.8), _finetuned("random", 0, 0.6, True),
              _finetuned("random", 1, 0.5, True)]
    by_key = {m.key: m for m in models}
    rows = [_row("source_vs_finetuned", "natural", fold, layer, 0.5 + 0.1 * fold, model_b=f"t.natural.v{fold}", measure=m)
            for fold in (0, 1) for layer in LAYERS for m in ("cca", "cka")]
    points = similarity_vs_gain(rows, by_key, LAYERS)
    assert len(points) == 2 * 5
    first = next(p for p in points if p["fold"] == 0 and p["layer"] == "stem")
    assert first["relative_gain"] == pytest.approx((0.9 - 0.6) / 0.6) and first["cca"] == pytest.approx(0.5)
    assert first["random_init_model"] == "t.random.v0" and first["points_layer"] == 2
    assert math.isnan(first["pearson_cca_layer"])  # fewer than 3 points


def test_similarity_vs_gain_says_which_points_rest_on_too_few_rows_per_channel():
    models = [_finetuned("natural", 0, 0.9), _finetuned("random", 0, 0.6, True)]
    by_key = {m.key: m for m in models}
    rows = [_row("source_vs_finetuned", "natural", 0, layer, 0.5, model_b="t.natural.v0", measure=m)
            for layer in LAYERS for m in ("cca", "cka")]
    for row in rows:
        if row["layer"] == "stage4" and row["measure"] == "cca":
            row["reliable"] = "False"  # as read back from similarity.csv
    points = {p["layer"]: p for p in similarity_vs_gain(rows, by_key, LAYERS)}
    assert points["stage4"]["reliable_cca"] is False and points["stage4"]["reliable_cka"] is True
    assert all(points[layer]["reliable_cca"] is True for layer in LAYERS[:-1])


def test_the_interval_over_folds_is_a_t_interval_widened_by_the_nadeau_bengio_correction():
    from scipy import stats

    values = [0.8, 0.9, 1.0]
    # a measure without a known range keeps the plain interval
    rows = [_row("source_vs_finetuned", "natural", fold, "stem", value, measure="other") for fold, value in
            enumerate(values)]
    plain = summarise(rows)[0]
    low, high = stats.t.interval(0.95, 2, loc=0.9, scale=stats.sem(values))  # the textbook interval (no overlap)
    assert (plain["ci_low"], plain["ci_high"], plain["ci_basis"], plain["ci_scale"]) == (
        pytest.approx(low), pytest.approx(high), "folds", "plain")
    # n_test / n_train = 0.5: variance factor 1/3 + 1/2 instead of 1/3, so the half-width grows by sqrt(5/2)
    corrected = summarise(rows, correction=0.5)[0]
    assert corrected["ci_high"] - 0.9 == pytest.approx((high - 0.9) * math.sqrt(2.5))
    assert corrected["ci_low"] < low and corrected["mean"] == pytest.approx(0.9)


def _logit_interval(values, correction):
    """By hand: clip ε inside [0, 1] (a fold at exactly 1 has an infinite logit), t-interval of the logits with
    the Nadeau–Bengio factor, expit back; an end within 2ε of a bound goes to it."""
    from scipy import special, stats

    from medtransfer.analysis.paired_statistics import BOUND_EPSILON

    z = special.logit(np.clip(values, BOUND_EPSILON, 1 - BOUND_EPSILON))
    half = stats.t.ppf(0.975, z.size - 1) * math.sqrt(1 / z.size + correction) * z.std(ddof=1)
    low, high = special.expit([z.mean() - half, z.mean() + half])
    return (0.0 if low <= 2 * BOUND_EPSILON else low), (1.0 if 1 - high <= 2 * BOUND_EPSILON else high)


@pytest.mark.parametrize("seed", range(5))
def test_cca_and_cka_intervals_are_logit_intervals_inside_zero_one(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([[1.0] if seed == 0 else [], rng.uniform(0.05, 0.99, 3 - (seed == 0))])
    values[0] = {1: 0.999, 2: 0.01}.get(seed, values[0])  # near the bounds too
    for measure in ("cca", "cka", "svcca", "pwcca"):
        rows = [_row("source_vs_finetuned", "natural", f, "stem", v, measure=measure) for f, v in enumerate(values)]
        row = summarise(rows, correction=0.5)[0]
        assert row["ci_scale"] == "logit" and 0.0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(_logit_interval(values, 0.5), abs=1e-12)


def test_the_issues_linear_cka_example_no_longer_leaves_the_range():
    # 0.51 ± 0.39 over 3 folds with the 3-fold correction 1/2: the plain interval was [−0.88, 1.90]
    rows = [_row("source_vs_finetuned", "natural", f, "stem", v, measure="cka")
            for f, v in enumerate([0.12, 0.6, 0.81])]
    row = summarise(rows, correction=0.5)[0]
    assert row["mean"] == pytest.approx(0.51) and row["sd"] == pytest.approx(0.354, abs=1e-3)
    assert 0.0 < row["ci_low"] < 0.01 and 0.99 < row["ci_high"] < 1.0  # honest: three folds tell little
    identity = summarise([_row("identity", "natural", f, "stem", 1.0, measure="cka") for f in range(3)])[0]
    assert (identity["ci_low"], identity["ci_high"]) == (1.0, 1.0)  # a point at the bound, no NaN


def test_debiased_cka_with_negative_values_gets_a_fisher_z_interval_inside_minus_one_to_one():
    values = np.array([-0.35, 0.05, -0.6])
    rows = [_row("shuffled", "natural", f, "stem", v, measure="cka_debiased") for f, v in enumerate(values)]
    row = summarise(rows, correction=0.5)[0]
    from scipy import stats

    z = np.arctanh(values)
    half = stats.t.ppf(0.975, 2) * math.sqrt(1 / 3 + 0.5) * z.std(ddof=1)
    assert row["ci_scale"] == "fisher z" and -1.0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.tanh([z.mean() - half, z.mean() + half])),
                                                            abs=1e-12)


def test_one_fold_gets_the_interval_over_its_channel_draws_and_none_without_draws():
    from scipy import special, stats

    sampled = _row("source_vs_finetuned", "natural", 0, "stem", 0.6)
    sampled.update(channel_draws="5", draw_sd="0.05")  # as read back from similarity.csv
    row = summarise([sampled])[0]
    # the channel sampling's Monte-Carlo error on the logit scale, by the delta method: sd / (m (1 − m))
    half = stats.t.ppf(0.975, 4) * 0.05 / (0.6 * 0.4) / math.sqrt(5)
    low, high = special.expit(special.logit(0.6) + np.array([-half, half]))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert row["ci_basis"] == "channel draws" and row["ci_scale"] == "logit" and row["count"] == 1
    alone = summarise([_row("source_vs_finetuned", "natural", 0, "stem", 0.6)])[0]
    assert math.isnan(alone["ci_low"]) and math.isnan(alone["ci_high"]) and alone["ci_basis"] == ""
    assert alone["ci_scale"] == ""
