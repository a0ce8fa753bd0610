"""How much the dead-channel threshold matters: ours (variance <= 1e-8 of the side's largest) against google/svcca's
(the covariance divided by its largest entry, then variance < 1e-12 dropped), on two random-init keras_resnet50
networks (the study's noise-floor pair) over real held-out images.

    PYTHONPATH=src .venv/bin/python benchmarks/dead_channel_threshold.py data/breastmnist/breastmnist.npz --size 56

Prints, per stage: rows, channels kept under each threshold, and mean CCA under each (all channels).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from medtransfer.analysis.activations import stage_hooks
from medtransfer.analysis.similarity import SimilarityAccumulator
from medtransfer.models.backbones import KERAS_RESNET50, create_backbone, keras_like_init_
from medtransfer.models.preprocessing import CAFFE

OURS, SVCCA_REFERENCE = 1e-8, 1e-12
ROWS_PER_LAYER = 10000


def stage_rows(seed: int, images: np.ndarray, rows: int, sample_seed: int = 0) -> dict[str, np.ndarray]:
    """{layer: (rows', C)} stage outputs of a Keras-initialised ResNet50, positions sampled the same way per layer."""
    network = keras_like_init_(create_backbone(KERAS_RESNET50), torch.Generator().manual_seed(seed)).eval()
    outputs: dict[str, np.ndarray] = {}

    def keep(layer: str, tensor: torch.Tensor) -> None:
        flat = tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1]).double().numpy()
        chosen = np.random.default_rng(sample_seed).permutation(len(flat))[:rows]
        outputs[layer] = flat[np.sort(chosen)]

    with torch.inference_mode(), stage_hooks(network, keep):
        network(CAFFE.apply(images))
    return outputs


def noise_floor_pair(description: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parse the command line shared by the benchmarks of this folder; return (images, seed 0's rows, seed 1's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("npz", help="a MedMNIST-layout file; its test images are used")
    parser.add_argument("--size", type=int, default=56, help="images are enlarged (nearest) to this size")
    parser.add_argument("--images", type=int, default=156)
    args = parser.parse_args()
    try:
        with np.load(args.npz) as archive:
            images = archive["test_images"][: args.images]
    except (OSError, KeyError, ValueError) as error:  # one line, not a traceback: say what the script needs
        parser.exit(2, f"{parser.prog}: cannot read {args.npz} ({type(error).__name__}: {error}); it needs a MedMNIST-"
                       "layout .npz with test_images, e.g. data/breastmnist/breastmnist.npz from this repository\n")
    factor = max(1, args.size // images.shape[1])
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return images, stage_rows(0, images, ROWS_PER_LAYER), stage_rows(1, images, ROWS_PER_LAYER)


def main() -> None:
    images, first, second = noise_floor_pair(__doc__.splitlines()[0])
    print(f"{len(images)} images at {images.shape[1]} px; random keras_resnet50 seed 0 vs seed 1, all channels")
    print("| layer | rows | channels | kept (ours 1e-8) | kept (svcca 1e-12) | mean CCA (ours) | mean CCA (svcca rule) |")
    print("|---|---|---|---|---|---|---|")
    for layer in first:  # the stages the network names, in forward order
        x, y = first[layer], second[layer]
        accumulator = SimilarityAccumulator(x.shape[1], y.shape[1])
        accumulator.update(x, y)
        ours = accumulator.finalize(["cca"], channel_rtol=OURS)
        # svcca scales each covariance by its largest absolute entry, the largest variance (|cov| <= max variance).
        reference = accumulator.finalize(["cca"], channel_rtol=SVCCA_REFERENCE)

        def cell(result) -> str:
            return "refused" if result.mean_cca is None else f"{result.mean_cca:.4f}"

        print(f"| {layer} | {len(x)} | {x.shape[1]} | {ours.p_kept}/{ours.q_kept} | {reference.p_kept}/{reference.q_kept} "
              f"| {cell(ours)} | {cell(reference)} |")


if __name__ == "__main__":
    main()
