"""A study folder copied or moved: its MLflow SQLite store still names the original's artifacts. Steps refuse it with
one line, `medtransfer relocate` points it at the copy's own files, and the copy then works without the original."""

from __future__ import annotations

import shutil
import sqlite3
import stat
from pathlib import Path

import mlflow
import pytest
import yaml

from medtransfer.config import load_config
from medtransfer.errors import ConfigError
from medtransfer.models.mlflow_models import load_registered_model
from medtransfer.models.sources import register_source
from medtransfer.registry import ALIAS_DEFAULT, model_uri, source_model_name
from medtransfer.relocate import check_store_location, relocate_store

SOURCES = {"random": {"kind": "random", "arch": "resnet18", "seed": 0}}


def _params(folder: Path, **stores) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "project": {"profile": "test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test", "optuna_storage": "sqlite:///optuna.db",
                   **stores},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": {},
        "sources": SOURCES,
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A study with a registered source model in its own SQLite store and artifact root; made once, only copied."""
    folder = tmp_path_factory.mktemp("original") / "study"
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MEDTRANSFER_TRACKING_URI"):
            patch.delenv(variable, raising=False)
        register_source(load_config(_params(folder)), "random")
    return folder


@pytest.fixture
def moved(original, tmp_path, monkeypatch):
    """A copy of the study whose original was then deleted (a move, or a copy sent elsewhere)."""
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    hidden = original.with_name("hidden")
    original.rename(hidden)
    yield copy
    hidden.rename(original)


def _recorded_paths(store: Path) -> list[str]:
    with sqlite3.connect(store) as connection:
        # the Default experiment MLflow creates points wherever the first process's working folder was: not ours
        rows = connection.execute("SELECT artifact_location FROM experiments WHERE name != 'Default' "
                                  "UNION ALL SELECT artifact_uri FROM runs "
                                  "UNION ALL SELECT storage_location FROM model_versions "
                                  "UNION ALL SELECT artifact_location FROM logged_models").fetchall()
    return [row[0] for row in rows]


def test_a_moved_study_stops_with_one_line_until_relocated_then_uses_its_own_files(moved, cli):
    refused = cli("source", "--name", "random", cwd=moved, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "outside this study's folder" in lines[0] and "medtransfer relocate" in lines[0]

    relocated = cli("relocate", cwd=moved, timeout=120)
    assert relocated.returncode == 0, relocated.stderr
    assert str(moved) in relocated.stdout
    recorded = _recorded_paths(moved / "mlflow.db")
    assert len(recorded) >= 4 and all(str(moved) in path for path in recorded), recorded

    config = load_config(moved / "params.yaml")
    mlflow.set_tracking_uri(config.tracking_uri)
    loaded = load_registered_model(model_uri(source_model_name("random"), alias=ALIAS_DEFAULT))  # only the copy's files exist
    assert loaded.spec.arch == "resnet18"
    again = cli("source", "--name", "random", cwd=moved, timeout=600)
    assert again.returncode == 0, again.stderr
    assert cli("relocate", cwd=moved, timeout=120).stdout.endswith("nothing to do\n")


def test_a_run_logged_in_the_relocated_copy_writes_into_the_copy(moved):
    from medtransfer.tracking import step_run

    config = load_config(moved / "params.yaml")
    with pytest.raises(ConfigError, match="medtransfer relocate"):
        check_store_location(config)
    relocate_store(config)
    with step_run(config, step="probe", run_name="probe") as run:
        mlflow.log_text("here", "probe.txt")
    assert Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="probe.txt")).read_text() == "here"
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri())
    assert (moved / "mlartifacts").glob(f"*/{run.info.run_id}/artifacts/probe.txt")


def test_relocate_keeps_the_store_file_mode_and_touches_only_whole_paths(original, moved):
    store = moved / "mlflow.db"
    store.chmod(0o640)
    old_root = original  # moved away by now: given by hand, as `medtransfer relocate --from` does
    unrelated = f"/elsewhere{old_root}/file"  # the old folder's path inside another path: not a path under it
    with sqlite3.connect(store) as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE name = 'Default'", (unrelated,))
    config = load_config(moved / "params.yaml")
    relocation = relocate_store(config, old_root)
    assert relocation.values >= 4
    assert stat.S_IMODE(store.stat().st_mode) == 0o640
    with sqlite3.connect(store) as connection:
        assert connection.execute("SELECT artifact_location FROM experiments WHERE name = 'Default'").fetchone() == (
            unrelated,)
    assert [p.name for p in moved.iterdir() if p.name.startswith(".")] == []  # no temporary copy of the store left


def test_relocate_refuses_a_store_that_is_not_sqlite(tmp_path, cli):
    params = _params(tmp_path / "study", tracking_uri="http://127.0.0.1:9")
    result = cli("--params", str(params), "relocate", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "relocate rewrites a SQLite tracking store" in lines[0], result.stderr


def test_an_artifact_root_kept_outside_the_study_on_purpose_is_not_refused(tmp_path, monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    shared = tmp_path / "shared-artifacts"
    config = load_config(_params(tmp_path / "study", artifact_root=str(shared)))
    from medtransfer.tracking import ensure_experiment, use_tracking_store

    use_tracking_store(config)
    ensure_experiment(config)
    check_store_location(config)  # no error: the store records the configured root
    assert mlflow.get_experiment_by_name("test").artifact_location == shared.as_uri()


def test_a_study_copied_into_a_folder_above_the_original_is_refused_until_relocated(original, tmp_path, monkeypatch):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    parent = tmp_path / "parent"
    inner = parent / "study"
    shutil.copytree(original, inner, symlinks=True)
    relocate_store(load_config(inner / "params.yaml"))  # the original study now lives in parent/study
    for entry in inner.iterdir():  # ... and is copied into the folder above it (`cp -a study/* .`)
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, parent / entry.name)
    config = load_config(parent / "params.yaml")
    # the copy's store still points into parent/study: "inside this folder", yet the original's artifacts
    with pytest.raises(ConfigError, match=f"inside another study's folder {inner}.*relocate --from {inner}"):
        check_store_location(config)
    relocate_store(config, inner)
    check_store_location(config)
    assert all(path.startswith(((parent / "mlartifacts").as_uri(), str(parent / "mlartifacts")))
               for path in _recorded_paths(parent / "mlflow.db")), _recorded_paths(parent / "mlflow.db")


def test_relocate_from_a_folder_the_store_never_recorded_changes_nothing_and_says_so(moved):
    store = moved / "mlflow.db"
    before = store.read_bytes()
    with pytest.raises(ConfigError, match="records no path under /nonexistent; nothing was changed"):
        relocate_store(load_config(moved / "params.yaml"), Path("/nonexistent"))
    assert store.read_bytes() == before
    assert [p.name for p in moved.iterdir() if p.name.startswith(".")] == []
