"""params.yaml validation: one error naming the key; paths and stores resolved against the params file's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medtransfer.config import load_config, resolve_store_url
from medtransfer.errors import ConfigError

DATASET = {"format": "medmnist", "path": "data/raw/x.npz", "classes": ["a", "b"]}


def test_valid_params_load_into_typed_objects(write_params):
    path = write_params({"x": {**DATASET, "split": {"scheme": "stratified_kfold", "folds": 3}}})
    config = load_config(path)
    dataset = config.dataset("x")
    assert dataset.classes == ["a", "b"]
    assert dataset.split.scheme == "stratified_kfold" and dataset.split.folds == 3
    assert dataset.split.val_fraction == pytest.approx(0.1)  # default from the schema
    assert config.root == path.parent


@pytest.mark.parametrize(
    ("mutate", "key_in_message"),
    [
        (lambda p: p["datasets"]["x"].update(colour="red"), "datasets.x.colour"),
        (lambda p: p["datasets"]["x"].pop("classes"), "datasets.x.classes"),
        (lambda p: p["datasets"]["x"].update(split={"scheme": "given", "folds": "five"}), "datasets.x.split.folds"),
        (lambda p: p["datasets"]["x"].update(split={"scheme": "leave_one_out"}), "datasets.x.split.scheme"),
        (lambda p: p["datasets"]["x"].update(format=3), "datasets.x.format"),
        (lambda p: p["stores"].update(tracking_uri=5), "stores.tracking_uri"),
        (lambda p: p.update(extras={}), "extras"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "vgg_sixteen"}}), "sources.s.arch"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "convnext_atto.d2_in1k"}}), "sources.s.arch"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "resnet18", "model_args": {"img_size": 32}}}),
         "sources.s.model_args"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "convnext_atto",
                                           "model_args": {"num_classes": 3}}}), "sources.s.model_args.num_classes"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "convnext_atto", "model_args": [32]}}),
         "sources.s.model_args"),
        (lambda p: p.update(sources={"s": {"kind": "keras_h5", "arch": "convnext_atto", "path": "w.h5"}}),
         "sources.s.arch"),
        (lambda p: p.update(sources={"s": {"kind": "keras_h5", "arch": "resnet50", "path": "w.h5"}}), "sources.s.arch"),
        (lambda p: p.update(sources={"s": {"kind": "safetensors", "arch": "resnet18"}}), "sources.s.path"),
        (lambda p: p["project"].update(seed=True), "project.seed"),
        (lambda p: p["datasets"]["x"].update(classes=["only"]), "datasets.x.classes"),
        (lambda p: p["datasets"]["x"].update(fingerprint="abc"), "datasets.x.fingerprint"),
        (lambda p: p["datasets"]["x"].update(split={"scheme": "stratified_kfold", "val_fraction": 1.5}), "val_fraction"),
        (lambda p: p["datasets"]["x"].update(multilabel={"rule": "column"}), "datasets.x.multilabel.column"),
        (lambda p: p["project"].pop("profile"), "project.profile"),
        (lambda p: p["stores"].update(optuna_heartbeat_seconds=0), "stores.optuna_heartbeat_seconds"),
        (lambda p: p["stores"].update(optuna_heartbeat_seconds=10, optuna_grace_seconds=10), "stores.optuna_grace_seconds"),
        # Values the types let through but training cannot use: refused at load, not after the data is read.
        (lambda p: p.update(train={"batch_size": 0}), "train.batch_size"),
        (lambda p: p.update(train={"batch_size": -8}), "train.batch_size"),
        (lambda p: p.update(train={"learning_rate": -1e-3}), "train.learning_rate"),
        (lambda p: p.update(train={"max_epochs": 0}), "train.max_epochs"),
        (lambda p: p.update(train={"momentum": 1.5}), "train.momentum"),
        (lambda p: p.update(sources={"s": {"kind": "pretrained", "arch": "resnet18", "dataset": "x",
                                           "train": {"head_learning_rate": 0}}}), "sources.s.train.head_learning_rate"),
        (lambda p: p.update(study={"targets": ["x"]}, search={"search_fold": 7}), "search.search_fold"),
        (lambda p: p.update(study={"targets": ["x"]}, search={"folds": [0, 1]}), "search.folds"),
        (lambda p: p.update(study={"targets": ["x"], "protocol": "papers"}), "study.protocol"),
        # A twin must be one of the paper's names (the shipped reference lists them).
        (lambda p: p["datasets"]["x"].update(paper_target="breastmnist"), "datasets.x.paper_target"),
        (lambda p: p.update(sources={"s": {"kind": "random", "arch": "resnet18", "paper_source": "ImageNet"}}),
         "sources.s.paper_source"),
    ],
)
def test_bad_params_give_one_error_naming_the_key(write_params, mutate, key_in_message):
    path = write_params({"x": dict(DATASET)})
    params = yaml.safe_load(path.read_text())
    mutate(params)
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = caught.value.one_line()
    assert key_in_message in message
    assert str(path) in message
    assert "\n" not in message


def test_any_timm_model_is_an_architecture_and_a_misspelt_one_is_named_with_close_matches(write_params):
    path = write_params({"x": dict(DATASET)}, sources={
        "vit": {"kind": "random", "arch": "vit_tiny_patch16_224", "model_args": {"img_size": 32}},
        "convnext": {"kind": "random", "arch": "convnext_atto"}})
    config = load_config(path)
    assert config.source("vit").model_args == {"img_size": 32} and config.source("convnext").model_args == {}
    path = write_params({"x": dict(DATASET)}, sources={"s": {"kind": "random", "arch": "convnext_ato"}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = caught.value.one_line()
    assert "unknown architecture 'convnext_ato'" in message and "sources.s.arch" in message
    assert "did you mean" in message and "convnext_atto" in message and "\n" not in message


def test_duplicate_dataset_names_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "project: {profile: t}\n"
        "datasets:\n"
        "  x: {format: medmnist, path: a.npz, classes: [a, b]}\n"
        "  x: {format: medmnist, path: b.npz, classes: [a, b]}\n"
    )
    with pytest.raises(ConfigError, match="duplicate key 'x' at line 4"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("project: {profile: t\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "absent.yaml")


def test_unknown_dataset_lists_the_known_ones(write_params):
    config = load_config(write_params({"x": dict(DATASET), "y": dict(DATASET)}))
    with pytest.raises(ConfigError, match="unknown dataset 'z'.*use one of: x, y"):
        config.dataset("z")


def test_stores_and_paths_resolve_against_the_params_folder_not_the_cwd(write_params, tmp_path, monkeypatch):
    path = write_params({"x": dict(DATASET)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert config.optuna_storage == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    assert config.prepared_data_dir == tmp_path / "data/prepared"
    assert config.resolve(config.dataset("x").path) == tmp_path / "data/raw/x.npz"


def test_environment_overrides_the_stores_for_cluster_workers(write_params, tmp_path, monkeypatch):
    path = write_params({"x": dict(DATASET)})
    monkeypatch.setenv("MEDTRANSFER_TRACKING_URI", "http://mlflow.example.org:5000")
    monkeypatch.setenv("MEDTRANSFER_OPTUNA_STORAGE", "postgresql://worker:secret@db.example.org/optuna")
    config = load_config(path)
    assert config.tracking_uri == "http://mlflow.example.org:5000"
    assert config.optuna_storage == "postgresql://worker:secret@db.example.org/optuna"
    monkeypatch.setenv("MEDTRANSFER_OPTUNA_STORAGE", "journal:shared/optuna.log")  # relative: against the params folder
    assert load_config(path).optuna_storage == f"journal:{tmp_path.resolve()}/shared/optuna.log"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:////r/mlflow.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("journal:optuna.log", "journal:/r/optuna.log"),
        ("postgresql://user@127.0.0.1/db", "postgresql://user@127.0.0.1/db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("mlartifacts", "/r/mlartifacts"),
    ],
)
def test_resolve_store_url(url, expected):
    assert resolve_store_url(url, Path("/r")) == expected


def test_params_found_from_a_subfolder_and_via_environment(write_params, tmp_path, monkeypatch):
    path = write_params({"x": dict(DATASET)})
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    monkeypatch.delenv("MEDTRANSFER_PARAMS", raising=False)
    assert load_config().source_file == path.resolve()
    other = write_params({"y": dict(DATASET)}, folder=tmp_path / "other")
    monkeypatch.setenv("MEDTRANSFER_PARAMS", str(other))
    assert set(load_config().datasets) == {"y"}


def test_repository_params_and_profiles_are_valid(repo_root):
    config = load_config(repo_root / "params.yaml")
    assert config.project.profile == "demo"
    assert config.study.protocol == "search"  # the demo's 4 epochs; the paper's 200 would take hours on a CPU
    for profile in sorted((repo_root / "profiles").glob("*.yaml")):
        raw = yaml.safe_load(profile.read_text())
        assert raw["project"]["profile"] == profile.stem
    for name in ("paper", "medmnist"):  # the original's fixed protocol, not a search, as the profiles promise
        assert yaml.safe_load((repo_root / f"profiles/{name}.yaml").read_text())["study"]["protocol"] == "paper"
