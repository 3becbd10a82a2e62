"""AES-CTR mask expansion into numpy buffers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import ConfigError
from fedveil.secagg.prg import CHUNK_BYTES, MaskExpander, expand, uniform01


def _reference(seed: bytes, nbytes: int) -> bytes:
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(nbytes))


def test_expand_is_the_aes_ctr_keystream():
    seed = os.urandom(16)
    out = expand(seed, 1000, np.uint32)
    assert out.tobytes() == _reference(seed, 4000)
    assert expand(seed, 10, np.uint64).tobytes() == _reference(seed, 80)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(0, 3 * CHUNK_BYTES // 4 + 17), wide=st.booleans())
def test_expander_add_subtract_match_reference_across_chunk_boundaries(length, wide):
    dtype = np.uint64 if wide else np.uint32
    seed_a, seed_b = os.urandom(16), os.urandom(16)
    exp = MaskExpander(length, dtype)
    acc = np.arange(length, dtype=dtype)
    exp.add_mask(acc, seed_a)
    exp.subtract_mask(acc, seed_b)
    itemsize = np.dtype(dtype).itemsize
    a = np.frombuffer(_reference(seed_a, length * itemsize), dtype=dtype)
    b = np.frombuffer(_reference(seed_b, length * itemsize), dtype=dtype)
    with np.errstate(over="ignore"):
        expected = np.arange(length, dtype=dtype) + a - b
    assert np.array_equal(acc, expected)
    assert np.array_equal(exp.expand(seed_a), a)
    exp.subtract_mask(acc, seed_a)
    exp.add_mask(acc, seed_b)
    assert np.array_equal(acc, np.arange(length, dtype=dtype))


def test_uniform01_range_and_determinism():
    seed = os.urandom(16)
    u = uniform01(seed, 100_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u, uniform01(seed, 100_000))


def test_bad_seed_and_accumulator_rejected():
    with pytest.raises(ConfigError, match="seed"):
        expand(b"x" * 15, 4)
    exp = MaskExpander(8, np.uint32)
    with pytest.raises(ConfigError, match="accumulator"):
        exp.add_mask(np.zeros(9, np.uint32), os.urandom(16))
    with pytest.raises(ConfigError, match="accumulator"):
        exp.add_mask(np.zeros(8, np.uint64), os.urandom(16))


def test_applies_run_one_at_a_time_and_give_each_thread_its_own_exact_sum(monkeypatch):
    """Concurrent applies in one process are serialized (side by side they are slower under
    CPython), and each accumulator still gets exactly its own masks."""
    import threading

    from fedveil.secagg import prg

    inside = 0
    most_inside = 0
    count_lock = threading.Lock()
    real_encryptor = prg._encryptor

    class Counting:
        def __init__(self, seed: bytes) -> None:
            self._enc = real_encryptor(seed)

        def update_into(self, data, out):
            nonlocal inside, most_inside
            assert prg._EXPANSION_LOCK.locked()
            with count_lock:
                inside += 1
                most_inside = max(most_inside, inside)
            try:
                return self._enc.update_into(data, out)
            finally:
                with count_lock:
                    inside -= 1

    length = 2 * CHUNK_BYTES // 4 + 5
    seeds = [[os.urandom(16) for _ in range(4)] for _ in range(8)]
    expected = []
    for own in seeds:
        added = sum((expand(seed, length, np.uint32) for seed in own[1:3]), expand(own[0], length, np.uint32))
        expected.append(added - expand(own[3], length, np.uint32))
    monkeypatch.setattr(prg, "_encryptor", Counting)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(seeds))

    def site(i: int) -> None:
        acc = np.zeros(length, np.uint32)
        start.wait()
        MaskExpander(length, np.uint32).apply(acc, add=seeds[i][:3], subtract=seeds[i][3:])
        results[i] = acc

    threads = [threading.Thread(target=site, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most_inside == 1
    for i in range(len(seeds)):
        assert np.array_equal(results[i], expected[i])


def test_a_child_forked_while_another_thread_expands_can_expand():
    """The lock is copied by fork in whatever state it is in; the child gets a fresh one."""
    import multiprocessing

    from fedveil.secagg import prg

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    prg._EXPANSION_LOCK.acquire()  # as if another thread were mid-apply at the fork
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_expand_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        stuck = child.is_alive()
        if stuck:
            child.kill()
    finally:
        prg._EXPANSION_LOCK.release()
    assert not stuck, "the forked child waited forever for a lock held by a thread it does not have"
    assert queue.get(timeout=10) == expand(bytes(16), 8, np.uint32).tolist()
    assert not prg._EXPANSION_LOCK.locked()


def _expand_in_child(queue) -> None:
    acc = np.zeros(8, np.uint32)
    MaskExpander(8, np.uint32).apply(acc, add=[bytes(16)])
    queue.put(acc.tolist())


@settings(max_examples=30, deadline=None)
@given(length=st.integers(0, 70_000), wide=st.booleans(), adds=st.integers(0, 9), subtracts=st.integers(0, 9),
       threads=st.integers(2, 5))
def test_threaded_apply_gives_the_single_threaded_sum(length, wide, adds, subtracts, threads):
    """Splitting the seeds among threads (each with its own accumulator and bigger chunks) changes
    nothing in the result: every mask is added or subtracted exactly once, mod 2^bits."""
    dtype = np.uint64 if wide else np.uint32
    seeds = [os.urandom(16) for _ in range(adds + subtracts)]
    start = np.arange(length, dtype=dtype) * dtype(2654435761)
    one, many = start.copy(), start.copy()
    MaskExpander(length, dtype).apply(one, add=seeds[:adds], subtract=seeds[adds:])
    MaskExpander(length, dtype).apply(many, add=seeds[:adds], subtract=seeds[adds:], threads=threads)
    assert np.array_equal(one, many)
    if seeds and length:
        assert not np.array_equal(many, start)


def test_threads_below_one_are_rejected():
    with pytest.raises(ConfigError, match="threads: must be >= 1"):
        MaskExpander(8, np.uint32).apply(np.zeros(8, np.uint32), add=[os.urandom(16)], threads=0)
