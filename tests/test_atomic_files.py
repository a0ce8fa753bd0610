"""Atomic outputs: a failure leaves the previous result whole and no temporary files behind."""

from __future__ import annotations

import pytest

from medtransfer.atomic_files import atomic_directory, atomic_write_text


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "out" / "table.csv"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_atomic_directory_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "prepared"
    with atomic_directory(final) as staging:
        (staging / "one").write_text("1")
    with atomic_directory(final) as staging:
        (staging / "two").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_atomic_directory_failure_keeps_the_old_folder(tmp_path):
    final = tmp_path / "prepared"
    with atomic_directory(final) as staging:
        (staging / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "half").write_text("written")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in final.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
