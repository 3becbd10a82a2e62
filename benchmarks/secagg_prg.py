"""Mask expansion rate vs the raw AES-CTR rate of ``cryptography`` on this machine (issue 2).

raw: one ``update_into`` call that encrypts a zero buffer into a preallocated buffer, the
fastest way to get AES-CTR keystream out of ``cryptography``. Mask expansion, as the protocol
does it: a fresh AES-CTR context per seed, keystream into the expander's reusable buffer, and
the wraparound add into the accumulator — for one mask (``MaskExpander.add_mask``) and for 20
masks at once (``MaskExpander.apply``, what a client does with its neighbours' seeds). Rates
count mask bytes produced per second; best of several repetitions.

Contention: T threads of one process each apply 253 seeds (a site's k + 1 at n = 1,000) to their
own m = 100,000 accumulator at the same moment, as a simulation worker's site threads do at the
masked-input stage; reported as wall and CPU microseconds per mask. The library runs one apply at a
time per process; before it did, 500 threads took 175 µs (wall) and 305 µs (CPU) per mask against
51 µs one after another (docs/scale-measurements.md).

    python benchmarks/secagg_prg.py [--json]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedveil.secagg.prg import MaskExpander

MASKS = 20


def best_seconds(fn: Callable[[], None], reps: int = 7, inner: int = 10) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def measure(m: int) -> dict[str, float]:
    nbytes = 4 * m
    zeros = np.zeros(nbytes, np.uint8)
    out = np.empty(nbytes + 16, np.uint8)
    key = os.urandom(16)
    expander = MaskExpander(m, np.uint32)
    acc = np.zeros(m, np.uint32)
    seeds = [os.urandom(16) for _ in range(MASKS)]

    def raw() -> None:
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, out)

    raw_rate = nbytes / best_seconds(raw)
    one_rate = nbytes / best_seconds(lambda: expander.add_mask(acc, seeds[0]))
    many_rate = MASKS * nbytes / best_seconds(lambda: expander.apply(acc, add=seeds[:10], subtract=seeds[10:]),
                                              inner=2)
    return {
        f"m{m}_raw_aes_ctr_GBps": raw_rate / 1e9,
        f"m{m}_one_mask_GBps": one_rate / 1e9,
        f"m{m}_{MASKS}_masks_GBps": many_rate / 1e9,
        f"m{m}_one_mask_ratio": one_rate / raw_rate,
        f"m{m}_{MASKS}_masks_ratio": many_rate / raw_rate,
    }


def concurrent_us_per_mask(threads: int, m: int = 100_000, seeds_each: int = 253) -> tuple[float, float]:
    """(wall, CPU) microseconds per mask when ``threads`` threads apply ``seeds_each`` seeds at once."""
    seeds = [[os.urandom(16) for _ in range(seeds_each)] for _ in range(threads)]
    ready = threading.Barrier(threads + 1)

    def site(own: list[bytes]) -> None:
        expander, acc = MaskExpander(m, np.uint32), np.zeros(m, np.uint32)
        ready.wait()
        expander.apply(acc, add=own)

    workers = [threading.Thread(target=site, args=(own,)) for own in seeds]
    for w in workers:
        w.start()
    ready.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    masks = threads * seeds_each
    return (time.perf_counter() - wall) / masks * 1e6, (time.process_time() - cpu) / masks * 1e6


def main() -> None:
    report: dict[str, float] = {}
    for m in (100_000, 1_000_000):
        report.update(measure(m))
    for threads in (1, 2, 16, 100, 500):
        wall_us, cpu_us = concurrent_us_per_mask(threads)
        report[f"threads{threads}_wall_us_per_mask"] = wall_us
        report[f"threads{threads}_cpu_us_per_mask"] = cpu_us
    if "--json" in sys.argv:
        print(json.dumps(report, sort_keys=True))
    else:
        for k, v in report.items():
            print(f"{k:32s} {v:8.3f}")


if __name__ == "__main__":
    main()
