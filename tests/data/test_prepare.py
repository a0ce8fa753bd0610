"""`prepare`: the prepared folder, fingerprint pinning, atomic output, and the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtransfer.config import load_config
from medtransfer.data.dataset import content_fingerprint
from medtransfer.data.medmnist import read_medmnist_npz
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.errors import DataError


def _entry(path, **extra):
    return {"format": "medmnist", "path": str(path), "classes": ["a", "b"], **extra}


def test_prepare_writes_a_complete_memory_mappable_folder(tmp_path, medmnist_npz, write_params):
    source = medmnist_npz(tmp_path / "data/raw/d.npz", sizes=(30, 10, 12))
    config = load_config(write_params({"d": _entry("data/raw/d.npz")}))
    manifest = prepare_dataset(config, "d")
    folder = tmp_path / "data/prepared/d"
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "labels.npy", "manifest.json", "splits.npy"]
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["folds"][0]["counts"] == {"train": 30, "val": 10, "test": 12}
    assert manifest["num_classes"] == 2 and manifest["image_shape"] == [8, 8, 1]
    assert manifest["source"]["path"] == "data/raw/d.npz"
    assert manifest["fingerprint"] == content_fingerprint(read_medmnist_npz(source, ["a", "b"]))
    prepared = load_prepared(config, "d")
    assert isinstance(prepared.images, np.memmap)
    assert prepared.fold(0)["test"].size == 12
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == [".d.lock"], "no temp folders left"


def test_prepare_is_deterministic_byte_for_byte(tmp_path, medmnist_npz, write_params):
    medmnist_npz(tmp_path / "data/raw/d.npz")
    config = load_config(write_params({"d": _entry("data/raw/d.npz", split={"scheme": "stratified_kfold", "folds": 3})}))
    prepare_dataset(config, "d")
    folder = tmp_path / "data/prepared/d"
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    prepare_dataset(config, "d")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first


def test_kfold_manifest_counts(tmp_path, medmnist_npz, write_params):
    medmnist_npz(tmp_path / "data/raw/d.npz", sizes=(60, 20, 20))
    config = load_config(write_params({"d": _entry("data/raw/d.npz", split={"scheme": "stratified_kfold", "folds": 5, "val_fraction": 0.2})}))
    manifest = prepare_dataset(config, "d")
    assert manifest["split"]["folds"] == 5
    for fold in manifest["folds"]:
        assert sum(fold["counts"].values()) == 100
        assert fold["counts"]["test"] == 20 and fold["counts"]["val"] == 16


def test_fingerprint_pin_accepts_the_same_data_and_refuses_another(tmp_path, medmnist_npz, write_params):
    medmnist_npz(tmp_path / "data/raw/d.npz", seed=1)
    config = load_config(write_params({"d": _entry("data/raw/d.npz")}))
    fingerprint = prepare_dataset(config, "d")["fingerprint"]
    pinned = load_config(write_params({"d": _entry("data/raw/d.npz", fingerprint=fingerprint)}))
    assert prepare_dataset(pinned, "d")["fingerprint"] == fingerprint
    medmnist_npz(tmp_path / "data/raw/d.npz", seed=2)  # another version of the data arrives
    with pytest.raises(DataError) as caught:
        prepare_dataset(pinned, "d")
    message = caught.value.one_line()
    assert fingerprint in message and "data version mismatch" in message
    other = content_fingerprint(read_medmnist_npz(tmp_path / "data/raw/d.npz", ["a", "b"]))
    assert other in message
    assert json.loads((tmp_path / "data/prepared/d/manifest.json").read_text())["fingerprint"] == fingerprint


def test_a_failed_prepare_leaves_the_previous_output_intact(tmp_path, medmnist_npz, write_params):
    medmnist_npz(tmp_path / "data/raw/d.npz")
    config = load_config(write_params({"d": _entry("data/raw/d.npz")}))
    prepare_dataset(config, "d")
    folder = tmp_path / "data/prepared/d"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (tmp_path / "data/raw/d.npz").write_bytes(b"garbage")
    with pytest.raises(DataError):
        prepare_dataset(config, "d")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_real_breastmnist_from_a_test_only_params_file(tmp_path, breastmnist_path, write_params):
    config = load_config(
        write_params({"breastmnist": {**_entry(str(breastmnist_path)), "classes": ["malignant", "normal_or_benign"]}})
    )
    # MedMNIST's own split puts one image in train (label 0) and, pixel for pixel, in test (label 1).
    with pytest.raises(DataError, match=r"1 set\(s\) of identical images .* train_images\[115\] \(train\) = "
                       r"test_images\[76\] \(test\) in fold 0 -- .*--allow-duplicates"):
        prepare_dataset(config, "breastmnist")
    manifest = prepare_dataset(config, "breastmnist", allow_duplicates=True)
    assert manifest["folds"][0]["counts"] == {"train": 546, "val": 78, "test": 156}
    assert manifest["num_classes"] == 2 and manifest["num_images"] == 780
    assert manifest["image_shape"] == [28, 28, 1]
    assert manifest["duplicates"] == {
        "method": "sha256 of the decoded, resized uint8 pixels", "sets": 1, "images": 2, "sets_across_split": 1,
        "sets_with_two_labels": 1, "allowed": True, "example": ["train_images[115]", "test_images[76]"],
        "example_across_split": {"fold": 0, "train": "train_images[115]", "test": "test_images[76]"},
    }


def test_real_breastmnist_as_the_demo_profile_splits_it_has_no_copy_across_folds(breastmnist_path, write_params):
    """params.yaml's 3 stratified folds (seed 0) put the pair in one test fold: prepare needs no escape."""
    split = {"scheme": "stratified_kfold", "folds": 3, "val_fraction": 0.15, "seed": 0}
    entry = {**_entry(str(breastmnist_path)), "classes": ["malignant", "normal_or_benign"], "split": split}
    manifest = prepare_dataset(load_config(write_params({"breastmnist": entry})), "breastmnist")
    assert manifest["duplicates"]["sets"] == 1 and manifest["duplicates"]["sets_across_split"] == 0
    assert manifest["duplicates"]["allowed"] is False


# -- the command: exit code 2, one stderr line, no traceback, no partial output -------------------------------------


def _corrupt_labels(path):
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays["train_labels"] = arrays["train_labels"][:-1]
    np.savez(path, **arrays)


def _drop_key(path):
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files if key != "test_images"}
    np.savez(path, **arrays)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("damage", "dataset", "expected"),
    [
        (lambda p: p.unlink(), "d", "file not found"),
        (_truncate, "d", "not a readable .npz"),
        (_drop_key, "d", "npz lacks key 'test_images'"),
        (_corrupt_labels, "d", "train: 29 labels for 30 images"),
        (None, "unknown", "unknown dataset 'unknown'"),
    ],
)
def test_prepare_command_errors(tmp_path, medmnist_npz, write_params, cli, damage, dataset, expected):
    path = medmnist_npz(tmp_path / "data/raw/d.npz")
    if damage:
        damage(path)
    params = write_params({"d": _entry("data/raw/d.npz")})
    result = cli("--params", str(params), "prepare", "--dataset", dataset)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "data/prepared").exists() or not any((tmp_path / "data/prepared").iterdir())


def test_prepare_command_labels_out_of_range(tmp_path, medmnist_npz, write_params, cli):
    medmnist_npz(tmp_path / "data/raw/d.npz", num_classes=3)
    params = write_params({"d": _entry("data/raw/d.npz")})
    result = cli("--params", str(params), "prepare", "--dataset", "d")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "outside the declared range" in result.stderr


def test_prepare_command_bad_config(tmp_path, write_params, cli):
    params = write_params({"d": {**_entry("data/raw/d.npz"), "colour": "red"}})
    result = cli("--params", str(params), "prepare", "--dataset", "d")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"medtransfer prepare: error: {params}: datasets.d.colour: unknown key 'colour' -- ")
    assert "known keys here: format, path, classes, split" in line


def test_prepare_command_success_prints_the_fingerprint(tmp_path, medmnist_npz, write_params, cli):
    medmnist_npz(tmp_path / "data/raw/d.npz")
    params = write_params({"d": _entry("data/raw/d.npz")})
    result = cli("--params", str(params), "prepare", "--dataset", "d")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "data/prepared/d/manifest.json").read_text())
    assert manifest["fingerprint"] in result.stdout
