"""A study whose sources are three architectures (a ResNet, a ConvNeXt, a vision transformer) through extract and
compare: every model's own stages are extracted and match its reloaded network's hooks, a model against itself is
1 at every stage of its architecture, pairs across architectures compare stages of equal reduction (and say which
stages have no partner), and one stage name at two sizes is refused with one line."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medtransfer.analysis.activations import activations_path, read_manifest
from medtransfer.analysis.compare import run_compare
from medtransfer.analysis.extract import run_extract
from medtransfer.config import load_config
from medtransfer.data.prepare import load_prepared, prepare_dataset
from medtransfer.errors import ModelError
from medtransfer.layout import FINETUNED_VS_FINETUNED, IDENTITY, PRETRAINED_VS_PRETRAINED, ROLE_FINETUNED, \
    SOURCE_VS_FINETUNED, TEST_PREDICTIONS_FILE
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.mlflow_models import load_registered_model, log_packaged_model, register_logged_model
from medtransfer.models.packaging import ModelSpec
from medtransfer.models.sources import register_source
from medtransfer.pointers import FoldModel, fold_model_alias
from medtransfer.registry import ALIAS_DEFAULT, Tag, finetuned_model_name, model_uri, source_model_name
from medtransfer.tracking import ensure_experiment, use_tracking_store
from medtransfer.train.finetune import PREDICTIONS_ARTIFACT_DIR
from medtransfer.train.metrics import roc_auc
from medtransfer.train.reporting import write_predictions

DATASET = "target"
REGIME = "full"
SIZE = 32
#: source → (arch, model_args); sorted by name, the ConvNeXt is the study's first source (its identity control)
ARCHITECTURES = {
    "convnext": ("convnext_atto", {}),
    "resnet": ("resnet18", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": SIZE}),
}
#: The stages each architecture reports at 32 px, with their reductions (timm's feature_info; the ResNets' own).
STAGES = {
    "convnext": {"stages.0": 4, "stages.1": 8, "stages.2": 16, "stages.3": 32},
    "resnet": {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32},
    "vit": {f"blocks.{k}": 16 for k in range(12)},
}


def _write_backbone(path: Path, arch: str, model_args: dict, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = Classifier(arch, None, model_args=model_args)
    keras_like_init_(model, torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))


def _register_finetuned(config, prepared, source: str, fold: int) -> FoldModel:
    """A stand-in for a fine-tuned fold model: the source plus seeded noise on every weight matrix, a new head."""
    loaded = load_registered_model(model_uri(source_model_name(source), alias=ALIAS_DEFAULT))
    model = loaded.model
    generator = torch.Generator().manual_seed(10 * fold + len(source))
    model.replace_head(2, generator=generator)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            if parameter.ndim > 1:
                parameter.add_(0.2 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    test = prepared.fold(fold)["test"]
    model.eval()
    with torch.inference_mode():
        logits = model(loaded.spec.preprocessing.apply(np.ascontiguousarray(prepared.images[test])))
    probabilities = torch.softmax(logits, dim=1).double().numpy()
    name = finetuned_model_name(DATASET, source, REGIME)
    spec = ModelSpec(loaded.spec.arch, 2, loaded.spec.preprocessing, classes=prepared.classes,
                     model_args=loaded.spec.model_args)
    with mlflow.start_run(experiment_id=ensure_experiment(config), run_name=f"ft {source} {fold}") as run:
        staging = config.root / "staging" / f"{source}-{fold}"
        write_predictions(staging / TEST_PREDICTIONS_FILE, test, prepared.labels[test], probabilities, prepared.classes)
        mlflow.log_artifact(str(staging / TEST_PREDICTIONS_FILE), artifact_path=PREDICTIONS_ARTIFACT_DIR)
        uri, digest = log_packaged_model(model, spec)
        version = register_logged_model(uri, name, {Tag.ROLE: ROLE_FINETUNED, Tag.WEIGHTS_SHA256: digest,
                                                    Tag.SOURCE: source, Tag.REGIME: REGIME})
    alias = fold_model_alias(fold, 0)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version.version))
    auc = roc_auc(prepared.labels[test], probabilities)["auc"]
    return FoldModel(fold, 0, str(version.version), run.info.run_id, digest, alias, float(auc))


def _params(root: Path, sources: dict) -> Path:
    import yaml

    params = {
        "project": {"profile": "test", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "test", "optuna_storage": "sqlite:///optuna.db"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": {DATASET: {"format": "medmnist", "path": "data/raw/target.npz", "classes": ["a", "b"],
                               "image_size": SIZE,  # the blob file's 16 px, prepared at the ViT's 32
                               "split": {"scheme": "stratified_kfold", "folds": 2, "val_fraction": 0.2}}},
        "sources": sources,
        "analysis": {"positions_per_layer": 200, "channel_sample": 16, "channel_repeats": 2, "batch_size": 8,
                     "measures": ["cca", "cka"], "seed": 0},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _build_study(root: Path, sources: dict, finetuned: list[str], blob_npz, fits_pointer):
    blob_npz(root / "data/raw/target.npz", 0, per_split=(40, 8, 16))
    config = load_config(_params(root, sources))
    prepare_dataset(config, DATASET)
    prepared = load_prepared(config, DATASET)
    use_tracking_store(config)
    registered = {name: register_source(config, name) for name in config.sources}
    for source in finetuned:
        fits = [_register_finetuned(config, prepared, source, fold) for fold in (0, 1)]
        fits_pointer(config, prepared, registered[source], DATASET, source, REGIME, fits)
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory, blob_npz, fits_pointer):
    """Three architectures' sources (safetensors files) and a random ResNet and ConvNeXt, each fine-tuned on two
    folds, and a second random ResNet and ConvNeXt (each architecture's random-vs-random floor)."""
    root = tmp_path_factory.mktemp("cross_arch")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(variable, raising=False)
        sources = {}
        for index, (name, (arch, model_args)) in enumerate(ARCHITECTURES.items()):
            _write_backbone(root / f"weights/{name}.safetensors", arch, model_args, 20 + index)
            sources[name] = {"kind": "safetensors", "arch": arch, "path": f"weights/{name}.safetensors",
                             **({"model_args": model_args} if model_args else {})}
        sources["random"] = {"kind": "random", "arch": "resnet18", "seed": 0}
        sources["random_b"] = {"kind": "random", "arch": "resnet18", "seed": 1}
        sources["random_convnext"] = {"kind": "random", "arch": "convnext_atto", "seed": 2}
        sources["random_convnext_b"] = {"kind": "random", "arch": "convnext_atto", "seed": 3}
        config = _build_study(root, sources, [*ARCHITECTURES, "random", "random_convnext"], blob_npz, fits_pointer)
        run_extract(config, DATASET)
        run_compare(config, DATASET)
        yield config


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_every_model_keeps_its_own_stages_and_they_match_its_reloaded_hooks(study):
    folder = study.root / "activations" / DATASET
    manifest = read_manifest(folder, DATASET)
    for key, record in manifest["models"].items():
        expected = STAGES["convnext"] if record["source"].startswith("random_convnext") else \
            STAGES.get(record["source"], STAGES["resnet"])  # random, random_b: ResNets
        assert record["stages"] == expected, key
        assert list(record["channels"]) == list(record["stages"])
    # the layers: each architecture's stages once, first-appearing model's first
    assert sorted(manifest["layers"]) == sorted({stage for stages in STAGES.values() for stage in stages})
    # extract's rows are the reloaded network's hook outputs, position by position, for every stage of each arch
    prepared = load_prepared(study, DATASET)
    fold = 0
    for source in ARCHITECTURES:
        key = next(k for k, r in manifest["models"].items() if r["source"] == source and r["role"] == ROLE_FINETUNED
                   and r["fold"] == fold)
        record = manifest["models"][key]
        loaded = load_registered_model(f"models:/{record['registered_model']}/{record['version']}")
        captured: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach()))
                   for name, module in loaded.model.stage_modules().items()]
        images = prepared.images[np.asarray(manifest["folds"][str(fold)]["order"][:2])]
        with torch.inference_mode():
            loaded.model.eval()(loaded.spec.preprocessing.apply(images))
        for handle in handles:
            handle.remove()
        assert list(captured) == list(STAGES[source])
        for stage, output in captured.items():
            expected = output.permute(0, 2, 3, 1).reshape(-1, output.shape[1]).numpy()
            assert output.shape[1] == record["channels"][stage]
            saved = np.load(activations_path(folder, fold, key, stage))[: len(expected)]
            np.testing.assert_allclose(saved, expected, rtol=1e-4, atol=1e-5, err_msg=f"{source} {stage}")


def test_a_model_against_itself_is_one_at_every_stage(study):
    rows = _rows(study.root / "results" / "analysis" / DATASET / "similarity.csv")
    identity = [row for row in rows if row["pair_kind"] == IDENTITY]
    # one control per architecture: its first source against itself, at every one of its stages
    assert {(row["pair"], row["layer"]) for row in identity} == {
        (source, stage) for source, stages in STAGES.items() for stage in stages}
    for row in identity:
        assert row["layer_b"] == row["layer"]
        assert float(row["value"]) == pytest.approx(1.0, abs=1e-6), row


def test_pairs_within_an_architecture_go_by_name_and_across_by_reduction(study):
    rows = _rows(study.root / "results" / "analysis" / DATASET / "similarity.csv")
    manifest = read_manifest(study.root / "activations" / DATASET, DATASET)
    source_of = {key: record["source"] for key, record in manifest["models"].items()}
    for row in rows:
        a, b = source_of[row["model_a"]], source_of[row["model_b"]]
        arch_a, arch_b = ("convnext" if s.startswith("random_convnext") else "resnet" if s.startswith("random") else s
                          for s in (a, b))
        if arch_a == arch_b:
            assert row["layer_b"] == row["layer"], row
        else:  # equal reductions, and (for every pair but the vit's many blocks at /16) the deepest stage there
            assert STAGES[arch_a][row["layer"]] == STAGES[arch_b][row["layer_b"]], row
    cross = {(row["layer"], row["layer_b"]) for row in rows if row["pair_kind"] == PRETRAINED_VS_PRETRAINED
             and row["pair"] == "convnext vs resnet"}
    assert cross == {("stages.0", "stage1"), ("stages.1", "stage2"), ("stages.2", "stage3"), ("stages.3", "stage4")}
    vit = {(row["layer"], row["layer_b"]) for row in rows if row["pair_kind"] == FINETUNED_VS_FINETUNED
           and row["pair"] == "resnet vs vit"}
    assert vit == {("stage3", "blocks.11")}
    # within an architecture every stage is compared
    own = {row["layer"] for row in rows if row["pair_kind"] == SOURCE_VS_FINETUNED and row["pair"] == "vit"}
    assert own == set(STAGES["vit"])


def test_stages_without_a_partner_are_reported(study):
    folder = study.root / "results" / "analysis" / DATASET
    matches = _rows(folder / "stage_matches.csv")
    convnext_vs_resnet = [r for r in matches if (r["arch_a"], r["arch_b"]) == ("convnext_atto", "resnet18")]
    assert {(r["stage_a"], r["stage_b"], r["status"]) for r in convnext_vs_resnet} == {
        ("stages.0", "stage1", "paired"), ("stages.1", "stage2", "paired"), ("stages.2", "stage3", "paired"),
        ("stages.3", "stage4", "paired"), ("", "stem", "no stage at reduction 2 on the other side")}
    resnet_vs_vit = [r for r in matches if (r["arch_a"], r["arch_b"]) == ("resnet18", "vit_tiny_patch16_224")]
    unpaired_blocks = [r for r in resnet_vs_vit if r["stage_b"].startswith("blocks.") and not r["stage_a"]]
    assert len(unpaired_blocks) == 11
    assert all(r["status"] == "a deeper stage at reduction 16 is paired" for r in unpaired_blocks)
    # within one architecture, every stage is paired by name
    same = [r for r in matches if r["arch_a"] == r["arch_b"]]
    assert same and all(r["status"] == "paired by name" and r["stage_a"] == r["stage_b"] for r in same)


def test_the_layer_table_and_its_stage_names_reach_the_summary(study):
    summary = _rows(study.root / "results" / "analysis" / DATASET / "similarity_summary.csv")
    layers = {row["layer"] for row in summary if row["pair_kind"] == SOURCE_VS_FINETUNED}
    assert layers == {stage for stages in STAGES.values() for stage in stages}
    vit_rows = [row for row in summary if row["pair"] == "resnet vs vit" and row["measure"] == "cka"]
    assert {(row["layer"], row["layer_b"]) for row in vit_rows} == {("stage3", "blocks.11")}
    assert all(np.isfinite(float(row["mean"])) and int(row["count"]) == 2 for row in vit_rows)


def test_one_stage_name_at_two_sizes_is_refused_with_one_line(tmp_path, monkeypatch, blob_npz, fits_pointer):
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(variable, raising=False)
    sources = {
        "vit16": {"kind": "random", "arch": "vit_tiny_patch16_224", "model_args": {"img_size": SIZE}, "seed": 0},
        "vit8": {"kind": "random", "arch": "vit_small_patch8_224", "model_args": {"img_size": SIZE}, "seed": 1},
    }
    config = _build_study(tmp_path, sources, list(sources), blob_npz, fits_pointer)  # same stage names, at 2x2 and 4x4 on 32 px
    with pytest.raises(ModelError) as info:
        run_extract(config, DATASET)
    message = str(info.value)
    assert "\n" not in message and "blocks.0" in message and "2x2" in message and "4x4" in message
    assert not (config.root / "activations" / DATASET).exists()  # nothing half-written


def test_each_gain_is_over_the_random_init_model_of_its_own_architecture_where_there_is_one(study):
    points = _rows(study.root / "results" / "analysis" / DATASET / "similarity_vs_gain.csv")
    manifest = read_manifest(study.root / "activations" / DATASET, DATASET)
    source_of = {key: record["source"] for key, record in manifest["models"].items()}
    assert {row["source"] for row in points} == set(ARCHITECTURES)
    for row in points:
        reference = source_of[row["random_init_model"]]
        # a ConvNeXt gains over the random ConvNeXt, a ResNet over the random ResNet; the ViT has no random
        # initialisation of its own and takes the study's first
        assert reference == {"convnext": "random_convnext", "resnet": "random", "vit": "random"}[row["source"]], row
        assert row["layer"] in STAGES[row["source"]], row  # a model's points cover its own stages only
        assert np.isfinite(float(row["cca"])), row
    assert {row["layer"] for row in points if row["source"] == "vit"} == set(STAGES["vit"])


def test_each_architecture_has_its_own_random_floor(study):
    summary = _rows(study.root / "results" / "analysis" / DATASET / "similarity_summary.csv")
    floors = {(row["pair"], row["layer"]) for row in summary if row["pair_kind"] == "random_vs_random"}
    assert floors == {("random vs random_b", stage) for stage in STAGES["resnet"]} | {
        ("random_convnext vs random_convnext_b", stage) for stage in STAGES["convnext"]}
    # every summary row of a ConvNeXt stage carries that floor
    convnext_rows = [row for row in summary if row["layer"] in STAGES["convnext"]]
    assert convnext_rows and all(np.isfinite(float(row["random_vs_random_mean"])) for row in convnext_rows)
