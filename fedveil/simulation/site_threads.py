"""numpy's BLAS at one thread per call in a process that hosts many simulated sites at once.

numpy's OpenBLAS keeps a pool of one thread per core and hands each call above a small size to
it. In a process where many site threads run side by side (the in-process backend, the healthcare
demo, a Ray worker) those calls come from every site at once, and the pool's threads spin against
each other for the same cores: the parallelism is already in the sites. Measured on 2 cores with
30 in-process sites at m = 100,000: one ``np.linalg.norm`` of a site's update cost 20–27 ms of CPU
instead of 0.02 ms, and the whole job used 7.2 s of CPU against 4.1 s with the pool at one thread.

Only the BLAS pools change: torch's threads (OpenMP) stay as ``--threads`` or the worker's options
set them. The pools are process-wide, as the sizes are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS at one thread while the block runs, and at its former size after."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blas_at_one_thread() -> None:
    """numpy's BLAS at one thread for the rest of this process, which only hosts sites (a Ray worker)."""
    threadpool_limits(limits=1, user_api="blas")
