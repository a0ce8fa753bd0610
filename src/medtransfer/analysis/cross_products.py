"""The accumulator's cross products, block by block, and their centring (pure functions on arrays).

`SimilarityAccumulator` shifts every row by a fixed provisional mean ``K`` (the first chunk's column means, float64)
and adds each row block ``Z`` ``(m, d)`` of shifted rows into the float64 total ``G += Z^T Z`` (upper triangle,
``d = p + q``). ``gram_precision`` chooses how:

* ``"float64"`` (default, the reference): one ``dsyrk`` per block on the float64 rows.
* ``"float32"``: each channel is scaled by a power of two (`channel_scales`, exact), the block is rounded to float32,
  one ``ssyrk`` forms its float32 product, and that is added into the float64 total. Blocks hold at most
  `FLOAT32_BLOCK_ROWS` rows, so every float32 sum restarts after that many rows. The float32 GEMM runs at about
  twice the speed of the float64 one, and the GEMM is the floor of the accumulation's cost.

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

import typing

import numpy as np
from scipy.linalg.blas import dger, ssyrk

from medtransfer.analysis.similarity_measures import CentredBlocks
from medtransfer.analysis.spectra import mm
from medtransfer.config import GramPrecision

__all__ = [
    "FLOAT32_BLOCK_ROWS",
    "GRAM_PRECISIONS",
    "add_float32_block",
    "centred_blocks",
    "channel_scales",
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


def channel_scales(z: np.ndarray) -> np.ndarray:
    """Per channel, the power of two ``2^-e`` that brings the root mean square of ``z`` ``(m, d)`` (shifted rows)
    into [0.5, 1); 1 for an all-zero channel.

    Scaling by a power of two is exact, so it changes no rounding error; it keeps float32 products of channels of
    any magnitude away from overflow (above ~1e38) and underflow (below ~1e-38), where the error bound would fail.
    """
    rms = np.sqrt(np.einsum("ij,ij->j", z, z) / max(1, z.shape[0]))
    return np.ldexp(1.0, -np.frexp(rms)[1])


def add_float32_block(total: np.ndarray, block_product: np.ndarray, z32: np.ndarray) -> None:
    """``total += z32^T z32`` on the upper triangle, through one float32 ``ssyrk`` into ``block_product``.

    total: ``(d, d)`` float64, Fortran order; block_product: ``(d, d)`` float32, Fortran order, overwritten (its
    strict lower triangle stays as it was: zero when allocated with `np.zeros`); z32: ``(m, d)`` float32, C order
    (its transpose is the Fortran-ordered operand ``ssyrk`` reads without a copy).
    """
    ssyrk(1.0, z32.T, beta=0.0, c=block_product, trans=0, lower=0, overwrite_c=1)
    d = total.shape[0]
    for start in range(0, d, _SLAB):
        stop = min(start + _SLAB, d)
        # Columns start..stop of the upper triangle live in rows 0..stop; the float32 -> float64 cast is exact.
        total[:stop, start:stop] += block_product[:stop, start:stop]


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
