"""The report reads every number from the study's outputs: check its tables against numbers computed here."""

from __future__ import annotations

import csv
import statistics

import pytest

from medtransfer.config import load_config
from medtransfer.errors import DataError
from medtransfer.pointers import FoldModel, ModelPointer, write_pointer
from medtransfer.report import run_report

AUCS = {("natural", "full"): [0.91, 0.85, 0.88], ("medical", "full"): [0.80, 0.84, 0.79], ("random", "full"): [0.6, 0.7, 0.65]}


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def study(tmp_path, write_params):
    params = write_params(
        {"target": {"format": "medmnist", "path": "t.npz", "classes": ["a", "b"]}},
        sources={"natural": {"kind": "random", "arch": "resnet18", "seed": 1},
                 "medical": {"kind": "random", "arch": "resnet18", "seed": 2},
                 "random": {"kind": "random", "arch": "resnet18", "seed": 3}},
        study={"targets": ["target"], "sources": ["natural", "medical", "random"], "regimes": ["full"]},
    )
    config = load_config(params)
    for (source, regime), aucs in AUCS.items():
        folds = [FoldModel(fold=k, seed=0, version=str(k + 1), run_id=f"run{k}", weights_sha256="0" * 64,
                           alias=f"fold{k}", test_auc=auc) for k, auc in enumerate(aucs)]
        write_pointer(config, ModelPointer(
            registered_model=f"target.{source}.{regime}", dataset="target", source=source, regime=regime,
            source_model=f"source.{source}", source_version="4", source_weights_sha256="1" * 64,
            data_fingerprint="f" * 64, study=f"s/target.{source}.{regime}", champion_version="2", folds=folds))
    folder = tmp_path / "results/analysis/target"
    summary = []
    for layer, value in zip(("stem", "stage1", "stage2", "stage3", "stage4"), (0.9, 0.8, 0.7, 0.6, 0.5)):
        summary.append({"pair_kind": "source_vs_finetuned", "pair": "natural", "regime": "full", "layer": layer,
                        "measure": "cca", "mean": value, "sd": 0.01, "count": 3, "reliable_share": 1,
                        "rows_per_channel": 20, "random_vs_random_mean": 0.4, "random_vs_random_sd": 0.02,
                        "shuffled_mean": 0.3, "shuffled_sd": 0.03})
        summary.append({**summary[-1], "pair_kind": "shuffled", "mean": 0.31})
    _write_csv(folder / "similarity_summary.csv", summary)
    _write_csv(folder / "predictions.csv", [
        {"pair": "natural vs medical", "model_a": "a", "model_b": "b", "fold": k, "regime": "full", "images": 100,
         "accuracy_a": 0.9, "accuracy_b": 0.8, "error_agreement": ea, "error_agreement_chance": 0.74,
         "error_consistency": (ea - 0.74) / 0.26, "label_agreement": ea, "label_kappa": 0.5,
         "probability_correlation": 0.8, "probability_correlation_of": "p(class 1)", "jensen_shannon": 0.1,
         "jensen_shannon_base": 2} for k, ea in enumerate((0.82, 0.86, 0.84))])
    _write_csv(folder / "similarity_vs_gain.csv", [
        {"source": "natural", "regime": "full", "fold": 0, "layer": "stage4", "model": "m", "source_model": "s",
         "random_init_model": "r", "cca": 0.5, "cka": 0.6, "test_auc": 0.9, "random_init_test_auc": 0.6,
         "relative_gain": 0.5, "pearson_cca_layer": -0.42, "pearson_cka_layer": 0.13, "points_layer": 6,
         "pearson_cca_layer_source": "", "pearson_cka_layer_source": "", "points_layer_source": 3}])
    (folder / "layers_cca.png").write_bytes(b"\x89PNG fake")
    return config


def test_report_tables_come_from_the_outputs(study):
    report = run_report(study)
    text = report.read_text()
    for (source, _), aucs in AUCS.items():
        scaled = [100 * a for a in aucs]
        assert f"{statistics.mean(scaled):.1f} ± {statistics.stdev(scaled):.1f}" in text, source
    assert "| fine-tuned vs its initialisation: natural | full | 0.90 ± 0.01 | 0.80 ± 0.01 |" in text
    assert "| noise floor: shuffled images | – | 0.30 ± 0.03 |" in text
    agreements = [0.82, 0.86, 0.84]
    assert f"{statistics.mean(agreements):.2f} ± {statistics.stdev(agreements):.2f} | 0.74" in text
    assert "| stage4 | 6 | -0.42 | 0.13 |" in text
    assert "| target.natural.full | fold0=v1, fold1=v2, fold2=v3 | source.natural v4 |" in text
    assert (report.parent / "figures/target_layers_cca.png").is_file()
    assert "figures/target_layers_cca.png" in text


def test_report_refuses_without_analysis(study, tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "results/analysis")
    with pytest.raises(DataError, match="no analysis for target 'target'"):
        run_report(study)
