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

from medtransfer.analysis.similarity_measures import CentredBlocks
from medtransfer.analysis.spectra import Spectra, concurrently, nuclear_norm

__all__ = [
    "ALIGNMENT_MEASURES",
    "FULLY_WHITENED_MEASURES",
    "PROCRUSTES",
    "SHAPE_ALPHAS",
    "alignment_cosines",
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


def procrustes_cosine(sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> float | None:
    """``|S_xy|_* / sqrt(tr S_xx tr S_yy)`` in [0, 1] (shapes ``(p, p)``, ``(q, q)``, ``(p, q)``); None when a side
    has no variance."""
    tx, ty = float(np.trace(sxx)), float(np.trace(syy))
    if tx <= 0.0 or ty <= 0.0:
        return None
    # Cauchy-Schwarz bounds it by 1; rounding can overshoot by an ulp.
    return min(1.0, nuclear_norm(sxy) / math.sqrt(tx * ty))


def _whitening_scales(lam: np.ndarray, alpha: float) -> np.ndarray:
    """``d_i = (alpha + (1 - alpha) t_i)^(-1/2)`` for the eigenvalues ``lam`` ``(k,)`` of a scatter matrix, with
    ``t = k lam / sum lam`` (mean 1), for 0 < alpha <= 1 (alpha = 0 is the CCA family's whitening, see
    `alignment_measures`)."""
    t = lam * (len(lam) / lam.sum())
    return 1.0 / np.sqrt(alpha + (1.0 - alpha) * t)


def shape_cosines(spectra: Spectra, alphas: list[float]) -> dict[float, float | None]:
    """``cos theta_alpha = |W_x S_xy W_y|_* / sqrt(tr(W_x S_xx W_x) tr(W_y S_yy W_y))`` for each 0 < alpha <= 1.

    One eigen-decomposition per side (`spectra.Spectra`) serves every alpha: ``S = V diag(lam) V^T`` gives
    ``W = V diag(d) V^T``, and the nuclear norm is invariant under the orthogonal ``V``'s, so
    ``|W_x S_xy W_y|_* = |D_x (V_x^T S_xy V_y) D_y|_*`` and ``tr(W S W) = sum lam_i d_i^2``. None for every alpha when
    a side has no variance.
    """
    lam_x, lam_y = spectra.lam_x, spectra.lam_y
    if float(lam_x.sum()) <= 0.0 or float(lam_y.sum()) <= 0.0:
        return {alpha: None for alpha in alphas}
    out: dict[float, float | None] = {}
    for alpha in alphas:
        dx, dy = _whitening_scales(lam_x, alpha), _whitening_scales(lam_y, alpha)
        fx, fy = float(lam_x @ dx**2), float(lam_y @ dy**2)
        weighted = spectra.rotated if alpha == 1.0 else dx[:, None] * spectra.rotated * dy[None, :]
        out[alpha] = min(1.0, nuclear_norm(weighted) / math.sqrt(fx * fy)) if fx > 0.0 and fy > 0.0 else None
    return out


def angle_to_similarity(cosine: float) -> float:
    """``1 - 2 arccos(cosine) / pi``: the angle's similarity, 1 for identical shapes and 0 for orthogonal ones."""
    return 1.0 - 2.0 * math.acos(min(1.0, max(0.0, cosine))) / math.pi


def alignment_cosines(blocks: CentredBlocks, spectra: Spectra | None, all_kept: bool,
                      wanted: set[str]) -> dict[str | float, float | None]:
    """The cosines of the wanted `ALIGNMENT_MEASURES` that take a nuclear norm (an SVD each), computed side by side
    (`spectra.concurrently`): ``PROCRUSTES`` (also for ``shape_1`` when all channels are kept) and each wanted
    ``alpha > 0`` otherwise (needs ``spectra``). ``alpha = 0`` needs none (`alignment_measures`).

    Split from `alignment_measures` so that the finalisation can run these SVDs beside the CCA family's own
    decompositions."""
    jobs: dict[str | float, object] = {}
    if PROCRUSTES in wanted or ("shape_1" in wanted and all_kept):
        jobs[PROCRUSTES] = lambda: procrustes_cosine(blocks.sxx, blocks.syy, blocks.sxy)
    if spectra is not None:
        for name, alpha in SHAPE_ALPHAS.items():
            if name in wanted and alpha > 0.0 and not (alpha == 1.0 and all_kept):
                jobs[alpha] = lambda alpha=alpha: shape_cosines(spectra, [alpha])[alpha]
    return dict(zip(jobs, concurrently(*jobs.values())))


def alignment_measures(
    blocks: CentredBlocks,
    spectra: Spectra | None,
    cca: dict[str, object] | None,
    all_kept: bool,
    wanted: set[str],
    refused: str | None,
    undefined: dict[str, str],
    cosines: dict[str | float, float | None] | None = None,
) -> dict[str, float | None]:
    """The wanted `ALIGNMENT_MEASURES` by name; undefined ones are None with their reason in ``undefined``.

    spectra: the kept channels' decompositions (`spectra.side_spectra`; None when a side keeps no channel), the
    same the CCA family uses, so ``shape_0`` rests on the same canonical correlations; cca: `cca_family`'s output
    (None when it was refused, the reason in ``refused``, which also refuses `FULLY_WHITENED_MEASURES`); all_kept:
    no channel was dropped, so ``shape_1`` is the Procrustes cosine itself; cosines: `alignment_cosines` of the
    same arguments when already computed.

    Fully whitened (alpha = 0), ``|X_0^T Y_0|_* / (|X_0|_F |Y_0|_F) = sum_i rho_i / sqrt(r_x r_y)`` (module docstring):
    no decomposition beyond the CCA family's.
    """
    if cosines is None:
        cosines = alignment_cosines(blocks, spectra, all_kept, wanted)
    out: dict[str, float | None] = {}
    no_variance = "one side has no variance (all channels constant)"
    names = [name for name in SHAPE_ALPHAS if name in wanted]
    procrustes = cosines.get(PROCRUSTES)
    if PROCRUSTES in wanted:
        out[PROCRUSTES] = procrustes
        if procrustes is None:
            undefined[PROCRUSTES] = no_variance
    if refused is not None:
        for name in (n for n in names if n in FULLY_WHITENED_MEASURES):
            out[name] = None
            undefined[name] = refused
        names = [name for name in names if name not in FULLY_WHITENED_MEASURES]
    if not names:
        return out
    if spectra is None:
        for name in names:
            out[name] = None
            undefined[name] = no_variance
        return out
    by_alpha: dict[float, float | None] = {alpha: value for alpha, value in cosines.items() if alpha != PROCRUSTES}
    if cca is not None and "shape_0" in names:
        rho = cca["canonical_correlations"]
        rank_x, rank_y = cca["cca_ranks"]
        by_alpha[0.0] = min(1.0, float(np.sum(rho)) / math.sqrt(rank_x * rank_y))
    if "shape_1" in names and all_kept:
        by_alpha[1.0] = procrustes
    missing = [SHAPE_ALPHAS[name] for name in names if SHAPE_ALPHAS[name] not in by_alpha]
    by_alpha.update(shape_cosines(spectra, missing))  # only when called without the CCA family's output
    for name in names:
        cosine = by_alpha[SHAPE_ALPHAS[name]]
        out[name] = None if cosine is None else angle_to_similarity(cosine)
        if cosine is None:
            undefined[name] = no_variance
    return out
