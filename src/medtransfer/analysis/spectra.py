"""The decompositions every whitened or aligned measure shares, computed once per finalisation (pure float64).

On wide layers the finalisation is a handful of dense decompositions of ``(p, p)``, ``(q, q)`` and ``(p, q)``
matrices, so each one counts: one symmetric eigen-decomposition per side serves the CCA family (whitening, SVCCA's
principal directions, PWCCA's weights) and every shape metric, and the cross block is rotated into those bases
once (`Spectra`). Singular values come from the eigenvalues of the smaller Gram matrix where only a mean of them is
needed (`singular_values`), and from an SVD where a sum of possibly tiny ones is (`nuclear_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dgemm, dsyrk

__all__ = ["Spectra", "mm", "nuclear_norm", "numerical_rank", "side_spectra", "singular_values"]


def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (2-D ``a``; 2-D or 1-D ``b``) through SciPy's BLAS, like the accumulation (one OpenBLAS, see
    ``SimilarityAccumulator._add_block``).

    C-ordered operands are passed as their Fortran-ordered transposes with the transpose flag, so nothing is copied.
    """
    b2 = b[:, None] if b.ndim == 1 else b
    ta, tb = not a.flags.f_contiguous, not b2.flags.f_contiguous
    out = dgemm(1.0, a.T if ta else a, b2.T if tb else b2, trans_a=ta, trans_b=tb)
    return out[:, 0] if b.ndim == 1 else out


@dataclass(frozen=True)
class Spectra:
    """``S_xx = V_x diag(lam_x) V_x^T``, ``S_yy = V_y diag(lam_y) V_y^T`` over the kept channels, and the cross block in
    those bases.

    lam_x ``(p_k,)``, lam_y ``(q_k,)``: eigenvalues, descending, rounding negatives clipped to 0; v_x ``(p_k, p_k)``,
    v_y ``(q_k, q_k)``: the eigenvectors; rotated ``(p_k, q_k)`` = ``V_x^T S_xy V_y``.
    """

    lam_x: np.ndarray
    v_x: np.ndarray
    lam_y: np.ndarray
    v_y: np.ndarray
    rotated: np.ndarray


def _eigh_descending(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Divide and conquer ("evd") is markedly faster than the default MRRR driver when all eigenpairs are needed.
    lam, vec = scipy.linalg.eigh(s, check_finite=False, driver="evd")
    return np.clip(lam[::-1], 0.0, None), vec[:, ::-1]


def side_spectra(sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> Spectra:
    """`Spectra` of the kept channels' scatter blocks ``(p_k, p_k)``, ``(q_k, q_k)``, ``(p_k, q_k)``."""
    lam_x, v_x = _eigh_descending(sxx)
    lam_y, v_y = _eigh_descending(syy)
    return Spectra(lam_x, v_x, lam_y, v_y, mm(mm(v_x.T, sxy), v_y))


def numerical_rank(lam: np.ndarray, eig_rtol: float) -> int:
    """Eigen-directions with eigenvalue ``> eig_rtol * lam[0]`` (``lam`` descending); 0 when ``lam[0] <= 0``.

    Cross-product methods square the condition number, so an eigenvalue below about ``1e-12 * lam[0]`` carries a
    relative error of percents in float64, and whitening by it would turn rounding noise into correlation.
    """
    return int(np.count_nonzero(lam > eig_rtol * lam[0])) if len(lam) and lam[0] > 0 else 0


def _gram_upper(m: np.ndarray, left: bool) -> np.ndarray:
    """Upper triangle of ``m m^T`` (left) or ``m^T m`` through ``dsyrk``, reading ``m`` without a copy."""
    if m.flags.f_contiguous:
        return dsyrk(1.0, m, trans=0 if left else 1)
    # The transpose of a C-ordered matrix is Fortran-ordered: (m^T)^T (m^T) = m m^T.
    return dsyrk(1.0, np.ascontiguousarray(m).T, trans=1 if left else 0)


def singular_values(m: np.ndarray, vectors: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``k = min(m.shape)`` singular values of ``m`` ``(a, b)``, descending, and optionally its ``"left"``
    ``(a, k)`` or ``"right"`` ``(b, k)`` singular vectors (else None), from one symmetric eigen-decomposition of
    ``m m^T`` or ``m^T m`` (the smaller when no vectors are asked for).

    About twice as fast as an SVD with vectors. Accuracy: the Gram's eigenvalues carry an absolute error of a few
    ``2^-53 |m|_2^2``, so ``sigma_i`` is off by at most about ``2^-53 |m|_2^2 / sigma_i``, and by ``2^-26.5 |m|_2``
    when ``sigma_i`` is 0. For canonical correlations (``|m|_2 <= 1``) that is below ``1e-8`` each, so below 1e-8 for
    their mean; the nuclear norms of the shape metrics, where many tiny values add up and an angle near 0 magnifies
    the sum's error, use `nuclear_norm` instead.
    """
    a, b = m.shape
    k = min(a, b)
    left = vectors == "left" or (vectors is None and a <= b)
    gram = _gram_upper(m, left)
    if vectors is None:
        lam = scipy.linalg.eigh(gram, lower=False, eigvals_only=True, overwrite_a=True, check_finite=False,
                                driver="evd")
        return np.sqrt(np.clip(lam[::-1][:k], 0.0, None)), None
    lam, vec = scipy.linalg.eigh(gram, lower=False, overwrite_a=True, check_finite=False, driver="evd")
    return np.sqrt(np.clip(lam[::-1][:k], 0.0, None)), vec[:, ::-1][:, :k]


def nuclear_norm(m: np.ndarray) -> float:
    """Sum of the singular values of ``m`` (any shape), from an SVD without vectors (absolute error of a few
    ``2^-53 |m|_2`` per value, however small the value)."""
    try:
        sigma = scipy.linalg.svd(m, compute_uv=False, check_finite=False)
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        sigma = scipy.linalg.svd(m, compute_uv=False, check_finite=False, lapack_driver="gesvd")
    return float(sigma.sum())
