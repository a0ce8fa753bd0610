"""compare's tables from similarity rows (analysis/summaries.py): the summary over folds with its noise floors,
the layer curves, the similarity-vs-gain table."""

from __future__ import annotations

import math

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
    rows = [_row("source_vs_finetuned", "natural", fold, "stem", value) for fold, value in enumerate(values)]
    plain = summarise(rows)[0]
    low, high = stats.t.interval(0.95, 2, loc=0.9, scale=stats.sem(values))  # the textbook interval (no overlap)
    assert (plain["ci_low"], plain["ci_high"], plain["ci_basis"]) == (pytest.approx(low), pytest.approx(high), "folds")
    # n_test / n_train = 0.5: variance factor 1/3 + 1/2 instead of 1/3, so the half-width grows by sqrt(5/2)
    corrected = summarise(rows, correction=0.5)[0]
    assert corrected["ci_high"] - 0.9 == pytest.approx((high - 0.9) * math.sqrt(2.5))
    assert corrected["ci_low"] < low and corrected["mean"] == pytest.approx(0.9)


def test_one_fold_gets_the_interval_over_its_channel_draws_and_none_without_draws():
    from scipy import stats

    sampled = _row("source_vs_finetuned", "natural", 0, "stem", 0.6)
    sampled.update(channel_draws="5", draw_sd="0.05")  # as read back from similarity.csv
    row = summarise([sampled])[0]
    half = stats.t.ppf(0.975, 4) * 0.05 / math.sqrt(5)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert row["ci_basis"] == "channel draws" and row["count"] == 1
    alone = summarise([_row("source_vs_finetuned", "natural", 0, "stem", 0.6)])[0]
    assert math.isnan(alone["ci_low"]) and math.isnan(alone["ci_high"]) and alone["ci_basis"] == ""
