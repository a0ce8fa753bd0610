"""Streaming representation-similarity measures: mean CCA, SVCCA, PWCCA, linear CKA, debiased linear CKA, the
Procrustes similarity and the angular shape metrics (as similarities; see `shape_metrics`).

Conventions: an activation matrix has one row per datapoint and one column per channel (neuron). ``X`` is
``n x p`` and ``Y`` is ``n x q``; row ``i`` of both belongs to the same datapoint.

Everything is computed from sufficient statistics accumulated by `SimilarityAccumulator` (this module), never from
stored data. The statistics: the count ``n``, the column sums and the cross-product blocks ``X'^T X'``, ``Y'^T Y'``,
``X'^T Y'`` of *shifted* data ``X' = X - K_x``, ``Y' = Y - K_y`` (``K`` = the column means of the first chunk seen),
plus a few fourth-moment sums for debiased CKA. Memory is ``O((p + q)^2)`` plus a bounded row block, independent of
``n``. The cross products are formed in float64, or (``gram_precision="float32"``) in float32 blocks summed in
float64, about twice as fast on wide layers with a bounded error (`cross_products`, which also centres them).
Finalising shares its decompositions across measures (`spectra`: one eigen-decomposition per side for the CCA
family and the shape metrics); the measures' algebra is in `similarity_measures` and `shape_metrics`.

Why shift: the centred scatter ``sum_i c_i c_i^T = S' - n mu' mu'^T`` (``c_i = x_i - mean``) cancels catastrophically
when the data have a large mean (ReLU activations do). After shifting by an estimate of the mean, ``mu'`` is small
and the subtraction is harmless.

Numbers the caller may want to know:

* ``channel_rtol`` (default 1e-8): for the CCA family, a channel whose variance is ``<= channel_rtol * (largest
  channel variance of its side)`` is dropped as dead/constant. The numbers kept are ``p_kept``/``q_kept``.
* ``eig_rtol`` (default 1e-10): when whitening a side, eigen-directions of its (kept-channel) covariance with
  eigenvalue ``<= eig_rtol * (largest eigenvalue)`` are dropped. Cross-product methods square the condition number,
  so an eigenvalue below about ``1e-12 * lambda_max`` carries a relative error of percents in float64 and whitening
  by it would turn rounding noise into spurious correlations; 1e-10 leaves a margin. The number of canonical
  correlations is ``min(rank_x, rank_y)`` with these numerical ranks.
* Reliability: with ``m = max(p_kept, q_kept)``, CCA-family values are flagged unreliable when ``n < 10 m`` and are
  refused (``None``) when ``n <= m + 1``; CKA is always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from scipy.linalg.blas import dsyrk

from medtransfer.analysis.cross_products import (FLOAT32_BLOCK_ROWS, GRAM_PRECISIONS, Float32Buffers, add_upper,
                                                 centred_blocks, channel_scales, float32_product, shift_block,
                                                 side_scales)
from medtransfer.analysis.shape_metrics import (ALIGNMENT_MEASURES, FULLY_WHITENED_MEASURES, PROCRUSTES,
                                                alignment_cosines, alignment_measures)
from medtransfer.analysis.similarity_measures import cca_family, cka, kept_channels
from medtransfer.analysis.spectra import concurrently, side_spectra

__all__ = [
    "ALIGNMENT_MEASURES",
    "ALL_MEASURES",
    "CCA_MEASURES",
    "CKA_MEASURES",
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_CHANNEL_RTOL",
    "DEFAULT_EIG_RTOL",
    "DEFAULT_SVCCA_THRESHOLD",
    "InsufficientSamplesError",
    "NonFiniteInputError",
    "REFUSED_WITH_CCA",
    "SimilarityAccumulator",
    "SimilarityResult",
    "compute_similarity",
]

#: Measure names, as used in results, on the command line and in JSON output.
CCA_MEASURES: tuple[str, ...] = ("cca", "svcca", "pwcca")
CKA_MEASURES: tuple[str, ...] = ("cka", "cka_debiased")
ALL_MEASURES: tuple[str, ...] = CCA_MEASURES + CKA_MEASURES + ALIGNMENT_MEASURES
#: Measures refused (None) whenever the CCA family is: they whiten fully and need as many rows.
REFUSED_WITH_CCA: tuple[str, ...] = CCA_MEASURES + FULLY_WHITENED_MEASURES

DEFAULT_CHANNEL_RTOL = 1e-8
DEFAULT_EIG_RTOL = 1e-10
DEFAULT_SVCCA_THRESHOLD = 0.99
#: Size of the float64 row block the accumulator processes at once (bounds its working memory).
DEFAULT_BLOCK_BYTES = 64 << 20
#: Below ``RELIABLE_ROWS_PER_CHANNEL * max(p_kept, q_kept)`` rows the CCA family is flagged unreliable.
RELIABLE_ROWS_PER_CHANNEL = 10


class NonFiniteInputError(ValueError):
    """A chunk given to `SimilarityAccumulator.update` holds NaN or infinity (or values whose square overflows).

    ``side`` is ``"x"`` or ``"y"``; ``row`` is the 0-based index, over all rows streamed so far, of the first bad row.
    """

    def __init__(self, side: str, row: int) -> None:
        self.side = side
        self.row = row
        super().__init__(f"{side.upper()} has NaN or infinite values (or values too large to square) in row {row}")


class InsufficientSamplesError(ValueError):
    """Raised by `SimilarityResult.require_cca` when the CCA family was refused (too few rows or no usable channel)."""


@dataclass(frozen=True)
class SimilarityResult:
    """All similarity measures of one pair of activation matrices.

    A measure that was not requested, or is undefined for these data, is ``None``; ``undefined`` maps each
    requested-but-undefined measure name to the reason.

    Attributes:
        mean_cca, svcca, pwcca, cka, cka_debiased: the measures (floats in [0, 1]; debiased CKA can be slightly
            negative).
        alignment: `ALIGNMENT_MEASURES` by name (``procrustes_similarity``, ``shape_<alpha>``), each in [0, 1],
            larger = more similar; only the requested ones are present.
        canonical_correlations: shape ``(min(rank_x, rank_y),)``, descending, float64 (empty when the CCA family
            was not computed).
        svcca_dims: principal directions kept per side for SVCCA, ``(kx, ky)``, or ``None``.
        cca_ranks: numerical ranks ``(rank_x, rank_y)`` of the whitened sides, or ``None``.
        pwcca_side: ``"x"`` or ``"y"``: the side whose neurons weight PWCCA (fewer kept channels; ties -> x).
        n, p, q: rows and channels seen; p_kept, q_kept: channels left after dropping (near-)constant ones.
        reliable: False when the CCA family is unreliable or refused; ``warning`` then says why.
        cca_refused: True when the CCA family could not be computed (its values are None).
    """

    n: int
    p: int
    q: int
    p_kept: int
    q_kept: int
    mean_cca: float | None = None
    svcca: float | None = None
    pwcca: float | None = None
    cka: float | None = None
    cka_debiased: float | None = None
    canonical_correlations: np.ndarray = field(default_factory=lambda: np.zeros(0))
    svcca_dims: tuple[int, int] | None = None
    cca_ranks: tuple[int, int] | None = None
    pwcca_side: str | None = None
    reliable: bool = True
    warning: str | None = None
    cca_refused: bool = False
    undefined: dict[str, str] = field(default_factory=dict)
    alignment: dict[str, float | None] = field(default_factory=dict)

    def value(self, measure: str) -> float | None:
        """The value of a measure by its public name (one of `ALL_MEASURES`); None if not requested or undefined."""
        if measure not in ALL_MEASURES:
            raise KeyError(f"unknown measure {measure!r}; known: {', '.join(ALL_MEASURES)}")
        if measure in ALIGNMENT_MEASURES:
            return self.alignment.get(measure)
        return getattr(self, "mean_cca" if measure == "cca" else measure)

    def require_cca(self) -> None:
        """Raise `InsufficientSamplesError` if the CCA family was refused."""
        if self.cca_refused:
            raise InsufficientSamplesError(self.warning or "CCA-family measures could not be computed")


# --------------------------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------------------------


class SimilarityAccumulator:
    """Streams paired row chunks of ``X`` (``n x p``) and ``Y`` (``n x q``) into float64 sufficient statistics.

    ``update`` may be called any number of times with chunks of any row count (float16/32/64 or integer input);
    the result equals one update with all rows up to rounding. Working memory is ``(p+q)^2`` float64 for the
    cross-product matrix plus one row block of about ``block_bytes`` bytes, whatever the chunk or total size
    (``gram_precision="float32"`` instead holds the block in float32 with its ``(p+q)^2`` float32 product, and two
    float64 slices of `cross_products.shift_slice_rows` rows).

    Accumulated, on shifted rows ``x'_i = x_i - K_x``, ``y'_i = y_i - K_y`` (``K`` = the first chunk's column
    means, then fixed), with ``z'_i = [x'_i, y'_i]``, ``r'_i = |x'_i|^2``, ``t'_i = |y'_i|^2``:

    * ``G = sum z'_i z'_i^T`` (upper triangle, one ``dsyrk`` per block, or one float32 ``ssyrk`` per block of at
      most `cross_products.FLOAT32_BLOCK_ROWS` rows summed in float64: see `cross_products` for the error bound),
      shape ``(p+q, p+q)``;
    * ``sum z'_i``, ``sum r'_i z'_i``, ``sum t'_i z'_i``, each shape ``(p+q,)``;
    * ``sum r'_i``, ``sum t'_i``, ``sum r'_i^2``, ``sum t'_i^2``, ``sum r'_i t'_i``.

    Only ``G`` changes with the precision; the sums are formed in float64 from the float64 shifted rows in both.
    """

    def __init__(self, p: int, q: int, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 gram_precision: str = "float64") -> None:
        if p < 1 or q < 1:
            raise ValueError(f"need at least one channel per side, got p={p}, q={q}")
        if gram_precision not in GRAM_PRECISIONS:
            raise ValueError(f"gram_precision must be one of {', '.join(GRAM_PRECISIONS)}, got {gram_precision!r}")
        self.p = int(p)
        self.q = int(q)
        self.gram_precision = gram_precision
        d = self.p + self.q
        self.block_rows = max(1, int(block_bytes) // (8 * d))
        if gram_precision == "float32":
            self.block_rows = min(self.block_rows, FLOAT32_BLOCK_ROWS)
        self.n = 0
        self._shift: np.ndarray | None = None  # (p+q,) = [K_x, K_y]
        self._side_scales: tuple[float, float] | None = None  # set on the first chunk (None: both sides as they are)
        # float64 path: (block_rows, p+q), C order; its row slices transpose to Fortran order
        self._buf: np.ndarray | None = None
        # Fortran order so that dsyrk updates it in place instead of copying it in and out on every block.
        self._gram = np.zeros((d, d), order="F")
        # float32 path: per-channel powers of two (set on the first block) and the working memory
        self._scales: np.ndarray | None = None
        self._buffers: Float32Buffers | None = None
        # Weights w_i = (1, r'_i, t'_i). Columns of sum z'_i w_i^T: sum z', sum r' z', sum t' z'; the upper triangle
        # of sum w_i w_i^T holds n, sum r', sum t', sum r'^2, sum r't', sum t'^2. Fortran order: updated in place.
        self._weighted_sums = np.zeros((d, 3), order="F")
        self._scalar_sums = np.zeros((3, 3), order="F")

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add paired rows: ``x`` shape ``(m, p)``, ``y`` shape ``(m, q)`` (any real dtype; memmaps are fine).

        Raises:
            ValueError: shapes do not match the accumulator or each other.
            NonFiniteInputError: a NaN/inf in the chunk (the accumulator is then unusable).
        """
        x = np.asanyarray(x)
        y = np.asanyarray(y)
        if x.ndim != 2 or y.ndim != 2:
            raise ValueError(f"chunks must be 2-D, got x.ndim={x.ndim}, y.ndim={y.ndim}")
        if x.shape[1] != self.p or y.shape[1] != self.q:
            raise ValueError(f"expected {self.p} and {self.q} columns, got {x.shape[1]} and {y.shape[1]}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y chunks have different row counts: {x.shape[0]} != {y.shape[0]}")
        m_total = x.shape[0]
        if m_total == 0:
            return
        for arr in (x, y):
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"chunks must be real numbers (float or integer), got dtype {arr.dtype}")
        p = self.p
        if self._shift is None:
            self._side_scales = side_scales(x, y)
        if self._side_scales is not None:  # data far from magnitude 1: brought there exactly (see side_scales)
            x, y = (np.multiply(a, scale, dtype=np.float64) for a, scale in zip((x, y), self._side_scales))
        if self._shift is None:
            # Any fixed shift near the mean keeps the later centring well conditioned; np.mean with dtype reduces
            # in float64 without materialising a float64 copy of the chunk.
            self._shift = np.concatenate([np.mean(x, axis=0, dtype=np.float64), np.mean(y, axis=0, dtype=np.float64)])
            if not np.isfinite(self._shift).all():
                self._raise_first_non_finite(x, y)
        rows = min(self.block_rows, m_total)
        if self.gram_precision == "float64" and (self._buf is None or self._buf.shape[0] < rows):
            self._buf = np.empty((rows, p + self.q))
        if self.gram_precision == "float32":
            if self._scales is None:  # from the first block's shifted rows, as float64
                self._scales = channel_scales(np.concatenate([x[:rows] - self._shift[:p], y[:rows] - self._shift[p:]],
                                                             axis=1))
            if self._buffers is None or self._buffers.rows.shape[0] < rows:
                self._buffers = Float32Buffers.allocate(self._scales, rows, self._buffers)
        for start in range(0, m_total, self.block_rows):
            stop = min(start + self.block_rows, m_total)
            self._add_block(x[start:stop], y[start:stop], start)
        self.n += m_total

    def _raise_first_non_finite(self, x: np.ndarray, y: np.ndarray) -> None:
        # A NaN/inf in the first chunk poisons the shift, and with it every row; find the row it came from.
        for start in range(0, x.shape[0], self.block_rows):
            for side, arr in (("x", x), ("y", y)):
                finite = np.isfinite(arr[start : start + self.block_rows]).all(axis=1)
                if not finite.all():
                    raise NonFiniteInputError(side, self.n + start + int(np.flatnonzero(~finite)[0]))
        side = "x" if not np.isfinite(self._shift[: self.p]).all() else "y"
        raise NonFiniteInputError(side, self.n)  # finite values whose sum overflows

    def _add_block(self, x: np.ndarray, y: np.ndarray, start: int) -> None:
        """Shift one block (rows from ``start`` of the chunk), add its sums and its cross products into ``G``."""
        m, buffers = x.shape[0], self._buffers
        if buffers is None:
            z = self._buf[:m]
            self._add_sums(*shift_block(x, y, self._shift, z), start)
            # z.T is a Fortran-ordered view of the C-ordered block: dsyrk reads it without a copy and, with trans=0,
            # computes z.T @ z into the upper triangle of the Fortran-ordered Gram matrix in place.
            self._gram = dsyrk(1.0, z.T, beta=1.0, c=self._gram, trans=0, lower=0, overwrite_c=1)
            return
        z32 = buffers.rows[:m]
        self._add_sums(*shift_block(x, y, self._shift, z32, buffers.work, buffers.scales), start)
        float32_product(buffers.product, z32)
        if not np.isfinite(buffers.product.diagonal()).all():
            self._raise_float32_overflow(buffers.product, z32, start)
        add_upper(self._gram, buffers.product)

    def _add_sums(self, w: np.ndarray, sums: list[np.ndarray], start: int) -> None:
        """Add a block's column and scalar sums, after checking it is finite (rows from ``start`` of the chunk)."""
        # A NaN/inf anywhere in a row makes that row's squared norm non-finite: an O(m) check instead of O(m(p+q)).
        for side, norms in (("x", w[1]), ("y", w[2])):
            if not np.isfinite(norms.sum()):
                bad = np.flatnonzero(~np.isfinite(norms))  # empty if only the sum overflowed
                raise NonFiniteInputError(side, self.n + start + (int(bad[0]) if bad.size else 0))
        for part in sums:  # the halves in row order, on both paths alike
            self._weighted_sums += part
        # Through SciPy's BLAS: NumPy bundles a second OpenBLAS whose idle threads spin for a while after each call,
        # so alternating between the two libraries makes both run at a fraction of their speed.
        self._scalar_sums = dsyrk(1.0, w.T, beta=1.0, c=self._scalar_sums, trans=1, lower=0, overwrite_c=1)

    def _raise_float32_overflow(self, product: np.ndarray, z32: np.ndarray, start: int) -> None:
        diagonal = product.diagonal()
        side = "x" if not np.isfinite(diagonal[: self.p]).all() else "y"
        columns = slice(0, self.p) if side == "x" else slice(self.p, None)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.einsum("ij,ij->i", z32[:, columns], z32[:, columns])
        bad = np.flatnonzero(~np.isfinite(norms))
        raise NonFiniteInputError(side, self.n + start + (int(bad[0]) if bad.size else 0))

    # ----------------------------------------------------------------------------------------------------------

    def finalize(
        self,
        measures: Iterable[str] | None = None,
        *,
        channel_rtol: float = DEFAULT_CHANNEL_RTOL,
        eig_rtol: float = DEFAULT_EIG_RTOL,
        svcca_threshold: float = DEFAULT_SVCCA_THRESHOLD,
    ) -> SimilarityResult:
        """Compute the requested measures (default: all of `ALL_MEASURES`) from the accumulated statistics.

        Does not change the accumulator; more rows may be added afterwards. Unknown measure names raise
        ``ValueError``. See the module docstring for the tolerances.
        """
        wanted = set(ALL_MEASURES if measures is None else measures)
        unknown = wanted - set(ALL_MEASURES)
        if unknown:
            raise ValueError(f"unknown measure(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_MEASURES)}")
        blocks = centred_blocks(self.n, self.p, self._gram, self._weighted_sums, self._scalar_sums, self._scales)
        values: dict[str, object] = {}
        undefined: dict[str, str] = {}
        if wanted & set(CKA_MEASURES):
            values.update(cka(blocks, wanted, undefined))
        p_kept, q_kept, keep_x, keep_y = kept_channels(blocks, channel_rtol)
        reliable, warning, refused = _reliability(blocks.n, p_kept, q_kept)
        whitened = wanted & set(CCA_MEASURES + FULLY_WHITENED_MEASURES)
        shaped = wanted & (set(ALIGNMENT_MEASURES) - {PROCRUSTES})
        spectra = None
        if p_kept and q_kept and ((whitened and not refused) or shaped - set(FULLY_WHITENED_MEASURES)):
            spectra = side_spectra(*_kept_blocks(blocks, keep_x, keep_y))
        if whitened and refused:
            for name in sorted(wanted & set(CCA_MEASURES)):
                undefined[name] = warning
        all_kept = (p_kept, q_kept) == (self.p, self.q)
        # The CCA family's decompositions and the alignment measures' SVDs do not depend on each other: side by side.
        cca, cosines = concurrently(
            lambda: cca_family(spectra, (p_kept, q_kept), wanted, eig_rtol, svcca_threshold)
            if whitened and not refused else {},
            lambda: alignment_cosines(blocks, spectra, all_kept, wanted) if wanted & set(ALIGNMENT_MEASURES) else {},
        )
        alignment = {}
        if wanted & set(ALIGNMENT_MEASURES):
            alignment = alignment_measures(blocks, spectra, cca or None, all_kept, wanted, warning if refused else None,
                                           undefined, cosines)
        return SimilarityResult(
            n=blocks.n,
            p=self.p,
            q=self.q,
            p_kept=p_kept,
            q_kept=q_kept,
            reliable=reliable,
            warning=warning,
            cca_refused=refused,
            undefined=undefined,
            alignment=alignment,
            **values,
            **cca,
        )


def compute_similarity(
    x: np.ndarray,
    y: np.ndarray,
    measures: Iterable[str] | None = None,
    *,
    chunk_rows: int | None = None,
    **finalize_kwargs: float,
) -> SimilarityResult:
    """One-shot convenience: stream ``x`` (``n x p``) and ``y`` (``n x q``) through an accumulator and finalise.

    ``chunk_rows`` (default: all rows at once; the accumulator still works in bounded row blocks) only matters for
    memmaps whose reading you want to pace.
    """
    x = np.asanyarray(x)
    y = np.asanyarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D, got x.ndim={x.ndim}, y.ndim={y.ndim}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different row counts: {x.shape[0]} != {y.shape[0]}")
    acc = SimilarityAccumulator(x.shape[1], y.shape[1])
    step = x.shape[0] if chunk_rows is None else max(1, int(chunk_rows))
    for start in range(0, x.shape[0], max(step, 1)):
        acc.update(x[start : start + step], y[start : start + step])
    return acc.finalize(measures, **finalize_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Finalisation (the centred statistics are in cross_products.py, the measures in similarity_measures.py)
# --------------------------------------------------------------------------------------------------------------


def _kept_blocks(blocks, keep_x: np.ndarray, keep_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scatter blocks restricted to the kept channels; copies only when a channel is dropped (they can be large)."""
    sxx, syy, sxy = blocks.sxx, blocks.syy, blocks.sxy
    if len(keep_x) < sxx.shape[0]:
        sxx, sxy = sxx[np.ix_(keep_x, keep_x)], sxy[keep_x]
    if len(keep_y) < syy.shape[0]:
        syy, sxy = syy[np.ix_(keep_y, keep_y)], sxy[:, keep_y]
    return sxx, syy, sxy


def _reliability(n: int, p_kept: int, q_kept: int) -> tuple[bool, str | None, bool]:
    """(reliable, warning, refused) for the CCA family.

    Refused when n <= max(p_kept, q_kept) + 1: centred rows live in the (n-1)-dimensional space orthogonal to the
    all-ones vector, so once a side has at least n-1 generic channels its centred column space is that whole space
    and every canonical correlation is 1 whatever the data. The boundary n = m + 1 (m channels = n - 1 dimensions)
    is therefore included.
    """
    m = max(p_kept, q_kept)
    if min(p_kept, q_kept) == 0:
        side = "X" if p_kept == 0 else "Y"
        return False, f"CCA-family measures refused: every channel of {side} is constant", True
    if n <= m + 1:
        return (
            False,
            f"CCA-family measures refused: n={n} rows <= max(p_kept, q_kept)+1 = {m + 1}; "
            "with so few rows every canonical correlation is 1",
            True,
        )
    if n < RELIABLE_ROWS_PER_CHANNEL * m:
        return (
            False,
            f"CCA-family measures unreliable: n={n} rows < {RELIABLE_ROWS_PER_CHANNEL} x max(p_kept, q_kept) = "
            f"{RELIABLE_ROWS_PER_CHANNEL * m}; canonical correlations are biased towards 1",
            False,
        )
    return True, None, False
