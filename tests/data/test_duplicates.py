"""Issue 32, no image in train and test: repeated CSV rows, identical images across a split (and the escape),
files an image folder passes over, and prepared arrays changed after `prepare`."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from medtransfer.config import load_config
from medtransfer.data import integrity
from medtransfer.data.duplicates import crossing_groups, duplicate_groups, find_duplicates, image_digests
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.errors import DataError

TRAIN, VAL, TEST = 0, 1, 2


def _images(values):
    """(len(values), 4, 4, 1) uint8 images, each filled with its value: equal values make identical images."""
    return np.stack([np.full((4, 4, 1), value, dtype=np.uint8) for value in values])


# -- the pure functions ----------------------------------------------------------------------------------------------


def test_duplicate_groups_by_pixels():
    images = _images([5, 7, 5, 9, 7, 5])
    groups = duplicate_groups(image_digests(images))
    assert [group.tolist() for group in groups] == [[0, 2, 5], [1, 4]]
    assert duplicate_groups(image_digests(_images([1, 2, 3]))) == ()


def test_a_given_split_crossing_and_a_copy_within_one_side():
    images = _images([1, 2, 1, 3, 3, 4])  # 0 = 2 cross (train, test); 3 = 4 both train: reported, not refused
    splits = np.array([[TRAIN, VAL, TEST, TRAIN, TRAIN, TEST]], dtype=np.int8)
    report = find_duplicates(images, splits)
    assert [group.tolist() for group in report.groups] == [[0, 2], [3, 4]]
    assert report.crossing == (0,) and report.example == (0, 0, 2) and report.images == 4


def test_k_fold_crossing_in_a_later_fold_and_val_vs_test():
    # 3 folds. Images 0 and 3 are identical: together in fold 0's test part, split only in fold 2 (val vs test).
    # Images 1 and 4 are identical and always on one side together; image 2 and 5 are unique.
    splits = np.array([
        [TEST, TRAIN, TRAIN, TEST, TRAIN, VAL],
        [TRAIN, TEST, VAL, VAL, TEST, TRAIN],  # 0 train, 3 val: one side
        [VAL, TRAIN, TEST, TEST, TRAIN, TRAIN],  # 0 val, 3 test: crosses here
    ], dtype=np.int8)
    groups = duplicate_groups(image_digests(_images([8, 6, 1, 8, 6, 2])))
    assert [group.tolist() for group in groups] == [[0, 3], [1, 4]]
    crossing, example = crossing_groups(groups, splits)
    assert crossing == (0,) and example == (2, 0, 3)
    # train and val are one side: identical images split between them only are not a crossing
    assert crossing_groups(groups, np.array([[TRAIN, TRAIN, TEST, VAL, VAL, TEST]], dtype=np.int8)) == ((), None)


# -- prepare: refuse, allow, record ----------------------------------------------------------------------------------

NPZ = {"format": "medmnist", "path": "raw/d.npz", "classes": ["a", "b"]}


def _copy_image(path, source_key, source_index, target_key, target_index):
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays[target_key][target_index] = arrays[source_key][source_index]
    np.savez(path, **arrays)


def test_identical_images_across_the_split_are_refused_and_allowed_with_the_escape(
    tmp_path, medmnist_npz, write_params, cli
):
    path = medmnist_npz(tmp_path / "raw/d.npz")
    _copy_image(path, "train_images", 3, "test_images", 5)
    _copy_image(path, "val_images", 1, "val_images", 2)  # within one side: recorded only
    params = write_params({"d": NPZ})
    refused = cli("--params", str(params), "prepare", "--dataset", "d")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "1 set(s) of identical images fall on both sides of a split, e.g. train_images[3] (train) = " \
           "test_images[5] (test) in fold 0" in line and "--allow-duplicates" in line
    assert not (tmp_path / "data/prepared/d").exists()
    allowed = cli("--params", str(params), "prepare", "--dataset", "d", "--allow-duplicates")
    assert allowed.returncode == 0, allowed.stderr
    assert "identical images: 2 set(s) of 4 images, 1 across a split (allowed)" in allowed.stdout
    assert "kept because of --allow-duplicates" in allowed.stderr
    record = json.loads((tmp_path / "data/prepared/d/manifest.json").read_text())["duplicates"]
    assert record["allowed"] is True and record["sets"] == 2 and record["sets_across_split"] == 1
    assert record["example_across_split"] == {"fold": 0, "train": "train_images[3]", "test": "test_images[5]"}


# -- CSV manifests: one file on two rows -----------------------------------------------------------------------------


def _csv_dataset(root, rows):
    for index in range(8):
        Image.new("L", (6, 6), 20 * index).save(root / f"i{index}.png")
    with (root / "m.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(("path", "label"))
        writer.writerows(rows)
    return {"format": "csv", "path": str(root / "m.csv"), "classes": ["no", "yes"], "image_size": 8, "channels": 1,
            "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.5}}


@pytest.mark.parametrize(("repeat", "expected"), [
    (["./i2.png", "no"], "i2.png (as ./i2.png on row 10) is listed twice, on rows 4 and 10 -- remove row 10 (or "
                         "row 4)"),
    (["i5.png", "no"], "i5.png has two labels: 'yes' on row 7 and 'no' on row 10 -- keep one row for the file"),
])
def test_a_csv_row_repeating_a_file_is_refused(tmp_path, write_params, cli, repeat, expected):
    rows = [[f"i{index}.png", "no" if index < 4 else "yes"] for index in range(8)] + [repeat]
    entry = _csv_dataset(tmp_path, rows)
    result = cli("--params", str(write_params({"d": entry})), "prepare", "--dataset", "d")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'm.csv'}: {expected}" in line and "Traceback" not in result.stderr


# -- image folders: what is passed over is counted -------------------------------------------------------------------


def test_a_dangling_symlink_is_counted_warned_and_recorded(tmp_path, write_params, capsys):
    for position, label in enumerate(("no", "yes")):
        (tmp_path / "raw/f" / label).mkdir(parents=True)
        for index in range(4):
            Image.new("L", (6, 6), 10 * (4 * position + index)).save(tmp_path / "raw/f" / label / f"{index}.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "raw/f/yes/link.png")
    os.symlink(tmp_path / "raw/f/no/loop.png", tmp_path / "raw/f/no/loop.png")  # a link to itself
    entry = {"format": "image_folder", "path": "raw/f", "classes": ["no", "yes"], "image_size": 8, "channels": 1,
             "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.5}}
    manifest = prepare_dataset(load_config(write_params({"d": entry})), "d")
    assert manifest["num_images"] == 8
    assert manifest["skipped"] == {"dangling_symlink_or_special": {"count": 2, "example": "no/loop.png"}}
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "skipped 2 dangling symlink(s) or special file(s), e.g. no/loop.png" in warning


# -- the prepared arrays are checked at every load -------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path, medmnist_npz, write_params):
    medmnist_npz(tmp_path / "raw/d.npz")
    config = load_config(write_params({"d": NPZ}))
    prepare_dataset(config, "d")
    return config, tmp_path / "data/prepared/d"


def test_a_changed_array_stops_loading_with_one_line(prepared):
    config, folder = prepared
    images = folder / "images.npy"
    original = images.read_bytes()
    images.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one pixel changed, same size
    with pytest.raises(DataError) as caught:
        load_prepared(config, "d")
    line = caught.value.one_line()
    assert "\n" not in line and line.startswith(f"{images}: changed since prepare: sha256 ")
    assert "rerun 'medtransfer prepare --dataset d'" in line
    images.write_bytes(original)
    (folder / "splits.npy").write_bytes((folder / "splits.npy").read_bytes()[:-1])  # a size change: no hashing
    with pytest.raises(DataError, match=r"splits.npy: changed since prepare: \d+ bytes, manifest.json says"):
        load_prepared(config, "d")


def test_an_untouched_file_is_not_rehashed_and_a_touched_unchanged_one_passes(prepared, monkeypatch):
    config, folder = prepared
    hashed = []
    original = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(path.name) or original(path))
    load_prepared(config, "d")
    assert hashed == [], "the stamp written by prepare makes the first load a fast one"
    stat = (folder / "labels.npy").stat()
    os.utime(folder / "labels.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert load_prepared(config, "d").labels.shape == (52,)
    assert hashed == ["labels.npy"]
    load_prepared(config, "d")
    assert hashed == ["labels.npy"], "the rehash renewed the stamp"


def test_a_manifest_without_array_checksums_is_refused(prepared):
    config, folder = prepared
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["arrays"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="records no array checksums .* rerun 'medtransfer prepare --dataset d'"):
        load_prepared(config, "d")
