"""Server memory during rounds over gRPC: does it stay O(m) as the cohort grows?

Starts ``fedveil server`` as its own process (plaintext loopback) with a wide logistic-regression
task (m = ``--dim`` parameters), and ``--clients`` clients in this process (threads, each with its
own gRPC channel and the real client protocol code: ``fedveil.clients.session.Federation``). A
client's "training" adds a small step to every weight, so the measurement is about transport and
secure aggregation, not about torch. Reported: the server's RSS after start-up, its peak RSS
(``VmHWM``) over the job, and their difference, plus the wall time per round.

    python benchmarks/server_memory.py --clients 4 --dim 1000000
    python benchmarks/server_memory.py --clients 8 --dim 1000000 --json

If the server kept every client's vector, the peak would grow by ~8·m bytes (4 MB wire + 4 MB
decoded at m = 1,000,000) per client; with the running sum and chunked transfers it should not
grow with the number of clients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedveil.clients.session import ClientOptions
from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import SimulatedSites

TASK_MODULE = '''
from fedveil.tasks.synthetic import make_task
task = make_task(n_features={features}, samples=8, name="wide-{features}")
'''


def _consortium(args: argparse.Namespace) -> tuple[SimulatedSites, list[ClientOptions]]:
    """The job's sites as a simulation makes them (an in-memory authority vouching for each, the
    secure default of active-adversary mode) and each client's options."""
    config = ServerConfig.from_flat(task="wide_task:task", rounds=args.rounds, clients_per_round=args.clients,
                                    min_clients=args.clients, round_timeout=600, stage_timeout=600, evaluate=False,
                                    final_evaluation=False, linger=0.5, seed=1, weighted=False, cohort_wait=0.0)
    sites = SimulatedSites.create(config, [f"c{i}" for i in range(args.clients)])
    policy = sites.policy()
    options = []
    for i, name in enumerate(sites.names):
        key, credential = sites.identity(name)
        options.append(ClientOptions(seed=i, poll_wait_ms=2000, identity_key=key, credential=credential,
                                     policy=policy))
    return sites, options


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="Same job with the coordinator in this process (no gRPC): round times only.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.in_process:
        return _in_process(args)
    from fedveil.clients.session import Federation
    from fedveil.protocol.client import ChannelConfig, GrpcTransport
    from fedveil.server.store import RunStore
    from fedveil.task import load_task

    features = args.dim - 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "wide_task.py").write_text(TASK_MODULE.format(features=features))
        sys.path.insert(0, str(work))
        task = load_task("wide_task:task")
        with RunStore(work / "run.db") as store:
            tokens = [store.enroll(f"c{i}").token for i in range(args.clients)]
        sites, client_options = _consortium(args)
        env = dict(os.environ, PYTHONPATH=f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   OMP_NUM_THREADS="1")
        server = subprocess.Popen(
            [sys.executable, "-m", "fedveil.cli", "server", "--listen", "127.0.0.1:0", "--port-file",
             str(work / "port"), "--store", str(work / "run.db"), "--task", "wide_task:task", "--rounds",
             str(args.rounds), "--clients-per-round", str(args.clients), "--insecure", "--round-timeout", "600",
             "--stage-timeout", "600", "--no-evaluate", "--no-final-evaluation", "--linger", "2", "--seed", "1",
             "--weighting", "uniform", "--log-level", "warning", *sites.write_files(work)["server"]],
            env=env, stdout=subprocess.DEVNULL, stderr=(work / "server.err").open("wb"),
        )
        try:
            deadline = time.monotonic() + 120
            while not (work / "port").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("server did not start:\n" + (work / "server.err").read_text())
                time.sleep(0.1)
            port = int((work / "port").read_text())
            time.sleep(0.5)
            baseline = _status(server.pid, "VmRSS")
            times: list[float] = []
            errors: list[BaseException] = []

            def client(i: int) -> None:
                try:
                    transport = GrpcTransport.connect(ChannelConfig(f"127.0.0.1:{port}", insecure=True), tokens[i])
                    fed = Federation(transport, task.name, task.build_model(), client_options[i])
                    with fed:
                        for rnd in fed:
                            with torch.no_grad():
                                for p in rnd.model.parameters():
                                    p.add_(0.001 * (i + 1))
                            started = time.perf_counter()
                            rnd.submit(rnd.model, num_examples=8)
                            if i == 0:
                                times.append(time.perf_counter() - started)
                except BaseException as err:
                    errors.append(err)

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
            for th in threads:
                th.start()
            peak_rss = baseline
            while any(th.is_alive() for th in threads) and server.poll() is None:
                peak_rss = max(peak_rss, _status(server.pid, "VmRSS"))
                time.sleep(0.02)
            try:  # the kernel's high-water mark, unless the server has exited already (then the samples)
                peak = max(peak_rss, _status(server.pid, "VmHWM"))
            except (KeyError, OSError):
                peak = peak_rss
            server.wait(60)
            if errors:
                raise SystemExit(f"client error: {errors[0]!r}")
        finally:
            if server.poll() is None:
                server.kill()
    result = {
        "clients": args.clients, "dim": args.dim, "rounds": args.rounds,
        "server_rss_baseline_mb": round(baseline / 2**20, 1), "server_rss_peak_mb": round(peak / 2**20, 1),
        "server_rss_growth_mb": round((peak - baseline) / 2**20, 1),
        "vector_mb": round(4 * args.dim / 2**20, 2),
        "round_s_client0": [round(t, 2) for t in times],
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


def _in_process(args: argparse.Namespace) -> int:
    from fedveil.clients.session import Federation
    from fedveil.protocol.transport import InProcessTransport
    from fedveil.server.coordinator import Coordinator
    from fedveil.server.store import RunStore
    from fedveil.task import load_task

    features = args.dim - 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "wide_task.py").write_text(TASK_MODULE.format(features=features))
        sys.path.insert(0, str(work))
        task = load_task("wide_task:task")
        store = RunStore(work / "run.db")
        for i in range(args.clients):
            store.enroll(f"c{i}")
        sites, client_options = _consortium(args)
        coordinator = Coordinator(sites.config, task, store)
        times: list[float] = []

        def client(i: int) -> None:
            fed = Federation(InProcessTransport(coordinator, f"c{i}"), task.name, task.build_model(), client_options[i])
            for rnd in fed:
                with torch.no_grad():
                    for p in rnd.model.parameters():
                        p.add_(0.001 * (i + 1))
                started = time.perf_counter()
                rnd.submit(rnd.model, num_examples=8)
                if i == 0:
                    times.append(time.perf_counter() - started)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for th in threads:
            th.start()
        coordinator.run()
        for th in threads:
            th.join(60)
        store.close()
    result = {"clients": args.clients, "dim": args.dim, "rounds": args.rounds, "transport": "in-process",
              "round_s_client0": [round(t, 2) for t in times]}
    print(json.dumps(result, sort_keys=True) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
