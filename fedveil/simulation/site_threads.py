"""One BLAS and OpenMP thread per call in a process that hosts many simulated sites at once.

numpy's OpenBLAS (and any OpenMP runtime loaded) keeps a pool of one thread per core and hands
each call above a small size to it. In a process where many site threads run side by side (the
in-process backend, the healthcare demo, a Ray worker) those calls come from every site at once,
and the pools' threads spin against each other for the same cores: the parallelism is already in
the sites. Measured on 2 cores with 30 in-process sites at m = 100,000 (``fedveil bench simulate
--backend in-process``): one ``np.linalg.norm`` of a site's update cost 20–27 ms of CPU instead of
0.02 ms, and the whole job used 7.2 s of CPU against 4.1 s with the pools at one thread.

:func:`one_thread_per_call` sets every pool that :mod:`threadpoolctl` finds in the process to one
thread for the duration, and restores the sizes afterwards. It is process-wide, as the pools are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def one_thread_per_call() -> Iterator[None]:
    """BLAS and OpenMP pools at one thread while the block runs (the sites are the parallelism)."""
    with threadpool_limits(limits=1):
        yield


def blas_at_one_thread() -> None:
    """numpy's BLAS at one thread for the rest of this process, which only hosts sites (a Ray
    worker); torch keeps the threads the worker's options give it."""
    threadpool_limits(limits=1, user_api="blas")
