"""``fedveil bench simulate``: whole jobs at scale on the Ray (or in-process) backend, against the
round's own mask-expansion floor measured in the same run.

The job is the real coordinator and the real client code on a synthetic 10-h-1 MLP with about
``dim`` parameters (the network benchmark's generated task module), SecAgg+ on a Harary graph (or
the complete graph), ``clients`` sites per round drawn from ``enrolled`` connected ones. In every
round each site leaves at the masked-input stage with probability ``dropout``
(:mod:`fedveil.simulation.faults`), so the server must rebuild and remove the leavers' pairwise masks.

The floor is what no implementation of the protocol can avoid on this machine: expanding (AES-CTR)
and adding every mask the round must expand. Each surviving site expands its k pairwise masks and
its self mask; the server expands every survivor's self mask and, for each leaver, its pairwise
masks with its surviving neighbours (k·(1 − dropout) of them on average). The cost of one mask is
measured here, with the protocol's own :class:`~fedveil.secagg.prg.MaskExpander` applying k + 1
seeds as a site does, and multiplied out: ``floor_s`` is that work done on one core,
``floor_parallel_s`` the same spread over the cores the job can use. The cost of one mask is the
fastest of several runs, taken before the job starts (the machine is quiet) and again after it;
the lower one counts. Measured only after the job, while Ray's processes were still exiting, it
read up to 56% high on a noisy machine (28.0 s against 18.0 s), which flattered the ratio.

Everything else a round does (key agreement, signatures, Shamir sharing, encoding, gRPC, Python)
is the overhead the ratio measures. Memory: ``peak_rss_mb`` is the peak resident set of this
process, which holds the driver and the coordinator (the sites live in the Ray workers).
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.model_spec import ModelSpec
from fedveil.secagg.graph import GraphSpec, build_graph
from fedveil.secagg.prg import SEED_BYTES, MaskExpander
from fedveil.secagg.survivor_checks import quorum_plan
from fedveil.secagg.threshold import plan_threshold
from fedveil.server.config import ServerConfig
from fedveil.server.events import JobEvent, StageClosed
from fedveil.simulation.backends import SimulationError, SimulationResult, simulate_in_process
from fedveil.simulation.faults import DropoutPlan
from fedveil.simulation.netbench import write_task_module
from fedveil.task import load_task

BACKENDS = ("ray", "in-process")
DP_MODES = ("none", "central", "distributed")
HELD_POLLS_PER_S = 200.0
"""The rate at which a round's held polls may come back to the server (see ``ScaleBench.poll_wait_s``)."""


@dataclass(frozen=True)
class ScaleBench:
    """One measured job (the command's flags)."""

    clients: int
    dim: int
    rounds: int
    dropout: float = 0.1
    enrolled: int | None = None
    backend: str = "ray"
    graph: str = "harary"
    dp: str = "none"
    active: bool = True
    client_cpus: float = 1.0
    ray_address: str | None = None
    seed: int = 0
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.clients < 3:
            raise SimulationError(f"clients: must be at least 3 (got {self.clients})", field="clients")
        if self.enrolled is not None and self.enrolled < self.clients:
            raise SimulationError(f"enrolled: must be at least --clients {self.clients} (got {self.enrolled})",
                                  field="enrolled")
        if self.dim < 13:
            raise SimulationError(f"dim: must be at least 13 (got {self.dim})", field="dim")
        if self.rounds < 1:
            raise SimulationError(f"rounds: must be at least 1 (got {self.rounds})", field="rounds")
        if not 0.0 <= self.dropout < 0.5:
            raise SimulationError(f"dropout: must be in [0, 0.5) (got {self.dropout})", field="dropout")
        if self.backend not in BACKENDS:
            raise SimulationError(f"backend: must be one of {', '.join(BACKENDS)} (got {self.backend!r})",
                                  field="backend")
        if self.dp not in DP_MODES:
            raise SimulationError(f"dp: must be one of {', '.join(DP_MODES)} (got {self.dp!r})", field="dp")

    @property
    def n_sites(self) -> int:
        return self.enrolled or self.clients

    def config(self, task_ref: str) -> ServerConfig:
        return ServerConfig.from_flat(
            # a simulated site that fails (e.g. gives up on an overloaded server) must not stop the
            # measurement: cohorts may start with 90% of the sites per round
            task=task_ref, rounds=self.rounds, clients_per_round=self.clients,
            min_clients=max(3, math.floor(0.9 * self.clients)),
            seed=self.seed, secagg=self.graph, expected_dropout=max(self.dropout, 0.01), dp=self.dp,
            active_adversary=self.active, evaluate=False, final_evaluation=False,
            round_timeout=self.timeout_s, stage_timeout=self.timeout_s, cohort_wait=2.0, linger=1.0,
            poll_wait=self.poll_wait_s,
        )

    @property
    def poll_wait_s(self) -> float:
        """How long the server holds a poll: 5 s, or longer so that a round's held polls come back
        at no more than :data:`HELD_POLLS_PER_S` a second. At 5,000 sites per round, 5 s meant 1,000
        polls a second, which took the driver's whole core before the first round could start."""
        return max(5.0, self.clients / HELD_POLLS_PER_S)


class StageTimes:
    """Listener: each round's stage durations (seconds), from the coordinator's StageClosed events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_round: dict[int, dict[str, float]] = defaultdict(dict)

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, StageClosed):
            with self._lock:
                self.by_round[event.round][event.stage] = event.duration_s


def mask_seconds(dim: int, degree: int, reps: int = 10) -> float:
    """Seconds to expand and add one mask of ``dim`` uint32 elements, as a site applies its k + 1
    seeds at once (the fastest of ``reps`` runs: what the work costs when nothing else runs)."""
    seeds = [os.urandom(SEED_BYTES) for _ in range(degree + 1)]
    expander = MaskExpander(dim, np.uint32)
    acc = np.zeros(dim, np.uint32)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        expander.apply(acc, add=seeds)
        times.append((time.perf_counter() - start) / len(seeds))
    return min(times)


def public_key_seconds(reps: int = 200) -> tuple[float, float]:
    """Seconds for one X25519 agreement and one Ed25519 verification with ``cryptography`` (medians)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    own = X25519PrivateKey.generate()
    peer = X25519PrivateKey.generate().public_key().public_bytes_raw()
    signer = Ed25519PrivateKey.generate()
    payload = os.urandom(128)
    signature, public = signer.sign(payload), signer.public_key()

    def timed(fn: Any) -> float:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            runs.append((time.perf_counter() - start) / reps)
        return statistics.median(runs)

    return (timed(lambda: own.exchange(X25519PublicKey.from_public_bytes(peer))),
            timed(lambda: public.verify(signature, payload)))


def masks_per_round(clients: int, degree: int, dropped: float) -> float:
    """Masks a round must expand: survivors' k + 1 each, the server's self masks of the survivors
    and the leavers' pairwise masks with their surviving neighbours (on average)."""
    survivors = clients - dropped
    return survivors * (degree + 1) + survivors + dropped * degree * survivors / clients


def survivor_set_verifications(clients: int, spec: GraphSpec, threshold: int, dropped: int, *, seed: int = 0,
                               sample: int = 25) -> float:
    """Survivor-set signatures a surviving site verifies in active mode when all are valid (the
    median over ``sample`` sites of a cohort laid out from a seeded permutation, with ``dropped``
    sites leaving at the masked-input stage): :func:`~fedveil.secagg.survivor_checks.quorum_plan`,
    the plan the sites' own check follows."""
    members = list(range(clients))
    layout_seed = hashlib.sha256(b"scalebench-layout" + str(seed).encode()).digest()[:SEED_BYTES]
    graph = build_graph(spec, clients, members, layout_seed)
    order = sorted(members, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).digest())
    dropped_set = frozenset(order[:dropped])
    survivors = frozenset(order[dropped:])
    sites = sorted(survivors)[:: max(1, len(survivors) // sample)][:sample]
    return float(statistics.median(len(quorum_plan(graph, me, survivors, dropped_set, survivors, threshold).signers)
                                   for me in sites))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_scale_bench(bench: ScaleBench) -> dict[str, Any]:
    """Run the job and return the report (the JSON object of ``--json``)."""
    plan = plan_threshold(bench.clients, bench.graph, expected_dropout=max(bench.dropout, 0.01),
                          max_corrupt_fraction=1 / 3)
    degree = plan.degree if plan.degree else bench.clients - 1
    dropout = DropoutPlan(bench.dropout, seed=bench.seed) if bench.dropout > 0 else None
    times = StageTimes()
    workers: list[float] = []
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedveil-scalebench-") as tmp:
        workdir = Path(tmp)
        task_ref = write_task_module(workdir, bench.dim)
        sys.path.insert(0, str(workdir))
        try:
            task_dim = ModelSpec.of(load_task(task_ref).build_model()).size
            quiet_mask_s = mask_seconds(task_dim, degree)  # before the job: nothing else runs yet
            result, plain = _run(bench, bench.config(task_ref), workdir, dropout, times, workers)
        finally:
            sys.path.remove(str(workdir))
    wall_s = time.monotonic() - started
    if result.summary.get("status") != "completed" or not result.rounds:
        raise SimulationError(f"the job did not complete: {result.summary.get('status')} "
                              f"({result.summary.get('reason', '')})", field="timeout")
    round_s = [float(r.stats["duration_s"]) for r in result.rounds]
    dropped = [len(r.stats.get("dropped", [])) for r in result.rounds]
    m = int(result.rounds[0].aggregate.size) if result.rounds[0].aggregate is not None else bench.dim
    after_mask_s = mask_seconds(m, degree)
    one_mask_s = min(after_mask_s, quiet_mask_s) if m == task_dim else after_mask_s
    floors = [masks_per_round(bench.clients, degree, d) * one_mask_s for d in dropped]
    cores = os.cpu_count() or 1
    report: dict[str, Any] = {
        "backend": bench.backend, "clients": bench.clients, "enrolled": bench.n_sites, "dim": m,
        "graph": bench.graph, "degree": degree, "threshold": plan.threshold, "dp": bench.dp, "active": bench.active,
        "rounds": len(round_s), "dropout": bench.dropout, "dropped": statistics.median(dropped),
        "dropped_per_round": dropped,
        "round_s": statistics.median(round_s), "round_s_each": round_s,
        "floor_s": statistics.median(floors), "floor_parallel_s": statistics.median(floors) / cores,
        "mask_s": one_mask_s, "mask_s_before_job": quiet_mask_s, "mask_s_after_job": after_mask_s,
        "masks_per_round": masks_per_round(bench.clients, degree, statistics.median(dropped)),
        "cores": cores,
        "stage_s": {stage: statistics.median(r.get(stage, 0.0) for r in times.by_round.values())
                    for stage in sorted({s for r in times.by_round.values() for s in r})},
        "stage_s_each": [{stage: round(s, 3) for stage, s in sorted(times.by_round[number].items())}
                         for number in sorted(times.by_round)],
        # this machine's 1-minute load average before the job and after it: a round's time is only
        # comparable to another's measured at a similar load (other jobs share the cores)
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "workers_peak_rss_mb": [round(w, 1) for w in workers],
        "n_times_m_mb": round(bench.clients * m * 4 / 2**20, 1),
        "wall_s": round(wall_s, 1),
        "site_failures": len(result.client_errors),
        "site_failure_examples": dict(list(sorted(result.client_errors.items()))[:3]),
    }
    # the protocol's public-key work besides the masks: each surviving site agrees two keys with each
    # of its k neighbours (mask and share keys); with --active-adversary it also verifies each
    # neighbour's signed keys and, before it reveals, the survivor-set signatures of t holders of
    # every owner whose share it reveals and of every live neighbour of those owners
    x25519_s, verify_s = public_key_seconds()
    survivors = bench.clients - report["dropped"]
    quorum_signatures = (survivor_set_verifications(bench.clients, plan.spec, plan.threshold,
                                                    round(report["dropped"]), seed=bench.seed)
                         if bench.active else 0.0)
    per_site = 2 * degree * x25519_s + ((degree + quorum_signatures) * verify_s if bench.active else 0.0)
    report.update(x25519_s=x25519_s, ed25519_verify_s=verify_s,
                  survivor_set_verifications_per_site=quorum_signatures,
                  crypto_floor_s=report["floor_s"] + survivors * per_site)
    report["round_over_floor"] = report["round_s"] / report["floor_s"]
    report["round_over_crypto_floor"] = report["round_s"] / report["crypto_floor_s"]
    report["round_over_parallel_floor"] = report["round_s"] / report["floor_parallel_s"]
    report.update(_exactness(result, plain, bench))
    return report


def _run(bench: ScaleBench, config: ServerConfig, workdir: Path, dropout: DropoutPlan | None,
         times: StageTimes, workers: list[float]) -> tuple[SimulationResult, Any]:
    if bench.backend == "in-process":
        return simulate_in_process(config, bench.n_sites, dropout=dropout, client_timeout_s=bench.timeout_s), None
    from fedveil.simulation.ray_backend import RayOptions, RaySimulation

    options = RayOptions(address=bench.ray_address, client_cpus=bench.client_cpus, working_dir=str(workdir))
    simulation = RaySimulation(config, bench.n_sites, options=options, listeners=[times], timeout_s=bench.timeout_s,
                               dropout=dropout, record_plain_sums=bench.dp == "none")
    result = simulation.run()
    workers.extend(simulation.worker_peak_rss_mb)
    return result, simulation.plain_sums


def _exactness(result: SimulationResult, plain: Any, bench: ScaleBench) -> dict[str, Any]:
    """Released aggregate vs the mean of the survivors' plaintext updates (no DP only: with DP the
    release is noised on purpose). Exact means within the fixed-point rounding, not bit for bit."""
    if plain is None or bench.dp != "none":
        return {"exact": None, "max_abs_error": None}
    errors = []
    for r in result.rounds:
        expected = plain.mean(r.round)
        if expected is None or r.aggregate is None:
            return {"exact": False, "max_abs_error": None}
        errors.append(float(np.max(np.abs(r.aggregate.astype(np.float64) - expected))))
    worst = max(errors)
    # fixed-point step of the ring for this cohort: far below 1e-4 for 32-bit rings up to 10^4 sites
    return {"exact": bool(worst < 1e-4 and math.isfinite(worst)), "max_abs_error": worst}
