"""The ImageNet-vs-RadImageNet path end to end on real Keras files: two ResNet50 HDF5 files saved by Keras itself
(different seeds, standing in for Keras' ImageNet file and RadImageNet's) are registered as `kind: keras_h5`
sources, searched, extracted, compared and reported through the CLI, beside a random source.

What the paper's comparison rests on is checked where it ends up: the registry's tags, the activations manifest,
the similarity table and the report; and caffe preprocessing against Keras' own `preprocess_input`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow(minutes=3)

KERAS_SOURCES = {"imagenet_like": 0, "radimagenet_like": 1}  # source name -> seed of the Keras file
RANDOM_SOURCE = "random"
DATASET = "target"
# Keras' caffe mode (keras.applications.imagenet_utils): RGB -> BGR, minus these means, in BGR order.
CAFFE_BGR_MEANS = np.array([103.939, 116.779, 123.68])


def _env() -> dict:
    """The CLI's environment: offline, and no MLflow settings of the caller redirecting the tests' store."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def _params(root: Path, weights: dict[str, Path]) -> Path:
    tiny = {"learning_rate": 1e-3, "batch_size": 8, "max_epochs": 1, "patience": 1, "augment": False, "seed": 0}
    sources = {name: {"kind": "keras_h5", "arch": "keras_resnet50", "path": str(weights[name].relative_to(root))}
               for name in KERAS_SOURCES}
    # A resnet18, not a Keras ResNet50: the random baseline is cheap, and the Keras path is what is under test.
    sources[RANDOM_SOURCE] = {"kind": "random", "arch": "resnet18", "seed": 0}
    params = {
        "project": {"profile": "keras-test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "keras-study",
                   "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        # 32 px: the smallest size at which every ResNet50 stage keeps more than one position.
        "datasets": {DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                               "image_size": 32, "channels": 3, "split": {"scheme": "given"}}},
        "sources": sources,
        "train": tiny,
        "search": {"trials": 1, "startup_trials": 1, "pruner_startup_trials": 1, "pruner_warmup_epochs": 1,
                   "space": {"learning_rate": {"type": "float", "low": 5e-4, "high": 1e-3, "log": True}}},
        "study": {"targets": [DATASET], "sources": [*KERAS_SOURCES], "regimes": ["full"]},
        # At 32 px the last stage has one position per image, so its rows are the 24 test images: 8 sampled
        # channels keep every CCA value computable (it is refused at rows <= channels + 1).
        "analysis": {"positions_per_layer": 64, "channel_sample": 8, "channel_repeats": 1, "batch_size": 16,
                     "measures": ["cca", "cka"], "seed": 0},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, keras_references, blob_npz):
    """The whole study run once through the CLI: the project folder and the Keras files it registered. Each step
    must exit 0."""
    root = tmp_path_factory.mktemp("keras_study")
    weights = {}
    for name, seed in KERAS_SOURCES.items():
        weights[name] = root / "weights" / f"{name}.h5"
        weights[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keras_references(seed) / "resnet50_model.h5", weights[name])
    blob_npz(root / "data/raw/target.npz", 0, per_split=(24, 8, 24))
    params = _params(root, weights)
    steps = [("prepare", "--dataset", DATASET)]
    steps += [("source", "--name", name) for name in (*KERAS_SOURCES, RANDOM_SOURCE)]
    # The random source is the baseline the Keras sources are compared with; fine-tuning it too would add a
    # search (about half a minute of CPU) that exercises nothing Keras-specific.
    steps += [("search", "--dataset", DATASET, "--source", name, "--regime", "full") for name in KERAS_SOURCES]
    steps += [("extract", "--dataset", DATASET), ("compare", "--dataset", DATASET), ("summary",),
              ("report",)]
    for step in steps:
        result = subprocess.run([sys.executable, "-m", "medtransfer", "--params", str(params), *step], cwd=root,
                                env=_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(step)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return {"root": root, "weights": weights}


@pytest.fixture(scope="module")
def registry(study):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{study['root'] / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(previous)


def test_keras_sources_are_registered_with_their_file_and_caffe_preprocessing(study, registry):
    from medtransfer.registry import ALIAS_DEFAULT, Tag

    for name in KERAS_SOURCES:
        version = registry.get_model_version_by_alias(f"source.{name}", ALIAS_DEFAULT)
        file_digest = hashlib.sha256(study["weights"][name].read_bytes()).hexdigest()
        assert version.tags[Tag.ORIGIN] == f"keras_h5:{file_digest}"
        assert version.tags[Tag.PREPROCESSING] == "caffe" and version.tags[Tag.ARCH] == "keras_resnet50"
    digests = {registry.get_model_version_by_alias(f"source.{name}", ALIAS_DEFAULT).tags[Tag.WEIGHTS_SHA256]
               for name in KERAS_SOURCES}
    assert len(digests) == 2, "the two Keras seeds must give two different sources"


def test_registered_keras_source_applies_keras_caffe_preprocessing(study, registry, keras_references):
    """The registered spec's pixel transform equals both the caffe rule written out here and what Keras'
    own `resnet50.preprocess_input` does to the same pixels."""
    from medtransfer.models.mlflow_models import load_registered_model

    loaded = load_registered_model("models:/source.radimagenet_like@default")
    assert loaded.spec.preprocessing.name == "caffe"
    with np.load(keras_references(0) / "reference.npz") as reference:
        pixels, by_keras = reference["preprocess/input"], reference["preprocess/output"]
    by_hand = pixels[..., ::-1].astype(np.float64) - CAFFE_BGR_MEANS
    ours = loaded.spec.preprocessing.apply(pixels).permute(0, 2, 3, 1).numpy()  # back to channels-last
    np.testing.assert_allclose(ours, by_hand, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours, by_keras, rtol=0, atol=1e-4)


def test_the_activations_manifest_runs_keras_models_with_caffe(study):
    manifest = json.loads((study["root"] / "activations" / DATASET / "manifest.json").read_text())
    by_source: dict[str, set[str]] = {}
    for record in manifest["models"].values():
        by_source.setdefault(record["source"], set()).add(record["preprocessing"])
        if record["source"] in KERAS_SOURCES:
            assert record["arch"] == "keras_resnet50", record
    # Every Keras model (the source and its fine-tuned fit) in caffe; the random resnet18 in ImageNet mean/std.
    assert by_source == {"imagenet_like": {"caffe"}, "radimagenet_like": {"caffe"}, RANDOM_SOURCE: {"imagenet"}}
    roles = {(record["source"], record["role"]) for record in manifest["models"].values()}
    assert {("imagenet_like", "source"), ("imagenet_like", "finetuned"), ("radimagenet_like", "source"),
            ("radimagenet_like", "finetuned")} <= roles
    # The filter pictures reverse the Keras networks' BGR input channels to draw them in RGB.
    orders = {source: record["channel_order"] for source, record in manifest["conv1"].items()}
    assert orders == {"imagenet_like": "BGR", "radimagenet_like": "BGR", RANDOM_SOURCE: "RGB"}


def test_similarity_has_finite_rows_for_the_two_sources(study):
    LAYERS = ("stem", "stage1", "stage2", "stage3", "stage4")  # the stages of keras_resnet50
    with (study["root"] / "results" / "analysis" / DATASET / "similarity.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    pair = [row for row in rows if row["pair_kind"] == "pretrained_vs_pretrained"]
    assert {row["pair"] for row in pair} == {"imagenet_like vs radimagenet_like"}
    assert {(row["layer"], row["measure"]) for row in pair} == {(layer, m) for layer in LAYERS for m in ("cca", "cka")}
    assert {row["fold"] for row in pair} == {"0"}
    for row in pair:
        assert math.isfinite(float(row["value"])) and 0.0 <= float(row["value"]) <= 1.0 + 1e-9, row
    after = [row for row in rows if row["pair_kind"] == "finetuned_vs_finetuned"
             and {row["model_a"].split(".")[1], row["model_b"].split(".")[1]} == set(KERAS_SOURCES)]
    # After fine-tuning a stage can hold dead or constant sampled channels, whatever the machine trained to: a value
    # is then undefined, and the row says why instead of passing a number.
    assert after
    for row in after:
        value = float(row["value"])
        assert (math.isfinite(value) and -1e-9 <= value <= 1.0 + 1e-9) or (math.isnan(value) and row["note"]), row


def test_the_report_names_both_sources(study):
    report = (study["root"] / "reports" / "report.md").read_text()
    for name in KERAS_SOURCES:
        assert name in report
    assert "imagenet_like vs radimagenet_like" in report
