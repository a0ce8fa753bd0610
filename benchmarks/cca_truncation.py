"""What dropping tiny eigen-directions does to mean CCA: ours (directions with eigenvalue <= 1e-10 of the side's
largest are dropped before whitening) against google/svcca's rule as the authors called it (`src/CCA.py`:
`cca_core.get_cca_similarity(acts1, acts2, epsilon=1e-12)`: each covariance scaled by its largest entry, channels
with variance below epsilon dropped, epsilon added to the diagonal, pseudo-inverse square roots, every direction
kept). Two random-init keras_resnet50 networks (the study's noise-floor pair) over real held-out images, the
original's draw: 64 channels, the same indices on both sides, 5 repeats per stage.

    PYTHONPATH=src .venv/bin/python benchmarks/cca_truncation.py data/breastmnist/breastmnist.npz --size 56

Prints, per stage: rows, the correlations each rule keeps (mean over the draws) and mean CCA under each; first for
the draws as they are, then with 4 of each draw's 64 channels made near-copies of others (noise 1e-4, 1e-5, 1e-6
of their sd): the nearly collinear channels that make the two rules part. The
svcca rule is written here from its published algorithm (Raghu et al. 2017; github.com/google/svcca, cca_core.py),
in float64, independent of medtransfer's streaming code.
"""

from __future__ import annotations

import numpy as np

from dead_channel_threshold import noise_floor_pair  # same folder: the same networks and rows
from medtransfer.analysis.similarity import SimilarityAccumulator

SAMPLE, REPEATS, EPSILON = 64, 5, 1e-12


def ours(x: np.ndarray, y: np.ndarray) -> tuple[float | None, int]:
    """Mean CCA and the number of canonical correlations, by medtransfer's defaults."""
    accumulator = SimilarityAccumulator(x.shape[1], y.shape[1])
    accumulator.update(x, y)
    result = accumulator.finalize(["cca"])
    return result.mean_cca, len(result.canonical_correlations)


def _inverse_sqrt(sigma: np.ndarray) -> np.ndarray:
    """(sigma + eps I)^+ then its symmetric square root, as cca_core does (negative eigenvalues clipped to 0)."""
    inverse = np.linalg.pinv(sigma + EPSILON * np.eye(len(sigma)))
    lam, vec = np.linalg.eigh(inverse)
    return (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T


def svcca_rule(x: np.ndarray, y: np.ndarray) -> tuple[float | None, int]:
    """Mean CCA and the number of correlations by svcca's `get_cca_similarity(..., epsilon=1e-12)`."""
    p = x.shape[1]
    covariance = np.cov(np.concatenate([x, y], axis=1), rowvar=False)
    sxx, syy, sxy = covariance[:p, :p], covariance[p:, p:], covariance[:p, p:]
    x_max, y_max = np.max(np.abs(sxx)), np.max(np.abs(syy))
    if x_max == 0 or y_max == 0:
        return None, 0
    sxx, syy, sxy = sxx / x_max, syy / y_max, sxy / np.sqrt(x_max * y_max)
    kx, ky = np.abs(np.diag(sxx)) >= EPSILON, np.abs(np.diag(syy)) >= EPSILON
    if not kx.any() or not ky.any():
        return None, 0
    sxx, syy, sxy = sxx[np.ix_(kx, kx)], syy[np.ix_(ky, ky)], sxy[np.ix_(kx, ky)]
    rho = np.abs(np.linalg.svd(_inverse_sqrt(sxx) @ sxy @ _inverse_sqrt(syy), compute_uv=False))
    rho = rho[: min(len(sxx), len(syy))]
    return float(np.mean(rho)), len(rho)


DUPLICATES = 4
#: Noise of the near-copies, relative to the copied channel's sd: the smallest eigenvalues come out near its square
#: (1e-8, 1e-10, 1e-12 of the largest): above both cut-offs, between ours (1e-10) and svcca's ridge (1e-12), below.
NOISE_SCALES = (1e-4, 1e-5, 1e-6)


def near_duplicates(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """`x` with its last `DUPLICATES` channels replaced by copies of its first ones plus noise of `noise` times their
    sd: nearly collinear channels, as fine-tuned filters can be."""
    out = x.copy()
    for offset in range(DUPLICATES):
        source = out[:, offset]
        out[:, -1 - offset] = source + noise * (source.std() or 1.0) * rng.standard_normal(len(source))
    return out


def table(first: dict, second: dict, noise: float | None) -> None:
    print(f"\n{SAMPLE} channels x {REPEATS} draws" + (f", the last {DUPLICATES} of each draw near-copies of others "
                                                     f"(noise {noise:g} of their sd) on both sides" if noise else ""))
    print("| layer | rows | correlations (ours) | correlations (svcca) | mean CCA (ours) | mean CCA (svcca rule) "
          "| ours − svcca | largest draw gap |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for layer in first:  # the stages the network names, in forward order
        x, y = first[layer], second[layer]
        pairs = []
        for _ in range(REPEATS):
            channels = rng.choice(x.shape[1], size=min(SAMPLE, x.shape[1]), replace=False)  # same indices both sides
            xs, ys = x[:, channels], y[:, channels]
            if noise:
                xs, ys = near_duplicates(xs, noise, rng), near_duplicates(ys, noise, rng)
            pairs.append((ours(xs, ys), svcca_rule(xs, ys)))
        if any(a[0] is None or b[0] is None for a, b in pairs):
            print(f"| {layer} | {len(x)} | – | – | undefined | undefined | – | – |")
            continue
        mine = np.array([a[0] for a, _ in pairs])
        theirs = np.array([b[0] for _, b in pairs])
        print(f"| {layer} | {len(x)} | {np.mean([a[1] for a, _ in pairs]):.1f} | {np.mean([b[1] for _, b in pairs]):.1f} "
              f"| {mine.mean():.4f} | {theirs.mean():.4f} | {mine.mean() - theirs.mean():+.4f} "
              f"| {np.max(np.abs(mine - theirs)):.4f} |")


def main() -> None:
    images, first, second = noise_floor_pair(__doc__.splitlines()[0])
    print(f"{len(images)} images at {images.shape[1]} px; random keras_resnet50 seed 0 vs seed 1")
    for noise in (None, *NOISE_SCALES):
        table(first, second, noise)


if __name__ == "__main__":
    main()
