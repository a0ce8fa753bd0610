"""Faults of the machine and of hand-edited files, met as a careless user would: each ends in exit code 2 and one
stderr line naming what, where and how to fix it; nothing is skipped silently and no output is left half-written.

Permission faults run the CLI with file permissions binding (`cli_without_root_file_access`), since root reads and
writes past mode bits.
"""

from __future__ import annotations

import pytest
import yaml
from PIL import Image

FOLDER = {"format": "image_folder", "path": "raw/f", "classes": ["no", "yes"], "image_size": 8, "channels": 1,
          "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.5}}
NPZ = {"format": "medmnist", "path": "raw/d.npz", "classes": ["a", "b"]}


def _one_line(result, expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


def _image_folder(root):
    """40 images: 20 per class, 10 of the 'no' class in a subfolder."""
    for label in ("no", "yes"):
        for index in range(20):
            path = root / label / ("scans" if label == "no" and index < 10 else "") / f"{label}{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (9, 9), 10 * index).save(path)


def _no_prepared_output(tmp_path):
    prepared = tmp_path / "data/prepared"
    return not prepared.is_dir() or not any(p for p in prepared.iterdir() if not p.name.startswith("."))


def test_an_unreadable_image_subfolder_is_an_error_not_a_silent_drop(tmp_path, write_params, cli_without_root_file_access):
    _image_folder(tmp_path / "raw/f")
    (tmp_path / "raw/f/no/scans").chmod(0)
    try:
        result = cli_without_root_file_access("--params", str(write_params({"d": FOLDER})), "prepare", "--dataset", "d")
    finally:
        (tmp_path / "raw/f/no/scans").chmod(0o755)
    _one_line(result, f"cannot read folder {tmp_path}/raw/f/no/scans (permission denied)")
    assert _no_prepared_output(tmp_path)


def test_an_unreadable_class_folder_is_named_not_reported_as_one_class(tmp_path, write_params, cli_without_root_file_access):
    _image_folder(tmp_path / "raw/f")
    (tmp_path / "raw/f/yes").chmod(0)
    try:
        result = cli_without_root_file_access("--params", str(write_params({"d": FOLDER})), "prepare", "--dataset", "d")
    finally:
        (tmp_path / "raw/f/yes").chmod(0o755)
    line = _one_line(result, f"cannot read folder {tmp_path}/raw/f/yes (permission denied)")
    assert "only class" not in line


def test_an_unreadable_npz_is_not_called_corrupt(tmp_path, write_params, medmnist_npz, cli_without_root_file_access):
    medmnist_npz(tmp_path / "raw/d.npz").chmod(0)
    result = cli_without_root_file_access("--params", str(write_params({"d": NPZ})), "prepare", "--dataset", "d")
    line = _one_line(result, f"{tmp_path}/raw/d.npz: cannot read it (permission denied)")
    assert "corrupt" not in line


def test_an_unreadable_params_file(tmp_path, write_params, cli_without_root_file_access):
    params = write_params({"d": NPZ})
    params.chmod(0)
    result = cli_without_root_file_access("--params", str(params), "prepare", "--dataset", "d")
    _one_line(result, f"{params}: cannot read it (permission denied) -- make it readable")


def test_an_unwritable_prepared_folder(tmp_path, write_params, medmnist_npz, cli_without_root_file_access):
    medmnist_npz(tmp_path / "raw/d.npz")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared").chmod(0o555)
    result = cli_without_root_file_access("--params", str(write_params({"d": NPZ})), "prepare", "--dataset", "d")
    _one_line(result, f"cannot use {tmp_path}/data/prepared/")
    assert "permission denied -- check the ownership and permissions of" in result.stderr
    assert list((tmp_path / "data/prepared").iterdir()) == []


def test_a_file_where_the_prepared_folder_belongs(tmp_path, write_params, medmnist_npz, cli):
    medmnist_npz(tmp_path / "raw/d.npz")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared").write_text("not a folder")
    result = cli("--params", str(write_params({"d": NPZ})), "prepare", "--dataset", "d")
    _one_line(result, f"{tmp_path}/data/prepared is a file where a folder belongs: move it away")
    assert (tmp_path / "data/prepared").read_text() == "not a folder"


def _profiles(root, write_params):
    params = write_params({"d": NPZ}, folder=root)
    (root / "profiles").mkdir()
    (root / "profiles/good.yaml").write_text(params.read_text())
    return params


def test_a_non_utf8_params_file_in_profile_list(tmp_path, write_params, cli):
    params = _profiles(tmp_path, write_params)
    params.write_bytes(b"# Active profile: good\nproject: {profile: \xff\xfe}\n")
    result = cli("--params", str(params), "profile", "list")
    _one_line(result, f"{params}: not a UTF-8 text file")


def test_profile_use_blames_the_broken_profile_not_params(tmp_path, write_params, cli):
    params = _profiles(tmp_path, write_params)
    broken = yaml.safe_load(params.read_text())
    broken["train"] = {"batch_size": 0}
    (tmp_path / "profiles/broken.yaml").write_text(yaml.safe_dump(broken))
    before = params.read_text()
    result = cli("--params", str(params), "profile", "use", "broken")
    line = _one_line(result, f"{tmp_path}/profiles/broken.yaml: train.batch_size: must be at least 1, got 0")
    assert f"{params}:" not in line
    assert params.read_text() == before


@pytest.mark.parametrize("uri_from_env", [False, True], ids=["params", "environment"])
def test_the_store_check_names_where_the_uri_came_from(tmp_path, write_params, monkeypatch, uri_from_env):
    from medtransfer.config import load_config
    from medtransfer.errors import ConfigError
    from medtransfer.tracking import use_tracking_store

    config = load_config(write_params({"d": NPZ}))
    (tmp_path / "elsewhere.db").write_bytes(b"not a database at all")
    if uri_from_env:
        monkeypatch.setenv("MEDTRANSFER_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    else:
        (tmp_path / "mlflow.db").write_bytes(b"not a database at all")
    with pytest.raises(ConfigError) as caught:
        use_tracking_store(config)
    expected = "$MEDTRANSFER_TRACKING_URI" if uri_from_env else f"{config.source_file}: stores.tracking_uri"
    assert caught.value.one_line().startswith(expected)
