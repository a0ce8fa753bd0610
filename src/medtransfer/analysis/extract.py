"""`extract --dataset NAME`: run every model the study names once over held-out images and save sampled stage
activations to `activations/<NAME>/` (a DVC output), so that `compare` never needs a network.

The models: the source version each pointer (`results/models/<NAME>.*.json`) starts from, every fold fit of every
pointer, and the `default` version of every source of kind random. Before anything runs, each pointer is checked
against the registry (`pointers.verify_pointer`) and against the prepared data's fingerprint; any disagreement is
refused with one line. `pairs.plan_pairs` decides which fold's images each model goes through (see pairs.py).

Each model is loaded once, applies its own preprocessing to the same uint8 images, and runs in eval mode under
`torch.inference_mode`, in batches of `analysis.batch_size`; hooks on the backbone's named stages (five for the
ResNet family, timm's own for other models) keep only the sampled positions (see activations.py). Models of
different architectures may meet in one study: each stage name is planned once per fold (the images it keeps
depend on its h×w only), one name at two sizes is refused, and each model records its stages' reductions, by
which `compare` pairs stages of different architectures (stage_matching.py). Besides the activations, the folder holds the first convolution's weights
of every source (`conv1/<source>.npy`, for the filter pictures) and each fine-tuned model's test predictions
(`predictions/<model_key>.csv`, copied from its run), and `manifest.json`:

    format, dataset, data_fingerprint, classes, image_shape, sampling {positions_per_layer, images, seed,
    batch_size}, layers, random_baselines [model keys], pointers [{file, registered_model, source, regime,
    source_model, source_version, versions}],
    folds {"<k>": {folder, test_images, order: [dataset indices], layers: {layer: {images, height, width, rows,
          image_indices: [dataset indices]}}, models: [keys run on this fold's images]}},
    models {key: {registered_model, version, weights_sha256, role, source, random_init, regime, fold, seed,
          seed_index, init_key, run_id, test_auc, arch, preprocessing, channels {layer: C},
          stages {layer: reduction}, predictions}},
    conv1 {source: {file, model_key, module, shape, channel_order}}

The whole folder is written to a temporary sibling and renamed into place (`atomic_files.atomic_directory`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.analysis.activations import (
    ACTIVATIONS_FORMAT,
    MANIFEST_NAME,
    activations_path,
    extract_stage_activations,
    first_conv_weights,
    fold_folder_name,
    plan_layers,
    sample_order,
    save_array,
    stage_shapes,
    write_manifest,
)
from medtransfer.analysis.pairs import (
    ROLE_FINETUNED,
    RandomSource,
    StudyModel,
    plan_pairs,
    random_baseline_keys,
    required_activations,
    study_folds,
    study_models,
)
from medtransfer.layout import (ACTIVATIONS_FOLDER, CONV1_FOLDER, POINTER_FOLDER, PREDICTIONS_ARTIFACT_DIR,
                                PREDICTIONS_FOLDER, TEST_PREDICTIONS_FILE, Tag)
from medtransfer.progress import item_line, progress_line
from medtransfer.atomic_files import atomic_directory
from medtransfer.config import Config
from medtransfer.errors import ConfigError, DataError, ModelError, UserError
from medtransfer.models.backbones import stage_reductions

__all__ = ["activations_folder", "run_extract"]


def activations_folder(config: Config, dataset: str) -> Path:
    """`activations/<dataset>/` under the repository root."""
    return config.resolve(ACTIVATIONS_FOLDER) / dataset


def run_extract(config: Config, dataset: str) -> Path:
    """Extract the activations of every model of `dataset`'s study; returns the activations folder.

    Raises ConfigError (unknown dataset), DataError (prepared data missing or of another version than the
    pointers name, an empty test fold) and ModelError (no pointers, a registry that disagrees with a pointer, a
    model that cannot be loaded), each with a one-line message.
    """
    import mlflow

    from medtransfer.data.prepare import load_prepared
    from medtransfer.pointers import pointer_path, pointers_for_dataset, verify_pointer
    from medtransfer.tracking import use_tracking_store

    began = time.time()  # wall clock: the MLflow run starts here
    config.dataset(dataset)
    _check_sampling_settings(config)
    started = time.perf_counter()
    pointers = pointers_for_dataset(config, dataset)
    if not pointers:
        raise ModelError(
            f"no model pointers for dataset '{dataset}'",
            where=str(config.resolve(POINTER_FOLDER)),
            fix=f"run the search first ('medtransfer search --dataset {dataset} ...' or 'dvc repro'), which writes "
            f"{POINTER_FOLDER}/{dataset}.<source>.<regime>.json",
        )
    prepared = load_prepared(config, dataset)
    use_tracking_store(config)
    client = mlflow.MlflowClient()
    for pointer in pointers:
        where = str(pointer_path(config, pointer.dataset, pointer.source, pointer.regime))
        verify_pointer(client, pointer, where)
        if pointer.data_fingerprint != prepared.fingerprint:
            raise DataError(
                f"the models were trained on data {pointer.data_fingerprint[:12]}…, the prepared data is "
                f"{prepared.fingerprint[:12]}…",
                where=where,
                fix="restore the data version the pointer names (dvc checkout), or rerun the search on this data",
            )
    random_sources = _registered_random_sources(config, client)
    models = study_models(pointers, random_sources, {name: source.arch for name, source in config.sources.items()})
    baselines = random_baseline_keys(random_sources)
    pairs = plan_pairs(models, baselines)
    needs = required_activations(pairs)
    folds = study_folds(models)
    for fold in folds:
        if fold >= prepared.num_folds:
            raise DataError(
                f"the pointers name fold {fold} but the prepared data has {prepared.num_folds} fold(s)",
                where=str(prepared.folder),
                fix="prepare the data with the split the search used, or rerun the search",
            )
    orders = {fold: sample_order(prepared.fold(fold)["test"], config.analysis.seed, fold) for fold in folds}
    for fold, order in orders.items():
        if len(order) == 0:
            raise DataError(f"fold {fold} has no test images", where=str(prepared.folder))

    folder = activations_folder(config, dataset)
    fold_plans: dict[int, dict] = {}
    records: dict[str, dict[str, Any]] = {}
    conv1: dict[str, dict[str, Any]] = {}
    run_models = [m for m in models if m.key in needs]
    with atomic_directory(folder) as staging:
        for index, model in enumerate(run_models, start=1):
            record = _extract_model(config, prepared, model, needs[model.key], orders, fold_plans, staging, conv1)
            records[model.key] = record
            progress_line(item_line(f"extract {dataset}", index, len(run_models),
                                    f"{model.key} ({model.role}) on fold(s) {', '.join(map(str, needs[model.key]))}"))
        manifest = build_manifest(config, dataset, prepared, pointers, models, baselines, orders, fold_plans,
                                  records, needs, conv1)
        write_manifest(staging, manifest)
    _log_extract_run(config, dataset, prepared, manifest, folder, began)
    elapsed = time.perf_counter() - started
    sizes = ", ".join(f"{layer} {plan.images} img × {plan.positions} pos" for layer, plan in fold_plans[folds[0]].items())
    print(f"extract {dataset}: {len(run_models)} models, {len(folds)} fold(s), {len(pairs)} pairs planned; "
          f"fold {folds[0]}: {sizes}; {elapsed:.0f} s\n  -> {folder}")
    return folder


def _check_sampling_settings(config: Config) -> None:
    analysis = config.analysis
    where = f"{config.source_file}: analysis"
    if analysis.positions_per_layer < 1:
        raise ConfigError(f"positions_per_layer must be at least 1, got {analysis.positions_per_layer}",
                          where=f"{where}.positions_per_layer", fix="the original study used 10000")
    if analysis.images is not None and analysis.images < 1:
        raise ConfigError(f"images must be at least 1 (or null), got {analysis.images}", where=f"{where}.images",
                          fix="leave it null to take round(positions_per_layer / (H*W)) images per layer")
    if analysis.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {analysis.batch_size}", where=f"{where}.batch_size")


def _registered_random_sources(config: Config, client) -> list[RandomSource]:
    """The `default` version of every source of kind random, in params order."""
    from medtransfer.registry import ALIAS_DEFAULT, model_uri, resolve_model_version, source_model_name

    found = []
    for name, source in config.sources.items():
        if source.kind != "random":
            continue
        registered = source_model_name(name)
        version = resolve_model_version(client, model_uri(registered, alias=ALIAS_DEFAULT))
        found.append(RandomSource(name, registered, str(version.version), version.tags.get(Tag.WEIGHTS_SHA256, "")))
    return found


def _extract_model(
    config: Config,
    prepared,
    model: StudyModel,
    folds: list[int],
    orders: dict[int, np.ndarray],
    fold_plans: dict[int, dict],
    staging: Path,
    conv1: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Load one model, run it over the images of `folds`, write its files; returns its manifest record."""
    from medtransfer.models.mlflow_models import load_registered_model

    loaded = load_registered_model(f"models:/{model.registered_model}/{model.version}")
    if model.weights_sha256 and loaded.weights_sha256 != model.weights_sha256:
        raise ModelError(
            f"{model.registered_model} v{model.version} holds weights {loaded.weights_sha256}, the study expects "
            f"{model.weights_sha256}",
            fix="rerun the search ('dvc repro') so that the pointer and the registry match again",
        )
    network = loaded.model.to(_device()).eval()
    preprocessing = loaded.spec.preprocessing
    shapes = stage_shapes(network, preprocessing, prepared.images[int(orders[folds[0]][0])])  # the stages, in order
    reductions = stage_reductions(network)
    for fold in folds:
        # One plan per stage name over all the study's models (the images a stage keeps depend on its h×w only), so
        # models of different architectures share the images of same-sized stages and pairs match any two stages.
        plans = fold_plans.setdefault(fold, {})
        unplanned = {layer: shape[1:] for layer, shape in shapes.items() if layer not in plans}
        plans.update(plan_layers(
            unplanned,
            len(orders[fold]),
            positions_per_layer=config.analysis.positions_per_layer,
            fixed_images=config.analysis.images,
            draws=config.analysis.channel_repeats if config.analysis.channel_sample > 0 else 1,
        ))
        for layer in shapes:
            plan = plans[layer]
            if shapes[layer][1:] != (plan.height, plan.width):
                raise ModelError(
                    f"stage {layer} of {model.key} ({loaded.spec.arch}) is {shapes[layer][1]}x{shapes[layer][2]}, "
                    f"another model's stage {layer} is {plan.height}x{plan.width}; one stage name cannot be one "
                    f"layer at two sizes",
                    fix="give the sources of one architecture the same model_args (e.g. img_size) and image size",
                )
        own_plans = {layer: plans[layer] for layer in shapes}
        activations = extract_stage_activations(
            network, preprocessing, prepared.images, orders[fold], own_plans, config.analysis.batch_size
        )
        for layer, array in activations.items():
            save_array(activations_path(staging, fold, model.key, layer), array)
        del activations
    predictions_file = None
    if model.role == ROLE_FINETUNED:
        predictions_file = _copy_predictions(model, staging)
    elif model.role != ROLE_FINETUNED and model.source not in conv1:
        module, weights = first_conv_weights(network)
        file = f"{CONV1_FOLDER}/{model.source}.npy"
        save_array(staging / file, weights)
        conv1[model.source] = {"file": file, "model_key": model.key, "module": module, "shape": list(weights.shape),
                               "channel_order": preprocessing.channel_order}  # BGR for Keras weights
    record = {
        **model.to_dict(),
        "arch": loaded.spec.arch,
        "preprocessing": preprocessing.name,
        "channels": {layer: int(shape[0]) for layer, shape in shapes.items()},
        # stage → reduction (stride from the input), in forward order: compare pairs other architectures by these
        "stages": {layer: int(reductions[layer]) for layer in shapes},
        "predictions": predictions_file,
    }
    del network, loaded
    return record


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _copy_predictions(model: StudyModel, staging: Path) -> str:
    """Copy the run's `predictions/test_predictions.csv` beside the activations, so that `compare` never needs the
    tracking store. A fine-tuned model without readable predictions stops the step: skipping it would turn a
    broken store into an analysis that silently lacks its prediction similarity."""
    import mlflow

    from medtransfer.train.reporting import read_predictions

    artifact = f"{PREDICTIONS_ARTIFACT_DIR}/{TEST_PREDICTIONS_FILE}"
    fix = "rerun the search of this model ('dvc repro') or restore the run's artifacts"
    if not model.run_id:
        raise ModelError(f"{model.key} names no MLflow run, so its test predictions cannot be read", fix=fix)
    target = f"{PREDICTIONS_FOLDER}/{model.key}.csv"
    try:
        with tempfile.TemporaryDirectory(prefix="medtransfer-predictions-") as download:
            local = mlflow.artifacts.download_artifacts(run_id=model.run_id, artifact_path=artifact, dst_path=download)
            read_predictions(Path(local))  # a truncated or garbled table stops here too
            (staging / PREDICTIONS_FOLDER).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, staging / target)
    except Exception as error:  # noqa: BLE001 - whatever the store raised, the artifact is unreadable
        if isinstance(error, UserError):
            detail = error.what
        else:
            detail = str(error).splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot read the test predictions '{artifact}' of run {model.run_id} ({model.key}): {detail}",
                         fix=fix) from error
    return target


def build_manifest(
    config: Config,
    dataset: str,
    prepared,
    pointers,
    models: list[StudyModel],
    baselines: list[str],
    orders: dict[int, np.ndarray],
    fold_plans: dict[int, dict],
    records: dict[str, dict[str, Any]],
    needs: dict[str, list[int]],
    conv1: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The manifest described in the module docstring (no timestamps: unchanged inputs give the same file)."""
    from medtransfer.pointers import pointer_path

    folds: dict[str, Any] = {}
    for fold, order in orders.items():
        plans = fold_plans[fold]
        folds[str(fold)] = {
            "folder": fold_folder_name(fold),
            "test_images": int(len(order)),
            # The fold's part sizes: paired statistics over folds need n_test / n_train (Nadeau & Bengio).
            "train_images": int(prepared.fold(fold)["train"].size),
            "val_images": int(prepared.fold(fold)["val"].size),
            "order": order.tolist(),
            "layers": {
                layer: {"images": plan.images, "images_per_draw": plan.images_per_draw, "height": plan.height,
                        "width": plan.width, "rows": plan.rows,
                        "image_indices": order[: plan.images].tolist()}
                for layer, plan in plans.items()
            },
            "models": [key for key, needed in needs.items() if fold in needed],
        }
    return {
        "format": ACTIVATIONS_FORMAT,
        "dataset": dataset,
        "data_fingerprint": prepared.fingerprint,
        "classes": prepared.classes,
        "image_shape": list(prepared.images.shape[1:]),
        "sampling": {
            "positions_per_layer": config.analysis.positions_per_layer,
            "images": config.analysis.images,
            "image_draws": config.analysis.channel_repeats if config.analysis.channel_sample > 0 else 1,
            "seed": config.analysis.seed,
            "batch_size": config.analysis.batch_size,
        },
        # Every stage name of the extracted models, each model's in forward order, the first model's first: the
        # layers of compare's tables (one architecture: its stages; several: each one's stages in turn).
        "layers": list(dict.fromkeys(layer for record in records.values() for layer in record["channels"])),
        "random_baselines": baselines,
        "pointers": [
            {
                "file": _relative(pointer_path(config, p.dataset, p.source, p.regime), config.root),
                "registered_model": p.registered_model,
                "source": p.source,
                "regime": p.regime,
                "source_model": p.source_model,
                "source_version": str(p.source_version),
                "versions": sorted(str(f.version) for f in p.folds),
            }
            for p in pointers
        ],
        "folds": folds,
        # Every study model, also one no pair needs (then without channels): compare plans the pairs from this list.
        "models": {m.key: records.get(m.key, {**m.to_dict(), "channels": None, "predictions": None}) for m in models},
        "conv1": conv1,
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _log_extract_run(config: Config, dataset: str, prepared, manifest: dict[str, Any], folder: Path,
                     started: float) -> None:
    """One MLflow run (nested under an active one), spanning the extraction since ``started``: which model versions
    were extracted, from which data."""
    import mlflow

    from medtransfer.tracking import log_prepared_dataset, step_run

    tags = {Tag.DATASET: dataset}
    tags.update({f"model.{key}": str(record["version"]) for key, record in manifest["models"].items()
                 if record.get("channels")})
    with step_run(config, step="extract", run_name=f"extract {dataset}", tags=tags, started=started):
        mlflow.log_params({**{f"analysis.{k}": v for k, v in manifest["sampling"].items()},
                           "models": len(manifest["models"]), "folds": len(manifest["folds"])})
        log_prepared_dataset(prepared.manifest, prepared.folder, context="analysis")
        mlflow.log_artifact(str(folder / MANIFEST_NAME), artifact_path="analysis")
