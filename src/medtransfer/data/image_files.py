"""Image folders (one subfolder per raw label) and CSV manifests (path,label[,group][,fold]) of PNG/JPEG files.

Images come in mixed sizes and modes; each is converted to the configured channels (grey ↔ RGB) and resized to
a square of the configured side with nearest (as the original study's Keras loader did) or bilinear resampling.
"""

from __future__ import annotations

import csv
import fnmatch
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medtransfer.config import DatasetConfig
from medtransfer.data.dataset import ImageDataset
from medtransfer.data.labels import LabelResolver
from medtransfer.errors import DataError, warn

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
CSV_REQUIRED_COLUMNS = ("path", "label")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def load_image(path: Path, size: int, channels: int, resize: str = "nearest") -> np.ndarray:
    """One image file as (size, size, channels) uint8. 16-bit grey is scaled to 8 bits, alpha is dropped."""
    from PIL import Image, UnidentifiedImageError

    resample = Image.Resampling.NEAREST if resize == "nearest" else Image.Resampling.BILINEAR
    try:
        with Image.open(path) as picture:
            if Image.MAX_IMAGE_PIXELS and picture.width * picture.height > Image.MAX_IMAGE_PIXELS:
                # Decoding a header's claim of, say, 30000 x 30000 pixels first allocates all of them.
                raise DataError(f"image claims {picture.width} x {picture.height} pixels, more than the "
                                f"{Image.MAX_IMAGE_PIXELS:,} read safely (a decompression bomb, or a whole-slide image)",
                                where=str(path), fix="downsample it beforehand, or exclude it with 'exclude' in params.yaml")
            picture.load()
            picture = _to_mode(picture, channels)
            picture = picture.resize((size, size), resample=resample)
            array = np.asarray(picture, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(
            f"unreadable image ({type(error).__name__}: {error})".replace(str(path), "file"),
            where=str(path),
            fix="replace or delete the file, or exclude it with 'exclude' in params.yaml",
        ) from None
    return array.reshape(size, size, channels)


def _to_mode(picture, channels: int):
    from PIL import Image

    if picture.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(picture, dtype=np.float64)
        if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            raise ValueError(f"{picture.mode} pixel values outside 0..65535")
        picture = Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")
    elif picture.mode == "F":
        raise ValueError("floating-point images are not supported; export 8- or 16-bit images")
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        picture = picture.convert("RGBA").convert("RGB")
    return picture.convert("L" if channels == 1 else "RGB")


def resize_images(images: np.ndarray, size: int, channels: int, resize: str = "nearest") -> np.ndarray:
    """(N, H, W, C) uint8 → (N, size, size, channels) uint8, converting grey ↔ RGB like `load_image`."""
    from PIL import Image

    resample = Image.Resampling.NEAREST if resize == "nearest" else Image.Resampling.BILINEAR
    out = np.empty((images.shape[0], size, size, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        picture = picture.convert("L" if channels == 1 else "RGB").resize((size, size), resample=resample)
        out[index] = np.asarray(picture, dtype=np.uint8).reshape(size, size, channels)
    return out


def load_images(paths: Sequence[Path], size: int, channels: int, resize: str) -> np.ndarray:
    """(len(paths), size, size, channels) uint8; decoding runs on a few threads (PIL releases the GIL)."""
    images = np.empty((len(paths), size, size, channels), dtype=np.uint8)

    def fill(index: int) -> DataError | None:
        try:
            images[index] = load_image(paths[index], size, channels, resize)
        except DataError as error:
            return error
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [error for error in pool.map(fill, range(len(paths))) if error is not None]
    if failures:
        # Name the first, count them all: fixing one file at a time, one rerun each, hides how many are broken.
        first = failures[0]
        count = f"; {len(failures)} of the {len(paths)} images are unreadable" if len(failures) > 1 else ""
        raise DataError(first.what + count, where=first.where, fix=first.fix)
    return images


def read_image_folder(config: DatasetConfig, folder: Path) -> ImageDataset:
    """One subfolder per raw label; files found recursively below it. Non-image files are skipped with a warning."""
    where = str(folder)
    if not folder.is_dir():
        raise DataError("image folder not found", where=where, fix="download the dataset there, or fix 'path'")
    resolver = LabelResolver(config.classes, config.label_map, where)
    paths, labels, skipped, broken = [], [], [], []
    class_folders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_folders:
        raise DataError("no class subfolders", where=where, fix="put each class's images in a subfolder named by its label")
    for class_folder in class_folders:
        label = resolver.index(class_folder.name, f"folder {class_folder.name}/")
        files, links = _files_below(class_folder, folder, config.exclude)
        broken.extend(relative for relative in (link.relative_to(folder).as_posix() for link in links)
                      if not _excluded(relative, config.exclude))
        for file in files:
            relative = file.relative_to(folder).as_posix()
            if _excluded(relative, config.exclude):
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(relative)
                continue
            paths.append(file)
            labels.append(label)
    if skipped:
        warn(f"{folder}: skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}")
    if broken:
        warn(f"{folder}: skipped {len(broken)} dangling symlink(s) or special file(s), e.g. {broken[0]}")
    if not paths:
        raise DataError("no images found", where=where, fix=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")
    groups = None
    if config.group_pattern is not None:
        relative_paths = [path.relative_to(folder).as_posix() for path in paths]
        groups = _group_codes([_group_of(name, config.group_pattern, where) for name in relative_paths])
    images = load_images(paths, config.image_size, config.channels, config.resize)
    passed_over = (("non_image", skipped), ("dangling_symlink_or_special", broken))
    return ImageDataset(
        images, np.asarray(labels, dtype=np.int64), tuple(config.classes), groups=groups, origin=where,
        names=tuple(path.relative_to(folder).as_posix() for path in paths),
        skipped=tuple((reason, len(names), names[0]) for reason, names in passed_over if names),
    )


def _files_below(folder: Path, root: Path, exclude: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """Every file below `folder` (excluded subfolders pruned), sorted, and, apart, the entries that are no file:
    dangling or looping symlinks, sockets, pipes (the caller counts them rather than dropping them unseen).
    `Path.rglob` passes over a folder it may not read without a word, which would drop its images silently (or a
    whole class); here that is an error."""
    def refuse(error: OSError) -> None:
        raise DataError(f"cannot read folder {error.filename} ({(error.strerror or str(error)).lower()})",
                        where=str(root), fix="make it readable (chmod -R u+rX), or list it under 'exclude' in params.yaml")

    files, others = [], []
    for parent, folders, names in os.walk(folder, onerror=refuse):
        here = Path(parent)
        folders[:] = sorted(name for name in folders if not _excluded((here / name).relative_to(root).as_posix(), exclude))
        for name in names:
            (files if (here / name).is_file() else others).append(here / name)
    return sorted(files), sorted(others)


def read_csv_manifest(config: DatasetConfig, manifest: Path) -> ImageDataset:
    """A CSV with a header and columns path,label[,group][,fold]; paths are relative to the CSV's folder."""
    where = str(manifest)
    if not manifest.is_file():
        raise DataError("CSV manifest not found", where=where, fix="create it or fix 'path' in params.yaml")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            rows = [{key.strip(): (value or "") for key, value in row.items() if key is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"not a readable CSV ({error})", where=where, fix="save it as UTF-8 CSV with a header") from None
    missing = [name for name in CSV_REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise DataError(
            f"CSV lacks column '{missing[0]}' (it has: {', '.join(columns) or 'no header'})",
            where=where,
            fix="the header must name path,label and optionally group,fold",
        )
    if not rows:
        raise DataError("CSV has no rows", where=where)
    resolver = LabelResolver(config.classes, config.label_map, where)
    paths, labels = [], []
    first_row: dict[Path, tuple[int, str, str, int]] = {}  # resolved file → its first row, path, raw label, class
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        relative = row["path"].strip()
        if not relative:
            raise DataError(f"row {line} has an empty path", where=where)
        path = (manifest.parent / relative).resolve()
        if not path.is_file():
            raise DataError(
                f"row {line} points to a missing file: {relative}", where=where, fix="fix the path or remove the row"
            )
        label = resolver.index(row["label"], f"row {line}")
        if path in first_row:
            first_line, first_relative, first_label, first_class = first_row[path]
            spelled = f" (as {relative} on row {line})" if relative != first_relative else ""
            _refuse_repeated_file(first_relative + spelled, (first_line, line), (first_label, row["label"].strip()),
                                  first_class != label, where)
        first_row[path] = (line, relative, row["label"].strip(), label)
        paths.append(path)
        labels.append(label)
    groups = _group_codes([row["group"].strip() for row in rows]) if "group" in columns else None
    folds = _fold_codes([row["fold"].strip() for row in rows], where) if "fold" in columns else None
    images = load_images(paths, config.image_size, config.channels, config.resize)
    return ImageDataset(
        images, np.asarray(labels, dtype=np.int64), tuple(config.classes), groups=groups, predefined_fold=folds,
        origin=where, names=tuple(row["path"].strip() for row in rows),
    )


def _refuse_repeated_file(relative: str, lines: tuple[int, int], raw_labels: tuple[str, str], relabelled: bool,
                          where: str) -> None:
    """A file (same resolved path) on two rows of a CSV manifest would be counted twice and may land in train and
    test at once; with labels of two classes it also contradicts itself. Either way the manifest is wrong."""
    (first, second), (first_label, second_label) = lines, raw_labels
    if relabelled:
        raise DataError(f"{relative} has two labels: '{first_label}' on row {first} and '{second_label}' on row "
                        f"{second}", where=where, fix="keep one row for the file, with its right label")
    raise DataError(f"{relative} is listed twice, on rows {first} and {second}", where=where,
                    fix=f"remove row {second} (or row {first})")


def _excluded(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def _group_of(relative: str, pattern: str, where: str) -> str:
    match = re.search(pattern, relative)
    if match is None:
        raise DataError(
            f"group_pattern '{pattern}' does not match {relative}",
            where=where,
            fix="adjust the pattern so it matches every file's path relative to the folder",
        )
    return match.group(1)


def _group_codes(values: Sequence[str]) -> np.ndarray:
    """Group ids (any text) → int64 codes, numbered by sorted id."""
    _, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64)


def _fold_codes(values: Sequence[str], where: str) -> np.ndarray:
    """The `fold` column (integers, 0- or 1-based) → int64 fold indices 0..K-1 in sorted order."""
    try:
        numbers = np.asarray([int(value) for value in values], dtype=np.int64)
    except ValueError:
        bad = next(value for value in values if not value.lstrip("-").isdigit())
        raise DataError(f"fold column holds '{bad}', not an integer", where=where) from None
    _, codes = np.unique(numbers, return_inverse=True)
    return codes.astype(np.int64)
