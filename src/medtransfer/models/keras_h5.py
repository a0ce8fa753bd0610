"""Read Keras ResNet50 HDF5 weight files (RadImageNet, Keras ImageNet) into a `KerasResNet50` state dict.

Supported: the legacy Keras HDF5 format as the published files use it, written by Keras 2 or Keras 3.

- whole-model files (`model.save("x.h5")`): layers under the `model_weights/` group;
  weights-only files (Keras 2 `save_weights("x.h5")`): layer groups at the root.
- the layer list comes from the `layer_names` attribute, each layer's weights from its `weight_names` attribute
  (Keras splits attributes over 64 KB into `layer_names0`, `layer_names1`, …; both forms are read).
- weight names with or without the `:0` suffix (`conv1_conv/kernel:0`, `conv1_conv/kernel`), and nested paths
  (`conv1_conv/conv1_conv/kernel:0`, or a ResNet50 stored as one sub-model layer of a bigger model): a weight
  belongs to the Keras layer named by the second-to-last part of its name, else to the layer whose group holds it.
- layers without weights (input, padding, activation, pooling, add) are ignored.

Not supported: the Keras 3 `.weights.h5` format (`layers/<class>_<n>/vars/<i>`), which stores no layer names.

Every backbone tensor must be present exactly once with the expected shape. Layers beyond the backbone (a
classifier top such as `predictions`, a custom head) are an error unless `ignore_top=True`, which skips them with a
warning. Any other mismatch is a `ModelError` listing the first few problems.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from medtransfer.atomic_files import atomic_write_bytes
from medtransfer.errors import ModelError, warn
from medtransfer.models.keras_resnet50 import (
    KerasResNet50,
    keras_layer_to_module_path,
    keras_weighted_layer_names,
)

# Keras variable name → attribute of the matching torch module, per layer kind (`*_conv` or `*_bn`).
KERAS_VARIABLES = {
    "conv": {"kernel": "weight", "bias": "bias"},
    "bn": {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"},
}
# Keras conv kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
KERNEL_TO_TORCH = (3, 2, 0, 1)

MISMATCHES_SHOWN = 5
EXPECTED_FILE = (
    "use a tf.keras.applications.ResNet50(include_top=False) weights file, e.g. RadImageNet-ResNet50_notop.h5 or "
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
# The 2017 keras.applications ResNet50 (res2a_branch2a, bn_conv1, …) is a different definition of the network.
_OLD_KERAS_NAMES = re.compile(r"(res|bn)\d[a-f]_branch\d[a-c]?|bn_conv1")
_WEIGHT_SUFFIX = re.compile(r":\d+$")


@functools.lru_cache(maxsize=1)
def expected_keras_tensors() -> dict[str, tuple[str, tuple[int, ...]]]:
    """`"<keras layer>/<variable>"` → (our state-dict key, shape as Keras stores it), in Keras layer order."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        state = KerasResNet50().state_dict()
    expected = {}
    for layer in keras_weighted_layer_names():
        module_path = keras_layer_to_module_path(layer)
        kind = "conv" if layer.endswith("_conv") else "bn"
        for variable, attribute in KERAS_VARIABLES[kind].items():
            key = f"{module_path}.{attribute}"
            shape = tuple(state[key].shape)
            if variable == "kernel":
                out_channels, in_channels, height, width = shape
                shape = (height, width, in_channels, out_channels)
            expected[f"{layer}/{variable}"] = (key, shape)
    return expected


def load_keras_resnet50_h5(path: str | Path, *, ignore_top: bool = False) -> dict[str, torch.Tensor]:
    """Read a Keras ResNet50 (no top) HDF5 weights file into a float32 state dict for `KerasResNet50`.

    The dict has every parameter and BatchNorm running statistic; `num_batches_tracked` is left to the module
    (`load_state_dict(..., strict=True)` accepts the dict as is). Conv kernels are transposed (3, 2, 0, 1).
    `ignore_top=True` skips weighted layers that are not part of the backbone (with a warning) instead of failing.
    Raises `ModelError` for a missing or unreadable file and for any missing, extra or mis-shaped tensor.
    """
    path = Path(path)
    found, problems = _read_keras_weights(path)
    expected = expected_keras_tensors()

    mismatches = list(problems)
    state: dict[str, torch.Tensor] = {}
    reported_layers = set()
    for name, (key, shape) in expected.items():
        layer = name.split("/")[0]
        if name not in found:
            if not any(other.startswith(layer + "/") for other in found):
                if layer not in reported_layers:
                    mismatches.append(f"missing {layer}")
                    reported_layers.add(layer)
            else:
                mismatches.append(f"missing {name}")
            continue
        array = found[name]
        if array.dtype.kind != "f":
            mismatches.append(f"{name} has dtype {array.dtype}, expected float")
        elif array.shape != shape:
            mismatches.append(f"{name} has shape {_shape(array.shape)}, expected {_shape(shape)}")
        elif not np.isfinite(array).all():
            mismatches.append(f"{name} has non-finite values")
        else:
            if name.endswith("/kernel"):
                array = array.transpose(KERNEL_TO_TORCH)
            state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    unexpected_backbone, top_layers = [], []
    for name in found:
        if name in expected:
            continue
        layer = name.split("/")[0]
        if _is_backbone_layer(layer):
            unexpected_backbone.append(f"unexpected {name}")
        elif layer not in top_layers:
            top_layers.append(layer)
    mismatches += unexpected_backbone
    if top_layers and not ignore_top:
        mismatches += [f"unexpected {name}" for name in found if name.split("/")[0] in top_layers]

    if mismatches:
        fix = _fix_hint(found, mismatches, top_layers, ignore_top)
        raise ModelError(_summary(mismatches), where=str(path), fix=fix)
    if top_layers:
        warn(f"{path}: ignored {len(top_layers)} layer(s) beyond the ResNet50 backbone: {', '.join(top_layers)}")
    return state


def convert_keras_h5_to_safetensors(path: str | Path, out_path: str | Path, *, ignore_top: bool = False) -> str:
    """Convert a Keras ResNet50 HDF5 file to a `KerasResNet50` safetensors file; returns its sha256 hex digest.

    The output is written atomically (temporary sibling, then rename); the same input gives the same bytes.
    """
    from safetensors.torch import save

    state = load_keras_resnet50_h5(path, ignore_top=ignore_top)
    # One metadata key only: safetensors writes metadata from a hash map, so several keys come out in a random
    # order and the same weights would get a different sha256 on every run.
    data = save(state, metadata={"format": "pt"})
    atomic_write_bytes(Path(out_path), data)
    return hashlib.sha256(data).hexdigest()


def _read_keras_weights(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """All weights in the file keyed `"<keras layer>/<variable>"`, and the structural problems met on the way."""
    import h5py

    if not path.exists():
        raise ModelError("weights file not found", where=str(path), fix="check the path or download the file")
    if not path.is_file():
        raise ModelError("weights path is not a file", where=str(path), fix="give the path of the .h5 file itself")
    if not h5py.is_hdf5(path):
        raise ModelError("not an HDF5 file", where=str(path), fix=EXPECTED_FILE + " (the file may be truncated)")
    try:
        with h5py.File(path, "r") as handle:
            root = _weights_root(handle, path)
            return _collect_weights(root)
    except OSError as error:
        message = str(error).replace("\n", " ")
        raise ModelError(f"cannot read HDF5 file ({message})", where=str(path), fix=EXPECTED_FILE) from error


def _weights_root(handle, path: Path):
    """The group whose `layer_names` attribute lists the layers: the root (weights-only) or `model_weights`."""
    if _has_attribute(handle, "layer_names"):
        return handle
    if "model_weights" in handle and _has_attribute(handle["model_weights"], "layer_names"):
        return handle["model_weights"]
    if "layers" in handle and "vars" in handle:
        raise ModelError(
            "Keras 3 '.weights.h5' file: it stores weights by variable index, not by layer name",
            where=str(path),
            fix="save the model in the legacy HDF5 format (model.save('model.h5')) or use the published .h5 file",
        )
    raise ModelError("no 'layer_names' attribute: not a Keras weights file", where=str(path), fix=EXPECTED_FILE)


def _collect_weights(root) -> tuple[dict[str, np.ndarray], list[str]]:
    import h5py

    found: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for layer in _read_names(root, "layer_names"):
        if layer not in root:
            continue  # Keras writes a group for every layer; without one there are no weights to read
        group = root[layer]
        for weight_name in _read_names(group, "weight_names"):
            dataset = group.get(weight_name)
            if not isinstance(dataset, h5py.Dataset):
                problems.append(f"{layer}: weight {weight_name} is listed but not stored")
                continue
            parts = _WEIGHT_SUFFIX.sub("", weight_name).split("/")
            name = f"{parts[-2] if len(parts) >= 2 else layer}/{parts[-1]}"
            if name in found:
                problems.append(f"duplicate {name}")
                continue
            found[name] = np.asarray(dataset[()])
    return found, problems


def _has_attribute(group, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def _read_names(group, name: str) -> list[str]:
    """A Keras list-of-names attribute, also when split into `name0`, `name1`, … chunks; bytes decoded."""
    if name in group.attrs:
        values = list(np.atleast_1d(group.attrs[name]))
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(np.atleast_1d(group.attrs[f"{name}{chunk}"]))
            chunk += 1
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in values]


def _is_backbone_layer(layer: str) -> bool:
    try:
        keras_layer_to_module_path(layer)
    except KeyError:
        return False
    return True


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(str(size) for size in shape) + ")"


def _summary(mismatches: list[str]) -> str:
    shown = "; ".join(mismatches[:MISMATCHES_SHOWN])
    more = len(mismatches) - MISMATCHES_SHOWN
    count = f"{len(mismatches)} mismatch{'es' if len(mismatches) != 1 else ''} with Keras ResNet50 (no top)"
    return f"{count}: {shown}" + (f"; and {more} more" if more > 0 else "")


def _fix_hint(found: dict, mismatches: list[str], top_layers: list[str], ignore_top: bool) -> str:
    if any(_OLD_KERAS_NAMES.fullmatch(name.split("/")[0]) for name in found):
        return (
            "this file uses the 2017 keras ResNet50 layer names (res2a_branch2a, bn_conv1), a different network "
            "definition; " + EXPECTED_FILE
        )
    top_only = all(line.startswith("unexpected ") and line.split(" ", 1)[1].split("/")[0] in top_layers
                   for line in mismatches)
    if top_layers and top_only and not ignore_top:
        return "the file has layers beyond the ResNet50 backbone (a classifier top?); pass ignore_top=True to skip them"
    return EXPECTED_FILE
