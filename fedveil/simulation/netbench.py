"""``fedveil bench network``: one round over loopback gRPC with client processes vs the same round in-process.

Both runs use the real coordinator and the real client code, on a synthetic MLP with about
``dim`` parameters (generated into a small task module so every process builds the same model).
The round's duration is the server's own measurement (round start to the released aggregate,
stored with the round). The server process's memory is sampled from ``/proc`` during the job:
its resident set before the clients arrive, and its peak (``VmHWM``) by the end; the peak
increase is printed for two cohort sizes to show whether it grows with n·m.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import COORDINATOR_HOST, SimulationError, simulate_in_process
from fedveil.simulation.host import CoordinatorHost
from fedveil.simulation.process_backend import orphan_grace_s, start_process_federation, wait_for_server
from fedveil.simulation.processes import status_kib

MakeConfig = Callable[[str, int, int], ServerConfig]
"""``make_config(task_ref, clients, rounds)``: the job to measure (the command builds a ServerConfig)."""

N_FEATURES = 10
MIB = 1024 * 1024


def hidden_for(dim: int) -> int:
    """Hidden width of a 10-h-1 MLP with about ``dim`` parameters (12h + 1)."""
    if dim < 13:
        raise ValueError(f"dim must be at least 13 (got {dim})")
    return (dim - 1) // 12


def write_task_module(directory: Path, dim: int) -> str:
    """Write ``fedveil_netbench_task_<dim>.py`` defining ``task`` with about ``dim`` parameters; return its
    reference. The name carries the size: a process that imported another size's module before (a
    second benchmark in the same process) must not get that one from its module cache."""
    hidden = hidden_for(dim)
    module = f"fedveil_netbench_task_{dim}"
    (directory / f"{module}.py").write_text(
        "from fedveil.tasks.synthetic import make_task\n\n"
        f"task = make_task(n_features={N_FEATURES}, hidden={hidden}, samples=64, batch_size=64, local_epochs=1,\n"
        f"                 name='synthetic-wide-{dim}')\n"
    )
    return f"{module}:task"


class RssSampler:
    """Samples a process's resident set size every ``interval_s`` until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_kib(self.pid, "VmRSS")
            if rss is None:
                return
            self.peak_kib = max(self.peak_kib, rss)
            hwm = status_kib(self.pid, "VmHWM")
            if hwm is not None:
                self.hwm_kib = max(self.hwm_kib, hwm)
            time.sleep(self.interval_s)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


@dataclass
class NetworkRun:
    mode: str
    clients: int
    round_s: list[float]
    server_baseline_mib: float | None = None
    server_peak_mib: float | None = None

    @property
    def best_round_s(self) -> float:
        return min(self.round_s)

    @property
    def server_growth_mib(self) -> float | None:
        if self.server_baseline_mib is None or self.server_peak_mib is None:
            return None
        return self.server_peak_mib - self.server_baseline_mib


def run_in_process(
    task_ref: str, clients: int, rounds: int, workdir: Path, *, make_config: MakeConfig,
    host: CoordinatorHost = COORDINATOR_HOST,
) -> NetworkRun:
    result = simulate_in_process(make_config(task_ref, clients, rounds), clients, host=host,
                                 store_path=workdir / f"inproc-{clients}.sqlite")
    if result.summary.get("status") != "completed" or result.client_errors:
        raise SimulationError(f"in-process run failed: {result.summary.get('message')} {result.client_errors}")
    return NetworkRun("in-process", clients, [float(r.stats["duration_s"]) for r in result.rounds])


def run_processes(
    task_ref: str, clients: int, rounds: int, workdir: Path, timeout_s: float, *, make_config: MakeConfig,
    host: CoordinatorHost = COORDINATOR_HOST,
) -> NetworkRun:
    config = make_config(task_ref, clients, rounds)
    fed = start_process_federation(config, clients, workdir / f"net-{clients}", host=host, start_clients=False,
                                   env={"PYTHONPATH": str(workdir)})
    try:
        baseline = status_kib(fed.server.pid, "VmRSS")
        sampler = RssSampler(fed.server.pid).start()
        fed.clients = [fed.start_client(i, config, extra=("--log-level", "warning")) for i in range(clients)]
        try:
            status = wait_for_server(fed, timeout_s, grace_s=orphan_grace_s(config))
        finally:
            sampler.stop()
        if status != 0:
            raise SimulationError(f"the server exited with status {status}: {fed.server.errors()[-2000:]}")
        import json

        summary = json.loads(fed.server.last_line())
    finally:
        fed.group.close()
    rounds_done = host.read_rounds(fed.store_path, str(summary["run_id"]))
    return NetworkRun(
        "processes", clients, [float(r.stats["duration_s"]) for r in rounds_done],
        server_baseline_mib=(baseline or 0) / 1024.0,
        server_peak_mib=max(sampler.peak_kib, sampler.hwm_kib) / 1024.0,
    )


def run_network_bench(
    clients: int, dim: int, *, host: CoordinatorHost = COORDINATOR_HOST, make_config: MakeConfig, rounds: int = 2,
    memory_clients: int | None = None, timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the benchmark; returns the report (the JSON object of ``--json``).

    ``host`` is the server side (the real coordinator and run store) and ``make_config`` builds
    the job; the command passes both, since ``fedveil.clients`` does not import ``fedveil.server``.
    """
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedveil-netbench-") as tmp:
        workdir = Path(tmp)
        task_ref = write_task_module(workdir, dim)
        sys.path.insert(0, str(workdir))
        try:
            from fedveil.task import load_task

            params = sum(p.numel() for p in load_task(task_ref).build_model().parameters())
            inproc = run_in_process(task_ref, clients, rounds, workdir, host=host, make_config=make_config)
            net = run_processes(task_ref, clients, rounds, workdir, timeout_s, host=host, make_config=make_config)
            small = None
            if memory_clients is not None and memory_clients != clients:
                small = run_processes(task_ref, memory_clients, rounds, workdir, timeout_s, host=host,
                                      make_config=make_config)
        finally:
            sys.path.remove(str(workdir))
    report: dict[str, Any] = {
        "clients": clients,
        "dim": params,
        "rounds": rounds,
        "in_process_round_s": inproc.round_s,
        "grpc_round_s": net.round_s,
        "in_process_best_s": round(inproc.best_round_s, 3),
        "grpc_best_s": round(net.best_round_s, 3),
        "ratio": round(net.best_round_s / inproc.best_round_s, 3),
        "target_ratio": 1.5,
        "masked_input_mib": round(4 * params / MIB, 2),
        "server_memory": [],
    }
    for run in [r for r in (small, net) if r is not None]:
        report["server_memory"].append({
            "clients": run.clients,
            "baseline_mib": round(run.server_baseline_mib or 0.0, 1),
            "peak_mib": round(run.server_peak_mib or 0.0, 1),
            "growth_mib": round(run.server_growth_mib or 0.0, 1),
            "n_times_m_mib": round(run.clients * 4 * params / MIB, 1),
        })
    return report
