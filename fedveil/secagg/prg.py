"""AES-CTR pseudorandom generator that expands seeds straight into numpy buffers.

Masks must be indistinguishable from uniform ring elements to anyone without the seed, so they
come from AES-128 in counter mode (``cryptography``'s OpenSSL binding, AES-NI where available),
never from numpy's or Python's ``random``. Bonawitz et al. (CCS 2017, §4) instantiate the PRG
the same way; Google's fcp/secagg calls it ``AesCtrPrng``.

Speed: the keystream is written with ``update_into`` into one preallocated byte buffer that
numpy then views as ``uint32``/``uint64``, so expansion costs one AES pass and no allocation,
and masks are added into an accumulator with wraparound ``+=``/``-=`` in place.
:class:`MaskExpander` keeps that buffer (and a zero plaintext) for reuse across seeds.

Each seed keys exactly one stream (the counter block starts at zero), so a seed must be used
for one purpose only; :mod:`fedveil.secagg.keys` derives separate seeds per purpose with HKDF.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedveil.secagg.errors import ConfigError

SEED_BYTES = 16
"""AES-128 keys: 128-bit security, matching X25519's."""

_ZERO_COUNTER = bytes(16)
# Room for OpenSSL versions that want ``len(data) + block_size - 1`` bytes in ``update_into``.
_PAD = 16
# Expand and accumulate in chunks that stay in the L2 cache (the add then reads hot data).
# CTR mode is a stream: consecutive update_into calls continue the keystream across chunks.
CHUNK_BYTES = 1 << 16
# Threads sharing one expansion take bigger chunks: each chunk hands the interpreter lock over twice,
# and at 64 KiB two threads spent their gain on those hand-overs (0.15 s → 0.13 s for 3,000 masks of
# 100,000 elements; 0.09 s at 256 KiB, while one thread is as fast with either size).
PARALLEL_CHUNK_BYTES = 1 << 18
# One expansion at a time per process. CPython runs the chunk loop under the interpreter lock anyway
# and numpy gives that lock up at every add, so concurrent expansions in one process (a simulation
# worker's hundreds of site threads) only hand the lock back and forth and evict each other's chunk
# from the cache: measured per mask, 2 threads gain nothing and 500 take 3.4x the wall time and 6x
# the CPU of one after another (docs/scale-measurements.md). Uncontended, it costs one acquire per apply.
_EXPANSION_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    # a fork copies the lock as it is: held, if another thread was expanding, and never released
    global _EXPANSION_LOCK
    _EXPANSION_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ConfigError(f"seed: expected {SEED_BYTES} bytes, got {type(seed).__name__} of length "
                          f"{len(seed) if isinstance(seed, (bytes, bytearray)) else 'n/a'}")


def _encryptor(seed: bytes) -> CipherContext:
    return Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_COUNTER)).encryptor()


def expand(seed: bytes, count: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """Return ``count`` pseudorandom elements of ``dtype`` (a fresh array) from ``seed``."""
    _check_seed(seed)
    dt = np.dtype(dtype)
    nbytes = int(count) * dt.itemsize
    raw = np.empty(nbytes + _PAD, dtype=np.uint8)
    KeyStream(seed).fill(raw, nbytes)
    return raw[:nbytes].view(dt.newbyteorder("<")).astype(dt, copy=False)


def uniform01(seed: bytes, count: int) -> np.ndarray:
    """``count`` float64 values uniform on the grid {0, 2^-32, …, 1 − 2^-32}, from ``seed``.

    32 random bits per value: ample for stochastic rounding, whose inputs carry at most ~21
    fractional bits at the magnitudes :mod:`fedveil.secagg.encoding` allows.
    """
    words = expand(seed, count, np.uint32)
    return np.multiply(words, 2.0**-32, dtype=np.float64)


class KeyStream:
    """One seed's AES-CTR keystream, consumed in pieces (consecutive calls continue the stream)."""

    def __init__(self, seed: bytes) -> None:
        _check_seed(seed)
        self._enc = _encryptor(seed)
        self._zeros = np.zeros(0, dtype=np.uint8)

    def fill(self, buf: np.ndarray, nbytes: int) -> None:
        """Write the next ``nbytes`` keystream bytes into ``buf`` (uint8, ``nbytes + 16`` long)."""
        if self._zeros.size < nbytes:
            self._zeros = np.zeros(nbytes, dtype=np.uint8)
        if nbytes:
            self._enc.update_into(self._zeros[:nbytes].data, buf.data)


class MaskExpander:
    """Expands seeds into one reusable buffer of ``length`` ring elements and accumulates masks.

    Memory is O(length) regardless of how many masks are expanded, which is what keeps the
    server's unmasking at O(m) (issue 2: memory independent of n·m).
    """

    def __init__(self, length: int, dtype: np.dtype | type) -> None:
        if length < 0:
            raise ConfigError(f"length: must be >= 0 (got {length})")
        self._dtype = np.dtype(dtype)
        self._le = self._dtype.newbyteorder("<")
        self._length = int(length)
        self._nbytes = self._length * self._dtype.itemsize
        self._step = max(1, min(self._length, CHUNK_BYTES // self._dtype.itemsize))  # elements per chunk
        chunk_bytes = self._step * self._dtype.itemsize
        self._zeros = np.zeros(chunk_bytes, dtype=np.uint8)
        self._chunk_buf = np.empty(chunk_bytes + _PAD, dtype=np.uint8)
        self._full: np.ndarray | None = None

    @property
    def length(self) -> int:
        return self._length

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def expand(self, seed: bytes) -> np.ndarray:
        """The mask for ``seed`` in a buffer owned by the expander (valid until the next call)."""
        if self._full is None:
            self._full = np.empty(self._nbytes + _PAD, dtype=np.uint8)
        KeyStream(seed).fill(self._full, self._nbytes)
        return self._full[: self._nbytes].view(self._le)

    def apply(self, acc: np.ndarray, add: Sequence[bytes] = (), subtract: Sequence[bytes] = (), *,
              threads: int = 1) -> None:
        """``acc += Σ PRG(a) − Σ PRG(s)`` with wraparound, in place.

        The loop runs over chunks of ``acc`` on the outside and seeds on the inside (each seed
        keeps its own AES-CTR context, so its stream simply continues chunk after chunk): the
        accumulator chunk stays in cache while every mask is added to it, so the cost is the
        AES keystream plus one pass over ``acc`` instead of one pass per mask. Applies run one at
        a time per process (``_EXPANSION_LOCK``), which is faster than side by side under CPython.

        ``threads`` > 1 splits the seeds among that many threads, each adding its share into its
        own accumulator (the first into ``acc``), for one caller that has the cores to itself: a
        server unmasking a round while its sites wait. AES-CTR and numpy's adds run without the
        interpreter lock, so the threads overlap; the result is the same for any thread count
        (sums mod 2^bits), at the cost of ``threads − 1`` extra vectors of ``length``.
        """
        if threads < 1:
            raise ConfigError(f"threads: must be >= 1 (got {threads})")
        for seed in (*add, *subtract):
            _check_seed(seed)
        if acc.dtype != self._dtype or acc.shape != (self._length,):
            raise ConfigError(f"accumulator: expected {self._dtype} array of shape ({self._length},), "
                              f"got {acc.dtype} {acc.shape}")
        jobs = [(_encryptor(seed), np.add) for seed in add] + [(_encryptor(seed), np.subtract) for seed in subtract]
        if not jobs:
            return
        groups = [jobs[i::threads] for i in range(min(threads, len(jobs)))]
        with _EXPANSION_LOCK:
            if len(groups) == 1:
                self._accumulate(acc, jobs, self._chunk_buf, self._step)
                return
            step = max(self._step, min(self._length, PARALLEL_CHUNK_BYTES // self._dtype.itemsize))
            if self._zeros.size < step * self._dtype.itemsize:
                self._zeros = np.zeros(step * self._dtype.itemsize, dtype=np.uint8)
            partials = [np.zeros_like(acc) for _ in groups[1:]]
            with ThreadPoolExecutor(max_workers=len(partials), thread_name_prefix="mask-expander") as pool:
                pending = [pool.submit(self._accumulate, part, group, self._parallel_buffer(step), step)
                           for part, group in zip(partials, groups[1:], strict=True)]
                self._accumulate(acc, groups[0], self._parallel_buffer(step), step)
                for future in pending:
                    future.result()
            for part in partials:
                np.add(acc, part, out=acc)

    def _parallel_buffer(self, step: int) -> np.ndarray:
        return np.empty(step * self._dtype.itemsize + _PAD, dtype=np.uint8)

    def _accumulate(self, acc: np.ndarray, jobs: Sequence[tuple[CipherContext, np.ufunc]], buf: np.ndarray,
                    step: int) -> None:
        """Add (or subtract) each job's keystream into ``acc``, ``step`` elements at a time, through ``buf``."""
        out = buf.data
        zeros = self._zeros.data
        itemsize = self._dtype.itemsize
        for start in range(0, self._length, step):
            stop = min(start + step, self._length)
            nb = (stop - start) * itemsize
            data = zeros[:nb]
            view = buf[:nb].view(self._le)
            seg = acc[start:stop]
            for enc, op in jobs:
                enc.update_into(data, out)
                op(seg, view, out=seg)

    def add_mask(self, acc: np.ndarray, seed: bytes) -> None:
        """``acc += PRG(seed)`` with wraparound, in place."""
        self.apply(acc, add=(seed,))

    def subtract_mask(self, acc: np.ndarray, seed: bytes) -> None:
        """``acc -= PRG(seed)`` with wraparound, in place."""
        self.apply(acc, subtract=(seed,))
