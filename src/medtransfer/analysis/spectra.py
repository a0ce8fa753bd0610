"""The decompositions every whitened or aligned measure shares, computed once per finalisation (pure float64).

On wide layers the finalisation is a handful of dense decompositions of ``(p, p)``, ``(q, q)`` and ``(p, q)``
matrices, so each one counts: one symmetric eigen-decomposition per side serves the CCA family (whitening, SVCCA's
principal directions, PWCCA's weights) and every shape metric, and the cross block is rotated into those bases
once (`Spectra`). Singular values come from the eigenvalues of the smaller Gram matrix where only a mean of them is
needed (`singular_values`), and from an SVD where a sum of possibly tiny ones is (`nuclear_norm`).

Independent decompositions run side by side (`concurrently`), each on one BLAS thread: LAPACK's symmetric
eigensolver spends much of its time in memory-bound matrix-vector steps that a second BLAS thread barely speeds up
(an ``eigh`` of 2048 x 2048 takes about 1.2 s on one core and 1.0 s on two), and OpenBLAS threads that wait on each
other at every such step lose most of their time when the machine is shared, while single-threaded calls on their
own cores neither wait nor spin. They go through `numpy.linalg` (LAPACK's ``syevd`` and ``gesdd``, the drivers
SciPy's ``eigh(driver="evd")`` and ``svd`` call) and NumPy's matmul, which release the GIL while LAPACK or BLAS runs:
SciPy's wrappers hold it for the whole call, so threads calling them would only take turns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dgemm

from threadpoolctl import ThreadpoolController

__all__ = ["Spectra", "concurrently", "mm", "nuclear_norm", "numerical_rank", "side_spectra", "singular_values"]

_blas_lock = threading.Lock()
_blas_state: dict[str, Any] = {"controller": None, "limiter": None, "depth": 0}


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Within it, BLAS calls run on the calling thread only.

    The limit is process-wide, so nested and concurrent scopes share one: the first to enter sets it and the last to
    leave restores the original thread counts (a scope restoring them while another still ran would let that one's
    calls spawn threads again)."""
    with _blas_lock:
        state = _blas_state
        if state["depth"] == 0:
            if state["controller"] is None:  # finds the loaded BLAS libraries once (NumPy's and SciPy's OpenBLAS)
                state["controller"] = ThreadpoolController()
            state["limiter"] = state["controller"].limit(limits=1, user_api="blas")
        state["depth"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            state["depth"] -= 1
            if state["depth"] == 0:
                state["limiter"].restore_original_limits()
                state["limiter"] = None


def concurrently(*tasks: Callable[[], Any]) -> list[Any]:
    """Run the argument-free ``tasks`` side by side, each on one BLAS thread; their results, in order.

    The first runs on the calling thread, the others on fresh threads. They overlap where they run NumPy (ufuncs,
    matmul and `numpy.linalg` release the GIL); SciPy's BLAS and LAPACK wrappers hold it, so tasks calling those take
    turns. Tasks may nest (no shared pool to deadlock on). The first task's exception, in order, is raised once all
    have ended. A single task runs as it is, with BLAS's own threads.
    """
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)

    def run(i: int) -> None:
        try:
            results[i] = tasks[i]()
        except BaseException as err:  # re-raised on the calling thread below
            errors[i] = err

    if len(tasks) < 2:
        return [task() for task in tasks]
    with _one_blas_thread():
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(tasks))]
        for thread in threads:
            thread.start()
        run(0)
        for thread in threads:
            thread.join()
    for err in errors:
        if err is not None:
            raise err
    return results


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
    # LAPACK's divide and conquer (syevd), markedly faster than the MRRR driver when all eigenpairs are needed.
    lam, vec = np.linalg.eigh(s)
    return np.clip(lam[::-1], 0.0, None), vec[:, ::-1]


def side_spectra(sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> Spectra:
    """`Spectra` of the kept channels' scatter blocks ``(p_k, p_k)``, ``(q_k, q_k)``, ``(p_k, q_k)``; the two sides
    are decomposed side by side (`concurrently`)."""
    (lam_x, v_x), (lam_y, v_y) = concurrently(lambda: _eigh_descending(sxx), lambda: _eigh_descending(syy))
    return Spectra(lam_x, v_x, lam_y, v_y, mm(mm(v_x.T, sxy), v_y))


def numerical_rank(lam: np.ndarray, eig_rtol: float) -> int:
    """Eigen-directions with eigenvalue ``> eig_rtol * lam[0]`` (``lam`` descending); 0 when ``lam[0] <= 0``.

    Cross-product methods square the condition number, so an eigenvalue below about ``1e-12 * lam[0]`` carries a
    relative error of percents in float64, and whitening by it would turn rounding noise into correlation.
    """
    return int(np.count_nonzero(lam > eig_rtol * lam[0])) if len(lam) and lam[0] > 0 else 0


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
    gram = m @ m.T if left else m.T @ m  # NumPy recognises the Gram and forms it with one syrk
    if vectors is None:
        lam = np.linalg.eigvalsh(gram)
        return np.sqrt(np.clip(lam[::-1][:k], 0.0, None)), None
    lam, vec = np.linalg.eigh(gram)
    return np.sqrt(np.clip(lam[::-1][:k], 0.0, None)), vec[:, ::-1][:, :k]


def nuclear_norm(m: np.ndarray) -> float:
    """Sum of the singular values of ``m`` (any shape), from an SVD without vectors (absolute error of a few
    ``2^-53 |m|_2`` per value, however small the value)."""
    try:
        sigma = np.linalg.svd(m, compute_uv=False)  # gesdd
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        sigma = scipy.linalg.svd(m, compute_uv=False, check_finite=False, lapack_driver="gesvd")
    return float(sigma.sum())
