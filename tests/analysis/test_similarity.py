"""Tests of medtransfer.analysis.similarity against independent in-memory oracles (QR/SVD of the data, n x n Grams)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from medtransfer.analysis.cross_products import side_scales
from medtransfer.analysis.similarity import (
    ALL_MEASURES,
    InsufficientSamplesError,
    NonFiniteInputError,
    SimilarityAccumulator,
    compute_similarity,
)

# ----------------------------------------------------------------------------------------------------------------
# Oracles: textbook float64 implementations working on the full data matrices.
# ----------------------------------------------------------------------------------------------------------------


def _centre(a):
    return a - a.mean(axis=0)


def oracle_cca(x, y):
    """Canonical correlations (descending) and unit-norm canonical variates via QR of each centred side."""
    qx, _ = np.linalg.qr(_centre(x))
    qy, _ = np.linalg.qr(_centre(y))
    u, s, vt = np.linalg.svd(qx.T @ qy, full_matrices=False)
    return s, qx @ u, qy @ vt.T


def oracle_pwcca(x, y):
    """Morcos et al. weights from the data: alpha_i = sum_j |h_i^T x_j|, unit-norm h_i, on the smaller side."""
    rho, hx, hy = oracle_cca(x, y)
    if x.shape[1] <= y.shape[1]:
        h, acts = hx, _centre(x)
    else:
        h, acts = hy, _centre(y)
    alpha = np.abs(h[:, : len(rho)].T @ acts).sum(axis=1)
    return float(alpha @ rho / alpha.sum())


def oracle_svcca(x, y, threshold=0.99):
    reduced = []
    for a in (x, y):
        ac = _centre(a)
        _, s, vt = np.linalg.svd(ac, full_matrices=False)
        var = s**2
        k = int(np.argmax(np.cumsum(var) >= threshold * var.sum())) + 1
        reduced.append(ac @ vt[:k].T)
    rho, _, _ = oracle_cca(*reduced)
    return float(rho.mean()), (reduced[0].shape[1], reduced[1].shape[1])


def oracle_cka(x, y):
    xc, yc = _centre(x), _centre(y)
    return np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def _unbiased_hsic(k, l):
    """Song et al. (2012), eq. (5), with zero-diagonal kernel matrices."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def oracle_cka_debiased(x, y):
    """n x n linear Gram matrices of the raw (uncentred) data; unbiased HSIC needs no centring."""
    k, l = x @ x.T, y @ y.T
    return _unbiased_hsic(k, l) / np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))


def correlated_pair(rng, n, p, q, shared=4, noise=0.5, offset=3.0):
    """Two views of a shared latent signal, with distinct channel scales and non-zero means."""
    z = rng.standard_normal((n, shared))
    x = z @ rng.standard_normal((shared, p)) + noise * rng.standard_normal((n, p))
    y = z @ rng.standard_normal((shared, q)) + noise * rng.standard_normal((n, q))
    x = x * rng.uniform(0.5, 3.0, p) + offset * rng.standard_normal(p)
    y = y * rng.uniform(0.5, 3.0, q) + offset * rng.standard_normal(q)
    return x, y


def stream(x, y, cuts, **kwargs):
    acc = SimilarityAccumulator(x.shape[1], y.shape[1], **kwargs)
    bounds = [0, *cuts, x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(x[a:b], y[a:b])
    return acc


# ----------------------------------------------------------------------------------------------------------------
# Invariances
# ----------------------------------------------------------------------------------------------------------------


def test_cca_family_is_one_for_invertible_affine_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)) + 5.0
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a = q @ np.diag(np.linspace(1.0, 2.0, 6))  # invertible, condition number 2
    y = x @ a + rng.standard_normal(6)
    res = compute_similarity(x, y)
    assert res.svcca_dims == (6, 6)  # balanced spectra: 99% of the variance needs every direction
    np.testing.assert_allclose(res.canonical_correlations, np.ones(6), atol=1e-10)
    for value in (res.mean_cca, res.svcca, res.pwcca):
        assert value == pytest.approx(1.0, abs=1e-10)


def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x, y = correlated_pair(rng, 300, 8, 5)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    base = compute_similarity(x, y, ["cka", "cka_debiased"])
    moved = compute_similarity(3.7 * x @ q + 11.0, y, ["cka", "cka_debiased"])
    assert moved.cka == pytest.approx(base.cka, abs=1e-12)
    assert moved.cka_debiased == pytest.approx(base.cka_debiased, abs=1e-12)
    same = compute_similarity(x, x)
    assert same.cka == pytest.approx(1.0, abs=1e-12)
    assert same.cka_debiased == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Agreement with oracles
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "q"), [(7, 12), (12, 7), (9, 9)])
def test_cca_family_matches_qr_oracle_and_subspace_angles(p, q):
    rng = np.random.default_rng(p * 100 + q)
    x, y = correlated_pair(rng, 800, p, q)
    res = compute_similarity(x, y)
    rho, _, _ = oracle_cca(x, y)
    np.testing.assert_allclose(res.canonical_correlations, rho, rtol=0, atol=1e-10)
    cos = np.sort(np.cos(scipy.linalg.subspace_angles(_centre(x), _centre(y))))[::-1]
    np.testing.assert_allclose(res.canonical_correlations, cos, rtol=0, atol=1e-10)
    assert res.mean_cca == pytest.approx(rho.mean(), abs=1e-10)
    assert res.pwcca == pytest.approx(oracle_pwcca(x, y), abs=1e-10)
    assert res.pwcca_side == ("x" if p <= q else "y")
    svcca, dims = oracle_svcca(x, y)
    assert res.svcca_dims == dims
    assert dims[0] < p and dims[1] < q  # the 99% truncation actually happens on these data
    assert res.svcca == pytest.approx(svcca, abs=1e-10)
    assert res.cka == pytest.approx(oracle_cka(x, y), abs=1e-10)
    assert res.cka_debiased == pytest.approx(oracle_cka_debiased(x, y), abs=1e-10)
    assert res.reliable and res.warning is None and not res.cca_refused


def test_independent_gaussians_mean_squared_correlation():
    # For independent Gaussian sides, E[sum rho^2] = p q / (n - 1) exactly, so the mean of the min(p, q) values of
    # rho^2 is max(p, q) / (n - 1).
    n, p, q = 2000, 40, 60
    means = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        res = compute_similarity(rng.standard_normal((n, p)), rng.standard_normal((n, q)), ["cca"])
        means.append(np.mean(res.canonical_correlations**2))
    assert np.mean(means) == pytest.approx(max(p, q) / (n - 1), rel=0.04)


def test_kornblith_published_demo():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    res = compute_similarity(x, y, ["cka", "cka_debiased"])
    assert round(res.cka, 5) == 0.55761
    assert round(res.cka_debiased, 5) == 0.51346


def test_debiased_cka_streamed_matches_gram_oracle():
    rng = np.random.default_rng(7)
    x, y = correlated_pair(rng, 500, 9, 13, offset=20.0)
    expected = oracle_cka_debiased(x, y)
    one_shot = compute_similarity(x, y, ["cka_debiased"]).cka_debiased
    uneven = stream(x, y, [1, 4, 60, 61, 333], block_bytes=8 * 22 * 7).finalize(["cka_debiased"]).cka_debiased
    assert one_shot == pytest.approx(expected, abs=1e-10)
    assert uneven == pytest.approx(expected, abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Dimensions, dead channels, chunking, precision
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_svcca_keeps_latent_dimension(k):
    rng = np.random.default_rng(k)
    n = 2000
    z = rng.standard_normal((n, k))
    x = z @ rng.standard_normal((k, 20)) + 1e-4 * rng.standard_normal((n, 20))
    y = z @ rng.standard_normal((k, 15)) + 1e-4 * rng.standard_normal((n, 15))
    # Equalise the latent variances seen by each side so no single direction falls under 1% of the variance.
    x = _centre(x) @ np.linalg.svd(_centre(x), full_matrices=False)[2].T
    x[:, :k] /= x[:, :k].std(axis=0)
    res = compute_similarity(x, y, ["svcca"])
    assert res.svcca_dims == (k, k) == oracle_svcca(x, y)[1]
    assert res.svcca == pytest.approx(1.0, abs=1e-6)


def test_dead_and_constant_channels_are_dropped_and_reported():
    rng = np.random.default_rng(3)
    x, y = correlated_pair(rng, 600, 6, 5)
    x_dead = np.column_stack([x[:, :2], np.zeros(600), x[:, 2:], np.full(600, 7.25)])
    y_dead = np.column_stack([np.full(600, -3.0), y])
    res = compute_similarity(x_dead, y_dead)
    ref = compute_similarity(x, y)
    assert (res.p, res.q, res.p_kept, res.q_kept) == (8, 6, 6, 5)
    np.testing.assert_allclose(res.canonical_correlations, oracle_cca(x, y)[0], atol=1e-10)
    for name in ALL_MEASURES:
        assert res.value(name) == pytest.approx(ref.value(name), abs=1e-10), name


def test_chunked_equals_one_shot():
    rng = np.random.default_rng(4)
    x, y = correlated_pair(rng, 1000, 11, 6, offset=50.0)
    one = compute_similarity(x, y)
    # Uneven chunks, and a block size that splits chunks into 5-row blocks inside the accumulator.
    res = stream(x, y, [3, 10, 11, 400, 999], block_bytes=5 * 8 * 17).finalize()
    np.testing.assert_allclose(res.canonical_correlations, one.canonical_correlations, rtol=0, atol=1e-12)
    for name in ALL_MEASURES:
        assert res.value(name) == pytest.approx(one.value(name), abs=1e-12), name
    assert res.n == 1000


def _relu_like(rng, n, p, dead=1):
    """ReLU of correlated Gaussians with large offsets; column scales span three orders of magnitude."""
    mix = rng.standard_normal((p, p)) / np.sqrt(p) + 0.7 * np.eye(p)
    g = rng.standard_normal((n, p)) @ mix
    offsets = np.concatenate([[-0.5, 0.0], np.full(p - 2, 40.0)])
    acts = np.maximum(g + offsets, 0.0) * np.logspace(-1.5, 1.5, p)
    acts[:, -dead:] = 0.0
    return acts


def _naive_float32_mean_cca(x32, y32):
    """Uncentred float32 moments, centred by subtraction in float32: what a careless streaming code would do."""
    n = np.float32(x32.shape[0])
    z = np.concatenate([x32, y32], axis=1)
    mu = z.mean(axis=0, dtype=np.float32)
    cov = (z.T @ z - n * np.outer(mu, mu)).astype(np.float64)
    p = x32.shape[1]
    keep = np.diag(cov) > 0
    kx, ky = keep[:p], keep[p:]
    cxx, cyy, cxy = cov[:p, :p][np.ix_(kx, kx)], cov[p:, p:][np.ix_(ky, ky)], cov[:p, p:][np.ix_(kx, ky)]
    wx = np.linalg.inv(np.linalg.cholesky(cxx))
    wy = np.linalg.inv(np.linalg.cholesky(cyy))
    return float(np.linalg.svd(wx @ cxy @ wy.T, compute_uv=False).mean())


def test_float32_input_gives_float64_accuracy_where_naive_float32_fails():
    rng = np.random.default_rng(5)
    n, p, q = 2000, 12, 9
    x32 = _relu_like(rng, n, p).astype(np.float32)
    y64 = _relu_like(rng, n, q)
    y64[:, :4] += 0.5 * x32[:, :4]  # some shared signal
    y32 = y64.astype(np.float32)
    x, y = x32.astype(np.float64), y32.astype(np.float64)

    res = stream(x32, y32, [700, 2100], block_bytes=8 * 21 * 256).finalize()
    assert (res.p_kept, res.q_kept) == (p - 1, q - 1)
    live_x, live_y = x[:, :-1], y[:, :-1]
    rho, _, _ = oracle_cca(live_x, live_y)
    np.testing.assert_allclose(res.canonical_correlations, rho, rtol=0, atol=1e-6)
    assert res.mean_cca == pytest.approx(rho.mean(), abs=1e-6)
    assert res.pwcca == pytest.approx(oracle_pwcca(live_x, live_y), abs=1e-6)
    assert res.svcca == pytest.approx(oracle_svcca(live_x, live_y)[0], abs=1e-6)
    assert res.cka == pytest.approx(oracle_cka(x, y), abs=1e-6)
    assert res.cka_debiased == pytest.approx(oracle_cka_debiased(x, y), abs=1e-6)

    # The same tolerance is out of reach for a naive float32 computation, so the test above can fail.
    naive = _naive_float32_mean_cca(x32[:, :-1], y32[:, :-1])
    assert abs(naive - rho.mean()) > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Reliability, errors, API details
# ----------------------------------------------------------------------------------------------------------------


def test_reliability_flag_below_ten_rows_per_channel():
    rng = np.random.default_rng(6)
    x, y = correlated_pair(rng, 150, 10, 20)
    res = compute_similarity(x, y)
    assert not res.reliable and not res.cca_refused
    assert "unreliable" in res.warning and "200" in res.warning
    assert res.mean_cca is not None and res.pwcca is not None and res.svcca is not None
    res.require_cca()  # flagged but not refused
    ok = compute_similarity(*correlated_pair(rng, 200, 10, 20))
    assert ok.reliable and ok.warning is None


@pytest.mark.parametrize("extra_rows", [0, 1])
def test_refusal_at_max_channels_plus_one_rows(extra_rows):
    rng = np.random.default_rng(8)
    n = 21 + extra_rows
    x, y = correlated_pair(rng, n, 10, 20)
    res = compute_similarity(x, y)
    assert res.cka is not None and res.cka_debiased is not None
    assert res.cka == pytest.approx(oracle_cka(x, y), abs=1e-10)
    if extra_rows == 0:
        assert res.cca_refused and not res.reliable and "refused" in res.warning
        assert res.mean_cca is res.svcca is res.pwcca is None
        assert res.canonical_correlations.size == 0
        # the fully whitened shape metric (alpha = 0) needs as many rows as CCA and is refused with it
        assert set(res.undefined) == {"cca", "svcca", "pwcca", "shape_0"}
        with pytest.raises(InsufficientSamplesError):
            res.require_cca()
    else:
        assert not res.cca_refused and res.mean_cca is not None


def test_refusal_counts_kept_channels_not_raw_channels():
    rng = np.random.default_rng(9)
    x, y = correlated_pair(rng, 12, 4, 4)
    x = np.column_stack([x, np.zeros((12, 20))])  # 24 raw channels, 4 alive: 12 rows are enough to compute
    res = compute_similarity(x, y)
    assert res.p_kept == 4 and not res.cca_refused and not res.reliable


def test_all_constant_side_refuses_cca_but_reports_cka_as_undefined():
    rng = np.random.default_rng(10)
    res = compute_similarity(np.ones((50, 3)), rng.standard_normal((50, 4)))
    assert res.cca_refused and res.p_kept == 0
    assert res.cka is None and "cka" in res.undefined


def test_subset_of_measures_leaves_others_none():
    rng = np.random.default_rng(11)
    x, y = correlated_pair(rng, 300, 5, 5)
    res = compute_similarity(x, y, ["cka"])
    assert res.cka is not None
    assert res.mean_cca is res.svcca is res.pwcca is res.cka_debiased is None
    assert res.undefined == {}
    with pytest.raises(ValueError, match="unknown measure"):
        compute_similarity(x, y, ["cca", "nope"])


@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("row", [57, 13])  # in a later chunk / in the first chunk, which sets the shift
def test_non_finite_values_are_detected_with_their_side(side, row):
    rng = np.random.default_rng(12)
    x, y = correlated_pair(rng, 100, 3, 4)
    (x if side == "x" else y)[row, 1] = np.nan if side == "x" else np.inf
    with pytest.raises(NonFiniteInputError) as info:
        stream(x, y, [50], block_bytes=8 * 7 * 4)
    assert info.value.side == side
    assert info.value.row == row


def test_update_validates_shapes_and_dtypes():
    acc = SimilarityAccumulator(3, 2)
    with pytest.raises(ValueError, match="columns"):
        acc.update(np.zeros((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="row counts"):
        acc.update(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="real numbers"):
        acc.update(np.zeros((4, 3), dtype=complex), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no rows"):
        acc.finalize()


def test_working_memory_is_bounded_by_the_block_size():
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((5000, 6)), rng.standard_normal((5000, 4))
    acc = SimilarityAccumulator(6, 4, block_bytes=8 * 10 * 64)
    acc.update(x, y)
    assert acc._buf.shape == (64, 10)  # a 5000-row chunk is processed in 64-row blocks
    assert acc.finalize().mean_cca == pytest.approx(oracle_cca(x, y)[0].mean(), abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Extreme magnitudes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gram_precision, scale_x, scale_y", [
    *(("float64", *scales) for scales in [(1e150, 1e150), (1e-150, 1e-150), (1e300, 1e-300), (2.0 ** -1000, 3e200)]),
    # float32 blocks: powers of two only, which leave the float32 roundings as they were (1e150 = c 2^k, c != 1,
    # would round every value differently, a change within the float32 path's own error bound, not the engine's)
    *(("float32", *scales) for scales in [(2.0 ** 500, 2.0 ** 500), (2.0 ** -500, 2.0 ** -500), (2.0 ** 990, 2.0 ** -990)]),
])
def test_every_measure_is_the_same_at_any_magnitude_without_a_warning(scale_x, scale_y, gram_precision):
    """Every measure is invariant to scaling one side; at 1e±150 the fourth powers behind debiased CKA (and at
    1e±300 the squares) leave float64, so the engine must bring the data to magnitude 1 itself, silently."""
    x, y = correlated_pair(np.random.default_rng(11), 400, 12, 9)
    reference = stream(x, y, [150], gram_precision=gram_precision).finalize(ALL_MEASURES)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = stream(x * scale_x, y * scale_y, [150], gram_precision=gram_precision).finalize(ALL_MEASURES)
    for measure in ALL_MEASURES:
        # the inputs' own rounding (x * 1e150 is not exact) moves the measures by far less than this
        assert scaled.value(measure) == pytest.approx(reference.value(measure), abs=1e-9), measure


def test_activations_of_ordinary_magnitude_are_not_rescaled():
    """Only data beyond 2^±64 take the extra pass: ordinary activations give the very same numbers as before."""
    x, y = correlated_pair(np.random.default_rng(12), 64, 5, 4)
    assert side_scales(x * 1e15, y * 1e-15) is None
    assert side_scales(np.zeros((3, 2)), y) is None  # a constant side is left to the checks that name it
    scale_x, scale_y = side_scales(x * 1e30, y)
    assert scale_y == 1.0 and np.frexp(scale_x)[0] == 0.5 and 0.5 <= np.ptp(x * 1e30 * scale_x, axis=0).max() < 1
