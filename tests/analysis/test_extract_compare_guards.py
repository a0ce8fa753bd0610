"""What extract and compare refuse or guard against, on the tiny study (tests/analysis/conftest.py): a registry or
artifact store that disagrees with the pointers, prepared data of another version or changed since prepare,
unreadable prediction artifacts, user errors; what compare may read (its DVC stage's deps only) and that it runs
without the models. The end-to-end outputs are checked in test_extract_compare.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from medtransfer.analysis.compare import run_compare
from medtransfer.analysis.extract import run_extract
from medtransfer.config import load_config
from medtransfer.errors import ConfigError, DataError, ModelError
from medtransfer.layout import ACTIVATIONS_FOLDER, POINTER_FOLDER, TEST_PREDICTIONS_FILE as PREDICTIONS_FILE
from medtransfer.pointers import pointer_path, read_pointer
from medtransfer.registry import Tag, finetuned_model_name
from medtransfer.tracking import use_tracking_store
from medtransfer.train.finetune import PREDICTIONS_ARTIFACT_DIR

DATASET = "target"
REGIME = "full"


def test_a_registry_that_disagrees_with_a_pointer_is_refused(study):
    use_tracking_store(study)
    client = mlflow.MlflowClient()
    name = finetuned_model_name(DATASET, "natural", REGIME)
    fold0 = client.get_model_version_by_alias(name, "fold0").version
    seed1 = client.get_model_version_by_alias(name, "fold0-seed1").version
    client.set_registered_model_alias(name, "fold0", seed1)  # someone moved the alias after the search
    try:
        with pytest.raises(ModelError) as error:
            run_extract(study, DATASET)
        message = str(error.value)
        assert "\n" not in message and "disagrees" in message and "fold0" in message
    finally:
        client.set_registered_model_alias(name, "fold0", fold0)

    original = client.get_model_version(name, fold0).tags[Tag.WEIGHTS_SHA256]
    client.set_model_version_tag(name, fold0, Tag.WEIGHTS_SHA256, "0" * 64)
    try:
        with pytest.raises(ModelError, match="disagrees"):
            run_extract(study, DATASET)
    finally:
        client.set_model_version_tag(name, fold0, Tag.WEIGHTS_SHA256, original)


def test_weights_changed_or_deleted_in_the_artifact_store_stop_report_and_summary(study):
    """What `report` and `summary` publish is checked against the artifact store, not only the registry's tags."""
    from urllib.parse import urlparse

    from medtransfer.models.weights_check import verify_published
    from medtransfer.pointers import pointer_path, pointers_for_dataset

    use_tracking_store(study)
    client = mlflow.MlflowClient()
    pointers = pointers_for_dataset(study, DATASET)
    where = lambda pointer: str(pointer_path(study, pointer.dataset, pointer.source, pointer.regime))  # noqa: E731
    verify_published(client, pointers, where)  # intact: passes
    name = finetuned_model_name(DATASET, "natural", REGIME)
    version = client.get_model_version_by_alias(name, "fold0")
    location = client.get_logged_model(version.source.rsplit("/", 1)[-1]).artifact_location
    (weights,) = Path(urlparse(location).path).rglob("weights.safetensors")
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
        with pytest.raises(ModelError) as error:
            verify_published(client, pointers, where)
        assert "\n" not in str(error.value) and "weights changed after registration" in str(error.value)
        assert f"models:/{name}/{version.version}" in str(error.value)
        weights.unlink()
        with pytest.raises(ModelError, match="weights are missing"):
            verify_published(client, pointers, where)
    finally:
        weights.write_bytes(original)
    verify_published(client, pointers, where)


def test_prepared_data_of_another_version_is_refused(study):
    path = pointer_path(study, DATASET, "medical", REGIME)
    original = path.read_text()
    record = json.loads(original)
    record["data_fingerprint"] = "f" * 64
    path.write_text(json.dumps(record))
    try:
        with pytest.raises(DataError) as error:
            run_extract(study, DATASET)
        assert "\n" not in str(error.value) and "prepared data" in str(error.value)
    finally:
        path.write_text(original)


def test_a_changed_prepared_images_array_stops_extract(study):
    images = study.prepared_data_dir / DATASET / "images.npy"
    original = images.read_bytes()
    images.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one pixel, same size: the manifest is intact
    try:
        with pytest.raises(DataError) as error:
            run_extract(study, DATASET)
        line = error.value.one_line()
        assert "\n" not in line and line.startswith(f"{images}: changed since prepare")
        assert f"medtransfer prepare --dataset {DATASET}" in line
    finally:
        images.write_bytes(original)  # a new mtime, the same bytes: the next load rehashes and passes


def test_stale_activations_are_dvcs_to_notice(repo_root):
    """Replaces compare's own check of the pointers (test_compare_refuses_activations_of_other_model_versions): the
    behaviour moved to DVC. extract depends on the pointers, so a new model version reruns it; compare depends on
    the activations only and reads no pointer (see the next test)."""
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert POINTER_FOLDER in stages["extract"]["do"]["deps"]
    assert f"{ACTIVATIONS_FOLDER}/${{item}}" in stages["compare"]["do"]["deps"]
    assert not any(dep.startswith(POINTER_FOLDER) for dep in stages["compare"]["do"]["deps"])


def _stage_paths(entries, params: dict, item: str) -> list[str]:
    """dvc.yaml `deps`/`outs` entries (strings or {path: options}) with ${item} and ${a.b} filled in."""
    import re

    def fill(match):
        value = params
        for part in match.group(1).split("."):
            value = item if part == "item" and value is params else value[part]
        return str(value)

    paths = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    return [re.sub(r"\$\{([^}]+)\}", fill, path).rstrip("/") for path in paths]


def test_compare_opens_only_data_its_dvc_stage_depends_on(study, repo_root):
    """Every file compare reads inside the study folder lies under a `deps` path of its dvc.yaml stage (or is one
    of its own outputs, read back to log them): nothing DVC does not know of can change its results."""
    import os

    import yaml

    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["compare"]["do"]
    params = yaml.safe_load(study.source_file.read_text())
    deps = _stage_paths(stage["deps"], params, DATASET)
    outputs = _stage_paths([*stage["outs"], *stage.get("plots", [])], params, DATASET)
    assert stage["params"] == [f"analysis.{key}" for key in
                               ("measures", "channel_sample", "channel_repeats", "bootstrap_resamples", "seed",
                                "gram_precision")]
    root = study.root.resolve()
    opened: list[Path] = []
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def record(event: str, args: tuple) -> None:
        if event != "open" or not RECORDING or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        if isinstance(mode, str) and any(letter in mode for letter in "wax+") or flags & writing:
            return
        if os.path.isdir(path):
            return  # a folder listed or removed (the previous outputs, replaced atomically), not data read
        try:
            opened.append(Path(os.fsdecode(path)).resolve().relative_to(root))
        except ValueError:
            pass  # outside the study: code, libraries

    _install_open_recorder(record)
    RECORDING.append(True)
    try:
        run_compare(study, DATASET)
    finally:
        RECORDING.clear()
    # The MLflow run compare logs goes to the tracking store: an output of the step, never read for its results.
    store = [Path("mlflow.db"), Path("mlartifacts"), Path("mlruns")]
    read = sorted({path for path in opened if not any(path.is_relative_to(folder) for folder in store)})
    assert any(path.is_relative_to(f"{ACTIVATIONS_FOLDER}/{DATASET}") for path in read), read
    outside = [path for path in read
               if not any(path.is_relative_to(dep) for dep in deps + outputs)]
    assert not outside, f"compare read files its dvc.yaml stage does not depend on: {outside}"


#: The audit hook below stays installed for the process (Python cannot remove one): it records only while this
#: list is non-empty, and is installed once.
RECORDING: list[bool] = []
_RECORDERS: list = []


def _install_open_recorder(record) -> None:
    import sys

    if not _RECORDERS:
        sys.addaudithook(lambda event, args: _RECORDERS[-1](event, args))
    _RECORDERS.append(record)


def test_user_errors_are_one_line(tmp_path, write_params, monkeypatch):
    import dataclasses

    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    config = load_config(write_params({DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"]}}))
    with pytest.raises(ModelError, match="no model pointers for dataset 'target'"):
        run_extract(config, DATASET)
    with pytest.raises(DataError, match="no activations for dataset 'target'.*medtransfer extract --dataset target"):
        run_compare(config, DATASET)
    with pytest.raises(ConfigError, match="unknown dataset"):
        run_extract(config, "nope")

    def with_analysis(**changes):
        return dataclasses.replace(config, analysis=dataclasses.replace(config.analysis, **changes))

    with pytest.raises(ConfigError, match="analysis.batch_size"):
        run_extract(with_analysis(batch_size=0), DATASET)
    with pytest.raises(ConfigError, match="analysis.channel_repeats"):
        run_compare(with_analysis(channel_repeats=0), DATASET)
    with pytest.raises(ConfigError, match="unknown similarity measure 'nope'"):
        run_compare(with_analysis(measures=["cca", "nope"]), DATASET)


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_an_unreadable_prediction_artifact_stops_extract_with_one_line(study, cli, damage):
    from urllib.parse import urlparse

    use_tracking_store(study)
    pointer = read_pointer(pointer_path(study, DATASET, "medical", REGIME))
    run_id = pointer.folds[1].run_id
    artifact_root = Path(urlparse(mlflow.MlflowClient().get_run(run_id).info.artifact_uri).path)
    artifact = artifact_root / PREDICTIONS_ARTIFACT_DIR / PREDICTIONS_FILE
    original = artifact.read_bytes()
    before = (study.root / "activations" / DATASET / "manifest.json")
    before_bytes = before.read_bytes() if before.is_file() else None
    if damage == "deleted":
        artifact.unlink()
    else:
        artifact.write_text("index,label,p_a,p_b\n3,1,0.2\n")  # a truncated row
    try:
        result = cli("extract", "--dataset", DATASET, cwd=study.root)
    finally:
        artifact.write_bytes(original)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert run_id in line and PREDICTIONS_FILE in line and "Traceback" not in result.stderr, line
    after = before.read_bytes() if before.is_file() else None
    assert after == before_bytes, "the previous activations are left as they were"


def test_compare_runs_without_the_models(csv_table, study):
    """Last in this file: it deletes every registered model and the whole artifact store."""
    if not (study.root / "activations" / DATASET / "manifest.json").is_file():
        run_extract(study, DATASET)
    _, before = csv_table(run_compare(study, DATASET) / "similarity.csv")
    use_tracking_store(study)
    client = mlflow.MlflowClient()
    for registered in client.search_registered_models():
        client.delete_registered_model(registered.name)
    shutil.rmtree(study.root / "mlartifacts")
    import medtransfer.analysis.extract as extract_module

    def no_network(*args, **kwargs):
        raise AssertionError("compare loaded a model or read the tracking store's artifacts")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("medtransfer.models.mlflow_models.load_registered_model", no_network)
        patch.setattr("mlflow.artifacts.download_artifacts", no_network)
        patch.setattr(extract_module, "_extract_model", no_network)
        folder = run_compare(study, DATASET)
    _, after = csv_table(folder / "similarity.csv")
    _, predictions = csv_table(folder / "predictions.csv")
    assert len(predictions) == 6  # 3 pairs x 2 folds, from the predictions saved beside the activations
    assert [row["value"] for row in after] == [row["value"] for row in before]
