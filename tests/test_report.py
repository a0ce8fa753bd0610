"""The report reads every number from the study's outputs: check its tables against numbers computed here."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import json
import sqlite3
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from medtransfer.config import load_config
from medtransfer.errors import DataError, ModelError
from medtransfer.pointers import FoldModel, ModelPointer, pointer_path, read_pointer, write_pointer
from medtransfer.registry import Tag
from medtransfer.analysis.study_summary import write_summary
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
        sources={"natural": {"kind": "safetensors", "arch": "resnet18", "path": "natural.safetensors"},
                 "medical": {"kind": "safetensors", "arch": "resnet18", "path": "medical.safetensors"},
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
         "pearson_cca_layer_source": -0.51, "pearson_cka_layer_source": 0.21, "points_layer_source": 3}])
    _write_csv(folder / "auc_intervals.csv", [
        {"source": source, "regime": regime, "fold": k, "model": f"target.{source}.{regime}.v{k + 1}", "images": 50,
         "test_auc": auc, "test_auc_low": auc - 0.05, "test_auc_high": min(auc + 0.04, 1.0), "resamples": 1000,
         "level": 0.95} for (source, regime), aucs in AUCS.items() for k, auc in enumerate(aucs)])
    _write_csv(folder / "paired_comparison.csv", [
        {"regime": "full", "source_a": "medical", "source_b": "natural", "folds": 3, "auc_a": 0.81, "auc_b": 0.88,
         "differences": "-0.11 -0.01 -0.09", "mean_difference": -0.07, "low": -0.2133, "high": 0.0733, "t": -1.9,
         "p": 0.1978, "correction": 0.25, "level": 0.95}])
    (folder / "layers_cca.png").write_bytes(b"\x89PNG fake")
    write_summary(config)  # the study-level tables the report opens with
    return config


class _RegistryAsThePointersSay:
    """An MLflow client answering as the registry `study` describes: the tables are under test here, not MLflow."""

    def get_model_version(self, name, version):
        return SimpleNamespace(version=str(version), tags={Tag.WEIGHTS_SHA256: ("1" if name.startswith("source.") else "0") * 64})

    def get_model_version_by_alias(self, name, alias):
        return SimpleNamespace(version=str(int(alias.removeprefix("fold")) + 1))


def test_report_tables_come_from_the_outputs(study, markdown_table):
    report = run_report(study, client=_RegistryAsThePointersSay())
    text = report.read_text()
    (auc_row,) = markdown_table(text, "## Test AUC ×100 (mean ± sd over folds)")
    assert auc_row["target"] == "target"
    for (source, _), aucs in AUCS.items():  # each cell under its own source's column: swapped columns fail
        scaled = [100 * a for a in aucs]
        assert auc_row[source] == f"{statistics.mean(scaled):.1f} ± {statistics.stdev(scaled):.1f}", source
    assert "| fine-tuned vs its initialisation: natural | full | 0.90 ± 0.01 | 0.80 ± 0.01 |" in text
    assert "| noise floor: shuffled images | – | 0.30 ± 0.03 |" in text
    agreements = [0.82, 0.86, 0.84]
    assert f"{statistics.mean(agreements):.2f} ± {statistics.stdev(agreements):.2f} | 0.74" in text
    assert "| stage4 | natural | full | 3 | -0.51 | 0.21 |" in text  # per source and regime, not the pooled r
    assert "| target.natural.full | fold0=v1, fold1=v2, fold2=v3 | source.natural v4 |" in text
    (natural_intervals,) = [row for row in markdown_table(text, "## Do the sources differ beyond fold noise? — target")
                            if row["source"] == "natural"]
    assert natural_intervals["fold 0"] == "91.0 (86.0–95.0)" and natural_intervals["fold 2"] == "88.0 (83.0–92.0)"
    paired = text.split("Paired differences of test AUC")[1]
    assert "| full | medical − natural | 3 | -11.0, -1.0, -9.0 | -7.0 | -21.3 to +7.3 | 0.198 |" in paired
    study_rows = {row["source"]: row for row in markdown_table(text, "## The study across targets")}
    random_mean = statistics.mean(AUCS[("random", "full")])
    natural_gain = 100 * (statistics.mean(AUCS[("natural", "full")]) - random_mean) / random_mean
    assert study_rows["natural"]["gain over random init"] == f"{natural_gain:+.1f} %"
    assert study_rows["random"]["gain over random init"] == "(the baseline)"  # never "+0.0 %" against itself
    assert "Targets:\n\n- `target`: " in text  # each target with its description (e.g. "no patient ids")
    # the first screen states the comparison in words, from the interval, before any table
    assert text.index("## The answer in brief") < text.index("## The study across targets")
    assert ("- **medical vs natural** (full): target: the folds cannot tell them apart (-7.0, 95 % -21.3 to +7.3)."
            in text)
    assert "needs more than one target; this study has one (target)" in text
    across = text.split("## Across targets: Wilcoxon signed-rank test on the per-target mean differences")[1]
    assert across.lstrip().startswith("Needs two or more targets (at least 6 for p < 0.05); this study has 1.")
    assert "| regime |" not in across.split("##")[0]  # one line, no table of empty rows
    assert (report.parent / "figures/target_layers_cca.png").is_file()
    assert "figures/target_layers_cca.png" in text


def test_report_refuses_without_analysis(study, tmp_path):
    import shutil

    (tmp_path / "results/analysis/target/predictions.csv").unlink()  # not to be worded as "nothing to compare"
    with pytest.raises(DataError, match="the analysis of target 'target' lacks predictions.csv"):
        run_report(study, client=_RegistryAsThePointersSay())
    shutil.rmtree(tmp_path / "results/analysis")
    with pytest.raises(DataError, match="no analysis for target 'target'"):
        run_report(study, client=_RegistryAsThePointersSay())


# -- faults: the report trusts neither its pointers nor the tracking store, and rewrites nothing before both pass --

OLD_REPORT = "the previous report, to be kept\n"


def _keep_a_previous_report(config):
    (config.root / "reports").mkdir()
    (config.root / "reports/report.md").write_text(OLD_REPORT)


def _assert_one_line_exit_2_and_report_kept(result, config, expected):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in lines[0], lines[0]
    assert (config.root / "reports/report.md").read_text() == OLD_REPORT
    assert sorted(path.name for path in (config.root / "reports").iterdir()) == ["report.md"]


def test_report_refuses_pointers_the_registry_does_not_hold(study, cli):
    # The registry of the study folder is empty: every version the pointers name (here v99) is unknown to it.
    path = study.root / "results/models/target.medical.full.json"
    pointer = json.loads(path.read_text())
    pointer["folds"][1]["version"] = "99"
    path.write_text(json.dumps(pointer))
    _keep_a_previous_report(study)
    result = cli("--params", str(study.source_file), "report", timeout=120)
    _assert_one_line_exit_2_and_report_kept(
        result, study, "the registry disagrees with the model pointer: target.medical.full version 1 does not exist")
    assert str(path) in result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda pointer: pointer.update(folds=[]), "'folds' names no registered fit"),
        (lambda pointer: pointer["folds"][0].update(test_auc="high"), "fold 0 has test_auc 'high', not a number"),
        (lambda pointer: pointer["folds"][0].update(test_auc=7.5), "fold 0 has test_auc 7.5, not a number"),
        (lambda pointer: pointer["folds"][0].update(version="latest"), "names version 'latest', not a registry version"),
    ],
)
def test_report_refuses_malformed_pointer_content(study, change, expected):
    path = study.root / "results/models/target.natural.full.json"
    pointer = json.loads(path.read_text())
    change(pointer)
    path.write_text(json.dumps(pointer))
    with pytest.raises(ModelError) as caught:
        run_report(study, client=_RegistryAsThePointersSay())
    assert expected in caught.value.one_line() and str(path) in caught.value.one_line()
    assert not (study.root / "reports").exists()


def _store_is_a_folder(store):
    store.mkdir()


def _store_is_random_bytes(store):
    store.write_bytes(np.random.default_rng(0).bytes(4096))


def _store_is_truncated(store):
    with contextlib.closing(sqlite3.connect(store)) as database:
        database.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
        database.execute("CREATE INDEX runs_name ON runs (name)")
        database.executemany("INSERT INTO runs (name) VALUES (?)", [(f"run {index}" * 8,) for index in range(4000)])
        database.commit()
    with store.open("r+b") as stream:
        stream.truncate(store.stat().st_size // 2)


@pytest.mark.parametrize(
    ("break_store", "expected"),
    [
        (_store_is_a_folder, "mlflow.db is not a regular file"),
        (_store_is_random_bytes, "mlflow.db is not an SQLite database"),
        (_store_is_truncated, "mlflow.db is damaged (database disk image is malformed)"),
    ],
    ids=["folder", "random_bytes", "truncated"],
)
def test_report_refuses_a_broken_tracking_store_in_seconds(study, cli, break_store, expected):
    break_store(study.root / "mlflow.db")
    _keep_a_previous_report(study)
    # MLflow itself retried for about 50 s before its traceback; the timeout makes "in seconds" part of the test.
    result = cli("--params", str(study.source_file), "report", timeout=45)
    _assert_one_line_exit_2_and_report_kept(result, study, expected)
    assert "stores.tracking_uri" in result.stderr


def test_report_refuses_a_store_in_a_missing_folder(study, cli):
    params = yaml.safe_load(study.source_file.read_text())
    params["stores"]["tracking_uri"] = "sqlite:///no/such/folder/mlflow.db"
    study.source_file.write_text(yaml.safe_dump(params))
    _keep_a_previous_report(study)
    result = cli("--params", str(study.source_file), "report", timeout=45)
    _assert_one_line_exit_2_and_report_kept(result, study, f"the tracking store's folder {study.root}/no/such/folder does not exist")
    assert not (study.root / "no").exists(), "no empty database made elsewhere"


def test_report_refuses_an_unreadable_store(study, cli_without_root_file_access):
    store = study.root / "mlflow.db"
    store.write_bytes(b"SQLite format 3\x00" + bytes(4080))
    store.chmod(0)
    _keep_a_previous_report(study)
    result = cli_without_root_file_access("--params", str(study.source_file), "report", timeout=45)
    _assert_one_line_exit_2_and_report_kept(result, study, f"cannot read the tracking store {store} (Permission denied)")


def test_every_auc_names_the_protocol_that_produced_it(study, markdown_table):
    """One protocol: said once above the AUC table; two: each cell names its own; the study table has a column."""
    client = _RegistryAsThePointersSay()
    text = run_report(study, client=client).read_text()
    assert "- protocol `search` (every cell):" in text
    path = pointer_path(study, "target", "natural", "full")
    write_pointer(study, dataclasses.replace(read_pointer(path), protocol="paper"))
    write_summary(study)
    text = run_report(study, client=client).read_text()
    (auc_row,) = markdown_table(text, "## Test AUC ×100 (mean ± sd over folds)")
    assert auc_row["natural"].endswith(" (paper)") and auc_row["medical"].endswith(" (search)")
    assert "- protocol `paper` (named in each cell): the original study's fixed protocol" in text
    rows = {row["source"]: row["protocol"] for row in markdown_table(text, "## The study across targets")}
    assert rows == {"natural": "paper", "medical": "search", "random": "search"}


def test_a_value_from_too_few_rows_per_channel_is_marked_with_a_legend(study, markdown_table):
    folder = study.resolve("results/analysis/target")
    with (folder / "similarity_summary.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        if row["layer"] == "stage4":  # one position per image at the last stage: 2 rows per channel
            row.update(reliable_share="0.0", rows_per_channel="2.0")
    _write_csv(folder / "similarity_summary.csv", rows)
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    (row,) = [row for row in markdown_table(text, "### mean CCA (mean ± sd over folds [95 % interval])")
              if row["regime"] == "full"]
    assert row["stage4"] == "0.50 ± 0.01†"  # a table written without interval columns shows mean ± sd alone
    assert all("†" not in row[layer] for layer in ("stem", "stage1", "stage2", "stage3"))
    section = text.split("### mean CCA")[1].split("###")[0]
    assert "† unreliable: in at least one fold the comparison had fewer than 10 rows" in section
    assert "(here as few as 2.0)" in section and "canonical correlations are biased towards 1" in section
    assert "† unreliable" not in text.split("## Layer-wise similarity")[0]

def test_similarity_cells_give_the_interval_compare_wrote_and_say_what_it_is(study, markdown_table):
    folder = study.resolve("results/analysis/target")
    with (folder / "similarity_summary.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row.update(ci_low="", ci_high="", ci_basis="", ci_scale="")
        if row["pair_kind"] == "source_vs_finetuned" and row["layer"] == "stem":  # over 3 folds (count 3)
            row.update(ci_low="0.8712", ci_high="0.9288", ci_basis="folds", ci_scale="logit")
        if row["pair_kind"] == "source_vs_finetuned" and row["layer"] == "stage1":
            row.update(ci_low="0.7501", ci_high="0.8499", ci_basis="channel draws", ci_scale="logit")
    _write_csv(folder / "similarity_summary.csv", rows)
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    (row,) = [row for row in markdown_table(text, "### mean CCA (mean ± sd over folds [95 % interval])")
              if row["regime"] == "full"]
    assert row["stem"] == "0.90 ± 0.01 [0.87, 0.93]"
    assert row["stage1"] == "0.80 ± 0.01 [0.75, 0.85]‡"
    assert row["stage2"] == "0.70 ± 0.01"  # no interval written: none shown
    section = text.split("### mean CCA")[1].split("###")[0]
    assert "95 % interval of the mean: Student t over the folds (k − 1 degrees of freedom), widened by Nadeau & " \
           "Bengio's correction" in section
    # the scale, and why: the interval stays inside the measure's range
    assert "computed on the logit scale, as the measure lies in [0, 1], and mapped back" in section
    assert "Fisher's z" not in section  # no row on that scale
    # 3 folds: wide for that reason, with the t quantile of 2 degrees of freedom (scipy: 4.3027)
    assert "With only 3 folds the intervals are wide for that reason" in section
    assert "the t quantile with 2 degrees of freedom is 4.30" in section
    assert "‡ one fold only: not a confidence interval for the similarity but the Monte-Carlo error of the " \
           "channel sampling" in section


def test_report_html_is_self_contained_and_holds_the_tables(study):
    import re

    run_report(study, client=_RegistryAsThePointersSay())
    page = (study.root / "reports/report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page)
    assert sources and all(source.startswith("data:") for source in sources), sources
    assert "<th>natural</th>" in page
    scaled = [100 * a for a in AUCS[("natural", "full")]]
    assert f"<td>{statistics.mean(scaled):.1f} ± {statistics.stdev(scaled):.1f}</td>" in page
    assert "<td>fine-tuned vs its initialisation: natural</td><td>full</td><td>0.90 ± 0.01</td>" in page
    embedded = base64.b64encode((study.root / "reports/figures/target_layers_cca.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{embedded}"' in page


def test_report_html_renders_the_markdown_subset(tmp_path):
    from medtransfer.report_html import markdown_to_html

    (tmp_path / "f.png").write_bytes(b"\x89PNG")
    blocks = markdown_to_html(
        "# Title <x>\n\nline one\nline `a<b` **bold** *em*\n\n- item `c`\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "![cap](f.png)\n\n![gone](missing.png)", tmp_path)
    assert blocks == [
        "<h1>Title &lt;x&gt;</h1>",
        "<p>line one line <code>a&lt;b</code> <strong>bold</strong> <em>em</em></p>",
        "<ul><li>item <code>c</code></li><li>two</li></ul>",
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table>",
        '<figure><img src="data:image/png;base64,iVBORw==" alt="cap"><figcaption>cap</figcaption></figure>',
        "<p><em>figure not available: missing.png</em></p>",
    ]


def test_twins_named_in_params_put_the_paper_beside_the_study(study, markdown_table):
    from medtransfer.paper_reference import load_paper_results

    raw = yaml.safe_load(study.source_file.read_text())
    raw["datasets"]["target"]["paper_target"] = "breast"
    for ours, twin in (("natural", "imagenet"), ("medical", "radimagenet"), ("random", "random")):
        raw["sources"][ours]["paper_source"] = twin
    study.source_file.write_text(yaml.safe_dump(raw))
    text = run_report(load_config(study.source_file), client=_RegistryAsThePointersSay()).read_text()
    assert "## Beside the paper (Juodelyte et al., TMLR 2024)" in text
    rows = {row["source"]: row for row in markdown_table(text, "### Test AUC ×100: ours, the paper's, the difference")}
    paper = load_paper_results()  # the oracle is the shipped data file, not code
    for ours, twin in (("natural", "imagenet"), ("medical", "radimagenet"), ("random", "random")):
        row = rows[f"{ours} ({twin})"]
        scaled = [100 * a for a in AUCS[(ours, "full")]]
        theirs = paper.test_auc[("breast", twin, "full")]
        assert row["target"] == "target (breast)" and row["regime"] == "full"
        assert row["ours"] == f"{statistics.mean(scaled):.1f} ± {statistics.stdev(scaled):.1f}"
        assert row["paper"] == f"{theirs[0]:.1f} ± {theirs[1]:.1f}"
        assert row["difference"] == f"{statistics.mean(scaled) - theirs[0]:+.1f}"


def test_without_twins_the_report_has_no_paper_section(study):
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    assert "Beside the paper" not in text


def test_pairs_across_architectures_say_which_stages_were_compared(study, markdown_table):
    folder = study.root / "results/analysis/target"
    assert "Pairs across architectures" not in run_report(study, client=_RegistryAsThePointersSay()).read_text()
    rows = [{"arch_a": "convnext_atto", "arch_b": "resnet18", "stage_a": f"stages.{k}", "reduction_a": 4 << k,
             "stage_b": f"stage{k + 1}", "reduction_b": 4 << k, "status": "paired"} for k in range(4)]
    rows.append({"arch_a": "convnext_atto", "arch_b": "resnet18", "stage_a": "", "reduction_a": "", "stage_b": "stem",
                 "reduction_b": 2, "status": "no stage at reduction 2 on the other side"})
    rows += [{"arch_a": "resnet18", "arch_b": "resnet18", "stage_a": s, "reduction_a": 4, "stage_b": s,
              "reduction_b": 4, "status": "paired by name"} for s in ("stage1", "stage2")]
    _write_csv(folder / "stage_matches.csv", rows)
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    (row,) = markdown_table(text, "## Layer-wise similarity — target")
    assert row["architecture a"] == "convnext_atto" and row["architecture b"] == "resnet18"
    assert row["compared (a~b, reduction)"] == ("stages.0~stage1 (/4), stages.1~stage2 (/8), stages.2~stage3 (/16), "
                                                "stages.3~stage4 (/32)")
    assert row["without partner"] == "stem"


def test_several_random_floors_are_named_by_their_pair(study):
    folder = study.root / "results/analysis/target"
    with (folder / "similarity_summary.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    base = {**rows[0], "pair_kind": "random_vs_random", "regime": "", "measure": "cca"}
    _write_csv(folder / "similarity_summary.csv", [*rows, {**base, "pair": "random vs random_b"}])
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    assert "| noise floor: two random initialisations | – |" in text  # one floor: no pair name needed
    _write_csv(folder / "similarity_summary.csv", [*rows, {**base, "pair": "random vs random_b"},
                                                   {**base, "pair": "random_convnext vs random_convnext_b"}])
    text = run_report(study, client=_RegistryAsThePointersSay()).read_text()
    assert "| noise floor: two random initialisations: random vs random_b | – |" in text
    assert "| noise floor: two random initialisations: random_convnext vs random_convnext_b | – |" in text


def test_a_fold_with_undefined_kappa_is_named_in_the_cell_and_legend(study, markdown_table):
    """Both models right on every image of fold 1: error consistency and label κ are undefined there (NaN), so each
    mean rests on 2 of the 3 folds, and the cell, the HTML and the legend say so instead of passing for 3."""
    path = study.root / "results/analysis/target/predictions.csv"
    rows = list(csv.DictReader(path.open()))
    rows[1].update({"accuracy_a": 1.0, "accuracy_b": 1.0, "error_agreement": 1.0, "error_agreement_chance": 1.0,
                    "error_consistency": "nan", "label_kappa": "nan"})
    _write_csv(path, rows)
    run_report(study, client=_RegistryAsThePointersSay())
    text = (study.root / "reports/report.md").read_text()
    (row,) = markdown_table(text, "## Prediction similarity — target")
    kappas = [(0.82 - 0.74) / 0.26, (0.84 - 0.74) / 0.26]  # folds 0 and 2
    assert row["error consistency κ"] == (f"{statistics.mean(kappas):.2f} ± {statistics.stdev(kappas):.2f} "
                                          "(2 of 3 folds; κ undefined where both models are always right (or both "
                                          "always wrong))")
    assert row["label κ"].startswith("0.50 ± 0.00 (2 of 3 folds; κ undefined where both models predict")
    agreements = [0.82, 1.0, 0.84]  # defined on every fold: no count
    assert row["error agreement"] == f"{statistics.mean(agreements):.2f} ± {statistics.stdev(agreements):.2f}"
    assert "(k of n folds): the mean and sd rest on the k folds where the value is defined" in text
    page = (study.root / "reports/report.html").read_text(encoding="utf-8")
    assert "(2 of 3 folds; κ undefined where both models are always right" in page


def test_a_fold_without_a_test_auc_is_named_in_the_auc_cells(study, markdown_table):
    pointer = read_pointer(pointer_path(study, "target", "medical", "full"))
    folds = [dataclasses.replace(fit, test_auc=None) if fit.fold == 2 else fit for fit in pointer.folds]
    write_pointer(study, dataclasses.replace(pointer, folds=folds))
    write_summary(study)
    run_report(study, client=_RegistryAsThePointersSay())
    text = (study.root / "reports/report.md").read_text()
    (auc_row,) = markdown_table(text, "## Test AUC ×100 (mean ± sd over folds)")
    scaled = [100 * auc for auc in AUCS[("medical", "full")][:2]]
    assert auc_row["medical"] == (f"{statistics.mean(scaled):.1f} ± {statistics.stdev(scaled):.1f} (2 of 3 folds; "
                                  "no test AUC where a fold's test part holds one class only)")
    study_rows = {row["source"]: row for row in markdown_table(text, "## The study across targets")}
    assert study_rows["medical"]["test AUC"].endswith("(2 of 3 folds; no test AUC where a fold's test part holds "
                                                      "one class only)")
    assert study_rows["natural"]["test AUC"].count("(") == 0
