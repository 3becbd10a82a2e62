"""CPU per unary call of gRPC Python's two servers: the thread pool and ``grpc.aio`` (issue 13).

The n = 1,000 simulation round is above 3× its mask floor, and an earlier note named moving the
driver off gRPC's thread-per-call server onto ``grpc.aio`` as one way to close the gap. Before any
rewrite this measures what it could save: a child process serves one echo method with either
server, this process makes ``--calls`` unary calls from ``--threads`` threads (as a simulation
worker's sites do) with a ``--payload``-byte request, and the server's and the client's CPU per
call are read from each process's own ``getrusage``. Nothing fedveil-specific runs, so the figures
are gRPC's own cost.

    python benchmarks/grpc_server_models.py [--calls 20000] [--threads 400] [--payload 200] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"
MODELS = ("threads", "aio")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _same(data: bytes) -> bytes:
    return data


def _serve_threads(workers: int) -> None:
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(
        lambda request, _context: request, request_deserializer=_same, response_serializer=_same)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _report_until_stdin_closes(port)
    server.stop(0)


def _serve_aio() -> None:
    async def echo(request: bytes, _context: Any) -> bytes:
        return request

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=_same, response_serializer=_same)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await asyncio.get_running_loop().run_in_executor(None, _report_until_stdin_closes, port)
        await server.stop(0)

    asyncio.run(main())


def _report_until_stdin_closes(port: int) -> None:
    """Print the port, then on each line from the parent the CPU used so far; stop at end of input."""
    print(port, flush=True)
    for _line in sys.stdin:
        print(f"{_cpu_s():.6f}", flush=True)


def measure(model: str, calls: int, threads: int, payload: int) -> dict[str, float | int | str]:
    child = subprocess.Popen([sys.executable, __file__, "--serve", model, "--threads", str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None

    def server_cpu() -> float:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("cpu\n")
        child.stdin.flush()
        return float(child.stdout.readline())

    try:
        port = int(child.stdout.readline())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        echo = channel.unary_unary(METHOD, request_serializer=_same, response_deserializer=_same)
        request = b"x" * payload
        for _ in range(50):  # connection and first-call set-up outside the figures
            echo(request)
        per_thread = calls // threads

        def site() -> None:
            for _ in range(per_thread):
                echo(request)

        workers = [threading.Thread(target=site) for _ in range(threads)]
        server_before, client_before, start = server_cpu(), _cpu_s(), time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - start
        client_used, server_used = _cpu_s() - client_before, server_cpu() - server_before
        channel.close()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    made = per_thread * threads
    return {"model": model, "calls": made, "threads": threads, "payload_bytes": payload,
            "wall_s": round(wall, 3), "server_us_per_call": round(server_used / made * 1e6, 1),
            "client_us_per_call": round(client_used / made * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=400)
    parser.add_argument("--payload", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each model, alternating")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    parser.add_argument("--serve", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "threads":
        _serve_threads(args.threads + 8)
        return 0
    if args.serve == "aio":
        _serve_aio()
        return 0
    for name, value, low in (("--calls", args.calls, 1), ("--threads", args.threads, 1),
                             ("--payload", args.payload, 0), ("--repeats", args.repeats, 1)):
        if value < low:
            parser.error(f"{name}: must be at least {low} (got {value})")
    if args.calls < args.threads:
        parser.error(f"--calls: must be at least --threads ({args.threads}) (got {args.calls})")
    runs = [measure(model, args.calls, args.threads, args.payload)
            for _ in range(args.repeats) for model in MODELS]
    for run in runs:
        print(f"{run['model']:>7}: {run['calls']} calls from {run['threads']} threads, {run['payload_bytes']} B: "
              f"server {run['server_us_per_call']} µs/call, client {run['client_us_per_call']} µs/call, "
              f"wall {run['wall_s']} s")
    summary = {model: statistics.median(float(r["server_us_per_call"]) for r in runs if r["model"] == model)
               for model in MODELS}
    print(f"median server CPU per call: threads {summary['threads']:.0f} µs, aio {summary['aio']:.0f} µs")
    if args.json:
        print(json.dumps({"runs": runs, "median_server_us_per_call": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
