"""The study-level summary against numbers this test assembles itself from the per-target tables."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.stats

from medtransfer.analysis.study_summary import (
    cross_target_similarity,
    pooled_gain_correlations,
    run_summary,
)
from medtransfer.config import load_config
from medtransfer.pointers import FoldModel, ModelPointer, write_pointer
from medtransfer.tables import read_table

TARGETS = ("alpha", "beta", "gamma")
LAYERS = ("stem", "stage1")
SOURCES = ("natural", "medical")


#: Two architectures, each with its own random init: a source's gain must be over its own architecture's.
ARCH_OF = {"natural": "resnet18", "medical": "resnet18", "natural_convnext": "convnext_atto"}


def _gain_rows(target_index):
    """similarity_vs_gain.csv rows of one target as `compare` writes them: three sources of two architectures, two
    regimes, three folds; every row's baseline is the random init of its own architecture fine-tuned in `full`."""
    rng = np.random.default_rng(target_index)
    random_full = {(arch, fold): 0.6 + 0.02 * fold + 0.01 * target_index + (0.2 if arch == "convnext_atto" else 0)
                   for arch in set(ARCH_OF.values()) for fold in range(3)}
    rows = []
    for source in ARCH_OF:
        for regime in ("full", "freeze"):
            for fold in range(3):
                auc = float(rng.uniform(0.65, 0.95))
                base = random_full[(ARCH_OF[source], fold)]
                for layer in LAYERS:
                    rows.append({"source": source, "regime": regime, "fold": str(fold), "layer": layer,
                                 "cca": repr(float(rng.uniform(0.2, 0.9))), "cka": repr(float(rng.uniform(0.2, 0.9))),
                                 "test_auc": repr(auc), "random_init_test_auc": repr(base),
                                 "relative_gain": repr((auc - base) / base),
                                 "pearson_cca_layer_source": "0.1", "pearson_cka_layer_source": "nan"})
    return rows


def _summary_rows(target_index):
    rng = np.random.default_rng(100 + target_index)
    rows = []
    for kind, pair, regime in (("source_vs_finetuned", "natural", "full"), ("random_vs_random", "random vs random_b", "")):
        for layer in LAYERS:
            for measure in ("cca", "cka"):
                rows.append({"pair_kind": kind, "pair": pair, "regime": regime, "layer": layer, "measure": measure,
                             "mean": repr(float(rng.uniform(0.2, 0.9))),
                             "random_vs_random_mean": repr(float(rng.uniform(0.3, 0.5)))})
    return rows


def test_pooled_correlation_is_pearson_per_source_and_regime_with_the_own_architecture_full_baseline():
    tables = {target: _gain_rows(index) for index, target in enumerate(TARGETS)}
    rows = pooled_gain_correlations(tables)
    result = {(r["source"], r["regime"], r["layer"], r["measure"]): r for r in rows}
    assert len(result) == len(ARCH_OF) * 2 * len(LAYERS) * 2
    # stage order, never sorted by name (sorting would put stage1 before stem)
    assert [r["layer"] for r in rows if (r["source"], r["regime"], r["measure"]) == ("medical", "full", "cca")] == \
        list(LAYERS)
    for source in ARCH_OF:
        for regime in ("full", "freeze"):
            for layer in LAYERS:
                similarity, gain = [], []
                for target_index, rows_of_target in enumerate(tables.values()):
                    for row in rows_of_target:
                        if (row["source"], row["regime"], row["layer"]) == (source, regime, layer):
                            # the baseline assembled here: random init of the source's own architecture, in `full`
                            base = 0.6 + 0.02 * int(row["fold"]) + 0.01 * target_index + \
                                (0.2 if ARCH_OF[source] == "convnext_atto" else 0)
                            similarity.append(float(row["cca"]))
                            gain.append((float(row["test_auc"]) - base) / base)
                row = result[(source, regime, layer, "cca")]
                assert row["points"] == len(similarity) == 9 and row["targets"] == 3
                assert row["pearson_r"] == pytest.approx(scipy.stats.pearsonr(similarity, gain).statistic, abs=1e-12)
                assert row["mean_per_target_r"] == pytest.approx(0.1)


def test_cross_target_means_are_the_mean_of_each_targets_value():
    summaries = {target: _summary_rows(index) for index, target in enumerate(TARGETS)}
    result = cross_target_similarity(summaries)
    assert [r["layer"] for r in result if (r["pair_kind"], r["measure"]) == ("source_vs_finetuned", "cca")] == \
        list(LAYERS)  # stage order
    for row in result:
        values = [float(r["mean"]) for rows in summaries.values() for r in rows
                  if (r["pair_kind"], r["layer"], r["measure"]) == (row["pair_kind"], row["layer"], row["measure"])]
        floors = [float(r["random_vs_random_mean"]) for rows in summaries.values() for r in rows
                  if (r["pair_kind"], r["layer"], r["measure"]) == (row["pair_kind"], row["layer"], row["measure"])]
        assert row["targets"] == 3
        assert row["mean"] == pytest.approx(np.mean(values)) and row["sd"] == pytest.approx(np.std(values, ddof=1))
        assert row["random_vs_random_mean"] == pytest.approx(np.mean(floors))


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class _RegistryAsThePointersSay:
    """An MLflow client answering as the pointers below describe: the tables are under test here, not MLflow."""

    def get_model_version(self, name, version):
        from types import SimpleNamespace

        recorded = ("1" if name.startswith("source.") else "0") * 64
        return SimpleNamespace(version=str(version), tags={"weights_sha256": recorded})

    def get_model_version_by_alias(self, name, alias):
        from types import SimpleNamespace

        return SimpleNamespace(version=str(int(alias.removeprefix("fold")) + 1))


def test_summary_writes_tables_metrics_and_the_auc_table_with_the_gain_over_random_init(tmp_path, write_params,
                                                                                      monkeypatch):
    params = write_params(
        {target: {"format": "medmnist", "path": "t.npz", "classes": ["a", "b"]} for target in TARGETS[:2]},
        sources={"natural": {"kind": "safetensors", "arch": "resnet18", "path": "natural.safetensors"},
                 "random": {"kind": "random", "arch": "resnet18", "seed": 3}},
        study={"targets": list(TARGETS[:2]), "sources": ["natural", "random"], "regimes": ["full"]},
    )
    config = load_config(params)
    aucs = {("alpha", "natural"): [0.9, 0.8], ("alpha", "random"): [0.6, 0.7],
            ("beta", "natural"): [0.7, 0.75], ("beta", "random"): [0.5, 0.55]}
    for (target, source), values in aucs.items():
        folds = [FoldModel(fold=k, seed=0, version=str(k + 1), run_id=f"r{k}", weights_sha256="0" * 64,
                           alias=f"fold{k}", test_auc=auc) for k, auc in enumerate(values)]
        write_pointer(config, ModelPointer(
            registered_model=f"{target}.{source}.full", dataset=target, source=source, regime="full",
            source_model=f"source.{source}", source_version="1", source_weights_sha256="1" * 64,
            data_fingerprint="f" * 64, study="s", champion_version="1", folds=folds))
    for index, target in enumerate(TARGETS[:2]):
        folder = tmp_path / "results/analysis" / target
        _write_csv(folder / "similarity_summary.csv", _summary_rows(index))
        _write_csv(folder / "similarity_vs_gain.csv", _gain_rows(index))
    import matplotlib.figure

    saved = matplotlib.figure.Figure.savefig
    x_orders = []

    def remember_x_order(figure, *args, **kwargs):
        x_orders.append([label.get_text() for label in figure.axes[0].get_xticklabels()])
        return saved(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", remember_x_order)
    folder = run_summary(config, client=_RegistryAsThePointersSay())
    # every cross-target figure runs in stage order (stem first), never sorted by name
    assert x_orders and all(order == list(LAYERS) for order in x_orders), x_orders
    with (folder / "auc_table.csv").open() as stream:
        table = {(row["target"], row["source"]): row for row in csv.DictReader(stream)}
    natural = table[("alpha", "natural")]
    assert float(natural["test_auc_mean"]) == pytest.approx(0.85)
    assert float(natural["relative_gain"]) == pytest.approx((0.85 - 0.65) / 0.65)
    assert natural["random_init_source"] == "random"
    # dvc metrics show: a short row per source and regime, means over targets; the pooled r stays in the CSV
    rows = {path.name: json.loads(path.read_text()) for path in (tmp_path / "results/metrics/study").iterdir()}
    gains = ((0.85 - 0.65) / 0.65, (0.725 - 0.525) / 0.525)
    assert rows == {"natural.full.json": {"test_auc_mean": pytest.approx((0.85 + 0.725) / 2),
                                          "relative_gain": pytest.approx(sum(gains) / 2)},
                    "random.full.json": {"test_auc_mean": pytest.approx((0.65 + 0.525) / 2)}}
    assert {"source", "layer", "measure", "pearson_r"} <= set(read_table(folder / "gain_correlation.csv")[0])
    assert (folder / "cross_target_cca.png").is_file()


def test_a_value_unreliable_on_one_target_is_marked_in_the_cross_target_table():
    from medtransfer.report_summary import _cross_target_table

    summaries = {target: _summary_rows(index) for index, target in enumerate(TARGETS)}
    for rows in summaries.values():
        for row in rows:
            row["reliable_share"] = "1.0"
    stage4 = next(r for r in summaries[TARGETS[1]] if r["layer"] == LAYERS[-1] and r["pair_kind"] == "source_vs_finetuned")
    stage4["reliable_share"] = "0.5"  # one fold of one target had too few rows per channel
    rows = cross_target_similarity(summaries)
    marked = [r for r in rows if r["reliable_share"] < 1]
    assert [(r["pair_kind"], r["pair"], r["layer"], r["measure"]) for r in marked] == [
        (stage4["pair_kind"], stage4["pair"], LAYERS[-1], stage4["measure"])]
    assert marked[0]["reliable_share"] == pytest.approx((1 + 0.5 + 1) / 3)
    table = _cross_target_table([{k: str(v) for k, v in r.items()} for r in rows], stage4["measure"], "t",
                                list(LAYERS), 3)
    (line,) = [line for line in table if line.startswith("| fine-tuned vs its initialisation")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[-1].endswith("†") and not any(cell.endswith("†") for cell in cells[2:-1])
    assert any(line.startswith("† unreliable") for line in table)
