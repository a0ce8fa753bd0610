"""Overhead of medtransfer's training loop over a bare PyTorch loop: same model, batches, data and augmentation.

Usage: python benchmarks/train_overhead.py [--arch resnet18] [--size 32] [--images 640] [--epochs 3]

Both loops train the same freshly initialised network for the same epochs on the same uint8 images, with the
same per-image augmentation and preprocessing, batch size and Adam optimiser. The bare loop does nothing else.
Ours adds what a tracked run needs: training metrics per epoch (loss, accuracy, AUC), a validation pass after
every epoch, early-stopping bookkeeping and a best-weights copy, and MLflow logging of every epoch's metrics to a
SQLite store. Images/s counts training images only; the table shows ours with and without its validation passes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medtransfer.config import TrainConfig
from medtransfer.models.backbones import Classifier, keras_like_init_
from medtransfer.models.preprocessing import IMAGENET
from medtransfer.train.augment import AugmentationSettings, augment_batch
from medtransfer.train.loop import Phase, Split, Trainer


def make_data(count: int, size: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, size=(count, size, size, 1), dtype=np.uint8), (np.arange(count) % 2).astype(np.int64))


def fresh_model(arch: str) -> Classifier:
    model = Classifier(arch, num_classes=2)
    keras_like_init_(model, torch.Generator().manual_seed(0))
    return model


def bare_loop(arch: str, data: Split, settings: TrainConfig, epochs: int) -> float:
    """Seconds for `epochs` epochs of augment → preprocess → forward → backward → step, nothing else."""
    model = fresh_model(arch).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()
    augmentation = AugmentationSettings()
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).numpy()
        for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
            batch = np.sort(order[start : start + settings.batch_size])
            images = augment_batch(torch.from_numpy(data.images[batch]), augmentation, generator)
            targets = torch.from_numpy(data.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(IMAGENET.apply(images)), targets).backward()
            optimizer.step()
    return time.perf_counter() - started


def our_loop(arch: str, data: Split, val: Split, settings: TrainConfig, epochs: int) -> tuple[float, float]:
    """(total seconds, seconds spent in validation passes) for our Trainer with MLflow logging on."""
    import mlflow

    validation_seconds = 0.0
    with tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(f"sqlite:///{Path(folder) / 'mlflow.db'}")
        experiment = mlflow.create_experiment("overhead", artifact_location=Path(folder).as_uri())
        with mlflow.start_run(experiment_id=experiment):
            step = {"n": 0}

            def log_epoch(_phase: str, _epoch: int, metrics: dict[str, float]) -> None:
                step["n"] += 1
                mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=step["n"])

            trainer = Trainer(fresh_model(arch), IMAGENET, settings, AugmentationSettings(),
                              device=torch.device("cpu"), on_epoch_end=log_epoch, progress=False)
            evaluate = trainer.evaluate

            def timed_evaluate(split: Split):
                nonlocal validation_seconds
                begun = time.perf_counter()
                result = evaluate(split)
                validation_seconds += time.perf_counter() - begun
                return result

            trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
            started = time.perf_counter()
            trainer.run_phase(Phase("full", True, settings.learning_rate, epochs, epochs + 1, "val_loss"), data, val)
            total = time.perf_counter() - started
    return total, validation_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--val-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    torch.set_num_threads(torch.get_num_threads())
    settings = TrainConfig(learning_rate=1e-3, batch_size=args.batch, augment=True, seed=0)
    data, val = make_data(args.images, args.size, 0), make_data(args.val_images, args.size, 1)
    trained = (args.images // args.batch) * args.batch * args.epochs
    bare_loop(args.arch, make_data(args.batch * 2, args.size, 2), settings, 1)  # warm-up: allocator, kernels

    bare_s = bare_loop(args.arch, data, settings, args.epochs)
    ours_s, validation_s = our_loop(args.arch, data, val, settings, args.epochs)
    ours_train_s = ours_s - validation_s
    print(f"{args.arch}, {args.size} px, batch {args.batch}, {args.images} train + {args.val_images} val images, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"{'loop':<52} {'seconds':>8} {'train img/s':>12} {'overhead':>9}")
    rows = [
        ("bare PyTorch (augment, preprocess, fwd/bwd/step)", bare_s),
        ("medtransfer Trainer, excluding validation passes", ours_train_s),
        ("medtransfer Trainer, all in (validation + MLflow)", ours_s),
    ]
    for label, seconds in rows:
        print(f"{label:<52} {seconds:8.2f} {trained / seconds:12.1f} {seconds / bare_s - 1:8.1%}")
    overhead = ours_train_s / bare_s - 1
    print(f"goal: overhead of the training loop with logging on <= 10%: {overhead:.1%} "
          f"{'PASS' if overhead <= 0.10 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
