"""Every bad input through the real command: exit code 2, one stderr line naming what and where, no output."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image


def _image(path, size=(9, 9), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def _npz(path, medmnist_npz, **changes):
    medmnist_npz(path)
    if changes:
        with np.load(path) as raw:
            arrays = {key: raw[key] for key in raw.files}
        arrays.update(changes)
        np.savez(path, **arrays)


def _folder(root, classes=("no", "yes"), per_class=4):
    """`per_class` images per class, no two alike (prepare refuses identical images across a split)."""
    for position, label in enumerate(classes):
        for index in range(per_class):
            _image(root / label / f"{label}{index}.png", value=(per_class * position + index) * 10)


def _csv(path, rows, header=("path", "label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


FOLDER = {"format": "image_folder", "path": "raw/f", "classes": ["no", "yes"], "image_size": 8, "channels": 1,
          "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.5}}
CSV = {"format": "csv", "path": "raw/m.csv", "classes": ["no", "yes"], "image_size": 8, "channels": 1,
       "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.5}}
NPZ = {"format": "medmnist", "path": "raw/d.npz", "classes": ["a", "b"]}


def scenario_wrong_rank(tmp, medmnist_npz):
    _npz(tmp / "raw/d.npz", medmnist_npz, val_images=np.zeros((10, 8), dtype=np.uint8))
    return NPZ, "val_images has shape (10, 8)"


def scenario_wrong_dtype(tmp, medmnist_npz):
    _npz(tmp / "raw/d.npz", medmnist_npz, val_images=np.zeros((10, 8, 8), dtype=np.complex64))
    return NPZ, "val_images has dtype complex64"


def scenario_nan_images(tmp, medmnist_npz):
    images = np.full((10, 8, 8), 0.5, dtype=np.float32)
    images[0, 0, 0] = np.nan
    _npz(tmp / "raw/d.npz", medmnist_npz, val_images=images)
    return NPZ, "val_images holds 1 NaN or infinite pixel values"


def scenario_train_with_one_class(tmp, medmnist_npz):
    _npz(tmp / "raw/d.npz", medmnist_npz, train_labels=np.zeros((30, 1), dtype=np.uint8))
    return NPZ, "fold 0: the train split holds only class 0"


def scenario_empty_split(tmp, medmnist_npz):
    _npz(tmp / "raw/d.npz", medmnist_npz, val_images=np.zeros((0, 8, 8), np.uint8), val_labels=np.zeros((0, 1), np.uint8))
    return NPZ, "fold 0 has an empty val split"


def scenario_unreadable_image(tmp, medmnist_npz):
    _folder(tmp / "raw/f")
    (tmp / "raw/f/yes/broken.png").write_bytes(b"not really a png")
    return FOLDER, "broken.png: unreadable image"


def scenario_csv_missing_file(tmp, medmnist_npz):
    _image(tmp / "raw/img/a.png")
    _csv(tmp / "raw/m.csv", [["img/a.png", "no"], ["img/gone.png", "yes"]])
    return CSV, "row 3 points to a missing file: img/gone.png"


def scenario_csv_missing_column(tmp, medmnist_npz):
    _image(tmp / "raw/img/a.png")
    _csv(tmp / "raw/m.csv", [["img/a.png"]], header=("path",))
    return CSV, "CSV lacks column 'label'"


def scenario_label_outside_label_map(tmp, medmnist_npz):
    _folder(tmp / "raw/f", classes=("benign", "malignant", "normal"))
    return {**FOLDER, "classes": ["benign", "malignant"], "label_map": {"benign": "benign", "malignant": "malignant"}}, \
        "label 'normal' (folder normal/) is not in the label map"


def scenario_fold_column_short(tmp, medmnist_npz):
    rows = []
    for index in range(8):
        _image(tmp / f"raw/img/{index}.png", value=index * 20)
        rows.append([f"img/{index}.png", ["no", "yes"][index % 2], index % 3])
    _csv(tmp / "raw/m.csv", rows, header=("path", "label", "fold"))
    return {**CSV, "split": {"scheme": "predefined_folds", "folds": 5}}, "the fold column has 3 folds, but split.folds asks for 5"


def scenario_npz_header_claims_1e13_elements(tmp, medmnist_npz):
    import io
    import zipfile

    intact = medmnist_npz(tmp / "intact.npz")
    (tmp / "raw").mkdir()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**13,)})
    with zipfile.ZipFile(intact) as source, zipfile.ZipFile(tmp / "raw/d.npz", "w") as archive:
        for name in source.namelist():
            forged = header.getvalue() + b"\x00" * 64
            archive.writestr(name, forged if name == "train_images.npy" else source.read(name))
    return NPZ, "member train_images claims shape (10000000000000,) of uint8"


def scenario_png_header_claims_30000_square(tmp, medmnist_npz):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    _folder(tmp / "raw/f")
    side = 30000  # 9e8 pixels, a few hundred bytes on disk
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * (1 + side // 8) * 10)) + chunk(b"IEND", b"")
    (tmp / "raw/f/no/bomb.png").write_bytes(png)
    return FOLDER, "Image size (900000000 pixels) exceeds limit"


SCENARIOS = [value for name, value in sorted(globals().items()) if name.startswith("scenario_")]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__.removeprefix("scenario_") for s in SCENARIOS])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, medmnist_npz, write_params, cli, scenario):
    entry, expected = scenario(tmp_path, medmnist_npz)
    params = write_params({"d": entry})
    result = cli("--params", str(params), "prepare", "--dataset", "d")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]
    prepared = tmp_path / "data/prepared"
    assert not prepared.exists() or not any(prepared.iterdir()), "no partial output"


def test_duplicate_dataset_names_exit_2(tmp_path, cli):
    params = tmp_path / "params.yaml"
    params.write_text(
        "project: {profile: t}\ndatasets:\n"
        "  d: {format: medmnist, path: a.npz, classes: [a, b]}\n"
        "  d: {format: medmnist, path: b.npz, classes: [a, b]}\n"
    )
    result = cli("--params", str(params), "prepare", "--dataset", "d")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "duplicate key 'd' at line 4" in result.stderr


def test_non_image_files_are_skipped_with_one_warning(tmp_path, write_params, cli):
    _folder(tmp_path / "raw/f")
    (tmp_path / "raw/f/no/readme.txt").write_text("notes")
    (tmp_path / "raw/f/yes/.DS_Store").write_bytes(b"\x00")
    result = cli("--params", str(write_params({"d": FOLDER})), "prepare", "--dataset", "d")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning") == 1 and "skipped 2 non-image file(s)" in result.stderr
    assert (tmp_path / "data/prepared/d/manifest.json").is_file()


def test_validation_with_one_class_is_a_warning_not_an_error(tmp_path, medmnist_npz, write_params, cli):
    _npz(tmp_path / "raw/d.npz", medmnist_npz, val_labels=np.zeros((10, 1), dtype=np.uint8))
    result = cli("--params", str(write_params({"d": NPZ})), "prepare", "--dataset", "d")
    assert result.returncode == 0, result.stderr
    assert "fold 0: the validation split holds only class 0" in result.stderr
