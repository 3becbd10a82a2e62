"""``fedveil server`` serves the standard gRPC health service (grpc.health.v1): probed here with
the standard stub against a real server running a real job over loopback gRPC."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedveil.protocol import SERVICE_NAME
from fedveil.protocol.health import ServingHealth
from tests.ops_helpers import join_sites, run_sites, start_served_job

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


@pytest.mark.slow
def test_a_real_server_is_serving_while_its_job_runs_and_not_serving_once_it_has_ended(tmp_path: Path) -> None:
    job = start_served_job(tmp_path, ["a", "b", "c"], rounds=2, linger=3.0)
    channel = grpc.insecure_channel(job.address)
    stub = health_pb2_grpc.HealthStub(channel)  # no bearer token: a load balancer has none
    # the job runs (it waits for its cohort): the server as a whole and the federation service are up
    assert check(stub, "") == SERVING
    assert check(stub, SERVICE_NAME) == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        check(stub, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    seen: list[int] = []
    ended = threading.Event()

    def watch() -> None:  # what grpc_health_probe --watch and load balancers follow
        try:
            for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120):
                seen.append(int(reply.status))
        except grpc.RpcError:
            pass  # the server stopped
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sites = job.sites()
    threads = run_sites(sites)
    join_sites(sites, threads)  # every site heard JobDone: the job is over, the server lingers
    assert job.finish().status == "completed"
    assert ended.wait(30)
    # SERVING through the rounds, then NOT_SERVING from the job's end on (never back up)
    assert seen[0] == SERVING and NOT_SERVING in seen, seen
    assert set(seen[seen.index(NOT_SERVING):]) == {NOT_SERVING}, seen
    channel.close()


def test_health_status_follows_set_serving_and_stays_down_after_shut_down() -> None:
    health = ServingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert check(stub, "") == NOT_SERVING  # not yet: the runner marks it serving
            health.set_serving(True)
            assert check(stub, "") == SERVING and check(stub, SERVICE_NAME) == SERVING and health.serving
            health.shut_down()
            health.set_serving(True)  # too late: a stopping server never comes back up
            assert check(stub, "") == NOT_SERVING and check(stub, SERVICE_NAME) == NOT_SERVING
    finally:
        server.stop(None)


def test_the_status_turns_not_serving_at_the_jobs_end_before_the_server_lingers(tmp_path: Path) -> None:
    from fedveil.server.events import JobEvent, JobFinished, RoundCompleted
    from fedveil.server.observability import ServerObservability
    from tests.server_helpers import Scripted, make_job, run_job, vectors

    names = ["a", "b", "c"]
    coordinator, store = make_job(tmp_path, names, rounds=1, weighted=False)
    ops = ServerObservability()
    ops.attach(coordinator)
    ops.job_running(True)
    states: list[tuple[str, bool]] = []

    class Probe:  # told after the health listener: sees the status a probe would get at that moment
        def on_event(self, event: JobEvent) -> None:
            if isinstance(event, (RoundCompleted, JobFinished)):
                states.append((type(event).__name__, ops.health.serving))

    coordinator.listeners.add(Probe())
    summary = run_job(coordinator, [Scripted(coordinator, n, v) for n, v in zip(names, vectors(3), strict=True)])
    assert summary.status == "completed"
    assert states == [("RoundCompleted", True), ("JobFinished", False)]
    store.close()
