"""How far all-channel mean CCA sits above the original's 64 sampled channels x 5 repeats, per stage: two
random-init keras_resnet50 networks (the study's noise-floor pair, whose true similarity does not depend on how
many channels are compared) over real held-out images, ~10,000 rows per layer.

    PYTHONPATH=src .venv/bin/python benchmarks/channel_sampling_bias.py ../shared/data/breastmnist.npz --size 56

Mean CCA of m channels over n rows is biased upward by roughly m/n; sampling 64 keeps m/n small at every stage.
"""

from __future__ import annotations

import argparse

import numpy as np

from dead_channel_threshold import ROWS_PER_LAYER, stage_rows  # same folder: the same networks and rows
from medtransfer.analysis.activations import LAYERS
from medtransfer.analysis.similarity import SimilarityAccumulator

SAMPLE, REPEATS = 64, 5


def mean_cca(x: np.ndarray, y: np.ndarray) -> float | None:
    accumulator = SimilarityAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x, y)
    return accumulator.finalize(["cca"]).mean_cca


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", help="a MedMNIST-layout file; its test images are used")
    parser.add_argument("--size", type=int, default=56, help="images are enlarged (nearest) to this size")
    parser.add_argument("--images", type=int, default=156)
    args = parser.parse_args()
    images = np.load(args.npz)["test_images"][: args.images]
    factor = max(1, args.size // images.shape[1])
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    first, second = stage_rows(0, images, ROWS_PER_LAYER), stage_rows(1, images, ROWS_PER_LAYER)
    print(f"{len(images)} images at {images.shape[1]} px; random keras_resnet50 seed 0 vs seed 1")
    print(f"| layer | rows | channels | rows per channel (all / {SAMPLE}) | mean CCA, all channels | "
          f"mean CCA, {SAMPLE} x {REPEATS} | all − sampled |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        x, y = first[layer], second[layer]
        everything = mean_cca(x, y)
        draws = [rng.choice(x.shape[1], size=min(SAMPLE, x.shape[1]), replace=False) for _ in range(REPEATS)]
        sampled_values = [mean_cca(x[:, channels], y[:, channels]) for channels in draws]  # same indices both sides
        sampled = float(np.mean(sampled_values)) if None not in sampled_values else None
        difference = "–" if everything is None or sampled is None else f"{everything - sampled:+.3f}"
        print(f"| {layer} | {len(x)} | {x.shape[1]} | {len(x) / x.shape[1]:.1f} / {len(x) / min(SAMPLE, x.shape[1]):.1f} | "
              f"{'refused' if everything is None else f'{everything:.3f}'} | "
              f"{'refused' if sampled is None else f'{sampled:.3f}'} | {difference} |")


if __name__ == "__main__":
    main()
