"""Peak memory of the analysis (extract + compare): it grows with channels, not with images.

Usage: python benchmarks/analysis_memory.py [--quick] [--all-models] [--settings a,b] [--keep]

For each setting it builds a temporary project: a synthetic dataset whose one fold's test part holds N images, and
then 2N (two datasets), a temporary MLflow store with registered models of the architecture (a "pretrained" source
and one fine-tuned fold model of it, random weights; `--all-models` adds two random sources) and the pointer files.
extract holds one model at a time and compare one pair at a time, so the number of models changes the time, not
the peak; two models keep the default run shorter. On 2 idle CPU cores: (a) about 3 minutes, (b) about 6 (mostly
ResNet50 forward passes and eigendecompositions of 2048-channel blocks); run-to-run noise of the peak is about
±40 MiB. Then, each in a fresh subprocess, `run_extract` and `run_compare` with the default analysis settings
(about 10,000 positions per layer, all channels), and it reads the subprocess's peak resident set size
(Linux `VmHWM`, see `peak_rss`) together with its peak right after the imports (the interpreter, torch, MLflow:
the same for every row).

Settings: (a) demo-like, resnet18 at 32 px (1000 / 2000 test images; its 1×1 stage4 wants 10,000 images, so every
test image goes through every model and doubling N doubles the work); (b) resnet50 at 224 px (300 / 600 images;
stage4 is 7×7, so round(10000/49) = 204 images are run either way); (c) convnext_atto and (d) vit_tiny_patch16_224
(img_size 32) at 32 px with timm's own stages (1000 / 2000 images; ConvNeXt's last stage and the ViT's blocks are
1×1 and 2×2, so all images run). `--quick` halves N.

Columns: images run = images each model goes through; sampled = the float32 matrices one model keeps for one fold
(sum over layers of rows × channels); largest Gram = the (p+q)² float64 matrix of the widest layer pair; peak RSS
and its growth over the post-import baseline, per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = float(1 << 20)
DATASET_SIZES = {"a": 1000, "b": 300, "c": 1000, "d": 1000}
SETTINGS = {
    "a": {"label": "(a) demo-like", "arch": "resnet18", "size": 32},
    "b": {"label": "(b) resnet50 224 px", "arch": "resnet50", "size": 224},
    "c": {"label": "(c) convnext_atto 32", "arch": "convnext_atto", "size": 32},
    "d": {"label": "(d) vit_tiny 32 px", "arch": "vit_tiny_patch16_224", "size": 32, "model_args": {"img_size": 32}},
}


# --------------------------------------------------------------------------------------------------------------
# Child: one measured step
# --------------------------------------------------------------------------------------------------------------


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux's VmHWM belongs to the address space, which exec replaces, so a child started from a large parent does
    not inherit the parent's peak; ru_maxrss is kept across exec (getrusage(2)) and is only the fallback.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(step: str, params: str, dataset: str) -> None:
    from medtransfer.analysis.compare import run_compare
    from medtransfer.analysis.extract import run_extract
    from medtransfer.config import load_config

    import mlflow  # noqa: F401 - imported up front so the baseline holds every library the step uses
    import timm  # noqa: F401 - the backbones import it when the first model is built
    import torch  # noqa: F401

    config = load_config(params)
    baseline = peak_rss()
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            (run_extract if step == "extract" else run_compare)(config, dataset)
        finally:
            sys.stdout = stdout
    seconds = time.perf_counter() - started
    peak = peak_rss()
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


# --------------------------------------------------------------------------------------------------------------
# Parent: build the projects, measure, print
# --------------------------------------------------------------------------------------------------------------


def _write_npz(path: Path, test_images: int, size: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", 8), ("val", 4), ("test", test_images)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def build_project(root: Path, arch: str, size: int, sizes: tuple[int, int], all_models: bool,
                  model_args: dict | None = None) -> list[str]:
    """Params, two datasets (N and 2N test images), registered models and pointers; returns the dataset names."""
    import mlflow
    import numpy as np
    import torch
    import yaml
    from safetensors.torch import save_file

    from medtransfer.config import load_config
    from medtransfer.data.prepare import load_prepared, prepare_dataset
    from medtransfer.models.backbones import Classifier, keras_like_init_
    from medtransfer.models.mlflow_models import load_registered_model, log_packaged_model, register_logged_model
    from medtransfer.models.packaging import ModelSpec
    from medtransfer.models.sources import register_source
    from medtransfer.pointers import FoldModel, ModelPointer, write_pointer
    from medtransfer.layout import ROLE_FINETUNED, TEST_PREDICTIONS_FILE as PREDICTIONS_FILE
    from medtransfer.registry import ALIAS_DEFAULT, Tag, finetuned_model_name, model_uri
    from medtransfer.tracking import ensure_experiment, use_tracking_store
    from medtransfer.train.reporting import write_predictions

    datasets = [f"n{count}" for count in sizes]
    for index, (name, count) in enumerate(zip(datasets, sizes)):
        _write_npz(root / f"data/raw/{name}.npz", count, size, seed=index)
    model_args = dict(model_args or {})
    backbone = Classifier(arch, None, model_args=model_args)
    keras_like_init_(backbone, torch.Generator().manual_seed(7))
    (root / "weights").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.backbone.state_dict().items()}, str(root / "weights/pre.safetensors"))
    params = {
        "project": {"profile": "benchmark", "seed": 0},
        "stores": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "benchmark"},
        "paths": {"raw_data": "data/raw", "prepared_data": "data/prepared"},
        "datasets": {name: {"format": "medmnist", "path": f"data/raw/{name}.npz", "classes": ["a", "b"]} for name in datasets},
        "sources": {"pre": {"kind": "safetensors", "arch": arch, "path": "weights/pre.safetensors",
                            **({"model_args": model_args} if model_args else {})}},
    }
    if all_models:
        extra = {"model_args": model_args} if model_args else {}
        params["sources"].update(random={"kind": "random", "arch": arch, "seed": 0, **extra},
                                 random_b={"kind": "random", "arch": arch, "seed": 1, **extra})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config = load_config(root / "params.yaml")
    use_tracking_store(config)
    registered = {name: register_source(config, name) for name in config.sources}
    source = load_registered_model(model_uri("source.pre", alias=ALIAS_DEFAULT))
    model = source.model
    model.replace_head(2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            if parameter.ndim > 1:
                parameter.add_(0.1 * parameter.std() * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)))
    for dataset in datasets:
        prepare_dataset(config, dataset)
        prepared = load_prepared(config, dataset)
        test = prepared.fold(0)["test"]
        probabilities = np.random.default_rng(0).dirichlet([1.0, 1.0], size=len(test))
        name = finetuned_model_name(dataset, "pre", "full")
        with mlflow.start_run(experiment_id=ensure_experiment(config)) as run:
            write_predictions(root / "staging" / PREDICTIONS_FILE, test, prepared.labels[test], probabilities, prepared.classes)
            mlflow.log_artifact(str(root / "staging" / PREDICTIONS_FILE), artifact_path="predictions")
            uri, digest = log_packaged_model(model, ModelSpec(arch, 2, source.spec.preprocessing, classes=prepared.classes,
                                                                 model_args=model_args))
            version = register_logged_model(uri, name, {Tag.ROLE: ROLE_FINETUNED, Tag.WEIGHTS_SHA256: digest})
        mlflow.MlflowClient().set_registered_model_alias(name, "fold0", str(version.version))
        fit = FoldModel(0, 0, str(version.version), run.info.run_id, digest, "fold0", 0.5)
        write_pointer(config, ModelPointer(
            registered_model=name, dataset=dataset, source="pre", regime="full", source_model=registered["pre"].name,
            source_version=registered["pre"].version, source_weights_sha256=registered["pre"].weights_sha256,
            data_fingerprint=prepared.fingerprint, study=name, champion_version=fit.version, folds=[fit]))
    return datasets


def measure(step: str, params: Path, dataset: str) -> dict:
    environment = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        environment.pop(variable, None)
    result = subprocess.run(
        [sys.executable, __file__, "--child", step, "--params", str(params), "--dataset", dataset],
        capture_output=True, text=True, env=environment, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{step} {dataset} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def describe(root: Path, dataset: str) -> dict:
    """Images run, sampled bytes per model and fold, and the largest Gram matrix, from the manifest."""
    manifest = json.loads((root / "activations" / dataset / "manifest.json").read_text())
    fold = manifest["folds"]["0"]
    channels = next(record["channels"] for record in manifest["models"].values() if record.get("channels"))
    sampled = sum(fold["layers"][layer]["rows"] * channels[layer] * 4 for layer in channels)
    widest = max(channels.values())
    return {"test_images": fold["test_images"], "images_run": max(info["images"] for info in fold["layers"].values()),
            "sampled": sampled, "gram": 8 * (2 * widest) ** 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the images")
    parser.add_argument("--all-models", action="store_true",
                        help="also the two random sources (4 models instead of 2; slower, same peak)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects (their paths are printed)")
    parser.add_argument("--settings", default="a,b", help="which settings to run, e.g. a,b (c: convnext_atto and d: "
                        "vit_tiny at 32 px, timm's own stages)")
    parser.add_argument("--child", choices=("extract", "compare"), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.params, args.dataset)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    command = " ".join(["python", "benchmarks/analysis_memory.py", *sys.argv[1:]])
    rows = []
    for key in args.settings.split(","):
        setting = SETTINGS[key]
        count = DATASET_SIZES[key] // (2 if args.quick else 1)
        root = Path(tempfile.mkdtemp(prefix=f"medtransfer-bench-{key}-"))
        try:
            print(f"setting up {setting['label']} in {root} ...", file=sys.stderr, flush=True)
            datasets = build_project(root, setting["arch"], setting["size"], (count, 2 * count), args.all_models,
                                     setting.get("model_args"))
            for dataset in datasets:
                extract = measure("extract", root / "params.yaml", dataset)
                compare = measure("compare", root / "params.yaml", dataset)
                rows.append({"setting": setting["label"], **describe(root, dataset), "extract": extract, "compare": compare})
                print(f"  {dataset}: done", file=sys.stderr, flush=True)
        finally:
            if args.keep:
                print(f"kept {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
    header = (f"{'setting':<22} {'test img':>8} {'img run':>8} {'sampled':>9} {'Gram':>8} "
              f"{'baseline':>9} {'extract peak (+)':>18} {'compare peak (+)':>18} {'extract s':>9} {'compare s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        e, c = row["extract"], row["compare"]
        print(f"{row['setting']:<22} {row['test_images']:>8} {row['images_run']:>8} {row['sampled'] / MIB:>7.1f}Mi "
              f"{row['gram'] / MIB:>6.1f}Mi {e['baseline'] / MIB:>7.0f}Mi "
              f"{e['peak'] / MIB:>8.0f}Mi (+{(e['peak'] - e['baseline']) / MIB:>4.0f}) "
              f"{c['peak'] / MIB:>8.0f}Mi (+{(c['peak'] - c['baseline']) / MIB:>4.0f}) "
              f"{e['seconds']:>9.1f} {c['seconds']:>9.1f}")
    print(f"\nMiB; (+) = growth over the post-import baseline of that step. Rerun: {command}")


if __name__ == "__main__":
    main()
