"""The measures' algebra on centred second- and fourth-moment statistics (`CentredBlocks`): linear CKA and its
debiased form, the channels kept, and the CCA family (mean CCA, SVCCA, PWCCA). Pure float64 functions of the
blocks; `similarity.SimilarityAccumulator` accumulates the statistics and calls them when it finalises (see
similarity.py's docstring for the definitions and tolerances)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dgemm

__all__ = ["CentredBlocks", "cca_family", "cka", "kept_channels", "mm"]


@dataclass(frozen=True)
class CentredBlocks:
    """Centred statistics: ``c_i = x_i - mean_x``, ``d_i = y_i - mean_y``.

    sxx ``(p, p)`` = sum c_i c_i^T, syy ``(q, q)``, sxy ``(p, q)``; sum_rt = sum |c_i|^2 |d_i|^2,
    sum_rr = sum |c_i|^4, sum_tt = sum |d_i|^4.
    """

    n: int
    sxx: np.ndarray
    syy: np.ndarray
    sxy: np.ndarray
    sum_rt: float
    sum_rr: float
    sum_tt: float



def cka(blocks: CentredBlocks, wanted: set[str], undefined: dict[str, str]) -> dict[str, float | None]:
    """Linear CKA = |C_xy|_F^2 / (|C_xx|_F |C_yy|_F) and its debiased version (Kornblith et al. 2019).

    Debiased: each |C_uv|_F^2 is replaced by n(n-3) times the unbiased HSIC estimator of Song et al. (2012) with
    linear kernels, which for centred features reduces to
        hsic(u, v) = |S_uv|_F^2 - n/(n-2) sum_i |c_i|^2 |d_i|^2 + (sum_i |c_i|^2)(sum_i |d_i|^2) / ((n-1)(n-2)),
    and CKA_debiased = hsic(x, y) / sqrt(hsic(x, x) hsic(y, y)) (same as ``feature_space_linearcka(debiased=True)``).
    """
    n = blocks.n
    out: dict[str, float | None] = {}
    nxy = float(np.sum(blocks.sxy * blocks.sxy))
    nxx = float(np.sum(blocks.sxx * blocks.sxx))
    nyy = float(np.sum(blocks.syy * blocks.syy))
    if "cka" in wanted:
        if nxx > 0.0 and nyy > 0.0:
            out["cka"] = nxy / math.sqrt(nxx * nyy)
        else:
            out["cka"] = None
            undefined["cka"] = "one side has no variance (all channels constant)"
    if "cka_debiased" in wanted:
        out["cka_debiased"] = None
        if n < 4:
            undefined["cka_debiased"] = f"debiased CKA needs at least 4 rows, got n={n}"
            return out
        tr_x, tr_y = float(np.trace(blocks.sxx)), float(np.trace(blocks.syy))

        def hsic(frob2: float, sum_uv: float, tr_u: float, tr_v: float) -> float:
            return frob2 - n / (n - 2.0) * sum_uv + tr_u * tr_v / ((n - 1.0) * (n - 2.0))

        hxy = hsic(nxy, blocks.sum_rt, tr_x, tr_y)
        hxx = hsic(nxx, blocks.sum_rr, tr_x, tr_x)
        hyy = hsic(nyy, blocks.sum_tt, tr_y, tr_y)
        if hxx > 0.0 and hyy > 0.0:
            out["cka_debiased"] = hxy / math.sqrt(hxx * hyy)
        else:
            undefined["cka_debiased"] = "the unbiased self-similarity of one side is not positive (too few rows or no variance)"
    return out


def kept_channels(blocks: CentredBlocks, rtol: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    keeps = []
    for s in (blocks.sxx, blocks.syy):
        var = np.diag(s)
        top = float(var.max())
        keeps.append(np.flatnonzero(var > rtol * top) if top > 0.0 else np.zeros(0, dtype=np.intp))
    return len(keeps[0]), len(keeps[1]), keeps[0], keeps[1]



def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (2-D ``a``; 2-D or 1-D ``b``) through SciPy's BLAS, like the accumulation (see ``_add_block``).

    C-ordered operands are passed as their Fortran-ordered transposes with the transpose flag, so nothing is copied.
    """
    b2 = b[:, None] if b.ndim == 1 else b
    ta, tb = not a.flags.f_contiguous, not b2.flags.f_contiguous
    out = dgemm(1.0, a.T if ta else a, b2.T if tb else b2, trans_a=ta, trans_b=tb)
    return out[:, 0] if b.ndim == 1 else out


def _whiten_basis(s: np.ndarray, eig_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition ``s = V diag(lam) V^T`` restricted to non-negligible eigenvalues, descending.

    Returns ``lam`` shape ``(r,)`` and ``V`` shape ``(k, r)``.
    """
    # Divide and conquer ("evd") is markedly faster than the default MRRR driver when all eigenpairs are needed.
    lam, vec = scipy.linalg.eigh(s, check_finite=False, driver="evd")
    lam, vec = lam[::-1], vec[:, ::-1]
    r = int(np.count_nonzero(lam > eig_rtol * lam[0])) if lam[0] > 0 else 0
    return lam[:r], vec[:, :r]


def _svd(m: np.ndarray, compute_uv: bool = True):
    try:
        return scipy.linalg.svd(m, full_matrices=False, compute_uv=compute_uv, check_finite=False)
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        return scipy.linalg.svd(
            m, full_matrices=False, compute_uv=compute_uv, check_finite=False, lapack_driver="gesvd"
        )


def _svcca_dims(lam: np.ndarray, threshold: float) -> int:
    """Fewest leading principal directions holding ``threshold`` of the variance (sum of ``lam``)."""
    cum = np.cumsum(lam)
    # The slack keeps an exact 99% split (e.g. synthetic data) from flipping on rounding.
    return int(min(len(lam), np.searchsorted(cum, threshold * cum[-1] * (1.0 - 1e-12)) + 1))


def cca_family(
    blocks: CentredBlocks,
    keep_x: np.ndarray,
    keep_y: np.ndarray,
    wanted: set[str],
    eig_rtol: float,
    svcca_threshold: float,
) -> dict[str, object]:
    """Mean CCA, SVCCA and PWCCA from one eigen-decomposition per side and one SVD.

    With C_xx = V_x L_x V_x^T and C_yy = V_y L_y V_y^T (kept channels, non-negligible eigen-directions, descending)
    the whitened cross-covariance is M = L_x^{-1/2} V_x^T C_xy V_y L_y^{-1/2} = U S W^T; S are the canonical
    correlations; canonical weights are A = V_x L_x^{-1/2} U (X side) and B = V_y L_y^{-1/2} W (Y side).

    SVCCA keeps the top kx, ky principal directions of each side. Those reduced sides are already white in the same
    bases, so their whitened cross-covariance is the leading block M[:kx, :ky]; only its singular values are needed.

    PWCCA (Morcos et al. 2018) on the side with fewer kept channels (ties: X), say X with canonical variates
    h_i = X_c a_i of unit variance:
        alpha_i = sum_j |Cov(x_j, h_i)|,   Cov(x, h) = C_xx A = V_x L_x^{1/2} U   (shape (p_kept, k)),
        PWCCA = sum_i alpha_i rho_i / sum_i alpha_i,
    over the kept (centred) channels x_j and all k = min(rank_x, rank_y) canonical pairs. google/svcca's
    ``compute_pwcca`` instead adds the neuron means back to the canonical directions, orthonormalises those
    uncentred directions with QR and weights by |projections| of the uncentred activations, so it depends on the
    channel means and on the QR basis; this version is invariant to shifting the data.
    """
    n1 = blocks.n - 1.0
    cxx = blocks.sxx[np.ix_(keep_x, keep_x)] / n1
    cyy = blocks.syy[np.ix_(keep_y, keep_y)] / n1
    cxy = blocks.sxy[np.ix_(keep_x, keep_y)] / n1
    lam_x, v_x = _whiten_basis(cxx, eig_rtol)
    lam_y, v_y = _whiten_basis(cyy, eig_rtol)
    sx, sy = 1.0 / np.sqrt(lam_x), 1.0 / np.sqrt(lam_y)
    m = (sx[:, None] * mm(mm(v_x.T, cxy), v_y)) * sy[None, :]
    u, rho, wt = _svd(m)
    rho = np.clip(rho, 0.0, 1.0)
    out: dict[str, object] = {
        "canonical_correlations": rho,
        "cca_ranks": (len(lam_x), len(lam_y)),
    }
    if "cca" in wanted:
        out["mean_cca"] = float(np.mean(rho))
    if "svcca" in wanted:
        kx, ky = _svcca_dims(lam_x, svcca_threshold), _svcca_dims(lam_y, svcca_threshold)
        if kx == len(lam_x) and ky == len(lam_y):
            rho_sv = rho
        else:
            rho_sv = np.clip(_svd(m[:kx, :ky], compute_uv=False), 0.0, 1.0)
        out["svcca"] = float(np.mean(rho_sv))
        out["svcca_dims"] = (kx, ky)
    if "pwcca" in wanted:
        side = "x" if len(keep_x) <= len(keep_y) else "y"
        k = len(rho)
        if side == "x":
            cov_nh = mm(v_x, np.sqrt(lam_x)[:, None] * u[:, :k])
        else:
            cov_nh = mm(v_y, np.sqrt(lam_y)[:, None] * wt[:k].T)
        alpha = np.abs(cov_nh).sum(axis=0)
        out["pwcca"] = float(alpha @ rho / alpha.sum())
        out["pwcca_side"] = side
    return out
