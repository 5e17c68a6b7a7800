"""map_per_core: one item per core, single-threaded BLAS meanwhile, order and errors kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from compressor.passes.linalg import map_per_core, usable_cores


def test_results_in_order_with_one_blas_thread_each_then_restored():
    seen_threads = []

    def work(n: int) -> float:
        seen_threads.append((torch.get_num_threads(),
                             {i["num_threads"] for i in threadpool_info()}))
        a = np.random.default_rng(n).standard_normal((40, 40))
        return float(np.linalg.eigvalsh(a @ a.T).max())

    before = torch.get_num_threads()
    expected = [work(n) for n in range(7)]
    seen_threads.clear()
    reports = []
    got = map_per_core(work, range(7), workers=2, progress=lambda *a: reports.append(a))
    assert got == expected
    assert reports == [(i, 7) for i in range(1, 8)]
    assert all(t == 1 and blas <= {1} for t, blas in seen_threads)
    assert torch.get_num_threads() == before
    assert usable_cores() >= 1


def test_the_first_error_is_raised_and_threads_are_restored():
    before = torch.get_num_threads()

    def fail(n: int) -> int:
        if n == 3:
            raise ValueError("layer 3 failed")
        return n

    with pytest.raises(ValueError, match="layer 3 failed"):
        map_per_core(fail, range(5), workers=2)
    assert torch.get_num_threads() == before
    assert map_per_core(fail, [], workers=2) == []


def test_blas_keeps_its_threads_when_asked():
    outside = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    seen = map_per_core(lambda _: {i["filepath"]: i["num_threads"] for i in threadpool_info()},
                        range(3), workers=2, one_blas_thread=False)
    assert all(s == outside for s in seen)
    assert {i["filepath"]: i["num_threads"] for i in threadpool_info()} == outside
