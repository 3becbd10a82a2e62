"""The long fuzzing campaign (issue 10): the targets of ``tests/test_fuzz_*.py`` with a large budget.

    .venv/bin/python benchmarks/fuzz.py --inputs 100000

Runs fresh jobs in batches (each a real coordinator with honest sites and a fuzzing site; the
gRPC target behind a real ``build_server``; the dashboard on a real HTTP server) until the
budget is spent, then prints inputs, outcomes and failures per target and the wall time. Exit
status 1 on any failure: an unmapped exception (INTERNAL), a gRPC INTERNAL/UNKNOWN, an HTTP 5xx,
a leaked path/traceback/token, or honest sites that did not finish with the exact mean.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedveil.protocol.auth import Authenticator  # noqa: E402
from fedveil.protocol.service import ServerLimits, build_server  # noqa: E402
from tests.fuzz_inputs import dashboard_requests  # noqa: E402
from tests.fuzz_targets import FederationUnderFuzz, Outcomes, dashboard_call, grpc_call  # noqa: E402
from tests.test_fuzz_federation import rpc_and_edits  # noqa: E402
from tests.test_fuzz_protocol import payloads  # noqa: E402

BATCH = 3000


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def fuzz_coordinator(budget: int, total: Outcomes) -> None:
    while total.total < budget:
        _coordinator_batch(min(BATCH, budget - total.total), total)


def _coordinator_batch(examples: int, total: Outcomes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = FederationUnderFuzz(Path(tmp), honest=5, rounds=2).start()

        @_settings(examples)
        @given(rpc_and_edits())
        def run(case: tuple[str, list]) -> None:  # type: ignore[type-arg]
            target.send(*case)

        try:
            run()
            summary = target.finish()
            if summary is None or summary.status != "completed" or target.honest_errors():
                target.outcomes.fail(f"honest job did not finish: {summary} {target.honest_errors()}")
            elif not target.released_mean_is_exact():
                target.outcomes.fail("a released aggregate is not the honest sites' exact mean")
        finally:
            target.finish(timeout=0)
            target.close()
        total.counts.update(target.outcomes.counts)
        total.failures += target.outcomes.failures


def fuzz_grpc(budget: int, total: Outcomes) -> None:
    while total.total < budget:
        _grpc_batch(min(BATCH, budget - total.total), total)


def _grpc_batch(examples: int, total: Outcomes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = FederationUnderFuzz(Path(tmp), honest=5, rounds=2)
        store = target.store
        token = store.enroll("mallory", rotate=True).token
        server, port = build_server(
            target.coordinator, Authenticator(store.credential, client_exists=store.client_enrolled),
            "127.0.0.1:0", credentials=None,
            limits=ServerLimits(max_message_bytes=target.coordinator.max_message_bytes(), workers=8,
                                max_concurrent_rpcs=32))
        tokens = {"mallory": token, "none": None, "wrong": "x" * 43}
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        target.start()

        @_settings(examples)
        @given(payloads(target))
        def run(case: tuple[str, bytes, str]) -> None:
            rpc, payload, who = case
            grpc_call(channel, rpc, payload, tokens[who], target.outcomes)

        try:
            run()
            summary = target.finish()
            if summary is None or summary.status != "completed" or target.honest_errors():
                target.outcomes.fail(f"honest job did not finish: {summary} {target.honest_errors()}")
        finally:
            target.finish(timeout=0)
            channel.close()
            server.stop(0).wait(5)
            target.close()
        total.counts.update(target.outcomes.counts)
        total.failures += target.outcomes.failures


def fuzz_dashboard(budget: int, total: Outcomes) -> None:
    from fedveil.demo import healthcare
    from fedveil.server.dashboard import Dashboard, DashboardServer, MemoryRunSource, SiteDataDirs
    from fedveil.server.dashboard_auth import LoginToken

    token = LoginToken.generate()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = SiteDataDirs(Path(tmp) / "hospitals", ("hospital-1", "hospital-2"), healthcare.task,
                                max_bytes=20_000)
        app = Dashboard(task=healthcare.task, runs=MemoryRunSource(), sites=dirs,
                        assessor=lambda m, x: healthcare.assess(m, x).to_dict())
        server = DashboardServer(app, port=0, token=token).start()
        try:
            while total.total < budget:
                @_settings(min(BATCH, budget - total.total))
                @given(dashboard_requests(), st.sampled_from(["token", "token", "token", "none", "wrong"]))
                def run(request: tuple[str, str, bytes, dict[str, str]], who: str) -> None:
                    method, path, body, headers = request
                    sent = {"token": token.value, "none": None, "wrong": "w" * 43}[who]
                    status = dashboard_call(server.url, method, path, body, headers, sent, total,
                                            secrets=(token.value, tmp))
                    if who != "token" and "/api/" in path and status is not None and status < 400:
                        total.fail(f"{method} {path} answered {status} without the token")

                run()
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="total inputs over the three targets")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # every refusal is logged as a warning: keep the figures readable
    logging.getLogger("fedveil").setLevel(logging.ERROR)
    if args.inputs < 3:
        parser.error("--inputs: at least 3 (one per target)")
    share = args.inputs // 3
    results: dict[str, Outcomes] = {}
    timings: dict[str, float] = {}
    for name, fuzz, budget in (("coordinator", fuzz_coordinator, share), ("grpc", fuzz_grpc, share),
                               ("dashboard", fuzz_dashboard, args.inputs - 2 * share)):
        start = time.perf_counter()
        results[name] = Outcomes()
        fuzz(budget, results[name])
        timings[name] = time.perf_counter() - start
        outcome = results[name]
        print(f"{name:12s} {outcome.total:7d} inputs  {outcome.counts['FAILURE']:3d} failures  "
              f"{timings[name]:7.1f} s  {dict(Counter(outcome.counts).most_common(8))}", flush=True)
        for failure in outcome.failures[:5]:
            print("   FAILURE:", failure[:600], flush=True)
    inputs = sum(r.total for r in results.values())
    failures = sum(r.counts["FAILURE"] for r in results.values())
    report = {"inputs": inputs, "failures": failures, "wall_s": round(sum(timings.values()), 1),
              "per_target": {n: {"inputs": r.total, "failures": r.counts["FAILURE"], "wall_s": round(timings[n], 1)}
                             for n, r in results.items()}}
    print(f"total: {inputs} inputs, {failures} failures (INTERNAL/UNKNOWN/5xx/leaks), {report['wall_s']} s")
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
