"""Image folders and CSV manifests: mixed sizes and modes, grey ↔ RGB, resizing, label maps, groups, folds."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from medtransfer.config import DatasetConfig, SplitConfig
from medtransfer.data.image_files import load_image, read_csv_manifest, read_image_folder
from medtransfer.data.splits import TEST, VAL, make_split_assignment
from medtransfer.errors import DataError


def _save(path, mode, size, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if mode == "I;16":
        array = np.full((height, width), value * 257, dtype=np.uint16)
        Image.fromarray(array).save(path)
    else:
        colour = {"L": value, "RGB": (value, value // 2, 255 - value), "RGBA": (value, value, value, 7)}[mode]
        Image.new(mode, size, colour).save(path)
    return path


def _folder_config(**overrides):
    base = {"format": "image_folder", "path": "x", "classes": ["benign", "malignant"], "image_size": 16, "channels": 1}
    base.update(overrides)
    return DatasetConfig(**base)


@pytest.fixture
def busi_like(tmp_path):
    """BUSI's layout: benign/, malignant/, normal/ with masks beside the images, mixed sizes and modes."""
    root = tmp_path / "busi"
    specs = [
        ("benign/benign (1).png", "L", (40, 30)),
        ("benign/benign (1)_mask.png", "L", (40, 30)),
        ("benign/benign (2).jpg", "RGB", (64, 48)),
        ("malignant/malignant (1).png", "RGBA", (20, 20)),
        ("malignant/sub/malignant (2).png", "I;16", (33, 17)),
        ("normal/normal (1).png", "RGB", (100, 80)),
        ("normal/normal (1)_mask.png", "L", (100, 80)),
    ]
    for index, (name, mode, size) in enumerate(specs):
        _save(root / name, mode, size, value=40 + 30 * index)
    (root / "benign" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_with_label_map_masks_excluded_and_mixed_modes(busi_like, capsys):
    config = _folder_config(
        label_map={"benign": "benign", "normal": "benign", "malignant": "malignant"}, exclude=["*_mask*"]
    )
    dataset = read_image_folder(config, busi_like)
    assert dataset.images.shape == (5, 16, 16, 1)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 0]  # benign x2, malignant x2 (one in a subfolder), normal→benign
    assert "skipped 1 non-image file(s), e.g. benign/notes.txt" in capsys.readouterr().err
    # 16-bit grey is scaled to 8 bits, not clipped: value 160 stored as 160*257 reads back as 160
    assert dataset.images[3].min() == dataset.images[3].max() == 160


def test_grey_to_rgb_and_rgb_to_grey(tmp_path):
    grey = _save(tmp_path / "g.png", "L", (10, 12), value=77)
    rgb = _save(tmp_path / "c.png", "RGB", (10, 12), value=200)
    as_rgb = load_image(grey, 8, 3)
    assert as_rgb.shape == (8, 8, 3) and (as_rgb == 77).all()
    as_grey = load_image(rgb, 8, 1)
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 55)  # ITU-R 601-2 luma of (200, 100, 55)
    assert as_grey.shape == (8, 8, 1) and abs(int(as_grey[0, 0, 0]) - expected) <= 1


def test_nearest_and_bilinear_resizing_differ_as_they_should(tmp_path):
    checker = np.kron((np.indices((4, 4)).sum(0) % 2) * 255, np.ones((2, 2))).astype(np.uint8)  # 8x8 checkerboard
    path = tmp_path / "check.png"
    Image.fromarray(checker).save(path)
    nearest = load_image(path, 4, 1, "nearest")
    bilinear = load_image(path, 4, 1, "bilinear")
    assert set(np.unique(nearest)) <= {0, 255}, "nearest keeps only original levels"
    assert len(set(np.unique(bilinear)) - {0, 255}) > 0, "bilinear blends"


def test_group_pattern_from_file_names(tmp_path):
    for patient in ("p1", "p2"):
        for n in range(2):
            _save(tmp_path / "t" / "benign" / f"{patient}_{n}.png", "L", (9, 9))
    _save(tmp_path / "t" / "malignant" / "p3_0.png", "L", (9, 9))
    dataset = read_image_folder(_folder_config(group_pattern=r"/(p\d+)_"), tmp_path / "t")
    assert dataset.groups.tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(DataError, match="group_pattern .* does not match"):
        read_image_folder(_folder_config(group_pattern=r"(q\d+)"), tmp_path / "t")


def _write_csv(path, rows, header=("path", "label", "group", "fold")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def thyroid_like(tmp_path):
    """DDTI-like: TI-RADS grades as labels, patients as groups, a published fold per patient."""
    rows = []
    grades = ["2", "3", "4a", "4b", "4c", "5"]
    for patient in range(12):
        for image in range(2):
            name = f"images/{patient}_{image}.jpg"
            _save(tmp_path / "ddti" / name, "RGB" if image else "L", (30 + patient, 20 + image))
            rows.append([name, grades[(patient + image) % 6], f"patient{patient}", patient % 3 + 1])
    return _write_csv(tmp_path / "ddti" / "manifest.csv", rows)


TIRADS_MAP = {"2": "benign", "3": "benign", "4a": "malignant", "4b": "malignant", "4c": "malignant", "5": "malignant"}


def test_csv_manifest_with_tirads_rule_groups_and_published_folds(thyroid_like):
    config = DatasetConfig(
        format="csv", path="x", classes=["benign", "malignant"], image_size=24, channels=1, label_map=TIRADS_MAP,
        split=SplitConfig(scheme="predefined_folds", folds=3, val_fraction=0.2),
    )
    dataset = read_csv_manifest(config, thyroid_like)
    assert dataset.images.shape == (24, 24, 24, 1)
    grades = ["2", "3", "4a", "4b", "4c", "5"]
    expected = [int(grades[(p + i) % 6] not in ("2", "3")) for p in range(12) for i in range(2)]
    assert dataset.labels.tolist() == expected
    assert dataset.predefined_fold.tolist() == [p % 3 for p in range(12) for _ in range(2)]
    assignment = make_split_assignment(dataset, config.split)
    for fold in range(3):
        np.testing.assert_array_equal(assignment[fold] == TEST, dataset.predefined_fold == fold)
        for group in np.unique(dataset.groups):
            assert np.unique(assignment[fold][dataset.groups == group]).size == 1, "a patient crosses parts"
        assert (assignment[fold] == VAL).any()


def test_csv_fold_column_with_fewer_folds_than_requested(thyroid_like):
    config = DatasetConfig(
        format="csv", path="x", classes=["benign", "malignant"], image_size=8, channels=1, label_map=TIRADS_MAP,
        split=SplitConfig(scheme="predefined_folds", folds=5),
    )
    dataset = read_csv_manifest(config, thyroid_like)
    with pytest.raises(DataError, match="the fold column has 3 folds, but split.folds asks for 5"):
        make_split_assignment(dataset, config.split)


def test_csv_errors(tmp_path):
    _save(tmp_path / "a.png", "L", (8, 8))
    config = DatasetConfig(format="csv", path="x", classes=["no", "yes"], image_size=8, channels=1)
    missing_column = _write_csv(tmp_path / "m1.csv", [["a.png"]], header=("path",))
    with pytest.raises(DataError, match="CSV lacks column 'label'"):
        read_csv_manifest(config, missing_column)
    missing_file = _write_csv(tmp_path / "m2.csv", [["a.png", "no"], ["b.png", "yes"]], header=("path", "label"))
    with pytest.raises(DataError, match="row 3 points to a missing file: b.png"):
        read_csv_manifest(config, missing_file)
    unknown_label = _write_csv(tmp_path / "m3.csv", [["a.png", "maybe"]], header=("path", "label"))
    with pytest.raises(DataError, match="label 'maybe' \\(row 2\\) is not a class"):
        read_csv_manifest(config, unknown_label)
    bad_fold = _write_csv(tmp_path / "m4.csv", [["a.png", "no", "g", "one"]])
    with pytest.raises(DataError, match="fold column holds 'one'"):
        read_csv_manifest(config, bad_fold)


def test_unreadable_image_is_named(tmp_path):
    _save(tmp_path / "f" / "yes" / "good.png", "L", (8, 8))
    broken = tmp_path / "f" / "no" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    config = _folder_config(classes=["no", "yes"])
    with pytest.raises(DataError, match="unreadable image") as caught:
        read_image_folder(config, tmp_path / "f")
    assert str(broken) in caught.value.one_line()


def test_folder_label_outside_the_label_map(busi_like):
    config = _folder_config(label_map={"benign": "benign", "malignant": "malignant"}, exclude=["*_mask*"])
    with pytest.raises(DataError, match="label 'normal' \\(folder normal/\\) is not in the label map"):
        read_image_folder(config, busi_like)
