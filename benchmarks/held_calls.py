"""CPU that a process spends while many of its sites are blocked in held polls (issue 13).

A Ray worker of ``fedveil simulate --backend ray`` hosts hundreds to thousands of sites, and each
spends most of a job blocked in a long poll the server holds. This starts a gRPC server in a child
process that holds every ``Poll`` for ``--hold`` seconds, blocks ``--calls`` threads of this process
in one ``Poll`` each, and reports this process's CPU (user and system, in % of one core) and its
voluntary context switches over ``--measure`` seconds while all of them wait. Three ways to wait:

- ``blocking``: gRPC's blocking call, one channel per site (the code before this benchmark);
- ``own-channels``: :class:`~fedveil.protocol.client.GrpcTransport` (an event set by the call's
  completion), one channel per site;
- ``shared-channel``: the same transport, every site on one channel, as a simulation worker's sites
  are.

    python benchmarks/held_calls.py [--calls 600] [--hold 30] [--measure 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

from fedveil.protocol import SERVICE_NAME
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.client import GrpcTransport

POLL = f"/{SERVICE_NAME}/Poll"


def serve(hold_s: float, calls: int) -> None:
    """Child process: hold each Poll ``hold_s`` seconds, then answer with a Wait."""

    def poll(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        time.sleep(hold_s)
        return pb.PollResponse(wait=pb.Wait(retry_after_ms=0)).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=calls + 8))
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {"Poll": grpc.unary_unary_rpc_method_handler(poll)})
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop(0)


def measure(mode: str, port: int, calls: int, settle_s: float, measure_s: float) -> dict[str, float | str | int]:
    target = f"127.0.0.1:{port}"
    shared = grpc.insecure_channel(target)
    request = pb.PollRequest(max_wait_ms=0)

    def one_site() -> None:
        if mode == "blocking":
            channel = grpc.insecure_channel(target)
            channel.unary_unary(POLL, request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=pb.PollResponse.FromString)(request, timeout=120.0)
            channel.close()
            return
        own = mode == "own-channels"
        transport = GrpcTransport(grpc.insecure_channel(target) if own else shared, rpc_timeout_s=120.0,
                                  owns_channel=own)
        transport.poll(request)
        transport.close()

    threads = [threading.Thread(target=one_site, daemon=True) for _ in range(calls)]
    for thread in threads:
        thread.start()
    time.sleep(settle_s)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(measure_s)
    after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
    for thread in threads:
        thread.join()
    shared.close()
    return {
        "mode": mode, "calls": calls,
        "user_pct": round(100 * (after.ru_utime - before.ru_utime) / elapsed, 2),
        "system_pct": round(100 * (after.ru_stime - before.ru_stime) / elapsed, 2),
        "voluntary_switches_per_s": round((after.ru_nvcsw - before.ru_nvcsw) / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--measure", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.hold, args.calls)
        return
    rows = []
    for mode in ("blocking", "own-channels", "shared-channel"):
        child = subprocess.Popen([sys.executable, __file__, "--serve", "--hold", str(args.hold), "--calls",
                                  str(args.calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        settle_s = min(5.0, args.hold / 4)
        rows.append(measure(mode, port, args.calls, settle_s, min(args.measure, args.hold - settle_s - 1)))
        child.stdin.close()
        child.wait(30)
        row = rows[-1]
        print(f"{row['mode']:>15}: {row['calls']} held calls, user {row['user_pct']}% + system "
              f"{row['system_pct']}% of a core, {row['voluntary_switches_per_s']} context switches/s", flush=True)
    if args.json:
        print(json.dumps({"held_calls": rows}))


if __name__ == "__main__":
    main()
