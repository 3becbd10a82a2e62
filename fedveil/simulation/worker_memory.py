"""Memory settings of the processes that host simulated sites.

A Ray worker hosts hundreds of a round's sites, and they all receive their ``RoundStart`` (the
cohort's n identity keys and credentials, a few hundred bytes per member) within the same
second, then each make and drop a few copies of it. glibc returns a freed block of 128 KiB or
more to the OS at once, but it also raises that threshold to the size of each such block freed
(up to 32 MiB): from then on blocks of that size come from the heap, and the burst stays
resident, fragmented, for the rest of the job. At n = 1,000 sites per round (m ≈ 1,000) fixing
the threshold took the workers' peak from about 1.28 GiB each to about 0.96 GiB.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers for the trim and mmap thresholds (``<malloc.h>``)."""

LARGE_BLOCK_BYTES = 128 * 1024
"""glibc's default for both: blocks at least this large are mapped on their own, and free memory
at the top of the heap beyond it is given back."""


def return_large_blocks_to_os() -> bool:
    """Keep glibc's mmap and trim thresholds at :data:`LARGE_BLOCK_BYTES` for this process (no
    dynamic raise), so that every large block is unmapped when freed and the heap's free top is
    trimmed; a raise that happened before the call (while the process imported its modules) is
    undone. Returns False where the C library has no ``mallopt`` (not glibc: macOS, musl), where
    nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, LARGE_BLOCK_BYTES))
