"""MedMNIST `.npz` reader: any 2D subset, any resolution (28, 64, 128, 224), its given train/val/test split.

A MedMNIST file holds `{train,val,test}_images` ((N, H, W) grey or (N, H, W, 3) colour, uint8) and
`{train,val,test}_labels` ((N, 1) in the official files, (N,) in some copies; (N, K) for multi-label sets such as
ChestMNIST, which need an explicit rule to become one label).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from medtransfer.config import MultiLabelRule
from medtransfer.data.dataset import SPLIT_CODES, ImageDataset, images_as_uint8
from medtransfer.data.labels import LabelResolver
from medtransfer.errors import DataError
from medtransfer.memory_budget import available_bytes, describe_shortfall

MEDMNIST_SPLITS = ("train", "val", "test")


def read_medmnist_npz(
    path: Path,
    classes: list[str],
    multilabel: MultiLabelRule | None = None,
    label_map: dict[str, str] | None = None,
) -> ImageDataset:
    """Read a MedMNIST-style npz into one `ImageDataset` whose `given_split` records train/val/test.

    Labels are class indices, unless `label_map` maps the stored values (as text, e.g. "2") to class names.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError(
            "file not found",
            where=where,
            fix="download it ('medtransfer download') or place the .npz there by hand, or fix 'path' in params.yaml",
        )
    arrays = _load_npz_arrays(path)
    parts_images, parts_labels, parts_split = [], [], []
    for split in MEDMNIST_SPLITS:
        images = _as_nhwc_uint8(arrays[f"{split}_images"], f"{split}_images", where)
        labels = _as_single_label(arrays[f"{split}_labels"], f"{split}_labels", multilabel, where)
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{split}: {labels.shape[0]} labels for {images.shape[0]} images",
                where=where,
                fix="the file is inconsistent; download it again",
            )
        parts_images.append(images)
        parts_labels.append(labels)
        parts_split.append(np.full(images.shape[0], SPLIT_CODES[split], dtype=np.int8))
    shapes = {part.shape[1:] for part in parts_images}
    if len(shapes) != 1:
        raise DataError(f"train/val/test images differ in shape: {sorted(shapes)}", where=where)
    labels = np.concatenate(parts_labels)
    if label_map is not None:
        resolver = LabelResolver(classes, label_map, where)
        lookup = {raw: resolver.index(str(raw), "stored label") for raw in np.unique(labels).tolist()}
        labels = np.asarray([lookup[raw] for raw in labels.tolist()], dtype=np.int64)
    return ImageDataset(
        images=np.concatenate(parts_images),
        labels=labels,
        classes=tuple(classes),
        given_split=np.concatenate(parts_split),
        origin=where,
        names=tuple(f"{split}_images[{index}]" for split, part in zip(MEDMNIST_SPLITS, parts_images)
                    for index in range(part.shape[0])),
    )


def _load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array a MedMNIST file must have, fully read (so a truncated member fails here, not later)."""
    where = str(path)
    required = [f"{split}_{kind}" for split in MEDMNIST_SPLITS for kind in ("images", "labels")]
    try:
        with open(path, "rb"):
            pass
    except OSError as error:  # is_zipfile would call an unreadable file corrupt
        raise DataError(f"cannot read it ({(error.strerror or str(error)).lower()})", where=where,
                        fix="make it readable by the user running medtransfer") from None
    if not zipfile.is_zipfile(path):  # else np.load would try to unpickle it
        raise _corrupt(where)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in required if key not in archive.files]
            if missing:
                raise DataError(
                    f"npz lacks key '{missing[0]}' (it has: {', '.join(archive.files) or 'nothing'})",
                    where=where,
                    fix="a MedMNIST file holds train/val/test _images and _labels; download it again",
                )
            _check_claimed_sizes(archive.zip, required, where)
            return {key: np.asarray(archive[key]) for key in required}
    except DataError:
        raise
    except MemoryError:  # the check above reads the limits once; another process may have taken memory since
        raise DataError("ran out of memory reading its arrays", where=where,
                        fix="raise the limit (ulimit -v, the container's memory) or free memory and run it again") from None
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise DataError(
                "npz holds pickled object arrays, which are not loaded for safety",
                where=where,
                fix="store plain numeric arrays",
            ) from None
        raise _corrupt(where) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError):
        raise _corrupt(where) from None


def _check_claimed_sizes(archive: zipfile.ZipFile, keys: list[str], where: str) -> None:
    """NumPy allocates what a member's .npy header claims before reading a byte of it: a header claiming 10¹³
    elements would end in a MemoryError (or the OOM killer). The claim must fit the member's own size and the
    machine's memory."""
    total = 0
    for key in keys:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(member)
        if dtype.hasobject:  # its size says nothing; np.load refuses it anyway, say why here
            raise DataError(f"member {key} holds Python objects (dtype {dtype}), which are not loaded for safety",
                            where=where, fix="store plain numeric arrays (e.g. labels as int64)")
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if claimed > info.file_size:
            raise DataError(f"member {key} claims shape {shape} of {dtype} ({claimed:,} bytes) but holds "
                            f"{info.file_size:,} bytes", where=where, fix="download it again or replace it with an intact copy")
        total += claimed
    # What this process may still allocate (ulimit -v, a cgroup's memory.max, available memory), not the machine's
    # RAM: a compressed member of a few MB can claim gigabytes that only the limit refuses.
    available = available_bytes()
    if available is not None and total > available:
        needed_text, available_text = describe_shortfall(total, available)
        raise DataError(f"its arrays need {needed_text}, more than the {available_text} this process may still "
                        "allocate (memory limits and free memory)", where=where,
                        fix="raise the limit (ulimit -v, the container's memory) or prepare it on a larger machine")


def _corrupt(where: str) -> DataError:
    return DataError(
        "not a readable .npz file (truncated or corrupt?)",
        where=where,
        fix="download it again or replace it with an intact copy",
    )


def _as_nhwc_uint8(images: np.ndarray, key: str, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim == 4 and images.shape[-1] in (2, 4):
        raise DataError(
            f"{key} has {images.shape[-1]} channels per pixel (shape {images.shape}); expected 1 (grey) or 3 (RGB)",
            where=where,
            fix="drop the alpha channel (keep [..., :3]) or convert the images to grey or RGB",
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 1 or 3)",
            where=where,
            fix="MedMNIST 3D subsets are not supported; use a 2D subset",
        )
    return images_as_uint8(images, key, where)


def _as_single_label(labels: np.ndarray, key: str, rule: MultiLabelRule | None, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:
        if rule is None:
            raise DataError(
                f"{key} is multi-label with shape {labels.shape}",
                where=where,
                fix="add a rule under 'multilabel' (rule: any, or rule: column with column: K) to make one label",
            )
        if rule.rule == "any":
            labels = (labels != 0).any(axis=1)
        else:
            if rule.column is None or rule.column >= labels.shape[1]:
                raise DataError(
                    f"multilabel column {rule.column} does not exist; {key} has {labels.shape[1]} columns",
                    where=where,
                )
            labels = labels[:, rule.column] != 0
    elif rule is not None:
        raise DataError(f"{key} has one label per image, but a multilabel rule is set", where=where, fix="remove 'multilabel'")
    if labels.ndim != 1:
        raise DataError(f"{key} has shape {labels.shape}; expected (N,) or (N, 1)", where=where)
    if labels.dtype == np.bool_:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{key} holds non-integer labels", where=where, fix="labels must be class indices")
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{key} has dtype {labels.dtype}; expected integer class indices", where=where)
    return labels.astype(np.int64)
