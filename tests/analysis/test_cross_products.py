"""The accumulator's row passes (`cross_products.shift_rows`): the slices they run in change no number."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.analysis import cross_products
from medtransfer.analysis.cross_products import SHIFT_BYTES, SHIFT_ROWS, shift_rows, shift_slice_rows


@pytest.mark.parametrize("d", [1, 2, 128, 1000, 4096, 8192, 100_000])
def test_a_slice_holds_at_least_the_minimum_rows_and_no_more_than_the_budget_beyond_it(d):
    rows = shift_slice_rows(d)
    assert rows >= SHIFT_ROWS
    assert rows == SHIFT_ROWS or rows * 8 * d <= SHIFT_BYTES < (rows + 1) * 8 * d


def _pair(m=1003, p=5, q=3, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, p)) * [1, 10, 100, 0.1, 3] + 7).astype(np.float32)
    y = (rng.standard_normal((m, q)) * 2 - 1).astype(np.float32)
    shift = np.concatenate([x[:50].mean(axis=0, dtype=np.float64), y[:50].mean(axis=0, dtype=np.float64)])
    return x, y, shift


def _shifted(x, y, shift, scales=None):
    """(out, w, sums) of `shift_rows` on float64 rows, or on float32 ones through its float64 work slice."""
    m, d = x.shape[0], len(shift)
    w = np.empty((3, m))
    w[0] = 1.0
    if scales is None:
        out, work = np.empty((m, d)), None
    else:
        out, work = np.empty((m, d), dtype=np.float32), np.empty((cross_products.shift_slice_rows(d), d))
    sums = shift_rows(x, y, shift, w, out, work, scales)
    return out, w, sums


@pytest.mark.parametrize("slice_rows", [1, 7, 128])
def test_the_rows_sums_and_norms_do_not_depend_on_the_slices(monkeypatch, slice_rows):
    x, y, shift = _pair()
    whole = _shifted(x, y, shift)  # one slice: 1003 rows of 8 channels are below the budget
    monkeypatch.setattr(cross_products, "shift_slice_rows", lambda _d: slice_rows)
    sliced = _shifted(x, y, shift)
    z = np.hstack([x.astype(np.float64) - shift[:5], y.astype(np.float64) - shift[5:]])
    # Row by row, the same operations whatever the slice: the same numbers, bit for bit, and those of the oracle.
    np.testing.assert_array_equal(sliced[0], whole[0])
    np.testing.assert_array_equal(whole[0], z)
    np.testing.assert_array_equal(sliced[1], whole[1])
    np.testing.assert_allclose(whole[1][1:], [np.sum(z[:, :5] ** 2, axis=1), np.sum(z[:, 5:] ** 2, axis=1)],
                               rtol=8 * np.finfo(float).eps)
    # The column sums add the slices in another order: equal up to float64 rounding of sums of m terms.
    weights = whole[1].T
    oracle, bound = z.T @ weights, np.abs(z).T @ np.abs(weights)
    tolerance = 2 * x.shape[0] * np.finfo(float).eps * bound
    assert np.all(np.abs(sliced[2] - oracle) <= tolerance) and np.all(np.abs(whole[2] - oracle) <= tolerance)


@pytest.mark.parametrize("slice_rows", [1, 7, 128])
def test_the_float32_rows_are_the_whole_blocks_rounding_whatever_the_slices(monkeypatch, slice_rows):
    x, y, shift = _pair(seed=1)
    scales = np.ldexp(1.0, -np.arange(8) % 3)
    monkeypatch.setattr(cross_products, "shift_slice_rows", lambda _d: slice_rows)
    out, _w, _sums = _shifted(x, y, shift, scales)
    z = np.hstack([x.astype(np.float64) - shift[:5], y.astype(np.float64) - shift[5:]])
    np.testing.assert_array_equal(out, (z * scales).astype(np.float32))
