"""Dense linear algebra for the passes: many mid-sized decompositions, one per layer.

LAPACK's eigendecompositions and SVDs are bound by matrix-vector work (the reduction to
tridiagonal or bidiagonal form) and synchronise their threads at every step; on a busy machine
each barrier waits for a descheduled thread. Measured here with two cores and other work
running, a 768 x 768 ``eigh`` took 2.1 s with two BLAS threads and 0.4 s with one. So the
passes use all cores the other way round: one layer per core, each decomposition on one thread
(``map_per_core``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

Item = TypeVar("Item")
Result = TypeVar("Result")


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_per_core(fn: Callable[[Item], Result], items: Iterable[Item],
                 workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 one_blas_thread: bool = True) -> list[Result]:
    """``[fn(item) for item in items]``, in order, ``workers`` (default: every usable core)
    items at a time, with NumPy's BLAS and torch held to one thread each meanwhile.

    ``fn`` must be safe to run in threads (NumPy, SciPy and torch release the GIL in their
    kernels). The first exception raised by ``fn`` is raised here. ``progress(done, total)``
    is called as results arrive, in order.

    ``one_blas_thread=False`` leaves the BLAS libraries their threads: for work whose BLAS
    calls are large products, not decompositions. SciPy's OpenBLAS runs one call at a time
    however many threads call it (two ssyrk calls on one thread each, side by side, took as
    long as one after the other: 95 GFLOP/s together, where one call on two threads ran at
    187), so its products use every core only with its threads left on, while the items' other
    work (gathering patches) overlaps them."""
    items = list(items)
    workers = min(workers or usable_cores(), max(len(items), 1))
    torch_threads = torch.get_num_threads()
    results: list[Result] = []
    with threadpool_limits(limits=1 if one_blas_thread else None):
        torch.set_num_threads(1)
        try:
            if workers == 1:
                done = map(fn, items)
                pool = None
            else:
                pool = ThreadPoolExecutor(max_workers=workers)
                done = pool.map(fn, items)
            try:
                for result in done:
                    results.append(result)
                    if progress is not None:
                        progress(len(results), len(items))
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        finally:
            torch.set_num_threads(torch_threads)
    return results
