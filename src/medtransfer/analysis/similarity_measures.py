"""The measures' algebra on centred second- and fourth-moment statistics (`CentredBlocks`): linear CKA and its
debiased form, the channels kept, and the CCA family (mean CCA, SVCCA, PWCCA). Pure float64 functions of the
blocks and of their shared decompositions (`spectra`); `similarity.SimilarityAccumulator` accumulates the
statistics and calls them when it finalises (see similarity.py's docstring for the definitions and tolerances)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medtransfer.analysis.spectra import Spectra, concurrently, mm, numerical_rank, singular_values

__all__ = ["CentredBlocks", "cca_family", "cka", "kept_channels"]


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



def _svcca_dims(lam: np.ndarray, threshold: float) -> int:
    """Fewest leading principal directions holding ``threshold`` of the variance (sum of ``lam``)."""
    cum = np.cumsum(lam)
    # The slack keeps an exact 99% split (e.g. synthetic data) from flipping on rounding.
    return int(min(len(lam), np.searchsorted(cum, threshold * cum[-1] * (1.0 - 1e-12)) + 1))


def cca_family(
    spectra: Spectra,
    n_kept: tuple[int, int],
    wanted: set[str],
    eig_rtol: float,
    svcca_threshold: float,
) -> dict[str, object]:
    """Mean CCA, SVCCA and PWCCA from the shared `spectra.Spectra` of the kept channels (``n_kept`` = (p_k, q_k)).

    With S_xx = V_x L_x V_x^T and S_yy = V_y L_y V_y^T restricted to the non-negligible eigen-directions
    (`spectra.numerical_rank`), the whitened cross-covariance is M = L_x^{-1/2} V_x^T S_xy V_y L_y^{-1/2} = U P W^T
    (the row count's 1/(n-1) cancels); P are the canonical correlations; canonical weights are A = V_x L_x^{-1/2} U
    (X side) and B = V_y L_y^{-1/2} W (Y side). Their values come from one eigen-decomposition of M M^T or M^T M
    (`spectra.singular_values`), which also gives U or W where PWCCA needs them.

    SVCCA keeps the top kx, ky principal directions of each side. Those reduced sides are already white in the same
    bases, so their whitened cross-covariance is the leading block M[:kx, :ky]; only its singular values are needed.

    PWCCA (Morcos et al. 2018) on the side with fewer kept channels (ties: X), say X with canonical variates
    h_i = X_c a_i of unit variance:
        alpha_i = sum_j |Cov(x_j, h_i)|,   Cov(x, h) = C_xx A ∝ V_x L_x^{1/2} U   (shape (p_kept, k)),
        PWCCA = sum_i alpha_i rho_i / sum_i alpha_i,
    over the kept (centred) channels x_j and all k = min(rank_x, rank_y) canonical pairs. google/svcca's
    ``compute_pwcca`` instead adds the neuron means back to the canonical directions, orthonormalises those
    uncentred directions with QR and weights by |projections| of the uncentred activations, so it depends on the
    channel means and on the QR basis; this version is invariant to shifting the data.
    """
    rank_x, rank_y = numerical_rank(spectra.lam_x, eig_rtol), numerical_rank(spectra.lam_y, eig_rtol)
    lam_x, lam_y = spectra.lam_x[:rank_x], spectra.lam_y[:rank_y]
    sx, sy = 1.0 / np.sqrt(lam_x), 1.0 / np.sqrt(lam_y)
    m = (sx[:, None] * spectra.rotated[:rank_x, :rank_y]) * sy[None, :]
    side = "x" if n_kept[0] <= n_kept[1] else "y"
    vectors = ("left" if side == "x" else "right") if "pwcca" in wanted else None
    svcca_dims = (_svcca_dims(lam_x, svcca_threshold), _svcca_dims(lam_y, svcca_threshold)) if "svcca" in wanted \
        else None
    tasks = [lambda: singular_values(m, vectors)]
    if svcca_dims is not None and svcca_dims != (rank_x, rank_y):  # SVCCA's own, smaller decomposition, alongside
        tasks.append(lambda: singular_values(m[: svcca_dims[0], : svcca_dims[1]])[0])
    (rho, basis), *truncated = concurrently(*tasks)
    rho = np.clip(rho, 0.0, 1.0)
    out: dict[str, object] = {"canonical_correlations": rho, "cca_ranks": (rank_x, rank_y)}
    if "cca" in wanted:
        out["mean_cca"] = float(np.mean(rho))
    if svcca_dims is not None:
        out["svcca"] = float(np.mean(np.clip(truncated[0], 0.0, 1.0) if truncated else rho))
        out["svcca_dims"] = svcca_dims
    if basis is not None:
        v, lam = (spectra.v_x[:, :rank_x], lam_x) if side == "x" else (spectra.v_y[:, :rank_y], lam_y)
        alpha = np.abs(mm(v, np.sqrt(lam)[:, None] * basis)).sum(axis=0)
        out["pwcca"] = float(alpha @ rho / alpha.sum())
        out["pwcca_side"] = side
    return out
