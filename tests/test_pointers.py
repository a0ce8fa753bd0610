"""The pointer stays the registry link; a separate metrics file per search is what `dvc metrics show` reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from medtransfer.config import load_config
from medtransfer.pointers import FoldModel, ModelPointer, metrics_path, pointer_path, write_pointer

BIN_DIR = Path(sys.executable).parent


def _pointer(aucs: list[float]) -> ModelPointer:
    folds = [FoldModel(fold=k, seed=0, version=str(k + 1), run_id=f"run{k}", weights_sha256="0" * 64,
                       alias=f"fold{k}", test_auc=auc) for k, auc in enumerate(aucs)]
    return ModelPointer(registered_model="d.natural.full", dataset="d", source="natural", regime="full",
                        source_model="source.natural", source_version="4", source_weights_sha256="1" * 64,
                        data_fingerprint="f" * 64, study="s/d.natural.full", champion_version="1", folds=folds,
                        test_auc_mean=0.8, test_auc_sd=0.1)


def test_dvc_metrics_show_lists_only_the_searches_metrics(tmp_path, repo_root, write_params):
    params = write_params({"d": {"format": "medmnist", "path": "d.npz", "classes": ["a", "b"]}},
                          sources={"natural": {"kind": "random", "arch": "resnet18", "seed": 0}},
                          study={"targets": ["d"], "sources": ["natural"], "regimes": ["full"], "protocol": "search"})
    config = load_config(params)
    write_pointer(config, _pointer([0.7, 0.9]))
    assert json.loads(pointer_path(config, "d", "natural", "full").read_text())["registered_model"] == "d.natural.full"
    assert json.loads(metrics_path(config, "d", "natural", "full").read_text()) == {
        "test_auc": {"fold0": 0.7, "fold1": 0.9}, "test_auc_mean": 0.8, "test_auc_sd": 0.1}

    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo_root / name, tmp_path / name)
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MEDTRANSFER_PARAMS", None)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([str(BIN_DIR / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=env)
    shown = subprocess.run([str(BIN_DIR / "dvc"), "metrics", "show", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()
    files = {Path(name).as_posix(): content for name, content in workspace["data"].items()}
    # The summary stage's metrics folder is declared too; this project has not run it.
    assert sorted(files) == ["results/metrics/d.natural.full.json", "results/metrics/study"]
    assert files["results/metrics/d.natural.full.json"]["data"] == {
        "test_auc": {"fold0": 0.7, "fold1": 0.9}, "test_auc_mean": 0.8, "test_auc_sd": 0.1}
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["search"]
    pointer_entry = "results/models/${item.dataset}.${item.source}.${item.regime}.json"
    assert {pointer_entry: {"cache": False}} in stage["outs"], "the pointer stays a DVC output"


def test_the_study_reads_only_the_pointers_of_its_own_sources_and_regimes(write_params):
    """A pointer another profile left (another source, another regime) is not one of this study's models."""
    import dataclasses

    from medtransfer.pointers import pointers_for_dataset

    sources = {name: {"kind": "random", "arch": "resnet18", "seed": seed}
               for seed, name in enumerate(("natural", "medical", "convnext"))}
    params = write_params({"d": {"format": "medmnist", "path": "d.npz", "classes": ["a", "b"]}}, sources=sources,
                          study={"targets": ["d"], "sources": ["natural", "medical"], "regimes": ["full"],
                                 "protocol": "search"})
    config = load_config(params)
    for source, regime in (("natural", "full"), ("medical", "full"), ("convnext", "full"), ("natural", "freeze")):
        write_pointer(config, dataclasses.replace(_pointer([0.7, 0.9]), registered_model=f"d.{source}.{regime}",
                                                  source=source, regime=regime))
    assert [(p.source, p.regime) for p in pointers_for_dataset(config, "d")] == [("medical", "full"),
                                                                               ("natural", "full")]
    assert pointers_for_dataset(config, "other") == []
    no_study = load_config(write_params({"d": {"format": "medmnist", "path": "d.npz", "classes": ["a", "b"]}},
                                        sources=sources))
    assert len(pointers_for_dataset(no_study, "d")) == 4  # no study named: every search run by hand counts
