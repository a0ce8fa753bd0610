"""Dataset readers by format: each turns a `DatasetConfig` into an `ImageDataset`.

Adding a format means adding one function to `READERS`; nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from medtransfer.config import DatasetConfig
from medtransfer.data.dataset import ImageDataset
from medtransfer.data.image_files import read_csv_manifest, read_image_folder, resize_images
from medtransfer.data.medmnist import read_medmnist_npz


def _read_medmnist(config: DatasetConfig, path: Path) -> ImageDataset:
    dataset = read_medmnist_npz(path, config.classes, config.multilabel, config.label_map)
    if config.image_size is None and config.channels is None:
        return dataset
    size = config.image_size or dataset.image_shape[0]
    channels = config.channels or dataset.image_shape[2]
    return dataclasses.replace(dataset, images=resize_images(dataset.images, size, channels, config.resize))


READERS: dict[str, Callable[[DatasetConfig, Path], ImageDataset]] = {
    "medmnist": _read_medmnist,
    "image_folder": read_image_folder,
    "csv": read_csv_manifest,
}


def read_dataset(config: DatasetConfig, path: Path) -> ImageDataset:
    """Read the dataset `config` describes from `path` (already resolved against the repository root)."""
    return READERS[config.format](config, path)
