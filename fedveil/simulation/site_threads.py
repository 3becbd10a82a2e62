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

from typing import Any

from threadpoolctl import threadpool_limits


def one_blas_thread() -> Any:
    """numpy's BLAS at one thread: until the block ends when used as a context manager (the sizes
    before come back), for the rest of the process when called alone (a Ray worker, which only
    hosts sites)."""
    return threadpool_limits(limits=1, user_api="blas")
