"""MedMNIST reader: both label shapes, colour and grey, multi-label rules, and every malformed file."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from medtransfer.config import MultiLabelRule
from medtransfer.data.dataset import SPLIT_CODES
from medtransfer.data.medmnist import read_medmnist_npz
from medtransfer.errors import DataError


@pytest.mark.parametrize("label_shape", ["column", "flat"])
def test_both_label_shapes_read_the_same(tmp_path, medmnist_npz, label_shape):
    path = medmnist_npz(tmp_path / "d.npz", sizes=(6, 3, 4), label_shape=label_shape)
    dataset = read_medmnist_npz(path, ["a", "b"])
    assert dataset.images.shape == (13, 8, 8, 1) and dataset.images.dtype == np.uint8
    assert dataset.labels.shape == (13,) and dataset.labels.dtype == np.int64
    assert dataset.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    assert np.bincount(dataset.given_split).tolist() == [6, 3, 4]
    assert dataset.given_split[6] == SPLIT_CODES["val"]
    with np.load(path) as raw:  # pixels arrive unchanged, in train/val/test order
        np.testing.assert_array_equal(dataset.images[:6, ..., 0], raw["train_images"])
        np.testing.assert_array_equal(dataset.images[9:, ..., 0], raw["test_images"])


def test_colour_and_larger_resolutions(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz", image_shape=(64, 64, 3), num_classes=3)
    dataset = read_medmnist_npz(path, ["a", "b", "c"])
    assert dataset.image_shape == (64, 64, 3)


def test_real_breastmnist(breastmnist_path):
    dataset = read_medmnist_npz(breastmnist_path, ["malignant", "normal_or_benign"])
    assert dataset.images.shape == (780, 28, 28, 1)
    assert np.bincount(dataset.given_split).tolist() == [546, 78, 156]
    assert set(np.unique(dataset.labels)) == {0, 1}


def test_multilabel_needs_an_explicit_rule(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "chest.npz", label_shape="multi")
    with pytest.raises(DataError, match="multi-label.*add a rule under 'multilabel'"):
        read_medmnist_npz(path, ["no", "yes"])
    with np.load(path) as raw:
        expected_any = (raw["train_labels"] != 0).any(axis=1).astype(int)
        expected_col = raw["train_labels"][:, 2].astype(int)
    any_rule = read_medmnist_npz(path, ["no", "yes"], MultiLabelRule(rule="any"))
    assert any_rule.labels[:30].tolist() == expected_any.tolist()
    column = read_medmnist_npz(path, ["no", "yes"], MultiLabelRule(rule="column", column=2))
    assert column.labels[:30].tolist() == expected_col.tolist()
    with pytest.raises(DataError, match="column 9 does not exist"):
        read_medmnist_npz(path, ["no", "yes"], MultiLabelRule(rule="column", column=9))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as caught:
        read_medmnist_npz(tmp_path / "absent.npz", ["a", "b"])
    assert str(tmp_path / "absent.npz") in caught.value.one_line()


def test_truncated_npz(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz", sizes=(300, 50, 50), image_shape=(28, 28))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable .npz"):
        read_medmnist_npz(path, ["a", "b"])


def test_corrupt_member_in_npz(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz", sizes=(300, 50, 50), image_shape=(28, 28))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("train_images.npy")
    middle = member.header_offset + 200 + member.compress_size // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a readable .npz"):
        read_medmnist_npz(path, ["a", "b"])


def test_not_an_npz_at_all(tmp_path):
    path = tmp_path / "d.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        read_medmnist_npz(path, ["a", "b"])


def test_npz_missing_a_key(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz")
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files if key != "val_labels"}
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="npz lacks key 'val_labels'"):
        read_medmnist_npz(path, ["a", "b"])


def test_label_count_differs_from_image_count(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz")
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays["test_labels"] = arrays["test_labels"][:-2]
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="test: 10 labels for 12 images"):
        read_medmnist_npz(path, ["a", "b"])


def test_labels_outside_the_declared_range(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz", num_classes=3)
    with pytest.raises(DataError, match="labels outside the declared range 0..1 .*\\[2\\]"):
        read_medmnist_npz(path, ["a", "b"])


def test_pickled_object_arrays_are_not_loaded(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz")
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays["train_labels"] = np.array([object()] * 30, dtype=object)
    np.savez(path, **arrays)
    # named for what it is, not as a truncated file to download again
    with pytest.raises(DataError, match=r"member train_labels holds Python objects \(dtype object\)") as caught:
        read_medmnist_npz(path, ["a", "b"])
    assert "download" not in str(caught.value) and "truncated" not in str(caught.value)


def _rewrite(path, **changes):
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def test_wrong_rank(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz")
    _rewrite(path, train_images=np.zeros((30, 4, 8, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="3D subsets are not supported"):
        read_medmnist_npz(path, ["a", "b"])
    _rewrite(path, train_images=np.zeros((30, 8, 8, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"train_images has shape \(30, 8, 8, 5\)"):
        read_medmnist_npz(path, ["a", "b"])
    for channels in (2, 4):  # grey + alpha, RGBA: a channel count, not a 3D subset
        _rewrite(path, train_images=np.zeros((30, 8, 8, channels), dtype=np.uint8))
        with pytest.raises(DataError, match=f"train_images has {channels} channels per pixel .*expected 1 \\(grey\\) "
                                            "or 3 \\(RGB\\)") as caught:
            read_medmnist_npz(path, ["a", "b"])
        assert "3D" not in str(caught.value)


def test_arrays_larger_than_this_process_may_allocate_are_refused_before_reading(tmp_path, medmnist_npz, monkeypatch):
    import medtransfer.data.medmnist as medmnist

    path = medmnist_npz(tmp_path / "d.npz")
    _rewrite(path, train_images=np.zeros((30, 512, 512), dtype=np.uint8))  # 7.5 MiB of arrays in a small file
    monkeypatch.setattr(medmnist, "available_bytes", lambda: 5 * 2**20)
    with pytest.raises(DataError, match=r"its arrays need 7\.\d+ MiB|its arrays need 0\.0\d+ GiB, more than the "
                                        r"0\.0\d+ GiB this process may still allocate"):
        read_medmnist_npz(path, ["a", "b"])
    monkeypatch.setattr(medmnist, "available_bytes", lambda: None)  # limits unknown: read, then judged on content
    with pytest.raises(DataError, match="train/val/test images differ in shape"):
        read_medmnist_npz(path, ["a", "b"])


def test_an_npz_bomb_under_ulimit_v_is_one_line_and_exit_2(tmp_path, medmnist_npz, cap_address_space):
    """A compressed member claiming far more than `ulimit -v` leaves: refused from the header, in a real process
    whose address space is capped (RLIMIT_AS) once the libraries are loaded."""
    import subprocess
    import sys
    import textwrap

    path = medmnist_npz(tmp_path / "d.npz")
    with np.load(path) as raw:
        arrays = {key: raw[key] for key in raw.files}
    arrays["train_images"] = np.zeros((30, 2048, 2048), dtype=np.uint8)  # 120 MiB of zeros, compressed to ~120 KiB
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 2**20
    script = textwrap.dedent(f"""
        import sys
        from medtransfer.data.medmnist import read_medmnist_npz
        from medtransfer.errors import DataError
        {cap_address_space(64 * 2**20)}
        try:
            read_medmnist_npz({str(path)!r}, ["a", "b"])
        except DataError as error:
            print(error.one_line(), file=sys.stderr)
            sys.exit(2)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "this process may still allocate" in done.stderr


def test_float_images_convert_only_when_unambiguous(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz")
    with np.load(path) as raw:
        levels = raw["train_images"]
    _rewrite(path, train_images=levels.astype(np.float32) / 255.0)  # fractions of full scale
    np.testing.assert_array_equal(read_medmnist_npz(path, ["a", "b"]).images[:30, ..., 0], levels)
    _rewrite(path, train_images=levels.astype(np.float64))  # 8-bit levels stored as floats
    np.testing.assert_array_equal(read_medmnist_npz(path, ["a", "b"]).images[:30, ..., 0], levels)
    broken = levels.astype(np.float32)
    broken[3, 2, 1] = np.nan
    broken[4, 0, 0] = np.inf
    _rewrite(path, train_images=broken)
    with pytest.raises(DataError, match="train_images holds 2 NaN or infinite pixel values"):
        read_medmnist_npz(path, ["a", "b"])
    _rewrite(path, train_images=levels.astype(np.int32) * 4)
    with pytest.raises(DataError, match="outside 0..255"):
        read_medmnist_npz(path, ["a", "b"])
    _rewrite(path, train_images=np.full(levels.shape, "x"))
    with pytest.raises(DataError, match="expected numeric images"):
        read_medmnist_npz(path, ["a", "b"])


def test_label_map_on_stored_integers(tmp_path, medmnist_npz):
    path = medmnist_npz(tmp_path / "d.npz", num_classes=3)  # BUSI-like: 0 normal, 1 benign, 2 malignant
    dataset = read_medmnist_npz(path, ["benign", "malignant"], label_map={"0": "benign", "1": "benign", "2": "malignant"})
    with np.load(path) as raw:
        stored = raw["train_labels"][:, 0]
    assert dataset.labels[:30].tolist() == (stored == 2).astype(int).tolist()
    with pytest.raises(DataError, match="label '2' .* is not in the label map"):
        read_medmnist_npz(path, ["benign", "malignant"], label_map={"0": "benign", "1": "benign"})
