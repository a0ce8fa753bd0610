"""The whole study against a real MLflow tracking server, checked over its REST API as the UI sees it."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow(minutes=5)


def _env(extra=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"})
    env.update(extra or {})
    return env


# One study per run of the suite (each takes minutes): on PostgreSQL with proxied artifacts, as a shared deployment
# would run, where a PostgreSQL server is given, and always under CI (where a missing server fails the run); on
# SQLite otherwise. Both paths share every line of our code but the store URLs, and the SQLite server is exercised
# by the parallel-workers test of tests/search too.
ON_POSTGRES = bool(os.environ.get("MEDTRANSFER_TEST_POSTGRES_URL")) or os.environ.get("CI") == "true"
BACKENDS = ["postgresql"] if ON_POSTGRES else ["sqlite"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """The tracking server's backend store, and Optuna's storage for the study."""
    if request.param == "sqlite":
        return {"kind": "sqlite", "optuna": "sqlite:///optuna.db"}
    create = request.getfixturevalue("postgres_database")
    return {"kind": "postgresql", "store": create("server"), "optuna": create("study_optuna")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, backend, start_mlflow_server):
    store = tmp_path_factory.mktemp("server")
    if backend["kind"] == "sqlite":
        storage = ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                   "--default-artifact-root", (store / "artifacts").as_uri()]
    else:  # clients never touch the artifact folder: they upload through the server (mlflow-artifacts:/)
        storage = ["--backend-store-uri", backend["store"], "--serve-artifacts",
                   "--artifacts-destination", str(store / "artifacts")]
    with start_mlflow_server(storage) as url:
        yield url


def _api(url, path, payload=None):
    if payload is None:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}")
    else:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _tags(run):
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, blob_npz, server, backend):
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".dvcignore", "MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, root / name)
    shutil.copytree(repo_root / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    blob_npz(root / "data/raw/target.npz", 0)
    blob_npz(root / "data/raw/second.npz", 2)  # a second target: the study-level summary pools across targets
    blob_npz(root / "data/raw/pretext.npz", 1, classes=4)
    tiny = {"learning_rate": 3e-3, "batch_size": 16, "max_epochs": 2, "patience": 2, "augment": False, "seed": 0}
    params = {
        "project": {"profile": "tiny", "seed": 0, "description": "a tiny study for the server test"},
        "stores": {"tracking_uri": server, "experiment": "tiny-study", "optuna_storage": backend["optuna"]},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "train": tiny,
        "search": {"trials": 1, "space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
                   "startup_trials": 1, "pruner_startup_trials": 1, "pruner_warmup_epochs": 1},
        "study": {"targets": ["target", "second"], "sources": ["tiny", "tiny_b", "random"], "regimes": ["full"],
                  "protocol": "search"},
        "analysis": {"positions_per_layer": 200, "images": None, "channel_sample": 0, "channel_repeats": 5,
                     "bootstrap_resamples": 200, "gram_precision": "float32",   # the fast path, end to end
                     "measures": ["cca", "cka"], "batch_size": 32, "seed": 0},
        "sources": {"tiny": {"kind": "pretrained", "arch": "resnet18", "dataset": "pretext", "seed": 5,
                             "train": {**tiny, "max_epochs": 1}},
                    # a second pretrained source: the UI check compares three sources, as the paper's two + random
                    "tiny_b": {"kind": "pretrained", "arch": "resnet18", "dataset": "pretext", "seed": 6,
                               "train": {**tiny, "max_epochs": 1}},
                    "random": {"kind": "random", "arch": "resnet18", "seed": 0},
                    "random_b": {"kind": "random", "arch": "resnet18", "seed": 1}},
        "datasets": {
            "second": {"format": "medmnist", "path": "data/raw/second.npz", "classes": ["a", "b"],
                       "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}},
            "target": {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                       "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.25}},
            "pretext": {"format": "medmnist", "path": "data/raw/pretext.npz", "classes": ["q0", "q1", "q2", "q3"]},
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=_env())
    return root


@pytest.fixture(scope="module")
def study(project, server):
    """The tiny study, run once against the server; the tests below read what it left there."""
    result = subprocess.run([sys.executable, "-m", "medtransfer", "study"], cwd=project, env=_env(),
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = _api(server, "experiments/get-by-name?experiment_name=tiny-study")["experiment"]
    return result, experiment


def _mean_sd_cell(values, digits):
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def test_the_study_runs_every_stage_and_writes_the_report(project, study, markdown_table):
    result, _ = study
    for stage in ("prepare@target", "source@tiny", "search@target-tiny-full", "extract@target", "compare@target",
                  "search@second-random-full", "compare@second", "summary", "report"):
        assert f"Running stage '{stage}'" in result.stdout, stage
    # Each epoch line names its trial or final fit; the libraries' warnings and registry chatter stay out.
    assert "search target.tiny.full trial 1/1 full epoch 1/2" in result.stdout
    assert "search target.tiny.full final fit fold 1 (2/2) full epoch 1/2" in result.stdout
    for chatter in ("ExperimentalWarning", "already exists. Creating a new version", "Created version"):
        assert chatter not in result.stdout + result.stderr, chatter
    report = (project / "reports/report.md").read_text()
    assert not re.search(r"\bnan\b", report, re.IGNORECASE)
    (auc_row,) = [row for row in markdown_table(report, "## Test AUC ×100 (mean ± sd over folds)")
                  if row["target"] == "target"]
    for source in ("tiny", "tiny_b", "random"):  # each cell is its own pointer's folds, under its own column
        pointer = json.loads((project / f"results/models/target.{source}.full.json").read_text())
        aucs = [100 * fold["test_auc"] for fold in pointer["folds"] if fold["test_auc"] is not None]
        assert len(pointer["folds"]) == 2 and auc_row[source].startswith(_mean_sd_cell(aucs, 1)), (source, auc_row)
        assert auc_row[source].split(" ")[0] == f"{100 * pointer['test_auc_mean']:.1f}", (source, auc_row)
    # The report opens with the study across both targets: the AUC table with the gain over random init ...
    assert report.index("## The study across targets") < report.index("## Test AUC ×100")
    study_rows = {(row["target"], row["source"]): row for row in markdown_table(report, "## The study across targets")}
    for target in ("target", "second"):
        means = {source: statistics.mean(fold["test_auc"] for fold in json.loads(
            (project / f"results/models/{target}.{source}.full.json").read_text())["folds"]) for source in ("tiny", "random")}
        gain = 100 * (means["tiny"] - means["random"]) / means["random"]
        assert study_rows[(target, "tiny")]["gain over random init"] == f"{gain:+.1f} %"
    # ... and the cross-target similarity, each cell the mean of the two targets' fold means.
    cross = markdown_table(report, "### mean CCA per layer, mean ± sd over the 2 targets")
    (finetuned,) = [row for row in cross if row["pair"] == "fine-tuned vs its initialisation: tiny"]
    summaries = [list(csv.DictReader((project / f"results/analysis/{target}/similarity_summary.csv").open()))
                 for target in ("target", "second")]
    stem = [float(row["mean"]) for rows in summaries for row in rows if (row["pair_kind"], row["pair"], row["layer"],
            row["measure"]) == ("source_vs_finetuned", "tiny", "stem", "cca")]
    finite = [value for value in stem if math.isfinite(value)]
    assert len(stem) == 2 and finetuned["stem"].startswith(_mean_sd_cell(finite, 2) if finite else "–"), finetuned
    assert ("(1 of 2 targets" in finetuned["stem"]) == (len(finite) == 1), finetuned
    predictions = markdown_table(report, "## Prediction similarity — target")
    pairs = [frozenset(row["pair"].split(" vs ")) for row in predictions]
    assert sorted(pairs, key=sorted) == sorted([frozenset({"random", "tiny"}), frozenset({"random", "tiny_b"}),
                                                frozenset({"tiny", "tiny_b"})], key=sorted)  # one row per source pair
    assert all(row["regime"] == "full" for row in predictions)
    # Each cell recomputed from compare's per-fold rows, whatever training reached: κ is undefined on a fold where
    # both models are always right, and then the cell names the folds it rests on instead of passing for both.
    per_fold = list(csv.DictReader((project / "results/analysis/target/predictions.csv").open()))
    columns = {"error agreement": "error_agreement", "chance": "error_agreement_chance",
               "error consistency κ": "error_consistency", "label κ": "label_kappa", "JSD (bits)": "jensen_shannon"}
    for row in predictions:
        folds = [fold for fold in per_fold if frozenset(fold["pair"].split(" vs ")) == frozenset(row["pair"].split(" vs "))]
        assert len(folds) == 2, row
        for header, column in columns.items():
            values = [float(fold[column]) for fold in folds if math.isfinite(float(fold[column]))]
            if not values:
                assert row[header] == "–", (header, row)
                continue
            expected = f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
            assert row[header].startswith(expected), (header, row)
            assert (row[header] == expected) == (len(values) == 2), (header, row)
            if len(values) < 2:
                assert row[header].startswith(f"{expected} (1 of 2 folds; "), (header, row)


def test_runs_form_a_parent_with_a_child_per_step_and_trials_below_searches(server, study):
    _, experiment = study
    runs = _api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    by_step = {}
    for run in runs:
        by_step.setdefault(_tags(run).get("step"), []).append(run)
    (parent,) = by_step["study"]
    study_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == "study tiny"
    kind = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    assert kind["mlflow.experimentKind"] == "custom_model_development"
    assert "a tiny study for the server test" in kind["mlflow.note.content"]
    assert {"stages_run", "stages_up_to_date"} <= {metric["key"] for metric in parent["data"]["metrics"]}
    for step in ("prepare", "pretrain", "source", "extract", "compare", "report"):
        assert by_step.get(step), f"no {step} run"
        assert all(_tags(run).get("mlflow.parentRunId") == study_id for run in by_step[step]), step
    searches = by_step["search"]
    assert len(searches) == 6 and all(_tags(run)["mlflow.parentRunId"] == study_id for run in searches)
    assert {_tags(run)["source"] for run in searches} == {"tiny", "tiny_b", "random"}
    assert {_tags(run)["dataset"] for run in searches} == {"target", "second"}
    assert all(_tags(run)["regime"] == "full" for run in searches)
    search_ids = {run["info"]["run_id"] for run in searches}
    for step in ("trial", "final_fit"):
        assert by_step[step] and all(_tags(run)["mlflow.parentRunId"] in search_ids for run in by_step[step])
    # Runs come newest first, and DVC may run either target's searches last: pick a fit of a named target.
    fit = next(run for run in by_step["final_fit"] if _tags(run)["dataset"] == "target")
    metric_keys = {metric["key"] for metric in fit["data"]["metrics"]}
    assert {"test_auc", "val_loss", "train_loss", "best_val_loss"} <= metric_keys
    inputs = fit["inputs"]["dataset_inputs"]
    assert inputs and inputs[0]["dataset"]["name"] == "target"
    assert {tag["key"]: tag["value"] for tag in inputs[0]["tags"]}["mlflow.data.context"] == "training"


def test_the_winners_are_registered_with_aliases(server, study):
    _, experiment = study
    runs = _api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                        "filter": "tags.step = 'final_fit'"})["runs"]
    for name, source in (("target.tiny.full", "tiny"), ("target.random.full", "random")):
        model = _api(server, f"registered-models/get?name={urllib.parse.quote(name)}")["registered_model"]
        aliases = {alias["alias"] for alias in model.get("aliases", [])}
        assert {"fold0", "fold1", "champion"} <= aliases, name
        fits = [run for run in runs if _tags(run)["source"] == source and _tags(run)["dataset"] == "target"]
        losses = {run["info"]["run_id"]: next(metric["value"] for metric in run["data"]["metrics"]
                                              if metric["key"] == "best_val_loss") for run in fits}
        champion = _api(server, f"registered-models/alias?name={urllib.parse.quote(name)}&alias=champion")
        lowest = {run_id for run_id, loss in losses.items() if loss == min(losses.values())}  # folds can tie exactly
        assert len(fits) == 2 and champion["model_version"]["run_id"] in lowest, name
        version = _api(server, f"registered-models/alias?name={urllib.parse.quote(name)}&alias=fold0")["model_version"]
        assert {tag["key"]: tag["value"] for tag in version["tags"]}["source"] == source
    assert _api(server, "registered-models/get?name=source.tiny")["registered_model"]["aliases"][0]["alias"] == "default"


def _dump_dom(chromium, project, url):
    """The page's DOM after headless Chromium has run its scripts."""
    page = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={project / '.chromium'}",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    return page.stdout


def _text(dom: str) -> str:
    """A page's visible words: tags dropped, entities decoded, white space collapsed."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def _readme_url(marker: str) -> str:
    """The first MLflow UI address in README.md that contains ``marker``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(url for url in re.findall(r"http://127\.0\.0\.1:5000/\S+", readme) if marker in url)


def test_the_ui_pages_name_the_sources_and_link_the_source_version(project, server, study, require_tool):
    """Headless Chromium renders the MLflow UI (required under CI): the runs page lists the study; a comparison of
    the final fits of fold 0 of three sources heads each column with its source; a fine-tuned version links to its source version."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        require_tool("Chromium is not installed (Debian package 'chromium')")
    _, experiment = study
    experiment_id = experiment["experiment_id"]
    assert "study tiny" in _dump_dom(chromium, project, f"{server}/#/experiments/{experiment_id}/runs")
    # The README's URL of the current final fits opens the model-training runs table with one fit per fold and
    # source of each target (2 targets x 3 sources x 2 folds), not the GenAI view.
    readme_url = _readme_url("searchFilter").replace("http://127.0.0.1:5000", server)
    listed = _text(_dump_dom(chromium, project, readme_url.replace("/experiments/1/", f"/experiments/{experiment_id}/")))
    assert "Training runs" in listed and "12 matching runs" in listed, listed[-3000:]
    for source in ("tiny", "tiny_b", "random"):
        assert f"fit {source}/full fold0" in listed and f"fit {source}/full fold1" in listed, source

    fits = _api(server, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000,
                                        "filter": "tags.step = 'final_fit' and tags.dataset = 'target' "
                                                  "and tags.fold = '0'"})["runs"]
    assert {_tags(run)["source"] for run in fits} == {"tiny", "tiny_b", "random"}
    run_ids = urllib.parse.quote(json.dumps([run["info"]["run_id"] for run in fits]))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    comparison = _dump_dom(chromium, project, f"{server}/#/compare-runs?runs={run_ids}&experiments={experiments}")
    for source in ("tiny", "tiny_b", "random"):  # three sources side by side, each column headed by its own
        assert f"fit {source}/full fold0" in comparison, source
    # The comparison lists the metrics' names, then their values (shown to 3 decimals), then the common artifacts.
    metrics, artifacts = _text(comparison).split("Metrics", 1)[1].split("Artifacts", 1)
    aucs = [next(metric["value"] for metric in run["data"]["metrics"] if metric["key"] == "test_auc") for run in fits]
    assert "test_auc" in metrics and any(f" {round(auc, 3):g} " in metrics for auc in aucs), metrics[:500]
    assert artifacts.split()[0] == "roc_curve.png", "the fits' ROC curves are offered side by side"

    version = _api(server, "registered-models/alias?name=target.tiny.full&alias=fold0")["model_version"]
    source_version = {tag["key"]: tag["value"] for tag in version["tags"]}["source_version"]
    page = _dump_dom(chromium, project, f"{server}/#/models/target.tiny.full/versions/{version['version']}")
    assert f'href="#/models/source.tiny/versions/{source_version}"' in page
    assert f"source.tiny v{source_version}</a>" in page and "Source <code>tiny</code>" in page


def test_a_second_study_finds_every_step_up_to_date_and_logs_no_new_run(project, server, study):
    _, experiment = study

    def study_runs():
        return _api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000,
                                            "filter": "tags.step = 'study'"})["runs"]

    (first,) = study_runs()
    again = subprocess.run([sys.executable, "-m", "medtransfer", "study"], cwd=project, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "every step was up to date" in again.stdout, again.stdout[-2000:]
    assert "Running stage" not in again.stdout
    assert f"the study's last MLflow run is {first['info']['run_id']}" in again.stdout
    (still,) = study_runs()
    assert still["info"]["run_id"] == first["info"]["run_id"] and "checked_up_to_date" in _tags(still)
