"""What the paper protocol costs for a profile: the fine-tuning fits, the images they pass, and the time at the
training throughput measured here (or given).

Usage: python benchmarks/paper_protocol_cost.py [--params profiles/medmnist.yaml] [--steps 3] [--batch 16]
                                                [--images-per-second SIZE=RATE ...] [--images NAME=COUNT ...]

For every target of the profile's study: its pooled image count and side (from the prepared data when present,
else from the raw file's arrays), the fold sizes of its split, the fits (sources × regimes × folds × seeds) and the image
passes per epoch (training images, plus the validation images at a third of a training step's cost: a forward
pass only). The throughput is measured on this machine's device (CUDA with bf16 autocast and channels-last where
present, else the CPU): `--steps` timed training steps of the profile's architecture at each target's image size,
after one warm-up step. `--images-per-second 224=900` replaces the measurement for one size. Early stopping ends
most fits long before the protocol's 200 epochs, so the table gives the hours for 10, 30 and 200 epochs per fit.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from medtransfer.config import load_config
from medtransfer.models.backbones import Classifier
from medtransfer.train.presets import PRESETS


def target_facts(config, name: str, given: dict[str, int]) -> tuple[int, int]:
    """(pooled image count, image side in px) of a target: the count from `--images NAME=COUNT`, else the
    prepared data, else the raw npz (every split pooled); the side from `image_size`, else the images, else the
    `<name>_<size>.npz` name `medtransfer download` gives MedMNIST+ files."""
    dataset = config.dataset(name)
    prepared = config.resolve(config.paths.prepared_data) / name / "images.npy"
    raw = config.resolve(dataset.path)
    count, side = given.get(name), dataset.image_size
    if prepared.is_file():
        shape = np.load(prepared, mmap_mode="r").shape
        count, side = count or int(shape[0]), side or int(shape[1])
    elif raw.is_file():
        with np.load(raw) as arrays:
            count = count or sum(int(arrays[key].shape[0]) for key in arrays.files if key.endswith("_labels"))
            side = side or int(arrays[next(key for key in arrays.files if key.endswith("_images"))].shape[1])
    match = re.search(r"_(\d+)\.npz$", str(dataset.path))
    side = side or (int(match.group(1)) if match else None)
    if count is None or side is None:
        raise SystemExit(f"{name}: neither prepared data nor {raw}; run 'medtransfer download --all', prepare it, "
                         f"or give its pooled image count with --images {name}=COUNT")
    return int(count), int(side)


def fold_sizes(total: int, folds: int, val_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) images of one fold of a k-fold split whose validation part is cut from the rest."""
    test = total // folds
    val = round((total - test) * val_fraction)
    return total - test - val, val, test


def training_rate(arch: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    """Training images per second: forward, backward and an Adam step on random images of `size` px."""
    model = Classifier(arch, 2).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("profiles/medmnist.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images-per-second", nargs="*", default=[], metavar="SIZE=RATE")
    parser.add_argument("--images", nargs="*", default=[], metavar="NAME=COUNT",
                        help="a target's pooled image count, where its files are not here")
    args = parser.parse_args()
    config = load_config(args.params)
    study = config.study
    given = {int(size): float(rate) for size, rate in (item.split("=") for item in args.images_per_second)}
    counts = {name: int(count) for name, count in (item.split("=") for item in args.images)}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    archs = {config.source(name).arch for name in study.sources}
    arch = sorted(archs)[0]
    seeds = len(config.search.seeds) if config.search.seeds else 1
    max_epochs = PRESETS["paper"].max_epochs
    print(f"{args.params}: {len(study.targets)} target(s) x {len(study.sources)} source(s) x {len(study.regimes)} "
          f"regime(s) x folds x {seeds} seed(s); {arch} trained on {device} "
          f"({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), batch {args.batch}")
    print("| target | size | images | train/val/test per fold | fits | image passes per epoch (all fits) | "
          "images/s | hours at 10 / 30 / 200 epochs |")
    print("|---|---|---|---|---|---|---|---|")
    total_per_epoch_seconds = 0.0
    rates: dict[int, float] = {}
    for target in study.targets:
        dataset = config.dataset(target)
        images, size = target_facts(config, target, counts)
        folds = int(dataset.split.folds or 1)
        train, val, test = fold_sizes(images, folds, float(dataset.split.val_fraction or 0.0))
        fits = len(study.sources) * len(study.regimes) * folds * seeds
        passes = fits * (train + val / 3)
        if size not in rates:
            rates[size] = given.get(size) or training_rate(arch, size, args.batch, args.steps, device)
        seconds = passes / rates[size]
        total_per_epoch_seconds += seconds
        hours = " / ".join(f"{seconds * epochs / 3600:.1f}" for epochs in (10, 30, max_epochs))
        print(f"| {target} | {size} | {images:,} | {train:,}/{val:,}/{test:,} | {fits} | {passes:,.0f} | "
              f"{rates[size]:.1f}{'' if size not in given else ' (given)'} | {hours} |")
    hours = " / ".join(f"{total_per_epoch_seconds * epochs / 3600:.1f}" for epochs in (10, 30, max_epochs))
    print(f"| all | | | | | | | {hours} |")


if __name__ == "__main__":
    main()
