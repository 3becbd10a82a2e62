"""``fedveil bench load``: one ``fedveil server`` process holding many connected sites over loopback gRPC.

The server is the real one (``fedveil server``, started as its own process, secure defaults included);
the sites are the real client code (:class:`~fedveil.clients.session.Federation` over
:class:`~fedveil.protocol.client.GrpcTransport`) on the tiny synthetic logistic task, one thread per
site in a few worker processes, so a thousand sessions fit on a small machine. Every round samples
``per_round`` of the connected sites; the rest keep polling.

Measured: each RPC's latency as its caller sees it (``Poll`` is a long poll: the server holds it until
there is something to say, so its figures are hold times, reported apart), the rounds' durations,
the server's resident memory and open file descriptors (sampled from ``/proc`` while the job runs),
every gRPC INTERNAL status the sites received, tracebacks in the server's log, and rounds lost
(attempts that aborted, rounds that did not complete).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import SimulationError, client_name
from fedveil.simulation.process_backend import orphan_grace_s, start_process_federation, wait_for_server
from fedveil.simulation.processes import status_kib

TASK = "fedveil.tasks.synthetic:task"
TIMED_RPCS = ("join", "poll", "respond_to_round", "reveal_contribution", "advertise_keys", "share_keys",
              "submit_masked_input", "confirm_survivors", "unmask", "report_metrics")


@dataclass(frozen=True)
class LoadBench:
    sites: int = 1000
    per_round: int = 150
    rounds: int = 20
    processes: int = 4
    active: bool = True
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.per_round < 3:
            raise SimulationError(f"per_round: must be at least 3 (got {self.per_round})", field="per_round")
        if self.sites < self.per_round:
            raise SimulationError(f"sites: must be at least --per-round {self.per_round} (got {self.sites})",
                                  field="sites")
        if self.rounds < 1:
            raise SimulationError(f"rounds: must be at least 1 (got {self.rounds})", field="rounds")
        if not 1 <= self.processes <= self.sites:
            raise SimulationError(f"processes: must be in [1, --sites] (got {self.processes})", field="processes")

    def config(self) -> ServerConfig:
        return ServerConfig.from_flat(
            task=TASK, rounds=self.rounds, clients_per_round=self.per_round, min_clients=self.per_round, seed=0,
            active_adversary=self.active, evaluate=False, final_evaluation=False, round_timeout=600.0,
            # linger past the longest "come back later" an idle site is given (half the poll wait), so
            # every site hears that the job is done before the server goes
            stage_timeout=300.0, cohort_wait=1.0, linger=8.0, poll_wait=10.0,
        )


class TimedTransport:
    """Forwards every call to the site's transport and records its latency and any error status."""

    def __init__(self, inner: Any, latencies: dict[str, list[float]], errors: Counter[str],
                 lock: threading.Lock) -> None:
        self._inner, self._latencies, self._errors, self._lock = inner, latencies, errors, lock

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in TIMED_RPCS:
            return target

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return target(*args, **kwargs)
            except Exception as err:
                code = getattr(getattr(err, "code", None), "name", None) or type(err).__name__
                with self._lock:
                    self._errors[f"{name}:{code}"] += 1
                raise
            finally:
                with self._lock:
                    self._latencies[name].append(time.perf_counter() - start)

        return timed


def _worker(address: str, config: ServerConfig, n_sites: int, sites: list[tuple[int, str, bytes, bytes]],
            policy: Any, out: Any) -> None:
    """One worker process: a thread per site running the real client loop; puts its figures on ``out``."""
    import torch

    from fedveil.clients.api import run_client
    from fedveil.clients.session import Federation
    from fedveil.protocol.client import ChannelConfig, GrpcTransport
    from fedveil.simulation.backends import client_dataset, site_options
    from fedveil.simulation.host import job_seed
    from fedveil.task import load_task

    torch.set_num_threads(1)
    task = load_task(config.task)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    failures: dict[str, str] = {}

    def run(index: int, token: str, key_pem: bytes, credential: bytes) -> None:
        name = client_name(index)
        try:
            data = client_dataset(task, index, n_sites, job_seed(config))
            key = serialization.load_pem_private_key(key_pem, None) if key_pem else None
            options = site_options(config, task, index, data, identity=key, credential=credential,  # type: ignore[arg-type]
                                   policy=policy)
            channel = ChannelConfig(target=address, insecure=True, own_connection=True)
            transport = TimedTransport(GrpcTransport.connect(channel, token), latencies, errors, lock)
            run_client(Federation(transport, task.name, task.build_model(), options), task, data)
        except Exception as err:  # counted; the server sees a dropout
            with lock:
                failures[name] = f"{type(err).__name__}: {err}"[:300]

    threads = [threading.Thread(target=run, args=spec, daemon=True) for spec in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put({"latencies": dict(latencies), "errors": dict(errors), "failures": failures})


class ProcSampler:
    """Samples a process's resident memory and open file descriptors from ``/proc`` twice a second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            hwm_kib = status_kib(self.pid, "VmHWM")
            try:
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except OSError:
                return
            if hwm_kib is None:
                return
            self.peak_rss_mb = max(self.peak_rss_mb, hwm_kib / 1024.0)
            self.peak_fds = max(self.peak_fds, fds)
            self._stop.wait(0.5)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_load_bench(bench: LoadBench, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    config = bench.config()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedveil-loadbench-") as tmp:
        workdir = Path(tmp)
        fed = start_process_federation(config, bench.sites, workdir, start_clients=False)
        try:
            sites = fed.sites
            assert sites is not None
            policy, job_config = sites.policy(), sites.config
            specs = []
            for i in range(bench.sites):
                key, credential = sites.identity(client_name(i))
                key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()) if key is not None else b""
                specs.append((i, fed.tokens[i], key_pem, credential))
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            workers = [ctx.Process(target=_worker, args=(fed.address, job_config, bench.sites,
                                                                    specs[p::bench.processes], policy, out),
                                   daemon=True) for p in range(bench.processes)]
            with ProcSampler(fed.server.pid) as sampler:
                for w in workers:
                    w.start()
                progress(f"{bench.sites} sites in {bench.processes} processes against server pid {fed.server.pid}")
                code = wait_for_server(fed, bench.timeout_s, grace_s=orphan_grace_s(config))
                results = [out.get(timeout=120.0) for _ in workers]
            for w in workers:
                w.join(timeout=30.0)
            server_log = fed.server.log()
        finally:
            fed.group.close()
        report = _report(bench, fed.store_path, results, sampler, server_log, code)
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def _report(bench: LoadBench, store_path: Path, results: list[dict[str, Any]], sampler: ProcSampler,
            server_log: str, exit_code: int) -> dict[str, Any]:
    from fedveil.server.store import RunStore

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for r in results:
        for rpc, values in r["latencies"].items():
            latencies[rpc].extend(values)
        errors.update(r["errors"])
        failures.update(r["failures"])
    with RunStore(store_path) as store:
        runs = store.runs()
        run = runs[-1]
        records = store.rounds(run.run_id)
    completed = [r for r in records if r.status == "completed"]
    durations = [float(r.stats.get("duration_s", 0.0)) for r in completed]
    rpc = {name: {"calls": len(v), "p50_ms": 1e3 * percentile(v, 0.5), "p99_ms": 1e3 * percentile(v, 0.99)}
           for name, v in sorted(latencies.items()) if v}
    non_poll = [x for name, v in latencies.items() if name != "poll" for x in v]
    internal = sum(n for key, n in errors.items() if key.endswith(":INTERNAL") or key.endswith(":InternalError"))
    return {
        "sites": bench.sites, "per_round": bench.per_round, "rounds": bench.rounds, "processes": bench.processes,
        "active": bench.active, "server_exit": exit_code, "run_status": run.status,
        "completed_rounds": len(completed), "aborted_attempts": sum(r.status == "aborted" for r in records),
        "lost_rounds": bench.rounds - len(completed),
        "round_s": statistics.median(durations) if durations else None, "round_s_max": max(durations, default=None),
        "rpc": rpc, "p50_ms": 1e3 * percentile(non_poll, 0.5) if non_poll else None,
        "p99_ms": 1e3 * percentile(non_poll, 0.99) if non_poll else None,
        "internal_errors": internal, "error_statuses": dict(sorted(errors.items())),
        "server_tracebacks": server_log.count("Traceback"), "site_failures": len(failures),
        "site_failure_examples": dict(list(sorted(failures.items()))[:3]),
        "server_peak_rss_mb": round(sampler.peak_rss_mb, 1), "server_peak_fds": sampler.peak_fds,
    }
