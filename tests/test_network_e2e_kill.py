"""A 3-round job over loopback gRPC with 5 client processes; one is SIGKILLed mid-job.

The job must complete without it, and every round released before the kill must equal, bit for
bit, the same round of an in-process simulation with the same seeds (same initial model, data,
cohort, client seeds and stochastic-rounding seeds; the masks cancel, so the unmasked sum is
determined by the encoded inputs).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import torch

from fedveil.clients.simulation import read_rounds, simulate_in_process, start_process_federation
from fedveil.server.config import ServerConfig
from fedveil.server.store import RunStore

torch.set_num_threads(1)
N = 5


def config() -> ServerConfig:
    # round_timeout bounds how long round 2 waits for the killed client's keys (it is a dropout);
    # 40 local epochs make a round last long enough (about a second) for the kill to land mid-job
    return ServerConfig(task="fedveil.tasks.synthetic", rounds=3, clients_per_round=N, min_clients=3, seed=11,
                        round_timeout=25.0, stage_timeout=30.0, cohort_wait=2.0, linger=2.0, poll_wait=2.0,
                        local_epochs=40)


def completed_rounds(store_path: Path) -> int:
    with RunStore(store_path) as store:
        run = store.latest_run()
        return 0 if run is None else store.completed_rounds(run.run_id)


def test_sigkilled_client_job_completes_and_rounds_before_the_kill_match_in_process(tmp_path: Path) -> None:
    cfg = config()
    fed = start_process_federation(cfg, N, tmp_path / "net")
    try:
        deadline = time.monotonic() + 240
        while completed_rounds(fed.store_path) < 1:
            assert time.monotonic() < deadline, "round 1 did not complete: " + fed.server.errors()[-3000:]
            assert fed.server.alive(), fed.server.errors()[-3000:]
            time.sleep(0.02)
        victim = fed.clients[N - 1]
        victim.kill(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        rounds_at_kill = completed_rounds(fed.store_path)
        assert rounds_at_kill < 3, "the job finished before the kill landed (machine too slow to poll?)"
        assert fed.server.wait(300) == 0, fed.server.errors()[-3000:]
        survivors_exit = [c.wait(60) for c in fed.clients[: N - 1]]
        summary = json.loads(fed.server.last_line())
    finally:
        fed.group.close()
    assert survivors_exit == [0] * (N - 1), [c.errors()[-2000:] for c in fed.clients]
    assert summary["status"] == "completed" and summary["completed_rounds"] == 3
    network = read_rounds(fed.store_path, summary["run_id"])
    assert [r.round for r in network] == [1, 2, 3]
    assert network[0].survivors == N
    assert all(r.survivors == N - 1 for r in network[rounds_at_kill:])  # the killed client is not in the sum
    for name in ("client-000", "client-001"):
        outcomes = json.loads((tmp_path / "net" / "logs" / f"{name}.out").read_text().splitlines()[-1])["outcomes"]
        assert outcomes == ["completed"] * 3

    local = simulate_in_process(cfg, N, store_path=tmp_path / "inproc.sqlite")
    assert local.summary["status"] == "completed" and not local.client_errors
    for before_kill in range(rounds_at_kill):
        a, b = network[before_kill].aggregate, local.rounds[before_kill].aggregate
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)
    # after the kill the cohorts differ (4 vs 5 clients), and so do the aggregates
    assert not np.array_equal(network[rounds_at_kill].aggregate, local.rounds[rounds_at_kill].aggregate)
