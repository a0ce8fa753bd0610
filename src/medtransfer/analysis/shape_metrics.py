"""Procrustes similarity and the angular shape metrics with partial whitening, from the centred blocks
``S_xx = X^T X`` ``(p, p)``, ``S_yy = Y^T Y`` ``(q, q)`` and ``S_xy = X^T Y`` ``(p, q)`` of centred ``X`` ``(n, p)``
and ``Y`` ``(n, q)`` (`similarity_measures.CentredBlocks`); never from the data matrices.

Every value is reported as a *similarity* in [0, 1], larger = more similar, like CCA and CKA: the summaries, noise
floors, logit-scale intervals, curves ("similarity" column) and the similarity-vs-gain table all read measures
that way, so a distance would silently invert their meaning.

``procrustes_similarity`` = ``|X^T Y|_* / (|X|_F |Y|_F)``, with ``|.|_*`` the nuclear norm (sum of singular values)
and ``|X|_F^2 = tr S_xx``. The orthogonal Procrustes distance of Ding, Denain & Steinhardt (NeurIPS 2021) on
centred, Frobenius-normalised data is ``d^2 = min_Q |X/|X|_F - Y Q/|Y|_F|_F^2 = 2 - 2 procrustes_similarity``
(``Q`` orthogonal; the smaller side zero-padded, which leaves ``|X^T Y|_*`` unchanged), so the similarity is
``1 - d^2 / 2``.

``shape_<alpha>`` is the angular shape metric of Williams, Kunz, Kornblith & Linderman (NeurIPS 2021, "Generalized
shape metrics on neural representations") with partial whitening ``alpha``, mapped onto a similarity:
``shape_alpha = 1 - 2 theta / pi``, where
    ``theta = arccos(|X_a^T Y_a|_* / (|X_a|_F |Y_a|_F))``,  ``X_a = X W_x``,
    ``W_x = (alpha I + (1 - alpha) T_x)^(-1/2)``
and ``T_x = p_k S_xx / tr S_xx`` is the covariance rescaled to mean eigenvalue 1 (``p_k`` = kept channels). The
rescaling is our choice: with the raw covariance ``Sigma_x = S_xx / n`` the mix ``alpha I + (1 - alpha) Sigma_x`` adds
numbers in activation units to pure numbers, so for 0 < alpha < 1 the metric would change with the scale of the
activations (layers differ by orders of magnitude). ``1 - shape_alpha = theta / (pi / 2)`` is itself a metric
(a scaled angle), so symmetry and the triangle inequality carry over. Special cases:

* alpha = 1: no whitening; ``cos theta = procrustes_similarity`` (the angular Procrustes metric on centred data).
* alpha = 0: full whitening. With ``rho_1..rho_k`` the canonical correlations (``k = min(r_x, r_y)``, ``r`` the
  numerical ranks after dropping eigen-directions ``<= eig_rtol * lambda_max`` exactly as `cca_family` does),
  ``|X_0^T Y_0|_* = sum rho_i * sqrt(tr S_xx tr S_yy / (p_k q_k))`` and ``|X_0|_F^2 = r_x tr S_xx / p_k``, so
      ``cos theta = sum_i rho_i / sqrt(r_x r_y)``,
  the mean canonical correlation when ``r_x = r_y`` and its sum over the geometric mean of the ranks otherwise.
  Like the CCA family it is refused when there are too few rows (see `similarity._reliability`).

netrep (Williams et al.'s package) computes its partial whitening as ``alpha I + (1 - alpha) (X^T X)^(-1/2)``
(interpolating the whitening matrices rather than the covariances) on unscaled data; both forms coincide at
alpha = 0 and alpha = 1, so ``shape_0`` and ``shape_1`` agree with ``LinearMetric(alpha=0 / 1,
score_method="angular")``, while ``shape_0.5`` is this module's regularised-covariance form.

The measures are a fixed set of names (`SHAPE_ALPHAS`): measure names are one static tuple shared with the
configuration rules (which load without NumPy), the plots' ranges and the report; adding an alpha is one entry here.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from medtransfer.analysis.similarity_measures import mm

__all__ = [
    "ALIGNMENT_MEASURES",
    "FULLY_WHITENED_MEASURES",
    "PROCRUSTES",
    "SHAPE_ALPHAS",
    "alignment_measures",
    "angle_to_similarity",
    "procrustes_cosine",
    "shape_cosines",
]

PROCRUSTES = "procrustes_similarity"
#: measure name -> partial-whitening alpha
SHAPE_ALPHAS: dict[str, float] = {"shape_0": 0.0, "shape_0.5": 0.5, "shape_1": 1.0}
ALIGNMENT_MEASURES: tuple[str, ...] = (PROCRUSTES, *SHAPE_ALPHAS)
#: Fully whitened, hence as row-hungry as CCA: refused with the CCA family.
FULLY_WHITENED_MEASURES: tuple[str, ...] = tuple(name for name, alpha in SHAPE_ALPHAS.items() if alpha == 0.0)


def _singular_values(m: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.svd(m, compute_uv=False, check_finite=False)
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        return scipy.linalg.svd(m, compute_uv=False, check_finite=False, lapack_driver="gesvd")


def procrustes_cosine(sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> float | None:
    """``|S_xy|_* / sqrt(tr S_xx tr S_yy)`` in [0, 1] (shapes ``(p, p)``, ``(q, q)``, ``(p, q)``); None when a side
    has no variance."""
    tx, ty = float(np.trace(sxx)), float(np.trace(syy))
    if tx <= 0.0 or ty <= 0.0:
        return None
    # Cauchy-Schwarz bounds it by 1; rounding can overshoot by an ulp.
    return min(1.0, float(_singular_values(sxy).sum()) / math.sqrt(tx * ty))


def _eig_desc(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, vec = scipy.linalg.eigh(s, check_finite=False, driver="evd")
    # Rounding can leave tiny negative eigenvalues on a positive semi-definite scatter matrix.
    return np.clip(lam[::-1], 0.0, None), vec[:, ::-1]


def _whitening_scales(lam: np.ndarray, alpha: float, eig_rtol: float) -> np.ndarray:
    """``d_i = (alpha + (1 - alpha) t_i)^(-1/2)`` for the eigenvalues ``lam`` ``(k,)`` of a scatter matrix, with
    ``t = k lam / sum lam`` (mean 1). At alpha = 0 directions ``<= eig_rtol * lam_max`` get 0: dividing by their
    square root would turn rounding noise into spurious correlation (see `similarity_measures._whiten_basis`)."""
    t = lam * (len(lam) / lam.sum())
    if alpha > 0.0:
        return 1.0 / np.sqrt(alpha + (1.0 - alpha) * t)
    d = np.zeros_like(t)
    kept = lam > eig_rtol * lam[0]
    d[kept] = 1.0 / np.sqrt(t[kept])
    return d


def shape_cosines(
    sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray, alphas: list[float], eig_rtol: float
) -> dict[float, float | None]:
    """``cos theta_alpha = |W_x S_xy W_y|_* / sqrt(tr(W_x S_xx W_x) tr(W_y S_yy W_y))`` for each alpha.

    One eigen-decomposition per side serves every alpha: ``S = V diag(lam) V^T`` gives ``W = V diag(d) V^T``, and the
    nuclear norm is invariant under the orthogonal ``V``'s, so ``|W_x S_xy W_y|_* = |D_x (V_x^T S_xy V_y) D_y|_*``
    and ``tr(W S W) = sum lam_i d_i^2``. None for every alpha when a side has no variance.
    """
    if float(np.trace(sxx)) <= 0.0 or float(np.trace(syy)) <= 0.0:
        return {alpha: None for alpha in alphas}
    lam_x, v_x = _eig_desc(sxx)
    lam_y, v_y = _eig_desc(syy)
    rotated = mm(mm(v_x.T, sxy), v_y)  # (p, q)
    del v_x, v_y
    out: dict[float, float | None] = {}
    for alpha in alphas:
        dx, dy = _whitening_scales(lam_x, alpha, eig_rtol), _whitening_scales(lam_y, alpha, eig_rtol)
        fx, fy = float(lam_x @ dx**2), float(lam_y @ dy**2)
        nuclear = float(_singular_values(dx[:, None] * rotated * dy[None, :]).sum())
        out[alpha] = min(1.0, nuclear / math.sqrt(fx * fy)) if fx > 0.0 and fy > 0.0 else None
    return out


def angle_to_similarity(cosine: float) -> float:
    """``1 - 2 arccos(cosine) / pi``: the angle's similarity, 1 for identical shapes and 0 for orthogonal ones."""
    return 1.0 - 2.0 * math.acos(min(1.0, max(0.0, cosine))) / math.pi


def alignment_measures(
    sxx: np.ndarray,
    syy: np.ndarray,
    sxy: np.ndarray,
    keep_x: np.ndarray,
    keep_y: np.ndarray,
    wanted: set[str],
    eig_rtol: float,
    refused: str | None,
    undefined: dict[str, str],
) -> dict[str, float | None]:
    """The wanted `ALIGNMENT_MEASURES` by name; undefined ones are None with their reason in ``undefined``.

    keep_x, keep_y: the channels the CCA family keeps (`similarity_measures.kept_channels`); the shape metrics use
    the same ones, so ``shape_0`` rests on the same canonical correlations. refused: the CCA family's refusal reason
    (None when computed), which also refuses `FULLY_WHITENED_MEASURES`.
    """
    out: dict[str, float | None] = {}
    no_variance = "one side has no variance (all channels constant)"
    if PROCRUSTES in wanted:
        out[PROCRUSTES] = procrustes_cosine(sxx, syy, sxy)
        if out[PROCRUSTES] is None:
            undefined[PROCRUSTES] = no_variance
    names = [name for name in SHAPE_ALPHAS if name in wanted]
    if refused is not None:
        for name in (n for n in names if n in FULLY_WHITENED_MEASURES):
            out[name] = None
            undefined[name] = refused
        names = [name for name in names if name not in FULLY_WHITENED_MEASURES]
    if not names:
        return out
    if len(keep_x) == 0 or len(keep_y) == 0:
        for name in names:
            out[name] = None
            undefined[name] = no_variance
        return out
    # Copies only when a channel is dropped: the blocks can be large.
    if len(keep_x) < sxx.shape[0]:
        sxx, sxy = sxx[np.ix_(keep_x, keep_x)], sxy[keep_x]
    if len(keep_y) < syy.shape[0]:
        syy, sxy = syy[np.ix_(keep_y, keep_y)], sxy[:, keep_y]
    cosines = shape_cosines(sxx, syy, sxy, [SHAPE_ALPHAS[name] for name in names], eig_rtol)
    for name in names:
        cosine = cosines[SHAPE_ALPHAS[name]]
        out[name] = None if cosine is None else angle_to_similarity(cosine)
        if cosine is None:
            undefined[name] = no_variance
    return out
