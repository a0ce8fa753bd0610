"""The float32 cross products (analysis/cross_products.py, ``gram_precision="float32"``) against the float64 path,
with the error bound derived below and computed from the data; plus the option's plumbing.

Derivation. Let ``Z`` ``(n, d)`` be the shifted rows in float64 (``d = p + q``; rows minus the first chunk's mean
``K``), ``A = |Z|^T |Z|`` and ``L`` the rows per float32 block. Both paths form the same column and fourth-moment
sums from ``Z`` in float64; only the cross-product total ``G`` differs, and entrywise

    |G_32 - G_64| <= eps_acc A,   eps_acc = gamma_L(2^-24) + 2 * 2^-24 + 2^-48 + gamma_n(2^-53),

with ``gamma_k(u) = k u / (1 - k u)``: rounding a value to float32 costs ``2^-24`` relative (``2u + u^2`` for a
product), a float32 dot product of length ``L`` errs by at most ``gamma_L`` relative to the sum of absolute products
in any summation order (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), and the float64 path's own
``G`` and the float64 sum of the block totals err by at most ``gamma_n(2^-53) A``. ``A`` is computed here from the
data: a large common offset left in ``Z`` (an unshifted accumulation) would put the error far above it.

Each path then centres ``S = G - n mu mu^T`` (rounding ``2^-53 (|G| + n |mu| |mu|^T)`` each) and finalises in float64
(backward stable: an error equivalent to perturbing ``S`` by a few ``d 2^-53`` relative; we allow ``32 d 2^-53``).
So the two paths' statistics differ by ``Delta`` with ``|Delta| <= B``,

    B = eps A + 2^-52 n |mu| |mu|^T,   eps = eps_acc + 32 d 2^-53.

Every measure ``f`` is a smooth function of the upper triangle of ``G`` while the data stay away from its
thresholds (dropped channels, eigen-directions, SVCCA's cut; checked), so to first order
``|f_32 - f_64| <= sum_e |df/dG_e| B_e``, the gradient taken by central differences through the real finalisation
(which also carries the debiased CKA's fourth-moment terms and, for the shape metrics, the arccos). The second-order
remainder is relative to the first by the size of the perturbation in whitened units, the condition of the data:
``eta = max |  |S^-1/2| B |S^-1/2|  |_2`` over the blocks ``xx``, ``yy``, ``xy`` (for CCA exactly: each canonical
correlation moves by at most ``(1 + eta_xy) / sqrt((1 - eta_x)(1 - eta_y)) - 1``). The tests require
``eta <= 0.05`` and assert ``|f_32 - f_64| <= 2 sum_e |df/dG_e| B_e``, the factor 2 covering that remainder. The bound
does not depend on the BLAS, its summation order, SIMD width or thread count, nor on luck: it holds for any data
meeting the checked conditions; the data below are seeded only to be concrete.
"""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.analysis.cross_products import FLOAT32_BLOCK_ROWS, GRAM_PRECISIONS
from medtransfer.analysis.similarity import ALL_MEASURES, NonFiniteInputError, SimilarityAccumulator
from medtransfer.analysis.streaming import compare_pair_layer
from medtransfer.config import load_config
from medtransfer.errors import ConfigError

U32, U64 = 2.0**-24, 2.0**-53
#: Uneven chunks; the first (which sets the shift) is short, so the shift misses the mean by a few percent of a spread.
CUTS = (37, 1000, 4321)


def gamma(k: int, u: float) -> float:
    return k * u / (1.0 - k * u)


def offset_collinear_pair(delta: float, n: int = 6000, p: int = 5, q: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """float32 activations sharing a 3-dimensional latent; on each side the last channel is the one before plus
    ``delta`` times noise (correlation ~ 1 - delta^2 / 6); channel scales span four decades, and every channel sits
    1000 of its own spreads away from zero (X up, Y down)."""
    rng = np.random.default_rng(35)
    latent = rng.standard_normal((n, 3))
    x = latent @ rng.standard_normal((3, p)) + 0.3 * rng.standard_normal((n, p))
    y = latent @ rng.standard_normal((3, q)) + 0.5 * rng.standard_normal((n, q))
    x[:, -1] = x[:, -2] + delta * rng.standard_normal(n)
    y[:, -1] = y[:, -2] + delta * rng.standard_normal(n)
    scale_x, scale_y = np.logspace(-2, 2, p), np.logspace(1, -1, q)
    return (x * scale_x + 1000.0 * scale_x).astype(np.float32), (y * scale_y - 1000.0 * scale_y).astype(np.float32)


def stream(x: np.ndarray, y: np.ndarray, precision: str, block_rows: int) -> SimilarityAccumulator:
    acc = SimilarityAccumulator(x.shape[1], y.shape[1], block_bytes=8 * (x.shape[1] + y.shape[1]) * block_rows,
                                gram_precision=precision)
    bounds = [0, *CUTS, len(x)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        acc.update(x[start:stop], y[start:stop])
    return acc


def shifted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Z``: the rows minus the first chunk's mean, as the accumulator shifts them (float64)."""
    first = CUTS[0]
    shift = np.concatenate([x[:first].mean(axis=0, dtype=np.float64), y[:first].mean(axis=0, dtype=np.float64)])
    return np.concatenate([x, y], axis=1).astype(np.float64) - shift


def whitened_size(bound: np.ndarray, centred: np.ndarray, p: int) -> float:
    """eta: the largest ``| |S^-1/2| B |S^-1/2| |_2`` over the xx, yy and xy blocks."""

    def abs_inverse_root(s):
        lam, vec = np.linalg.eigh(s)
        return np.abs((vec / np.sqrt(lam)) @ vec.T)

    wx, wy = abs_inverse_root(centred[:p, :p]), abs_inverse_root(centred[p:, p:])
    return max(np.linalg.norm(wx @ bound[:p, :p] @ wx, 2), np.linalg.norm(wy @ bound[p:, p:] @ wy, 2),
               np.linalg.norm(wx @ bound[:p, p:] @ wy, 2))


def first_order_bounds(acc: SimilarityAccumulator, bound: np.ndarray, centred: np.ndarray) -> dict[str, float]:
    """``sum_e |df/dG_e| B_e`` per measure, over the upper triangle of the float64 accumulator's ``G`` (the
    finalisation mirrors it, so one entry moves ``S_jk`` and ``S_kj`` together, as rounding does)."""
    out = dict.fromkeys(ALL_MEASURES, 0.0)
    d = bound.shape[0]
    for j in range(d):
        for k in range(j, d):
            step = 1e-6 * np.sqrt(centred[j, j] * centred[k, k])
            kept = acc._gram[j, k]
            acc._gram[j, k] = kept + step
            up = acc.finalize()
            acc._gram[j, k] = kept - step
            down = acc.finalize()
            acc._gram[j, k] = kept
            for measure in ALL_MEASURES:
                out[measure] += abs(up.value(measure) - down.value(measure)) / (2.0 * step) * bound[j, k]
    return out


@pytest.mark.parametrize(("delta", "block_rows"), [(0.05, 64), (0.5, FLOAT32_BLOCK_ROWS)],
                         ids=["nearly-collinear-64-row-blocks", "collinear-production-blocks"])
def test_float32_path_stays_within_the_derived_bound_for_every_measure(delta, block_rows):
    x, y = offset_collinear_pair(delta)
    n, p = x.shape[0], x.shape[1]
    fast, reference = stream(x, y, "float32", block_rows), stream(x, y, "float64", block_rows)
    rows = fast.block_rows
    assert rows == min(block_rows, FLOAT32_BLOCK_ROWS) and n > 2 * rows  # several float32 blocks

    z = shifted_rows(x, y)
    a = np.abs(z).T @ np.abs(z)
    mean = z.mean(axis=0)
    centred = (z - mean).T @ (z - mean)
    eps_acc = gamma(rows, U32) + 2 * U32 + U32**2 + gamma(n, U64)

    # The accumulation itself, entrywise on the upper triangle (the float32 total is held in scaled channels).
    upper = np.triu_indices(a.shape[0])
    g32 = fast._gram / np.outer(fast._scales, fast._scales)
    assert np.all(np.abs(g32 - reference._gram)[upper] <= eps_acc * a[upper])

    eps = eps_acc + 32 * a.shape[0] * U64
    bound = eps * a + 2 * U64 * n * np.outer(np.abs(mean), np.abs(mean))
    eta = whitened_size(bound, centred, p)
    assert eta <= 0.05, f"the data are too ill-conditioned for a first-order bound (eta = {eta:.2e})"

    got, ref = fast.finalize(), reference.finalize()
    # Away from every threshold: the same channels, ranks and SVCCA cut on both paths, no angle near 0.
    assert (got.p_kept, got.q_kept, got.cca_ranks, got.svcca_dims) == (ref.p_kept, ref.q_kept, ref.cca_ranks,
                                                                       ref.svcca_dims)
    assert ref.svcca_dims[0] < p  # the SVCCA truncation is exercised
    limits = first_order_bounds(reference, bound, centred)
    for measure in ALL_MEASURES:
        value, expected = got.value(measure), ref.value(measure)
        assert 0.05 < expected < 0.98, measure
        assert abs(value - expected) <= 2.0 * limits[measure], (measure, abs(value - expected), limits[measure])
        assert limits[measure] < 1e-2, measure  # the bound says something


def test_the_float32_path_ignores_the_magnitude_of_the_activations():
    # Powers-of-two channel scales keep float32 products in range: activations 2^-100 or 2^100 (~1e-30, ~1e30) times
    # larger give the values of the originals (their squares would underflow or overflow float32); scaling by a
    # power of two is exact, so the float32 rows are the same and only float64 rounding differs.
    x, y = offset_collinear_pair(0.5, n=3000)
    base = stream(x, y, "float32", 256).finalize()
    for factor in (2.0**-100, 2.0**100):
        scaled = stream(x.astype(np.float64) * factor, y.astype(np.float64) * factor, "float32", 256).finalize()
        for measure in ALL_MEASURES:
            assert scaled.value(measure) == pytest.approx(base.value(measure), abs=1e-9), (factor, measure)


def test_values_beyond_float32_range_are_reported_with_their_row():
    x, y = offset_collinear_pair(0.5, n=500)
    x, y = x.astype(np.float64), y.astype(np.float64)
    y[321, 2] = 1e45  # finite in float64, beyond float32 even after the first chunk's channel scale
    acc = SimilarityAccumulator(x.shape[1], y.shape[1], gram_precision="float32")
    with pytest.raises(NonFiniteInputError) as caught:
        acc.update(x[:100], y[:100])
        acc.update(x[100:], y[100:])
    assert (caught.value.side, caught.value.row) == ("y", 321)


def test_unknown_precision_is_refused():
    assert GRAM_PRECISIONS == ("float64", "float32")
    with pytest.raises(ValueError, match="float64, float32"):
        SimilarityAccumulator(3, 2, gram_precision="float16")


def test_the_layer_comparison_passes_the_precision_on():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64 * 16, 12)).astype(np.float32) + 50.0
    y = (x @ rng.standard_normal((12, 12)) + rng.standard_normal(x.shape)).astype(np.float32)
    results = {precision: compare_pair_layer(x, y, 16, list(ALL_MEASURES), gram_precision=precision)
               for precision in GRAM_PRECISIONS}
    for measure in ALL_MEASURES:
        assert results["float32"].values[measure] == pytest.approx(results["float64"].values[measure], abs=1e-5)
    identity = compare_pair_layer(x, x, 16, list(ALL_MEASURES), gram_precision="float32")
    for measure in ALL_MEASURES:
        assert identity.values[measure] == pytest.approx(1.0, abs=1e-6), measure


def test_the_setting_is_validated_at_load(write_params):
    dataset = {"format": "medmnist", "path": "data/raw/x.npz", "classes": ["a", "b"]}
    assert load_config(write_params({"x": dataset})).analysis.gram_precision == "float64"
    assert load_config(write_params({"x": dataset}, analysis={"gram_precision": "float32"})).analysis.gram_precision \
        == "float32"
    with pytest.raises(ConfigError) as caught:
        load_config(write_params({"x": dataset}, analysis={"gram_precision": "float16"}))
    message = caught.value.one_line()
    assert "analysis.gram_precision" in message and "'float32'" in message


def test_the_similarity_command_takes_the_precision(tmp_path, capsys):
    import argparse
    import json

    from medtransfer.analysis.similarity_command import add_arguments, peak_bytes, run

    x, y = offset_collinear_pair(0.5, n=800)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--json", "--gram-precision", "float32"]))
    data = json.loads(capsys.readouterr().out)
    accumulator = SimilarityAccumulator(x.shape[1], y.shape[1], gram_precision="float32")
    accumulator.update(x, y)  # the command reads these small files in one chunk
    expected = accumulator.finalize()
    for measure in ALL_MEASURES:
        assert data[measure] == pytest.approx(expected.value(measure), abs=1e-12), measure
    measures = list(ALL_MEASURES)
    assert peak_bytes(2048, 2048, measures, "float32") > peak_bytes(2048, 2048, measures)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--gram-precision", "float16"])
