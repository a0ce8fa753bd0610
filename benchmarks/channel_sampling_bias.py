"""How far all-channel mean CCA sits above the original's 64 sampled channels x 5 repeats, per stage: two
random-init keras_resnet50 networks (the study's noise-floor pair, whose true similarity does not depend on how
many channels are compared) over real held-out images, ~10,000 rows per layer.

    PYTHONPATH=src .venv/bin/python benchmarks/channel_sampling_bias.py data/breastmnist/breastmnist.npz --size 56

Mean CCA of m channels over n rows is biased upward by roughly m/n; sampling 64 keeps m/n small at every stage.
"""

from __future__ import annotations


import numpy as np

from dead_channel_threshold import noise_floor_pair  # same folder: the same networks and rows
from medtransfer.analysis.similarity import SimilarityAccumulator

SAMPLE, REPEATS = 64, 5


def mean_cca(x: np.ndarray, y: np.ndarray) -> float | None:
    accumulator = SimilarityAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x, y)
    return accumulator.finalize(["cca"]).mean_cca


def main() -> None:
    images, first, second = noise_floor_pair(__doc__.splitlines()[0])
    print(f"{len(images)} images at {images.shape[1]} px; random keras_resnet50 seed 0 vs seed 1")
    print(f"| layer | rows | channels | rows per channel (all / {SAMPLE}) | mean CCA, all channels | "
          f"mean CCA, {SAMPLE} x {REPEATS} | all − sampled |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for layer in first:  # the stages the network names, in forward order
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
