"""Dataset readers by format: each turns a `DatasetConfig` into an `ImageDataset`.

Adding a format means adding one function to `READERS`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medtransfer.config import DatasetConfig
from medtransfer.data.dataset import ImageDataset
from medtransfer.data.medmnist import read_medmnist_npz


def _read_medmnist(config: DatasetConfig, path: Path) -> ImageDataset:
    return read_medmnist_npz(path, config.classes, config.multilabel)


READERS: dict[str, Callable[[DatasetConfig, Path], ImageDataset]] = {
    "medmnist": _read_medmnist,
}


def read_dataset(config: DatasetConfig, path: Path) -> ImageDataset:
    """Read the dataset `config` describes from `path` (already resolved against the repository root)."""
    return READERS[config.format](config, path)
