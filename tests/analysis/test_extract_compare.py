"""extract and compare end to end on the tiny study (tests/analysis/conftest.py: two self-made "pretrained"
sources, two random sources, fine-tuned fold models of three sources, one with a second seed, and pointer files):
activations, manifest, tables, figures and the MLflow run, and the similarity values against a textbook
implementation. What they refuse and guard against is in test_extract_compare_guards.py."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from medtransfer.analysis import pairs as pair_kinds
from medtransfer.analysis.activations import activations_path, read_manifest
from medtransfer.analysis.compare import run_compare
from medtransfer.analysis.extract import run_extract
from medtransfer.analysis.prediction_table import PREDICTION_COLUMNS
from medtransfer.analysis.summaries import GAIN_COLUMNS, SIMILARITY_COLUMNS, SUMMARY_COLUMNS
from medtransfer.data.prepare import load_prepared
from medtransfer.models.mlflow_models import load_registered_model
from medtransfer.pointers import pointer_path, read_pointer
from medtransfer.tracking import use_tracking_store

DATASET = "target"
FINETUNED_SOURCES = ("natural", "medical", "random")
REGIME = "full"
#: The stages of the ResNet family, which extract finds on the models and writes into the manifest.
LAYERS = ["stem", "stage1", "stage2", "stage3", "stage4"]


def test_extract_writes_paired_activations_and_a_manifest(study, capsys):
    folder = run_extract(study, DATASET)
    assert folder == study.root / "activations" / DATASET
    assert "extract target" in capsys.readouterr().out
    manifest = read_manifest(folder, DATASET)
    assert sorted(manifest["folds"]) == ["0", "1"]
    roles = {record["role"] for record in manifest["models"].values()}
    assert roles == {"source", "random", "finetuned"}
    assert {"source.natural.v1", "source.medical.v1", "source.random.v1", "source.random_b.v1"} <= set(manifest["models"])
    prepared = load_prepared(study, DATASET)
    for fold, info in manifest["folds"].items():
        test = set(prepared.fold(int(fold))["test"].tolist())
        assert set(info["order"]) == test and len(info["order"]) == len(test)
        for layer in LAYERS:
            layer_info = info["layers"][layer]
            indices = layer_info["image_indices"]
            assert indices == info["order"][: layer_info["images"]]  # a prefix of one seeded order
            per_draw = min(max(1, round(200 / (layer_info["height"] * layer_info["width"]))), len(test))
            # channel_repeats 2: a block of images per draw, as far as the fold holds them
            assert layer_info["images_per_draw"] == per_draw
            assert layer_info["images"] == min(2 * per_draw, len(test))
            for key in info["models"]:
                array = np.load(activations_path(folder, int(fold), key, layer), mmap_mode="r")
                assert array.dtype == np.float32
                assert array.shape == (layer_info["rows"], manifest["models"][key]["channels"][layer])
    record = manifest["models"]["target.natural.full.v1"]
    assert record["role"] == "finetuned" and record["fold"] == 0 and record["regime"] == REGIME
    assert record["weights_sha256"] and record["source"] == "natural" and record["init_key"] == "source.natural.v1"
    assert (folder / record["predictions"]).is_file()
    assert set(manifest["conv1"]) == {"natural", "medical", "random", "random_b"}
    assert np.load(folder / manifest["conv1"]["natural"]["file"]).shape == (64, 3, 7, 7)
    assert manifest["conv1"]["natural"]["module"] == "backbone.body.conv1"
    assert manifest["conv1"]["natural"]["channel_order"] == "RGB"  # ImageNet mean/std preprocessing reads RGB

    # The rows of two models' matrices belong to the same images: recompute one model's rows directly.
    fold = 1
    layer_info = manifest["folds"][str(fold)]["layers"]["stage1"]
    images = prepared.images[np.asarray(layer_info["image_indices"][:2])]
    for key in ("source.medical.v1", "target.medical.full.v2"):
        loaded = load_registered_model(f"models:/{manifest['models'][key]['registered_model']}/"
                                       f"{manifest['models'][key]['version']}")
        captured = {}
        handle = loaded.model.stage_modules()["stage1"].register_forward_hook(
            lambda _m, _i, output: captured.setdefault("out", output.detach().clone()))
        with torch.inference_mode():
            loaded.model.eval()(loaded.spec.preprocessing.apply(images))
        handle.remove()
        expected = captured["out"].permute(0, 2, 3, 1).reshape(-1, captured["out"].shape[1]).numpy()
        saved = np.load(activations_path(folder, fold, key, "stage1"))[: len(expected)]
        np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-5)


def test_compare_writes_every_table_figure_and_one_run(csv_table, study, capsys):
    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    folder = run_compare(study, DATASET)
    assert folder == study.root / "results" / "analysis" / DATASET
    assert "compare target" in capsys.readouterr().out

    columns, rows = csv_table(folder / "similarity.csv")
    assert columns == SIMILARITY_COLUMNS
    kinds = {row["pair_kind"] for row in rows}
    assert kinds == set(pair_kinds.PAIR_KINDS)
    assert {row["layer"] for row in rows} == set(LAYERS)
    assert {row["fold"] for row in rows} == {"0", "1"}
    for row in rows:
        value = float(row["value"])
        if row["measure"] == "cka_debiased":
            assert np.isnan(value) or -0.5 <= value <= 1.0 + 1e-9, row
        else:
            assert np.isnan(value) or -1e-9 <= value <= 1.0 + 1e-9, row
        assert row["reliable"] in ("true", "false")
        assert float(row["rows_per_channel"]) == pytest.approx(int(row["n"]) / max(int(row["c_a"]), int(row["c_b"])))
    for row in rows:
        if row["pair_kind"] == "identity" and row["measure"] in ("cca", "cka", "svcca", "pwcca"):
            assert float(row["value"]) == pytest.approx(1.0, abs=1e-6), row
    sampled = [row for row in rows if row["layer"] == "stage4" and row["pair_kind"] == "source_vs_finetuned"]
    assert all(row["c_a"] == "16" and row["channels_a"] == "512" and row["channel_draws"] == "2" for row in sampled)

    columns, summary = csv_table(folder / "similarity_summary.csv")
    assert columns == SUMMARY_COLUMNS
    natural = [r for r in summary if r["pair_kind"] == "source_vs_finetuned" and r["pair"] == "natural"
               and r["measure"] == "cka"]
    assert len(natural) == len(LAYERS) and all(r["count"] == "2" for r in natural)
    assert all(np.isfinite(float(r["random_vs_random_mean"])) for r in natural)
    # The real pair stands above the shuffled-image floor in the early layers, where many positions are compared.
    stem = next(r for r in natural if r["layer"] == "stem")
    assert float(stem["mean"]) > float(stem["shuffled_mean"]) + 0.1

    columns, predictions = csv_table(folder / "predictions.csv")
    assert columns == PREDICTION_COLUMNS
    assert {row["pair"] for row in predictions} == {"medical vs natural", "medical vs random", "natural vs random"}
    for row in predictions:
        assert 0.0 <= float(row["error_agreement"]) <= 1.0 and 0.0 <= float(row["error_agreement_chance"]) <= 1.0
        assert 0.0 <= float(row["jensen_shannon"]) <= 1.0 and row["jensen_shannon_base"] == "2"
        assert row["probability_correlation_of"] == "p(class 1)"

    columns, gain = csv_table(folder / "similarity_vs_gain.csv")
    assert columns == GAIN_COLUMNS
    assert {row["source"] for row in gain} == {"natural", "medical"}
    assert len(gain) == 2 * 2 * len(LAYERS)  # 2 sources x 2 folds x layers
    assert all(row["points_layer"] == "4" for row in gain)
    pointers = [read_pointer(pointer_path(study, DATASET, source, REGIME)) for source in FINETUNED_SOURCES]
    aucs = {f"{pointer.registered_model}.v{fit.version}": fit.test_auc for pointer in pointers for fit in pointer.folds}
    for row in gain:  # the gain from the pointers' AUCs, and r from scipy on the points of the layer
        auc, reference = aucs[row["model"]], aucs[row["random_init_model"]]
        assert float(row["relative_gain"]) == pytest.approx((auc - reference) / reference, rel=1e-6)
    for layer in LAYERS:
        points = [row for row in gain if row["layer"] == layer]
        for measure in ("cca", "cka"):
            expected = scipy.stats.pearsonr([float(r[measure]) for r in points],
                                            [float(r["relative_gain"]) for r in points]).statistic
            assert [float(r[f"pearson_{measure}_layer"]) for r in points] == pytest.approx([expected] * 4, abs=1e-6)

    _, intervals = csv_table(folder / "auc_intervals.csv")
    assert len(intervals) == len(FINETUNED_SOURCES) * 2  # the primary fit of each source and fold
    for row in intervals:
        assert float(row["test_auc"]) == pytest.approx(aucs[row["model"]], abs=1e-6)
        assert float(row["test_auc_low"]) <= float(row["test_auc"]) <= float(row["test_auc_high"])
    _, paired = csv_table(folder / "paired_comparison.csv")
    assert [(row["source_a"], row["source_b"]) for row in paired] == [
        ("medical", "natural"), ("medical", "random"), ("natural", "random")]
    prepared = load_prepared(study, DATASET)
    correction = np.mean([prepared.fold(k)["test"].size / prepared.fold(k)["train"].size for k in (0, 1)])
    by_source = {pointer.source: pointer for pointer in pointers}
    for row in paired:  # the corrected resampled t-test recomputed by hand from the pointers' AUCs
        first = np.array([fit.test_auc for fit in by_source[row["source_a"]].folds if fit.seed == 0])
        second = np.array([fit.test_auc for fit in by_source[row["source_b"]].folds if fit.seed == 0])
        differences = first - second
        standard_error = np.sqrt((1 / 2 + correction) * differences.var(ddof=1))
        t = differences.mean() / standard_error
        assert float(row["correction"]) == pytest.approx(correction)
        assert float(row["mean_difference"]) == pytest.approx(differences.mean(), abs=1e-6)
        assert float(row["t"]) == pytest.approx(t, rel=1e-5)
        assert float(row["p"]) == pytest.approx(2 * scipy.stats.t.sf(abs(t), 1), rel=1e-5)

    for row in summary:  # every interval over the 2 folds recomputed from similarity.csv, with the same correction
        values = np.array([float(r["value"]) for r in rows if (r["pair_kind"], r["pair"], r["regime"], r["layer"],
                           r["measure"]) == (row["pair_kind"], row["pair"], row["regime"], row["layer"], row["measure"])])
        values = values[np.isfinite(values)]
        if values.size == 2:  # on the measure's own scale: logit for [0, 1], Fisher z for debiased CKA's [-1, 1]
            low_bound, high_bound = (-1.0, 1.0) if row["measure"] == "cka_debiased" else (0.0, 1.0)
            unit = np.clip((values - low_bound) / (high_bound - low_bound), 1e-6, 1 - 1e-6)
            z = np.log(unit / (1 - unit))
            half = scipy.stats.t.ppf(0.975, 1) * np.sqrt((1 / 2 + correction) * z.var(ddof=1))
            back = low_bound + (high_bound - low_bound) * scipy.special.expit(np.array([z.mean() - half, z.mean() + half]))
            assert row["ci_scale"] == ("fisher z" if row["measure"] == "cka_debiased" else "logit"), row
            assert low_bound <= float(row["ci_low"]) <= float(row["ci_high"]) <= high_bound, row
            near = 2e-6 * (high_bound - low_bound)  # an end this close to a bound is printed at the bound
            assert (float(row["ci_low"]), float(row["ci_high"])) == (
                pytest.approx(back[0], abs=near), pytest.approx(back[1], abs=near)), row
    flags = {(r["model_b"], r["layer"], r["measure"]): r["reliable"] for r in rows
             if r["pair_kind"] == "source_vs_finetuned"}
    for row in gain:  # each point says whether its similarity rests on enough rows per channel
        assert row["reliable_cca"].lower() == flags[(row["model"], row["layer"], "cca")], row

    pngs = {path.name for path in folder.glob("*.png")}
    assert {"layers_cca.png", "layers_cka.png", "prediction_agreement.png", "conv1_filters.png",
            "similarity_vs_gain.png"} <= pngs

    use_tracking_store(study)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'compare'", output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["dataset"] == DATASET
    assert run.data.tags["model.source.natural.v1"] == "1" and run.data.tags["model.target.random.full.v2"] == "2"
    assert any(key.startswith("cca_stage4_source_vs_finetuned_natural") for key in run.data.metrics)
    # each main group's mean is logged with its 95 % interval over folds, the same numbers as the summary table
    (row,) = [r for r in summary if (r["pair_kind"], r["pair"], r["regime"], r["layer"], r["measure"])
              == ("source_vs_finetuned", "natural", "full", "stage1", "cca")]
    key = "cca_stage1_source_vs_finetuned_natural_full"
    assert run.data.metrics[f"{key}_low"] == pytest.approx(float(row["ci_low"]))
    assert run.data.metrics[f"{key}_high"] == pytest.approx(float(row["ci_high"]))
    assert row["ci_basis"] == "folds" and float(row["ci_low"]) < float(row["mean"]) < float(row["ci_high"])
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "analysis")}
    assert "analysis/similarity.csv" in artifacts and "analysis/layers_cca.png" in artifacts


def _textbook_similarity(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(mean CCA, linear CKA, larger kept channel count) of two activation matrices (n x p, n x q) in float64,
    straight from the data: the canonical correlations are the singular values of Qxᵀ Qy, Q an orthonormal basis
    of each side's centred columns (Björck & Golub 1973); CKA is ‖Xᵀ Y‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on centred data.
    For the CCA, channels whose variance is below 1e-8 of the side's largest are dropped, the engine's documented
    rule for dead ReLUs."""
    x = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    y = y.astype(np.float64) - y.astype(np.float64).mean(axis=0)
    cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    def basis(a):
        variance = a.var(axis=0)
        return np.linalg.qr(a[:, variance >= 1e-8 * variance.max()])[0]

    basis_x, basis_y = basis(x), basis(y)
    correlations = np.linalg.svd(basis_x.T @ basis_y, compute_uv=False)
    return float(correlations.mean()), float(cka), max(basis_x.shape[1], basis_y.shape[1])


def test_similarity_values_match_a_textbook_implementation_on_the_saved_activations(csv_table, study):
    import dataclasses

    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    every_channel = dataclasses.replace(study, analysis=dataclasses.replace(study.analysis, channel_sample=0))
    folder = run_compare(every_channel, DATASET)
    _, rows = csv_table(folder / "similarity.csv")
    activations = study.root / "activations" / DATASET
    manifest = read_manifest(activations, DATASET)
    checked = 0
    for row in rows:
        if (row["pair_kind"] not in ("source_vs_finetuned", "pretrained_vs_pretrained", "finetuned_vs_finetuned")
                or row["layer"] not in ("stem", "stage1", "stage2") or row["measure"] not in ("cca", "cka")):
            continue
        x = np.load(activations_path(activations, int(row["fold"]), row["model_a"], row["layer"]))
        y = np.load(activations_path(activations, int(row["fold"]), row["model_b"], row["layer"]))
        # one draw of every channel takes the first block of images (the images one draw needs)
        layer_info = manifest["folds"][row["fold"]]["layers"][row["layer"]]
        rows_per_draw = layer_info["images_per_draw"] * layer_info["height"] * layer_info["width"]
        x, y = x[:rows_per_draw], y[:rows_per_draw]
        assert int(row["n"]) == len(x) and int(row["channels_a"]) == x.shape[1] and int(row["channels_b"]) == y.shape[1]
        mean_cca, cka, kept = _textbook_similarity(x, y)
        # Both are float64 computations of a well-posed quantity (n ≥ 200 rows, ≤ 128 channels, near-dead channels
        # dropped): they agree to about cond(X)·1e-16; 1e-6 leaves orders of magnitude of room on any machine.
        if row["measure"] == "cka":
            assert float(row["value"]) == pytest.approx(cka, abs=1e-6), row
        elif len(x) > kept + 1:
            assert float(row["value"]) == pytest.approx(mean_cca, abs=1e-6), row
            checked += 1
        else:  # the centred rows span at most n - 1 dimensions: every correlation is 1, so the engine refuses
            assert np.isnan(float(row["value"])) and mean_cca == pytest.approx(1.0), row
    assert checked >= 2 * 2 * 3, checked  # CCA values compared: two layers x two folds x at least three pairs


