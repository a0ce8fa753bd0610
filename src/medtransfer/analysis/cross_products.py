"""The accumulator's cross products, block by block, and their centring (pure functions on arrays).

`SimilarityAccumulator` shifts every row by a fixed provisional mean ``K`` (the first chunk's column means, float64)
and adds each row block ``Z`` ``(m, d)`` of shifted rows into the float64 total ``G += Z^T Z`` (upper triangle,
``d = p + q``). ``gram_precision`` chooses how:

* ``"float64"`` (default, the reference): one ``dsyrk`` per block on the float64 rows.
* ``"float32"``: each channel is scaled by a power of two (`channel_scales`, exact), the block is rounded to float32,
  one ``ssyrk`` forms its float32 product, and that is added into the float64 total. Blocks hold at most
  `FLOAT32_BLOCK_ROWS` rows, so every float32 sum restarts after that many rows. The float32 GEMM runs at about
  twice the speed of the float64 one, and the GEMM is the floor of the accumulation's cost.

Both paths shift a block's rows a slice at a time (`shift_rows`, `shift_slice_rows`): the float64 rows of a slice
stay in cache while they are squared, summed and (float32 path) scaled and rounded, so memory sees the input and the
rounded rows once instead of the float64 rows five times. These NumPy passes, and the float64 additions of the
float32 product (`add_upper`), run on two threads (`spectra.concurrently`: NumPy releases the GIL), by halves of the
rows and by column ranges; the ``ssyrk`` itself runs alone with all BLAS threads (SciPy's BLAS wrappers hold the GIL,
so nothing could run beside it). Each entry still receives one float32 product of the same rows per block, so
nothing below changes, and the column sums are the same numbers on both paths (two half-block sums per block, added
in order).

Error of the float32 path, entrywise, with ``u = 2^-24`` (float32 unit roundoff), ``L`` the rows per block and ``Z``
the shifted rows in float64 (the float64 path's own):

    |G_float32 - Z^T Z| <= (gamma_L + 2u + u^2) |Z|^T |Z|,   gamma_L = L u / (1 - L u),

plus the float64 rounding of adding the ``n / L`` block totals (relative ``2^-53`` each). Rounding a scaled value
to float32 moves it by at most ``u`` relative (so a product by at most ``2u + u^2``), and a float32 dot product of
length ``L`` errs by at most ``gamma_L`` relative to the sum of the absolute products, whatever order the BLAS sums
in (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5 and the remark after it). The bound
grows with ``L``, not with ``n``. It is relative to ``|Z|^T |Z|``, not to the centred statistics: a channel with mean
``mu`` and spread ``sigma`` adds ``n (sigma^2 + (mu - K)^2)`` to its diagonal, so unshifted ReLU activations
(``mu ~ sigma``) would double the error and a large offset (``mu = 100 sigma``) multiply it by ``10^4``; the shift
keeps ``mu - K`` at the first chunk's sampling error. Only ``G`` differs between the paths: the column sums and the
fourth-moment sums are formed in float64 from the float64 shifted rows in both, so they are identical, and the
centred blocks differ by ``G_float32 - G_float64`` (and the rounding of the centring, ``2^-53`` relative).
tests/analysis/test_gram_precision.py carries this bound through every measure.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import dgemm, dger, ssyrk

from medtransfer.analysis.similarity_measures import CentredBlocks
from medtransfer.analysis.spectra import concurrently, mm
from medtransfer.config import GramPrecision

__all__ = [
    "FLOAT32_BLOCK_ROWS",
    "Float32Buffers",
    "GRAM_PRECISIONS",
    "SHIFT_BYTES",
    "SHIFT_ROWS",
    "add_upper",
    "centred_blocks",
    "channel_scales",
    "float32_product",
    "shift_block",
    "shift_rows",
    "shift_slice_rows",
    "side_scales",
    "split_column",
    "symmetrise_upper",
]

#: The accepted `gram_precision` values (defined once, in the configuration schema).
GRAM_PRECISIONS: tuple[str, ...] = typing.get_args(GramPrecision)
#: Rows per float32 block: the ``L`` of the error bound (``gamma_L`` ~ 1.2e-4 worst case, ~ sqrt(L) u ~ 3e-6 for
#: rounding errors of random sign). Adding a block's float32 product into the float64 total costs about 3% of its
#: GEMM at this length.
FLOAT32_BLOCK_ROWS = 2048
#: Columns per slab when adding or mirroring triangles: a slab of a Fortran-ordered matrix is contiguous memory.
_SLAB = 256
#: Rows shifted at a time (`shift_slice_rows`): SHIFT_ROWS float64 rows of 4096 channels (4 MiB) stay in cache through
#: the passes over them; narrower layers take as many rows as fill SHIFT_BYTES (128 rows of 1024 channels), so that
#: the passes stay long enough for calling them to cost little beside their work (64 channels a side: 1024 rows).
SHIFT_ROWS = 128
SHIFT_BYTES = 1 << 20


def shift_slice_rows(d: int) -> int:
    """Rows per slice of `shift_rows` for ``d`` channels (both sides together)."""
    return max(SHIFT_ROWS, SHIFT_BYTES // (8 * max(1, d)))


def channel_scales(z: np.ndarray) -> np.ndarray:
    """Per channel, the power of two ``2^-e`` that brings the root mean square of ``z`` ``(m, d)`` (shifted rows)
    into [0.5, 1); 1 for an all-zero channel.

    Scaling by a power of two is exact, so it changes no rounding error; it keeps float32 products of channels of
    any magnitude away from overflow (above ~1e38) and underflow (below ~1e-38), where the error bound would fail.
    """
    rms = np.sqrt(np.einsum("ij,ij->j", z, z) / max(1, z.shape[0]))
    return np.ldexp(1.0, -np.frexp(rms)[1])


def split_column(d: int) -> int:
    """The column ``c`` that splits the upper triangle of a ``(d, d)`` matrix into two parts of equal size: columns
    ``[0, c)`` (``c^2 / 2`` entries) and ``[c, d)`` (``(d^2 - c^2) / 2``)."""
    return round(d / math.sqrt(2.0))


@dataclass(frozen=True)
class Float32Buffers:
    """The float32 path's working memory, allocated once: the block's scaled float32 rows (``rows``, C order: the
    transpose is the Fortran-ordered operand ``ssyrk`` reads without a copy), one ``(shift_slice_rows(d), d)``
    float64 slice per thread (``work``), the block's float32 product (``product``, ``(d, d)``, Fortran order, upper
    triangle written in place) and the channels' powers of two (``scales``)."""

    scales: np.ndarray
    rows: np.ndarray
    work: tuple[np.ndarray, np.ndarray]
    product: np.ndarray

    @classmethod
    def allocate(cls, scales: np.ndarray, rows: int, old: Float32Buffers | None = None) -> Float32Buffers:
        """Buffers for blocks of up to ``rows`` rows, keeping ``old``'s product (it does not depend on ``rows``)."""
        d = len(scales)
        product = old.product if old is not None else np.zeros((d, d), dtype=np.float32, order="F")
        work = tuple(np.empty((min(rows, shift_slice_rows(d)), d)) for _ in range(2))
        return cls(scales, np.empty((rows, d), dtype=np.float32), work, product)


def shift_rows(x: np.ndarray, y: np.ndarray, shift: np.ndarray, w: np.ndarray, out: np.ndarray,
               work: np.ndarray | None = None, scales: np.ndarray | None = None) -> np.ndarray:
    """Shift rows ``x`` ``(m, p)``, ``y`` ``(m, q)`` by ``shift`` ``(d,)`` into ``out`` ``(m, d)``,
    `shift_slice_rows` at a time; returns the ``(d, 3)`` float64 sums of ``z'_i w_i^T`` over them and fills ``w[1]``,
    ``w[2]`` (``w`` ``(3, m)``, ``w[0] = 1``) with the squared norms of the shifted ``x`` and ``y`` rows.

    out: float64 (``work`` and ``scales`` None), or float32: the shifted rows multiplied by ``scales`` and rounded,
    through ``work`` ``(shift_slice_rows(d), d)`` float64, exactly as rounding the whole shifted block would round
    them.
    """
    p, step = x.shape[1], shift_slice_rows(len(shift))
    sums = np.zeros((len(shift), 3), order="F")
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        z = out[start:stop] if scales is None else work[: stop - start]
        np.subtract(x[start:stop], shift[:p], out=z[:, :p])  # converts to float64 and shifts in one pass
        np.subtract(y[start:stop], shift[p:], out=z[:, p:])
        np.einsum("ij,ij->i", z[:, :p], z[:, :p], out=w[1, start:stop])
        np.einsum("ij,ij->i", z[:, p:], z[:, p:], out=w[2, start:stop])
        sums = dgemm(1.0, z.T, w[:, start:stop].T, beta=1.0, c=sums, overwrite_c=1)
        if scales is not None:
            with np.errstate(over="ignore"):  # beyond float32's range: caught on the product's diagonal
                # exact scaling (powers of two) and one rounding to float32, with no float64 temporary
                np.multiply(z, scales, out=out[start:stop], casting="same_kind")
    return sums


#: Below this many values a pass is done on the calling thread: starting threads (and limiting BLAS to one per
#: thread) costs more than the pass itself on narrow layers (the benchmark's 64 channels: about 3 times the time).
_THREADED_MIN_VALUES = 1 << 20


def _side_by_side(tasks: list, values: int) -> list:
    """The tasks' results in order: side by side (`spectra.concurrently`) for a pass over at least
    `_THREADED_MIN_VALUES` values, else one after another. The same numbers either way: each task writes its own
    part, and the caller combines the results in order."""
    return concurrently(*tasks) if values >= _THREADED_MIN_VALUES else [task() for task in tasks]


def shift_block(x: np.ndarray, y: np.ndarray, shift: np.ndarray, out: np.ndarray,
                work: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                scales: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """`shift_rows` on the two halves of a block's rows side by side, each with its own ``work``; returns ``w``
    ``(3, m)`` and the halves' ``(d, 3)`` sums in row order (the caller adds them in that order, on both paths)."""
    m = x.shape[0]
    w = np.empty((3, m))
    w[0] = 1.0
    halves = [(0, m // 2), (m // 2, m)]
    tasks = [lambda a=a, b=b, slot=slot: shift_rows(x[a:b], y[a:b], shift, w[:, a:b], out[a:b], slot, scales)
             for (a, b), slot in zip(halves, work)]
    return w, _side_by_side(tasks, m * len(shift))


def float32_product(product: np.ndarray, z32: np.ndarray) -> None:
    """``product = z32^T z32`` (upper triangle; the strict lower one is left as it was) by one ``ssyrk`` in place,
    with all BLAS threads: product ``(d, d)`` float32, Fortran order; z32 ``(m, d)`` float32, C order."""
    ssyrk(1.0, z32.T, beta=0.0, c=product, trans=0, lower=0, overwrite_c=1)


def add_upper(total: np.ndarray, product: np.ndarray) -> None:
    """``total += product`` on the upper triangle (``total`` float64, ``product`` float32, both Fortran order; the
    cast is exact), slab by slab, in two column ranges of equal size side by side."""
    d = total.shape[0]

    def add_columns(first: int, last: int) -> None:
        for start in range(first, last, _SLAB):
            stop = min(start + _SLAB, last)
            # Columns start..stop of the upper triangle live in rows 0..stop.
            total[:stop, start:stop] += product[:stop, start:stop]

    middle = split_column(d)
    _side_by_side([lambda: add_columns(0, middle), lambda: add_columns(middle, d)], d * d // 2)


def symmetrise_upper(a: np.ndarray) -> np.ndarray:
    """Copy the upper triangle of square ``a`` into its strict lower triangle, in place, slab by slab (no ``(d, d)``
    temporary); returns ``a``."""
    d = a.shape[0]
    for start in range(0, d, _SLAB):
        stop = min(start + _SLAB, d)
        block = a[start:stop, start:stop]
        block[...] = np.triu(block) + np.triu(block, 1).T
        a[stop:, start:stop] = a[start:stop, stop:].T
    return a


def centred_blocks(
    n: int,
    p: int,
    gram: np.ndarray,
    weighted_sums: np.ndarray,
    scalar_sums: np.ndarray,
    scales: np.ndarray | None = None,
) -> CentredBlocks:
    """The centred statistics from the accumulated shifted ones.

    gram: ``(d, d)`` upper triangle of ``sum z'_i z'_i^T`` (of the rows multiplied by ``scales``, ``(d,)`` powers of
    two, when given); weighted_sums: ``(d, 3)`` columns ``sum z'``, ``sum r' z'``, ``sum t' z'``; scalar_sums:
    ``(3, 3)`` upper triangle of ``sum w w^T``, ``w = (1, r', t')`` (see `SimilarityAccumulator`).
    """
    if n == 0:
        raise ValueError("no rows were accumulated")
    # One (d, d) copy: mirrored, unscaled (exact: powers of two) and centred in place.
    centred = symmetrise_upper(np.array(gram, order="F"))
    if scales is not None:
        inverse = 1.0 / scales
        centred *= inverse[:, None]
        centred *= inverse[None, :]
    sums = weighted_sums.T
    mu = sums[0] / n  # mean of the shifted rows, [mu', nu']
    # Scatter about the mean: S' - n mu mu^T (harmless cancellation because mu' is small after the shift); a rank-one
    # BLAS update in place, mu_i mu_j = mu_j mu_i keeps it symmetric.
    centred = dger(-float(n), mu, mu, a=centred, overwrite_a=1)
    sxx, syy, sxy = centred[:p, :p], centred[p:, p:], centred[:p, p:]

    # Fourth-moment sums over centred rows. With a_i = x'_i^T mu', b_i = y'_i^T nu', m_x = |mu'|^2, m_y = |nu'|^2:
    #   |c_i|^2 = r'_i - 2 a_i + m_x,   |d_i|^2 = t'_i - 2 b_i + m_y,
    # and sum a_i = n m_x, sum b_i = n m_y, sum a_i b_i = mu'^T S'_xy nu', sum r'_i b_i = nu'^T sum r'_i y'_i, ...
    # Multiplying out and summing (S' = S + n mu mu^T the shifted, uncentred block),
    #   sum |c|^2 |d|^2 = sum r't' - 2 nu'^T (sum r' y') - 2 mu'^T (sum t' x') + 4 mu'^T S'_xy nu'
    #                     + m_y sum r' + m_x sum t' - 3 n m_x m_y,
    # and |c|^4, |d|^4 are the special cases y = x and x = y.
    mux, muy = mu[:p], mu[p:]
    mx, my = float(mux @ mux), float(muy @ muy)
    s = np.triu(scalar_sums)  # rows/cols: 1, r', t'; only the upper triangle is filled
    sum_r, sum_t = s[0, 1], s[0, 2]
    rz, tz = sums[1], sums[2]  # sum r' z', sum t' z'

    def fourth(s_uv, u_v, v_u, mu_u, mu_v, s_centred, m_u, m_v, sum_u, sum_v) -> float:
        shifted_cross = float(mu_u @ mm(s_centred, mu_v)) + n * m_u * m_v  # mu_u^T S'_uv mu_v
        return float(
            s_uv - 2.0 * (mu_v @ u_v) - 2.0 * (mu_u @ v_u) + 4.0 * shifted_cross
            + m_v * sum_u + m_u * sum_v - 3.0 * n * m_u * m_v
        )

    sum_rt = fourth(s[1, 2], rz[p:], tz[:p], mux, muy, sxy, mx, my, sum_r, sum_t)
    sum_rr = fourth(s[1, 1], rz[:p], rz[:p], mux, mux, sxx, mx, mx, sum_r, sum_r)
    sum_tt = fourth(s[2, 2], tz[p:], tz[p:], muy, muy, syy, my, my, sum_t, sum_t)
    return CentredBlocks(n=n, sxx=sxx, syy=syy, sxy=sxy, sum_rt=sum_rt, sum_rr=sum_rr, sum_tt=sum_tt)


#: A side whose first chunk spreads over more than 2^SIDE_EXPONENT_LIMIT, or less than 2^-SIDE_EXPONENT_LIMIT, is
#: scaled to magnitude 1 (`side_scales`): the accumulator's fourth-moment sums (debiased CKA) hold fourth powers of
#: the values, times rows and channels, which leave float64 beyond about 1e±75, and a shape metric's normaliser holds
#: their squares. Inside the limit nothing is scaled, so ordinary activations take no extra pass.
SIDE_EXPONENT_LIMIT = 64


def side_scales(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Per side, the power of two that brings the largest channel range (max - min) of the first chunk into
    [0.5, 1) where that range lies beyond 2^±`SIDE_EXPONENT_LIMIT`, else 1; None when both sides are within.

    Every measure is invariant to scaling one side's activations (CCA, CKA and the normalised shape metrics), and
    multiplying by a power of two is exact, so the measures of data at magnitude 1e150 or 1e-150 are those of the
    same data at magnitude 1, and no intermediate overflows or underflows. Ranges that are not finite (infinite
    values, or finite ones whose difference overflows) are left to the accumulator's own checks.
    """
    scales = []
    for a in (x, y):
        with np.errstate(over="ignore", invalid="ignore"):
            spread = float(np.max(np.max(a, axis=0).astype(np.float64) - np.min(a, axis=0).astype(np.float64)))
        exponent = int(np.frexp(spread)[1]) if np.isfinite(spread) and spread > 0 else 0
        scales.append(float(np.ldexp(1.0, -exponent)) if abs(exponent) > SIDE_EXPONENT_LIMIT else 1.0)
    return None if scales == [1.0, 1.0] else (scales[0], scales[1])
