"""`spectra.concurrently`: independent decompositions side by side, each on one BLAS thread, with the process's
BLAS thread counts restored afterwards, whatever the tasks did."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from medtransfer.analysis.spectra import concurrently


def _blas_threads() -> list[int]:
    return [library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"]


def test_results_come_back_in_order_from_as_many_threads():
    names = concurrently(*(lambda i=i: (i, threading.current_thread().name) for i in range(3)))
    assert [i for i, _ in names] == [0, 1, 2]
    assert names[0][1] == threading.current_thread().name and len({name for _, name in names}) == 3


def test_tasks_run_on_one_blas_thread_and_the_counts_come_back_even_after_an_error():
    before = _blas_threads()
    inside = concurrently(_blas_threads, _blas_threads)
    assert inside == [[1] * len(before)] * 2
    assert _blas_threads() == before

    def fails():
        raise ValueError("the first error, in order")

    with pytest.raises(ValueError, match="the first error"):
        concurrently(fails, lambda: 2, lambda: 1 / 0)
    assert _blas_threads() == before


def test_nested_scopes_share_the_limit_and_a_single_task_keeps_its_threads():
    before = _blas_threads()
    outer = concurrently(lambda: concurrently(_blas_threads, _blas_threads), _blas_threads)
    assert outer == [[[1] * len(before)] * 2, [1] * len(before)]
    assert concurrently(_blas_threads) == [before] and _blas_threads() == before


def test_decompositions_side_by_side_equal_one_after_another():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 120))
    s, t = a.T @ a, a @ a.T
    together = concurrently(lambda: np.linalg.eigvalsh(s), lambda: np.linalg.eigvalsh(t))
    np.testing.assert_allclose(together[0][-120:], np.linalg.eigvalsh(s), rtol=1e-12)
    np.testing.assert_allclose(together[1][-120:], np.linalg.eigvalsh(t)[-120:], rtol=1e-9)
