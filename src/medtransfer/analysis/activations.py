"""Sampled stage activations: forward hooks, the choice of datapoints, and the on-disk layout `extract` writes.

Datapoints are spatial positions, as in the original study: a stage output (N, C, H, W) becomes a matrix
(N·H·W, C), one row per position of one image. Row r of a layer's matrix is image r // (H·W) of the fold's order,
position (h, w) = divmod(r % (H·W), W).

Which images: the fold's test part, in a seeded permutation (`sample_order`, seed = `analysis.seed` and the fold),
the same images in the same order for every model. A layer with H×W positions per image takes the first
N_layer = max(1, round(positions_per_layer / (H·W))) images of that order, at most the images available
(`images_per_layer`). A model is run once over the largest N needed (the deepest layer's), and each layer keeps
the prefix it needs, so the rows of two models' matrices for one layer always belong to the same datapoints.

Memory: `extract_stage_activations` preallocates the sampled matrices (about positions_per_layer × C float32 per
layer) and copies into them from inside the hooks, batch by batch; nothing else outlives a batch.

Layout under `activations/<dataset>/`:

    manifest.json                       see `extract.build_manifest`
    fold<k>/<model_key>/<layer>.npy     (N_layer·H·W, C) float32, memory-mappable
    conv1/<source>.npy                  the first convolution's weights (out, in, kh, kw) float32
    predictions/<model_key>.csv         the fine-tuned model's test predictions, copied from its run
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtransfer.layout import ACTIVATIONS_MANIFEST_FILE
from medtransfer.errors import DataError, ModelError
from medtransfer.models.preprocessing import Preprocessing

MANIFEST_NAME = ACTIVATIONS_MANIFEST_FILE
ACTIVATIONS_FORMAT = "medtransfer-activations-v1"


@dataclass(frozen=True)
class LayerPlan:
    """How many images of the fold's order one layer keeps, and its spatial size.

    `images_per_draw`: the images one channel draw uses. With several draws (channel sampling) the layer keeps up
    to that many images per draw, so that each draw can see its own images (`image_draws`)."""

    layer: str
    images: int
    height: int
    width: int
    images_per_draw: int = 0

    def __post_init__(self) -> None:
        if not self.images_per_draw:
            object.__setattr__(self, "images_per_draw", self.images)

    @property
    def positions(self) -> int:
        return self.height * self.width

    @property
    def rows(self) -> int:
        return self.images * self.height * self.width


def model_key(registered_name: str, version: str | int) -> str:
    """`source.natural` version 3 → `source.natural.v3`: the folder name of one model's activations."""
    return f"{registered_name}.v{version}"


def fold_folder_name(fold: int) -> str:
    return f"fold{int(fold)}"


def activations_path(folder: Path, fold: int, key: str, layer: str) -> Path:
    return Path(folder) / fold_folder_name(fold) / key / f"{layer}.npy"


def sample_order(test_indices: np.ndarray, seed: int, fold: int) -> np.ndarray:
    """The fold's test images (dataset indices, (n,)) in the seeded order every model of the fold sees."""
    test_indices = np.asarray(test_indices, dtype=np.int64)
    permutation = np.random.default_rng([int(seed), int(fold)]).permutation(len(test_indices))
    return test_indices[permutation]


def images_per_layer(positions: int, available: int, *, positions_per_layer: int, fixed_images: int | None = None) -> int:
    """Images a layer with `positions` = H·W positions per image takes, out of `available`.

    Default: max(1, round(positions_per_layer / positions)) as the original did (Python's round), capped by
    `available`. With `fixed_images` (`analysis.images`), every layer takes min(fixed_images, available).
    """
    if available < 1:
        raise ValueError("no images available")
    if fixed_images is not None:
        return int(min(fixed_images, available))
    wanted = max(1, int(round(positions_per_layer / max(positions, 1))))
    return int(min(wanted, available))


def plan_layers(
    spatial: Mapping[str, tuple[int, int]], available: int, *, positions_per_layer: int, fixed_images: int | None = None,
    draws: int = 1,
) -> dict[str, LayerPlan]:
    """{layer: LayerPlan} from each layer's (H, W) and the number of test images available; with `draws` > 1
    (channel repeats) each layer keeps `draws` times its images per draw, as far as the fold has them."""
    plans = {}
    for layer, (h, w) in spatial.items():
        per_draw = images_per_layer(h * w, available, positions_per_layer=positions_per_layer, fixed_images=fixed_images)
        plans[layer] = LayerPlan(layer, min(available, per_draw * max(1, draws)), h, w, per_draw)
    return plans


def image_draws(images: int, per_draw: int, draws: int) -> list[slice]:
    """The images (a slice of the layer's kept images, which are in the fold's seeded random order) each of
    `draws` channel draws uses: disjoint blocks of `per_draw` images while the layer holds enough, so that every
    repeat sees a fresh draw of held-out images as in the original; with fewer than `draws` blocks the blocks are
    reused in turn, and with one block or less every draw uses the same images."""
    per_draw = max(1, min(per_draw, images))
    blocks = max(1, images // per_draw)
    return [slice((r % blocks) * per_draw, (r % blocks) * per_draw + per_draw) for r in range(max(1, draws))]


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stage_hooks(model: nn.Module, on_output) -> Iterator[None]:
    """Call `on_output(layer, tensor (B, C, H, W))` for each named stage output while the context is open.

    `model` must expose `stage_modules()` (a `Classifier` or a backbone): its names, in forward order, are the
    layers of the analysis (the architecture says them; `extract` writes them into the manifest). The hooks are
    removed on exit, also on error.
    """
    modules = getattr(model, "stage_modules", lambda: {})()
    if not modules:
        raise ModelError("the model exposes no stages to hook", fix="use a medtransfer backbone")
    handles = [
        module.register_forward_hook(lambda _module, _inputs, output, name=name: on_output(name, output))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _backbone(model: nn.Module) -> nn.Module:
    """The part of a model that ends at stage4: running only it skips the pooling and the head."""
    return getattr(model, "backbone", model)


def stage_shapes(model: nn.Module, preprocessing: Preprocessing, image: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """{layer: (C, H, W)} of one image (H, W[, C]) uint8, from one forward pass in eval mode."""
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(layer: str, output: torch.Tensor) -> None:
        shapes[layer] = tuple(int(v) for v in output.shape[1:])  # type: ignore[assignment]

    device = _device_of(model)
    model.eval()
    with torch.inference_mode(), stage_hooks(model, record):
        _backbone(model)(preprocessing.apply(np.array(image)[None]).to(device))
    return shapes


def extract_stage_activations(
    model: nn.Module,
    preprocessing: Preprocessing,
    images: np.ndarray,
    order: np.ndarray,
    plans: Mapping[str, LayerPlan],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Run `model` once over the images of `order` that the layers need and return {layer: (rows, C) float32}.

    images: (N, H, W[, C]) uint8, e.g. the prepared dataset's memory map; order: (n,) indices into `images`, the
    fold's sampled order; plans: {layer: LayerPlan} (the layer keeps the first `plan.images` images of `order`).
    Eval mode and `torch.inference_mode`; `preprocessing` is the model's own. Each batch's stage outputs are
    copied straight into preallocated matrices (image-major, then h, then w) and then dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    needed = max(plan.images for plan in plans.values())
    if needed > len(order):
        raise ValueError(f"the plan needs {needed} images, the order holds {len(order)}")
    outputs: dict[str, np.ndarray | None] = {layer: None for layer in plans}
    state = {"start": 0}

    def record(layer: str, output: torch.Tensor) -> None:
        plan = plans.get(layer)
        if plan is None:
            return
        start = state["start"]
        take = min(output.shape[0], plan.images - start)
        if take <= 0:
            return
        channels, height, width = (int(v) for v in output.shape[1:])
        if (height, width) != (plan.height, plan.width):
            raise ModelError(
                f"stage {layer} is {height}x{width} here but {plan.height}x{plan.width} in the plan; "
                "positions of different spatial sizes cannot be paired",
                fix="compare models whose stages have the same strides (the ResNet family does)",
            )
        target = outputs[layer]
        if target is None:
            target = outputs[layer] = np.empty((plan.rows, channels), dtype=np.float32)
        elif target.shape[1] != channels:
            raise ModelError(f"stage {layer} changed its channel count between batches ({target.shape[1]} → {channels})")
        rows = slice(start * plan.positions, (start + take) * plan.positions)
        # (B, C, H, W) → (B, H, W, C) → rows; copied in place, without an intermediate array.
        view = torch.from_numpy(target[rows]).view(take, height, width, channels)
        view.copy_(output[:take].permute(0, 2, 3, 1))

    device = _device_of(model)
    model.eval()
    body = _backbone(model)
    with torch.inference_mode(), stage_hooks(model, record):
        for start in range(0, needed, batch_size):
            state["start"] = start
            batch = np.ascontiguousarray(images[np.asarray(order[start : start + batch_size])])
            body(preprocessing.apply(batch).to(device))
    missing = [layer for layer, array in outputs.items() if array is None]
    if missing:
        raise ModelError(f"stage {missing[0]} produced no output (its hook never fired)")
    return {layer: array for layer, array in outputs.items() if array is not None}


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def first_conv_weights(model: nn.Module) -> tuple[str, np.ndarray]:
    """(module name, weights (out, in, kh, kw) float32) of the first `nn.Conv2d` in module order of the backbone.

    keras_resnet50: `backbone.stem.conv`; timm ResNets: `backbone.body.conv1`.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module.weight.detach().to("cpu", torch.float32).numpy().copy()
    raise ModelError("the model has no convolution")


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` atomically: readers see the old file or the complete new one."""
    from medtransfer.atomic_files import atomic_write

    atomic_write(path, lambda stream: np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False))


def open_activations(folder: Path, fold: int, key: str, layer: str) -> np.ndarray:
    """The saved (rows, C) float32 matrix, memory-mapped read-only; a DataError names the file if it is unusable."""
    path = activations_path(folder, fold, key, layer)
    if not path.is_file():
        raise DataError(
            "activation file missing", where=str(path), fix="run 'medtransfer extract' again (or 'dvc checkout')"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"unreadable activation file ({error})", where=str(path), fix="run 'medtransfer extract' again") from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise DataError(
            f"expected a 2-D float32 matrix, found {array.ndim}-D {array.dtype}",
            where=str(path),
            fix="run 'medtransfer extract' again",
        )
    return array


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from medtransfer.atomic_files import atomic_write_text

    atomic_write_text(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: Path, dataset: str) -> dict[str, Any]:
    """The manifest of `activations/<dataset>/`, or a one-line DataError saying how to make it."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no activations for dataset '{dataset}'",
            where=str(folder),
            fix=f"run 'medtransfer extract --dataset {dataset}' first (or 'dvc repro' / 'dvc pull')",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != ACTIVATIONS_FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        for key in ("dataset", "layers", "folds", "models", "random_baselines"):
            if key not in manifest:
                raise ValueError(f"no '{key}'")
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(
            f"malformed activations manifest ({error})",
            where=str(path),
            fix=f"run 'medtransfer extract --dataset {dataset}' again",
        ) from None
    if manifest["dataset"] != dataset:
        raise DataError(
            f"the manifest is for dataset '{manifest['dataset']}', not '{dataset}'",
            where=str(path),
            fix=f"run 'medtransfer extract --dataset {dataset}' again",
        )
    return manifest


def manifest_layers(manifest: dict[str, Any], folder: Path) -> list[str]:
    """The layer names of the manifest, in forward order: the stages of the architecture the models share, as
    `extract` found them (never a global list: another architecture names other stages)."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(layer, str) for layer in layers):
        raise DataError(f"the activations manifest names no layers (found {layers!r})", where=str(folder),
                        fix=f"run 'medtransfer extract --dataset {manifest.get('dataset', '<dataset>')}' again")
    return list(layers)
