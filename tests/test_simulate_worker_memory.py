"""The simulation workers: their malloc setting, and how long their sites wait on a large cohort.

The burst scenario runs in a fresh interpreter, so the test process's own allocator is untouched.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

BURST = """
import sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = bytearray(1 << 20)
del big  # glibc now maps only blocks of 1 MiB or more on their own (as after a worker's imports)
if sys.argv[1] == "fixed":
    from fedveil.simulation.worker_memory import return_large_blocks_to_os
    assert return_large_blocks_to_os()
before = rss()
burst, survivors = [], []
for _ in range(400):  # 80 MB of 200 KiB blocks (a worker's sites each parsing a RoundStart) ...
    block = bytearray(200 * 1024)
    block[::4096] = b"\\x01" * len(block[::4096])
    burst.append(block)
    survivors.append(bytearray(600))  # ... with small objects that outlive them in between
del burst
print(rss() - before)
"""


def resident_after_burst(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", BURST, mode], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"),
                    reason="glibc's mallopt only")
def test_a_freed_burst_of_large_blocks_goes_back_to_the_os() -> None:
    assert resident_after_burst("plain") > 40  # glibc's own behaviour: the burst stays (about 78 MB)
    assert resident_after_burst("fixed") < 10


def test_a_sites_patience_grows_with_the_cohort_and_the_enrolled_sites() -> None:
    """A stage sends each of n sites n keys: the last calls of a 5,000-site round passed 120 s; and
    10,000 sites that have just joined poll at once: 9 of them ran out of 120 s of retries."""
    from fedveil.server.config import ServerConfig
    from fedveil.simulation.backends import site_patience_s

    def per_round(n: int) -> ServerConfig:
        return ServerConfig.from_flat(task="fedveil.tasks.synthetic:task", clients_per_round=n, min_clients=n, rounds=1)

    assert site_patience_s(per_round(10)) == site_patience_s(per_round(1000)) == 120.0
    assert site_patience_s(per_round(5000)) == pytest.approx(300.0)
    assert site_patience_s(per_round(20000)) > site_patience_s(per_round(5000))
    assert site_patience_s(per_round(1000), 10_000) == pytest.approx(600.0)  # enrolled beyond the cohort
    assert site_patience_s(per_round(1000), 500) == 120.0
