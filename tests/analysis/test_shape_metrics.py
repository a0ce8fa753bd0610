"""Procrustes similarity and the angular shape metrics (analysis/shape_metrics.py) against textbook float64
implementations on full matrices, their invariances and metric axioms, and their plumbing through the engine,
the channel-draw layer comparison and the `medtransfer similarity` command."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from medtransfer.analysis.shape_metrics import ALIGNMENT_MEASURES, PROCRUSTES, SHAPE_ALPHAS
from medtransfer.analysis.similarity import ALL_MEASURES, compute_similarity
from medtransfer.analysis.similarity_command import add_arguments, run
from medtransfer.analysis.streaming import compare_pair_layer

TOL = 1e-6


def _pair(rng, n=400, p=6, q=5, shared=3, noise=0.7, offset=3.0):
    z = rng.standard_normal((n, shared))
    x = z @ rng.standard_normal((shared, p)) + noise * rng.standard_normal((n, p)) + offset
    y = z @ rng.standard_normal((shared, q)) + noise * rng.standard_normal((n, q)) - offset
    return x, y


def _centre(a):
    return a - a.mean(axis=0)


def _nuclear(m):
    return float(np.linalg.svd(m, compute_uv=False).sum())


def oracle_procrustes(x, y):
    """|X^T Y|_* / (|X|_F |Y|_F) on centred data (nuclear norm by numpy's SVD)."""
    x, y = _centre(x), _centre(y)
    return _nuclear(x.T @ y) / (np.linalg.norm(x) * np.linalg.norm(y))


def oracle_procrustes_distance_sq(x, y):
    """Ding, Denain & Steinhardt (2021): min over orthogonal Q of |X/|X|_F - Y Q/|Y|_F|_F^2, the smaller side
    zero-padded; Q = U V^T from the SVD of the padded Y^T X (Schönemann's solution)."""
    x, y = _centre(x), _centre(y)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    u, _, vt = np.linalg.svd(y.T @ x)
    return float(np.linalg.norm(x - y @ (u @ vt)) ** 2)


def oracle_shape_theta(x, y, alpha):
    """theta = arccos(|X_a^T Y_a|_* / (|X_a|_F |Y_a|_F)), X_a = X_c (alpha I + (1 - alpha) T_x)^(-1/2) with T_x the
    covariance rescaled to mean eigenvalue 1 (the module's convention), inverse square root by scipy's sqrtm."""

    def whiten(a):
        a = _centre(a)
        sigma = a.T @ a / len(a)
        t = sigma * (a.shape[1] / np.trace(sigma))
        root = np.real(scipy.linalg.sqrtm(alpha * np.eye(a.shape[1]) + (1.0 - alpha) * t))
        return a @ np.linalg.inv(root)

    xa, ya = whiten(x), whiten(y)
    cosine = _nuclear(xa.T @ ya) / (np.linalg.norm(xa) * np.linalg.norm(ya))
    return math.acos(min(1.0, cosine))


def oracle_canonical_correlations(x, y, rtol=1e-10):
    """Independent CCA: singular values of Q_x^T Q_y, Q = orthonormal bases of the centred column spaces (by SVD,
    keeping singular values > sqrt(rtol) * the largest, i.e. covariance eigenvalues > rtol * the largest)."""

    def basis(a):
        u, s, _ = np.linalg.svd(_centre(a), full_matrices=False)
        return u[:, s > math.sqrt(rtol) * s[0]]

    qx, qy = basis(x), basis(y)
    return np.linalg.svd(qx.T @ qy, compute_uv=False), qx.shape[1], qy.shape[1]


def theta_of(value):
    """The angle back from the reported similarity 1 - 2 theta / pi."""
    return (1.0 - value) * math.pi / 2.0


def test_the_measures_are_public_and_reported_as_similarities():
    assert set(ALIGNMENT_MEASURES) <= set(ALL_MEASURES)
    assert ALIGNMENT_MEASURES == ("procrustes_similarity", "shape_0", "shape_0.5", "shape_1")
    from medtransfer.analysis.plots import MEASURE_NAMES, MEASURE_RANGES

    for name in ALIGNMENT_MEASURES:
        assert MEASURE_RANGES[name] == (0.0, 1.0) and name in MEASURE_NAMES


@pytest.mark.parametrize("p, q", [(6, 5), (4, 4), (3, 7)])
def test_procrustes_matches_the_textbook_and_the_distance_convention(p, q):
    x, y = _pair(np.random.default_rng(p * 10 + q), p=p, q=q)
    res = compute_similarity(x, y)
    assert res.value(PROCRUSTES) == pytest.approx(oracle_procrustes(x, y), abs=TOL)
    # similarity = 1 - d^2 / 2 with Ding et al.'s squared distance
    assert res.value(PROCRUSTES) == pytest.approx(1.0 - oracle_procrustes_distance_sq(x, y) / 2.0, abs=TOL)


@pytest.mark.parametrize("alpha_name", list(SHAPE_ALPHAS))
@pytest.mark.parametrize("p, q", [(6, 5), (4, 4), (3, 7)])
def test_shape_metric_matches_the_full_matrix_oracle(alpha_name, p, q):
    x, y = _pair(np.random.default_rng(p * 100 + q), p=p, q=q)
    value = compute_similarity(x, y).value(alpha_name)
    assert theta_of(value) == pytest.approx(oracle_shape_theta(x, y, SHAPE_ALPHAS[alpha_name]), abs=TOL)


@pytest.mark.parametrize("p, q", [(6, 5), (4, 4), (3, 7)])
def test_alpha_zero_is_the_sum_of_canonical_correlations_over_the_geometric_mean_rank(p, q):
    x, y = _pair(np.random.default_rng(7 + p + q), p=p, q=q)
    rho, rx, ry = oracle_canonical_correlations(x, y)
    res = compute_similarity(x, y)
    assert math.cos(theta_of(res.value("shape_0"))) == pytest.approx(rho.sum() / math.sqrt(rx * ry), abs=TOL)
    if p == q:  # then it is the mean canonical correlation: netrep's LinearMetric(alpha=0, score_method="angular")
        assert math.cos(theta_of(res.value("shape_0"))) == pytest.approx(res.mean_cca, abs=TOL)


def test_alpha_zero_on_rank_deficient_data_drops_the_null_directions_like_cca():
    rng = np.random.default_rng(11)
    x, y = _pair(rng, n=500, p=5, q=6)
    x = np.column_stack([x, x[:, 0] - 2.0 * x[:, 1]])  # rank 5 of 6 columns
    y = np.column_stack([y, y[:, :2] @ [0.5, 1.5], y[:, 3]])  # rank 6 of 8 columns
    rho, rx, ry = oracle_canonical_correlations(x, y)
    assert (rx, ry) == (5, 6)
    res = compute_similarity(x, y)
    assert res.cca_ranks == (5, 6)
    np.testing.assert_allclose(res.canonical_correlations, rho, atol=TOL)
    assert math.cos(theta_of(res.value("shape_0"))) == pytest.approx(rho.sum() / math.sqrt(rx * ry), abs=TOL)


def test_alpha_one_is_the_angular_procrustes_metric():
    x, y = _pair(np.random.default_rng(5), p=6, q=4)
    res = compute_similarity(x, y)
    assert theta_of(res.value("shape_1")) == pytest.approx(math.acos(oracle_procrustes(x, y)), abs=TOL)
    assert theta_of(res.value("shape_1")) == pytest.approx(math.acos(res.value(PROCRUSTES)), abs=TOL)


def _netrep_angle(x, y, alpha):
    """Williams et al.'s netrep, from its documented definitions (not its code): centre columns, partially whiten
    with Z = alpha I + (1 - alpha) (X^T X)^(-1/2) (eigendecomposition), then theta = arccos(|X_Z^T Y_Z|_* /
    (|X_Z|_F |Y_Z|_F)) (the optimal orthogonal alignment, "angular" score). Equal widths, so no zero-padding."""

    def whiten(a):
        a = _centre(a)
        lam, vec = np.linalg.eigh(a.T @ a)
        return a @ ((vec * (alpha + (1.0 - alpha) / np.sqrt(lam))) @ vec.T)

    xa, ya = whiten(x), whiten(y)
    return math.acos(min(1.0, _nuclear(xa.T @ ya) / (np.linalg.norm(xa) * np.linalg.norm(ya))))


@pytest.mark.parametrize("alpha_name", ["shape_0", "shape_1"])
def test_agrees_with_netreps_definition_where_the_whitening_forms_coincide(alpha_name):
    x, y = _pair(np.random.default_rng(21), n=300, p=5, q=5)
    value = compute_similarity(x, y).value(alpha_name)
    assert theta_of(value) == pytest.approx(_netrep_angle(x, y, SHAPE_ALPHAS[alpha_name]), abs=TOL)


def test_invariant_to_orthogonal_maps_isotropic_scaling_and_translation():
    rng = np.random.default_rng(9)
    x, y = _pair(rng, p=6, q=5)
    ref = compute_similarity(x, y, ALIGNMENT_MEASURES)
    qx, qy = ortho_group.rvs(6, random_state=1), ortho_group.rvs(5, random_state=2)
    variants = {
        "orthogonal x": (x @ qx, y), "orthogonal y": (x, y @ qy), "orthogonal both": (x @ qx, y @ qy),
        "scale": (7.3 * x, 1e-3 * y), "translate": (x + rng.standard_normal(6) * 50.0, y - 20.0),
    }
    for label, (a, b) in variants.items():
        got = compute_similarity(a, b, ALIGNMENT_MEASURES)
        for name in ALIGNMENT_MEASURES:
            assert got.value(name) == pytest.approx(ref.value(name), abs=TOL), (label, name)


def test_identical_and_rotated_copies_are_fully_similar():
    x, _ = _pair(np.random.default_rng(3), p=5, q=5)
    for other in (x, x @ ortho_group.rvs(5, random_state=4) * 3.0 + 1.0):
        res = compute_similarity(x, other, ALIGNMENT_MEASURES)
        for name in ALIGNMENT_MEASURES:
            assert res.value(name) == pytest.approx(1.0, abs=TOL), name


@pytest.mark.parametrize("alpha_name", list(SHAPE_ALPHAS))
def test_angular_metric_axioms(alpha_name):
    rng = np.random.default_rng(13)
    n = 300
    for _ in range(8):
        z = rng.standard_normal((n, 3))
        # three representations sharing a latent, of different widths (zero-padding is implicit)
        reps = [z @ rng.standard_normal((3, width)) + rng.uniform(0.2, 1.5) * rng.standard_normal((n, width))
                for width in (4, 5, 6)]
        theta = {(i, j): theta_of(compute_similarity(reps[i], reps[j], [alpha_name]).value(alpha_name))
                 for i in range(3) for j in range(3) if i != j}
        for (i, j), value in theta.items():
            assert value == pytest.approx(theta[(j, i)], abs=1e-9)  # symmetry
            assert 0.0 <= value <= math.pi / 2 + 1e-12
        for i, j, k in ((0, 1, 2), (1, 0, 2), (0, 2, 1)):
            assert theta[(i, k)] <= theta[(i, j)] + theta[(j, k)] + 1e-9  # triangle inequality


def test_streamed_in_chunks_equals_one_shot():
    x, y = _pair(np.random.default_rng(17), n=900, p=7, q=4, offset=80.0)
    one = compute_similarity(x, y)
    chunked = compute_similarity(x, y, chunk_rows=37)
    for name in ALIGNMENT_MEASURES:
        assert chunked.value(name) == pytest.approx(one.value(name), abs=1e-10), name


def test_too_few_rows_refuse_only_the_fully_whitened_shape_metric():
    x, y = _pair(np.random.default_rng(19), n=6, p=6, q=5)
    res = compute_similarity(x, y)
    assert res.cca_refused and res.value("shape_0") is None and "refused" in res.undefined["shape_0"]
    for name in ("procrustes_similarity", "shape_0.5", "shape_1"):
        assert res.value(name) is not None and 0.0 <= res.value(name) <= 1.0, name


def test_a_constant_side_leaves_the_measures_undefined():
    x, _ = _pair(np.random.default_rng(23), n=50)
    res = compute_similarity(x, np.ones((50, 3)), ALIGNMENT_MEASURES)
    for name in ALIGNMENT_MEASURES:
        assert res.value(name) is None and name in res.undefined, name


def test_channel_draws_of_a_layer_get_the_new_measures():
    rng = np.random.default_rng(29)
    x, y = _pair(rng, n=64 * 16, p=12, q=12)
    measures = list(ALIGNMENT_MEASURES) + ["cka"]
    same = compare_pair_layer(x, x, 16, measures, channel_sample=8, channel_repeats=3,
                              rng_channels=np.random.default_rng(0))
    other = compare_pair_layer(x, y, 16, measures, channel_sample=8, channel_repeats=3,
                               rng_channels=np.random.default_rng(0))
    assert same.draws == other.draws == 3
    for name in ALIGNMENT_MEASURES:
        assert same.values[name] == pytest.approx(1.0, abs=TOL), name
        assert 0.0 < other.values[name] < 1.0 and other.draw_sd[name] is not None, name


def test_the_similarity_command_prints_them(tmp_path, capsys):
    x, y = _pair(np.random.default_rng(31), n=300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ref = compute_similarity(x, y)
    run(parser.parse_args([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--json"]))
    data = json.loads(capsys.readouterr().out)
    for name in ALIGNMENT_MEASURES:
        assert data[name] == pytest.approx(ref.value(name), abs=1e-12), name
    run(parser.parse_args([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                           "--measures", "procrustes_similarity,shape_0.5"]))
    table = capsys.readouterr().out
    assert "(procrustes_similarity)" in table and "(shape_0.5)" in table and "(cca)" not in table
