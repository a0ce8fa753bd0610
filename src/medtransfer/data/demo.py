"""The offline demo datasets: real pixels from scikit-image's bundled sample images, synthetic tasks.

scikit-image installs about two dozen sample images with the package, so these datasets exist on any fresh
machine without a network. Three small datasets at 32 px are cut from them, deterministically for a seed:

- `natural`  (source, RGB): which of 8 everyday photos a random crop comes from (astronaut, brick, cat, coffee,
  coins, grass, gravel, rocket). Stands in for ImageNet.
- `medical`  (source, grey): which of 5 medical images a crop comes from (retina fundus (left half only),
  immunohistochemistry, fluorescence cells, retinal microaneurysms, Shepp-Logan CT phantom). Stands in for
  RadImageNet.
- `fundus_vessels` (target, grey): does a crop of the retina fundus image (right half only, so no pixel is
  shared with the `medical` source) contain blood vessel, judged by a vesselness filter (Sato) on the full-size
  image; crops with an ambiguous vessel fraction are left out. Brightness, contrast and noise are jittered per
  crop, so mean intensity alone does not give the answer away.

These are not medical benchmarks: the labels are made up from the pixels. They exist so that the whole study —
pretraining two genuinely different sources, fine-tuning, comparing representations — runs offline in minutes.
Each file has the MedMNIST layout (`{train,val,test}_{images,labels}`), so `prepare` reads it like any npz.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from medtransfer.atomic_files import atomic_write_bytes

DEMO_IMAGE_SIZE = 32
DEMO_DATASETS = ("natural", "medical", "fundus_vessels")
_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


NATURAL_IMAGES = ("astronaut", "brick", "chelsea", "coffee", "coins", "grass", "gravel", "rocket")
MEDICAL_IMAGES = ("retina", "immunohistochemistry", "cell", "microaneurysms", "shepp_logan_phantom")
FUNDUS_CLASSES = ("no_vessel", "vessel")


def write_demo_datasets(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write natural.npz, medical.npz and fundus_vessels.npz into `folder` (each atomically)."""
    builders = {
        "natural": lambda: natural_dataset(seed),
        "medical": lambda: medical_dataset(seed + 1),
        "fundus_vessels": lambda: fundus_vessels_dataset(seed + 2),
    }
    written = {}
    for name, build in builders.items():
        images, labels = build()
        written[name] = folder / f"{name}.npz"
        atomic_write_bytes(written[name], _medmnist_npz_bytes(images, labels, np.random.default_rng([seed, 99])))
    return written


def demo_classes(name: str) -> tuple[str, ...]:
    return {"natural": NATURAL_IMAGES, "medical": MEDICAL_IMAGES, "fundus_vessels": FUNDUS_CLASSES}[name]


# -- the three datasets --------------------------------------------------------------------------------------------


def natural_dataset(seed: int, per_class: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """(8·per_class, 32, 32, 3) uint8 crops of everyday photos and their photo index."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(NATURAL_IMAGES):
        photo = _as_rgb_float(_sample_image(name))
        images.append(_random_crops(photo, per_class, (48, 160), rng))
        labels.append(np.full(per_class, label))
    return _to_uint8(np.concatenate(images)), np.concatenate(labels).astype(np.int64)


def medical_dataset(seed: int, per_class: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """(5·per_class, 32, 32, 1) uint8 grey crops of medical images and their image index."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(MEDICAL_IMAGES):
        picture = _as_grey_float(_sample_image(name))
        if name == "retina":
            picture = picture[:, : picture.shape[1] // 2]  # the right half is the target's
        sides = (24, 64) if name == "microaneurysms" else (48, 160)
        images.append(_random_crops(picture[..., np.newaxis], per_class, sides, rng))
        labels.append(np.full(per_class, label))
    return _to_uint8(np.concatenate(images)), np.concatenate(labels).astype(np.int64)


def fundus_vessels_dataset(
    seed: int, per_class: int = 500, vessel_above: float = 0.06, background_below: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(2·per_class, 32, 32, 1) uint8 crops of the fundus' right half; label 1 when vessel covers more than
    `vessel_above` of the crop, 0 when less than `background_below` (crops in between are skipped)."""
    from skimage import filters

    rng = np.random.default_rng(seed)
    fundus = _sample_image("retina")
    green = fundus[..., 1].astype(np.float64) / 255.0  # vessels contrast best in the green channel
    field_of_view = fundus.max(axis=-1) > 20
    vesselness = filters.sato(green, sigmas=(2, 4), black_ridges=True)
    vessel = (vesselness > np.percentile(vesselness[field_of_view], 88)) & field_of_view
    left = green.shape[1] // 2
    wanted = {0: per_class, 1: per_class}
    crops: dict[int, list[np.ndarray]] = {0: [], 1: []}
    attempts = 0
    while any(len(crops[label]) < wanted[label] for label in wanted):
        attempts += 1
        if attempts > 200 * per_class:
            raise RuntimeError("could not find enough fundus crops; the thresholds are too strict")  # pragma: no cover
        side = int(rng.integers(40, 97))
        top = int(rng.integers(0, green.shape[0] - side))
        start = int(rng.integers(left, green.shape[1] - side))
        window = (slice(top, top + side), slice(start, start + side))
        if field_of_view[window].mean() < 0.98:
            continue
        fraction = vessel[window].mean()
        label = 1 if fraction > vessel_above else 0 if fraction < background_below else None
        if label is None or len(crops[label]) >= wanted[label]:
            continue
        crop = _resize(green[window][..., np.newaxis], DEMO_IMAGE_SIZE)
        crop = _jitter_photometry(_random_dihedral(crop, rng), rng, contrast=(0.5, 2.0), noise=(0.01, 0.05))
        crops[label].append(crop)
    images = np.stack(crops[0] + crops[1])
    labels = np.repeat([0, 1], per_class)
    return _to_uint8(images), labels.astype(np.int64)


# -- helpers -------------------------------------------------------------------------------------------------------


def _sample_image(name: str) -> np.ndarray:
    from skimage import data

    picture = getattr(data, name)()
    if picture.dtype != np.uint8:  # shepp_logan_phantom is float in [0, 1]
        picture = np.clip(np.asarray(picture, dtype=np.float64) * 255.0, 0, 255).astype(np.uint8)
    return picture


def _as_rgb_float(picture: np.ndarray) -> np.ndarray:
    picture = picture.astype(np.float64) / 255.0
    if picture.ndim == 2:
        picture = np.repeat(picture[..., np.newaxis], 3, axis=-1)
    return picture[..., :3]


def _as_grey_float(picture: np.ndarray) -> np.ndarray:
    picture = picture.astype(np.float64) / 255.0
    if picture.ndim == 3:
        picture = picture[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
    return picture


def _random_crops(picture: np.ndarray, count: int, sides: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(count, 32, 32, C) float crops of random side, position and dihedral orientation, photometry jittered."""
    height, width = picture.shape[:2]
    low, high = sides[0], min(sides[1], height, width)
    crops = []
    for _ in range(count):
        side = int(rng.integers(low, high + 1))
        top = int(rng.integers(0, height - side + 1))
        start = int(rng.integers(0, width - side + 1))
        crop = _resize(picture[top : top + side, start : start + side], DEMO_IMAGE_SIZE)
        crops.append(_jitter_photometry(_random_dihedral(crop, rng), rng))
    return np.stack(crops)


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(crop, (size, size, crop.shape[-1]), order=1, anti_aliasing=True, preserve_range=True)


def _random_dihedral(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    crop = np.rot90(crop, k=int(rng.integers(4)), axes=(0, 1))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _jitter_photometry(
    crop: np.ndarray,
    rng: np.random.Generator,
    contrast: tuple[float, float] = (0.7, 1.3),
    noise: tuple[float, float] = (0.02, 0.02),
) -> np.ndarray:
    """Random contrast (log-uniform factor), brightness and Gaussian noise (uniform sd), so that no dataset is
    separable by intensity or contrast statistics alone."""
    mean = crop.mean()
    factor = np.exp(rng.uniform(np.log(contrast[0]), np.log(contrast[1])))
    crop = (crop - mean) * factor + mean + rng.uniform(-0.1, 0.1)
    return crop + rng.normal(0.0, rng.uniform(*noise), size=crop.shape)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _medmnist_npz_bytes(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> bytes:
    """A MedMNIST-layout npz (stratified 70/15/15 train/val/test, labels shaped (N, 1) as the official files)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _SPLIT_FRACTIONS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(_SPLIT_FRACTIONS["train"] * members.size))
        n_val = int(round(_SPLIT_FRACTIONS["val"] * members.size))
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train : n_train + n_val])
        parts["test"].append(members[n_train + n_val :])
    arrays = {}
    for name, chunks in parts.items():
        index = np.sort(np.concatenate(chunks))
        squeezed = images[index][..., 0] if images.shape[-1] == 1 else images[index]
        arrays[f"{name}_images"] = squeezed
        arrays[f"{name}_labels"] = labels[index][:, np.newaxis].astype(np.uint8)
    return deterministic_npz_bytes(arrays)


def deterministic_npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like np.savez_compressed, but byte-identical across runs (numpy stamps each member with the current
    time, which would make DVC see a new version of unchanged data)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
