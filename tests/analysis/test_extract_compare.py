"""extract and compare end to end on a tiny study in a temporary MLflow store: two self-made "pretrained" sources,
two random sources, fine-tuned fold models of three sources (one with a second seed), pointer files; then
activations, tables, figures and the MLflow run; compare without the models; refusals when the registry or the
data disagree with the pointers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from medtransfer.analysis import pairs as pair_kinds
from medtransfer.analysis.activations import activations_path, read_manifest
from medtransfer.analysis.compare import run_compare
from medtransfer.analysis.prediction_table import PREDICTION_COLUMNS
from medtransfer.analysis.summaries import GAIN_COLUMNS, SIMILARITY_COLUMNS, SUMMARY_COLUMNS
from medtransfer.analysis.extract import run_extract
from medtransfer.config import load_config
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.errors import ConfigError, DataError, ModelError
from medtransfer.layout import ACTIVATIONS_FOLDER, POINTER_FOLDER
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.mlflow_models import load_registered_model, log_packaged_model, register_logged_model
from medtransfer.models.packaging import ModelSpec
from medtransfer.models.sources import register_source
from medtransfer.pointers import FoldModel, fold_model_alias, pointer_path, read_pointer
from medtransfer.layout import ROLE_FINETUNED, TEST_PREDICTIONS_FILE as PREDICTIONS_FILE
from medtransfer.registry import ALIAS_DEFAULT, Tag, finetuned_model_name, model_uri, source_model_name
from medtransfer.tracking import ensure_experiment, use_tracking_store
from medtransfer.train.finetune import PREDICTIONS_ARTIFACT_DIR
from medtransfer.train.metrics import roc_auc
from medtransfer.train.reporting import write_predictions

DATASET = "target"
PRETRAINED = ("natural", "medical")
FINETUNED_SOURCES = ("natural", "medical", "random")
REGIME = "full"
#: The stages of the ResNet family, which extract finds on the models and writes into the manifest.
LAYERS = ["stem", "stage1", "stage2", "stage3", "stage4"]


def _blob_npz(path: Path, seed: int, per_split=(40, 8, 16)) -> None:
    """16 px grey images; the class sets the quadrant of a bright blob (MedMNIST layout)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), per_split):
        labels = np.arange(count) % 2
        images = rng.normal(90, 25, size=(count, 16, 16))
        for index, label in enumerate(labels):
            images[index, 2 + 8 * label : 6 + 8 * label, 3:7] += 110
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _write_backbone(path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    model = Classifier("resnet18", None)
    keras_like_init_(model, torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))


def _probabilities(model: Classifier, preprocessing, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        logits = model(preprocessing.apply(np.ascontiguousarray(images)))
    return torch.softmax(logits, dim=1).double().numpy()


def _register_finetuned(config, prepared, source: str, fold: int, seed: int, alias: str) -> FoldModel:
    """A stand-in for a fine-tuned fold model: the source plus seeded noise and a new head, logged like finetune."""
    loaded = load_registered_model(model_uri(source_model_name(source), alias=ALIAS_DEFAULT))
    model = loaded.model
    generator = torch.Generator().manual_seed(1000 * seed + 10 * fold + len(source))
    model.replace_head(2, generator=generator)
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if parameter.ndim > 1:  # perturb weights, more in deeper stages (fine-tuning changes them most)
                depth = next((stage for stage in range(1, 5) if f"layer{stage}." in name), 0) + 1
                parameter.add_(0.1 * depth * parameter.std() * torch.randn(parameter.shape, generator=generator))
    test = prepared.fold(fold)["test"]
    probabilities = _probabilities(model, loaded.spec.preprocessing, prepared.images[test])
    name = finetuned_model_name(DATASET, source, REGIME)
    spec = ModelSpec("resnet18", 2, loaded.spec.preprocessing, classes=prepared.classes)
    with mlflow.start_run(experiment_id=ensure_experiment(config), run_name=f"ft {source} {fold} {seed}") as run:
        mlflow.set_tags({"step": "finetune", Tag.DATASET: DATASET, Tag.SOURCE: source, Tag.REGIME: REGIME,
                         "fold": str(fold)})
        staging = config.root / "staging" / f"{source}-{fold}-{seed}"
        write_predictions(staging / PREDICTIONS_FILE, test, prepared.labels[test], probabilities, prepared.classes)
        mlflow.log_artifact(str(staging / PREDICTIONS_FILE), artifact_path=PREDICTIONS_ARTIFACT_DIR)
        uri, digest = log_packaged_model(model, spec)
        mlflow.set_tag(Tag.WEIGHTS_SHA256, digest)
        version = register_logged_model(uri, name, {Tag.ROLE: ROLE_FINETUNED, Tag.WEIGHTS_SHA256: digest,
                                                    Tag.SOURCE: source, Tag.REGIME: REGIME})
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version.version))
    auc = roc_auc(prepared.labels[test], probabilities)["auc"]
    return FoldModel(fold, seed, str(version.version), run.info.run_id, digest, alias, float(auc))


def _params(root: Path) -> Path:
    import yaml

    params = {
        "project": {"profile": "test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test", "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": {DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                               "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.2}}},
        "sources": {
            "natural": {"kind": "safetensors", "arch": "resnet18", "path": "weights/natural.safetensors"},
            "medical": {"kind": "safetensors", "arch": "resnet18", "path": "weights/medical.safetensors"},
            "random": {"kind": "random", "arch": "resnet18", "seed": 0},
            "random_b": {"kind": "random", "arch": "resnet18", "seed": 1},
        },
        "analysis": {"positions_per_layer": 200, "channel_sample": 16, "channel_repeats": 2, "batch_size": 8,
                     "measures": ["cca", "svcca", "pwcca", "cka", "cka_debiased"], "seed": 0},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, fits_pointer):
    """The tiny study, built once for the module: prepared data, registered sources and fine-tuned models, pointer
    files. Nothing extracted yet."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(variable, raising=False)
        _blob_npz(root / "data/raw/target.npz", 0)
        for index, name in enumerate(PRETRAINED):
            _write_backbone(root / f"weights/{name}.safetensors", 11 + index)
        config = load_config(_params(root))
        prepare_dataset(config, DATASET)
        prepared = load_prepared(config, DATASET)
        use_tracking_store(config)
        registered = {name: register_source(config, name) for name in config.sources}
        for source in FINETUNED_SOURCES:
            fits = [_register_finetuned(config, prepared, source, fold, 0, fold_model_alias(fold, 0)) for fold in (0, 1)]
            if source == "natural":  # a second seed on fold 0: seed-to-seed pairs
                fits.append(_register_finetuned(config, prepared, source, 0, 1, fold_model_alias(0, 1)))
            fits_pointer(config, prepared, registered[source], DATASET, source, REGIME, fits)
        yield config


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


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


def test_compare_writes_every_table_figure_and_one_run(study, capsys):
    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    folder = run_compare(study, DATASET)
    assert folder == study.root / "results" / "analysis" / DATASET
    assert "compare target" in capsys.readouterr().out

    columns, rows = _read_csv(folder / "similarity.csv")
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

    columns, summary = _read_csv(folder / "similarity_summary.csv")
    assert columns == SUMMARY_COLUMNS
    natural = [r for r in summary if r["pair_kind"] == "source_vs_finetuned" and r["pair"] == "natural"
               and r["measure"] == "cka"]
    assert len(natural) == len(LAYERS) and all(r["count"] == "2" for r in natural)
    assert all(np.isfinite(float(r["random_vs_random_mean"])) for r in natural)
    # The real pair stands above the shuffled-image floor in the early layers, where many positions are compared.
    stem = next(r for r in natural if r["layer"] == "stem")
    assert float(stem["mean"]) > float(stem["shuffled_mean"]) + 0.1

    columns, predictions = _read_csv(folder / "predictions.csv")
    assert columns == PREDICTION_COLUMNS
    assert {row["pair"] for row in predictions} == {"medical vs natural", "medical vs random", "natural vs random"}
    for row in predictions:
        assert 0.0 <= float(row["error_agreement"]) <= 1.0 and 0.0 <= float(row["error_agreement_chance"]) <= 1.0
        assert 0.0 <= float(row["jensen_shannon"]) <= 1.0 and row["jensen_shannon_base"] == "2"
        assert row["probability_correlation_of"] == "p(class 1)"

    columns, gain = _read_csv(folder / "similarity_vs_gain.csv")
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

    _, intervals = _read_csv(folder / "auc_intervals.csv")
    assert len(intervals) == len(FINETUNED_SOURCES) * 2  # the primary fit of each source and fold
    for row in intervals:
        assert float(row["test_auc"]) == pytest.approx(aucs[row["model"]], abs=1e-6)
        assert float(row["test_auc_low"]) <= float(row["test_auc"]) <= float(row["test_auc_high"])
    _, paired = _read_csv(folder / "paired_comparison.csv")
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


def test_similarity_values_match_a_textbook_implementation_on_the_saved_activations(study):
    import dataclasses

    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    every_channel = dataclasses.replace(study, analysis=dataclasses.replace(study.analysis, channel_sample=0))
    folder = run_compare(every_channel, DATASET)
    _, rows = _read_csv(folder / "similarity.csv")
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


def test_a_registry_that_disagrees_with_a_pointer_is_refused(study):
    use_tracking_store(study)
    client = mlflow.MlflowClient()
    name = finetuned_model_name(DATASET, "natural", REGIME)
    fold0 = client.get_model_version_by_alias(name, "fold0").version
    seed1 = client.get_model_version_by_alias(name, "fold0-seed1").version
    client.set_registered_model_alias(name, "fold0", seed1)  # someone moved the alias after the search
    try:
        with pytest.raises(ModelError) as error:
            run_extract(study, DATASET)
        message = str(error.value)
        assert "\n" not in message and "disagrees" in message and "fold0" in message
    finally:
        client.set_registered_model_alias(name, "fold0", fold0)

    original = client.get_model_version(name, fold0).tags[Tag.WEIGHTS_SHA256]
    client.set_model_version_tag(name, fold0, Tag.WEIGHTS_SHA256, "0" * 64)
    try:
        with pytest.raises(ModelError, match="disagrees"):
            run_extract(study, DATASET)
    finally:
        client.set_model_version_tag(name, fold0, Tag.WEIGHTS_SHA256, original)


def test_weights_changed_or_deleted_in_the_artifact_store_stop_report_and_summary(study):
    """What `report` and `summary` publish is checked against the artifact store, not only the registry's tags."""
    from urllib.parse import urlparse

    from medtransfer.models.weights_check import verify_published
    from medtransfer.pointers import pointer_path, pointers_for_dataset

    use_tracking_store(study)
    client = mlflow.MlflowClient()
    pointers = pointers_for_dataset(study, DATASET)
    where = lambda pointer: str(pointer_path(study, pointer.dataset, pointer.source, pointer.regime))  # noqa: E731
    verify_published(client, pointers, where)  # intact: passes
    name = finetuned_model_name(DATASET, "natural", REGIME)
    version = client.get_model_version_by_alias(name, "fold0")
    location = client.get_logged_model(version.source.rsplit("/", 1)[-1]).artifact_location
    (weights,) = Path(urlparse(location).path).rglob("weights.safetensors")
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
        with pytest.raises(ModelError) as error:
            verify_published(client, pointers, where)
        assert "\n" not in str(error.value) and "weights changed after registration" in str(error.value)
        assert f"models:/{name}/{version.version}" in str(error.value)
        weights.unlink()
        with pytest.raises(ModelError, match="weights are missing"):
            verify_published(client, pointers, where)
    finally:
        weights.write_bytes(original)
    verify_published(client, pointers, where)


def test_prepared_data_of_another_version_is_refused(study):
    path = pointer_path(study, DATASET, "medical", REGIME)
    original = path.read_text()
    record = json.loads(original)
    record["data_fingerprint"] = "f" * 64
    path.write_text(json.dumps(record))
    try:
        with pytest.raises(DataError) as error:
            run_extract(study, DATASET)
        assert "\n" not in str(error.value) and "prepared data" in str(error.value)
    finally:
        path.write_text(original)


def test_a_changed_prepared_images_array_stops_extract(study):
    images = study.prepared_data_dir / DATASET / "images.npy"
    original = images.read_bytes()
    images.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one pixel, same size: the manifest is intact
    try:
        with pytest.raises(DataError) as error:
            run_extract(study, DATASET)
        line = error.value.one_line()
        assert "\n" not in line and line.startswith(f"{images}: changed since prepare")
        assert f"medtransfer prepare --dataset {DATASET}" in line
    finally:
        images.write_bytes(original)  # a new mtime, the same bytes: the next load rehashes and passes


def test_stale_activations_are_dvcs_to_notice(repo_root):
    """Replaces compare's own check of the pointers (test_compare_refuses_activations_of_other_model_versions): the
    behaviour moved to DVC. extract depends on the pointers, so a new model version reruns it; compare depends on
    the activations only and reads no pointer (see the next test)."""
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert POINTER_FOLDER in stages["extract"]["do"]["deps"]
    assert f"{ACTIVATIONS_FOLDER}/${{item}}" in stages["compare"]["do"]["deps"]
    assert not any(dep.startswith(POINTER_FOLDER) for dep in stages["compare"]["do"]["deps"])


def _stage_paths(entries, params: dict, item: str) -> list[str]:
    """dvc.yaml `deps`/`outs` entries (strings or {path: options}) with ${item} and ${a.b} filled in."""
    import re

    def fill(match):
        value = params
        for part in match.group(1).split("."):
            value = item if part == "item" and value is params else value[part]
        return str(value)

    paths = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    return [re.sub(r"\$\{([^}]+)\}", fill, path).rstrip("/") for path in paths]


def test_compare_opens_only_data_its_dvc_stage_depends_on(study, repo_root):
    """Every file compare reads inside the study folder lies under a `deps` path of its dvc.yaml stage (or is one
    of its own outputs, read back to log them): nothing DVC does not know of can change its results."""
    import os

    import yaml

    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["compare"]["do"]
    params = yaml.safe_load(study.source_file.read_text())
    deps = _stage_paths(stage["deps"], params, DATASET)
    outputs = _stage_paths([*stage["outs"], *stage.get("plots", [])], params, DATASET)
    assert stage["params"] == [f"analysis.{key}" for key in
                               ("measures", "channel_sample", "channel_repeats", "bootstrap_resamples", "seed",
                                "gram_precision")]
    root = study.root.resolve()
    opened: list[Path] = []
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def record(event: str, args: tuple) -> None:
        if event != "open" or not RECORDING or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        if isinstance(mode, str) and any(letter in mode for letter in "wax+") or flags & writing:
            return
        if os.path.isdir(path):
            return  # a folder listed or removed (the previous outputs, replaced atomically), not data read
        try:
            opened.append(Path(os.fsdecode(path)).resolve().relative_to(root))
        except ValueError:
            pass  # outside the study: code, libraries

    _install_open_recorder(record)
    RECORDING.append(True)
    try:
        run_compare(study, DATASET)
    finally:
        RECORDING.clear()
    # The MLflow run compare logs goes to the tracking store: an output of the step, never read for its results.
    store = [Path("mlflow.db"), Path("mlartifacts"), Path("mlruns")]
    read = sorted({path for path in opened if not any(path.is_relative_to(folder) for folder in store)})
    assert any(path.is_relative_to(f"{ACTIVATIONS_FOLDER}/{DATASET}") for path in read), read
    outside = [path for path in read
               if not any(path.is_relative_to(dep) for dep in deps + outputs)]
    assert not outside, f"compare read files its dvc.yaml stage does not depend on: {outside}"


#: The audit hook below stays installed for the process (Python cannot remove one): it records only while this
#: list is non-empty, and is installed once.
RECORDING: list[bool] = []
_RECORDERS: list = []


def _install_open_recorder(record) -> None:
    import sys

    if not _RECORDERS:
        sys.addaudithook(lambda event, args: _RECORDERS[-1](event, args))
    _RECORDERS.append(record)


def test_user_errors_are_one_line(tmp_path, write_params, monkeypatch):
    import dataclasses

    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    config = load_config(write_params({DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"]}}))
    with pytest.raises(ModelError, match="no model pointers for dataset 'target'"):
        run_extract(config, DATASET)
    with pytest.raises(DataError, match="no activations for dataset 'target'.*medtransfer extract --dataset target"):
        run_compare(config, DATASET)
    with pytest.raises(ConfigError, match="unknown dataset"):
        run_extract(config, "nope")

    def with_analysis(**changes):
        return dataclasses.replace(config, analysis=dataclasses.replace(config.analysis, **changes))

    with pytest.raises(ConfigError, match="analysis.batch_size"):
        run_extract(with_analysis(batch_size=0), DATASET)
    with pytest.raises(ConfigError, match="analysis.channel_repeats"):
        run_compare(with_analysis(channel_repeats=0), DATASET)
    with pytest.raises(ConfigError, match="unknown similarity measure 'nope'"):
        run_compare(with_analysis(measures=["cca", "nope"]), DATASET)


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_an_unreadable_prediction_artifact_stops_extract_with_one_line(study, cli, damage):
    from urllib.parse import urlparse

    use_tracking_store(study)
    pointer = read_pointer(pointer_path(study, DATASET, "medical", REGIME))
    run_id = pointer.folds[1].run_id
    artifact_root = Path(urlparse(mlflow.MlflowClient().get_run(run_id).info.artifact_uri).path)
    artifact = artifact_root / PREDICTIONS_ARTIFACT_DIR / PREDICTIONS_FILE
    original = artifact.read_bytes()
    before = (study.root / "activations" / DATASET / "manifest.json")
    before_bytes = before.read_bytes() if before.is_file() else None
    if damage == "deleted":
        artifact.unlink()
    else:
        artifact.write_text("index,label,p_a,p_b\n3,1,0.2\n")  # a truncated row
    try:
        result = cli("extract", "--dataset", DATASET, cwd=study.root)
    finally:
        artifact.write_bytes(original)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert run_id in line and PREDICTIONS_FILE in line and "Traceback" not in result.stderr, line
    after = before.read_bytes() if before.is_file() else None
    assert after == before_bytes, "the previous activations are left as they were"


def test_compare_runs_without_the_models(study):
    """Last in this file: it deletes every registered model and the whole artifact store."""
    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    _, before = _read_csv(run_compare(study, DATASET) / "similarity.csv")
    use_tracking_store(study)
    client = mlflow.MlflowClient()
    for registered in client.search_registered_models():
        client.delete_registered_model(registered.name)
    shutil.rmtree(study.root / "mlartifacts")
    import medtransfer.analysis.extract as extract_module

    def no_network(*args, **kwargs):
        raise AssertionError("compare loaded a model or read the tracking store's artifacts")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("medtransfer.models.mlflow_models.load_registered_model", no_network)
        patch.setattr("mlflow.artifacts.download_artifacts", no_network)
        patch.setattr(extract_module, "_extract_model", no_network)
        folder = run_compare(study, DATASET)
    _, after = _read_csv(folder / "similarity.csv")
    _, predictions = _read_csv(folder / "predictions.csv")
    assert len(predictions) == 6  # 3 pairs x 2 folds, from the predictions saved beside the activations
    assert [row["value"] for row in after] == [row["value"] for row in before]
