"""Pace steering: when the held polls are at their limit, a site outside the running round is sent
away until that round should end, still counts for the next cohort once it is due back soon enough,
and the server lingers at the job's end for the sites it sent away (Bonawitz et al., SysML 2019);
and a call cut on the way (CANCELLED) is retried by the site like UNAVAILABLE.

The real coordinator on a SQLite store, with a clock the tests move, and the real client session.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedveil.clients.session import MAX_RETRY_AFTER_S
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import OutOfOrder
from fedveil.protocol.transport import ClientSession, InProcessTransport
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator
from fedveil.server.coordinator.state import MAX_STEER_S
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.server_helpers import TASK

pytestmark = pytest.mark.timeout(60)
POLL_WAIT = 4.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(tmp_path: Path, names: list[str], clock: Any = time.monotonic,
        **overrides: Any) -> tuple[Coordinator, RunStore]:
    store = RunStore(tmp_path / "run.db")
    for name in names:
        store.enroll(name)
    settings: dict[str, Any] = dict(task=TASK, rounds=2, clients_per_round=2, min_clients=2, round_timeout=300.0,
                                    stage_timeout=40.0, cohort_wait=0.0, linger=0.2, seed=3,
                                    poll_wait=POLL_WAIT, evaluate=False, final_evaluation=False,
                                    active_adversary=False)
    settings.update(overrides)
    coordinator = Coordinator(ServerConfig.from_flat(**settings), load_task(TASK), store, new_run=True, clock=clock)
    return coordinator, store


def join(coordinator: Coordinator, name: str) -> tuple[InProcessTransport, ClientSession]:
    transport = InProcessTransport(coordinator, name)
    request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg")
    return transport, ClientSession.from_join(transport.join(request))


def poll(site: tuple[InProcessTransport, ClientSession], wait_ms: int = 4000) -> pb.PollResponse:
    transport, session = site
    return transport.poll(pb.PollRequest(header=session.header(), max_wait_ms=wait_ms))


def start_round(coordinator: Coordinator, available: list[str]) -> str:
    """Announce round 1 to a cohort drawn from ``available``; returns a site left out of it."""
    with coordinator._cond:
        rnd = coordinator._start_round(1, available)
        coordinator._round = rnd
    (outsider,) = set(available) - set(rnd.cohort)
    return outsider


def test_only_a_site_that_asks_for_work_is_drawn_for_a_cohort(tmp_path: Path) -> None:
    """A site that joined and only makes other calls (here reports) is not drawn: it would not hear of
    the round, which then waited out its commit deadline for it (the abusive reporter of
    tests/test_abuse_processes.py was drawn for round 1 and cost it 30 s). Its polls are what count."""
    skipped = [0.0]  # the clock runs, so that the short polls end, and the test moves it on
    coordinator, store = job(tmp_path, ["a", "b"], lambda: time.monotonic() + skipped[0])
    a, b = join(coordinator, "a"), join(coordinator, "b")

    def report() -> None:  # a report for a round that is not running: refused after its session is checked
        transport, session = b
        with pytest.raises(OutOfOrder, match="not running"):
            transport.report_metrics(pb.MetricsReport(header=session.header(1, b"\x00" * 16), model_version=0,
                                                      num_examples=1))

    poll(a, wait_ms=10)
    report()
    with coordinator._cond:
        assert coordinator._available() == ["a"]
    assert coordinator.connected_sites() == 1
    poll(b, wait_ms=10)
    with coordinator._cond:
        assert coordinator._available() == ["a", "b"]
    skipped[0] += POLL_WAIT + 6.0  # longer than a poll's round trip since either polled; b only reports
    report()
    with coordinator._cond:
        assert coordinator._available() == []
    poll(a, wait_ms=10)
    with coordinator._cond:
        assert coordinator._available() == ["a"]
    store.close()


def test_a_small_federation_served_over_grpc_holds_every_sites_poll(tmp_path: Path) -> None:
    """The served job's held-poll budget counts its enrolled sites (up to about 120): before, 16 sites
    with a cohort of 6 had 12 held polls for the sites outside the round, so 4 were sent away for up
    to 12.5 s and a round that drew one waited for it (`fedveil bench load --sites 16`: rounds of 10 s)."""
    from fedveil.server.job_runner import GrpcEndpoint, JobRunner, server_workers

    store = RunStore(tmp_path / "run.db")
    for i in range(16):
        store.enroll(f"s{i}")
    config = ServerConfig.from_flat(task=TASK, rounds=1, clients_per_round=6, min_clients=6, seed=3,
                                    active_adversary=False)
    runner = JobRunner(config, load_task(TASK), store, new_run=True, endpoint=GrpcEndpoint("127.0.0.1:0", None))
    try:
        budget = runner.coordinator.max_waiting_polls
        assert budget is not None and budget // 2 >= 16  # the sites outside a round: all 16 held
    finally:
        runner.close()
        store.close()
    # a large federation: the cohort's needs, as before (2 x 150 + 16); a small one: at least 32
    assert server_workers(150, 1000) == 316 and server_workers(3, 0) == 32
    assert server_workers(6, 16) == 48 and server_workers(10, 5000) == 256


def test_a_site_outside_a_running_round_is_sent_away_until_it_should_end(tmp_path: Path) -> None:
    clock = Clock()
    names = ["a", "b", "c"]
    coordinator, store = job(tmp_path, names, clock)
    coordinator.max_waiting_polls = 0  # every poll budget is full
    sites = {name: join(coordinator, name) for name in names}
    outsider = start_round(coordinator, names)
    coordinator._last_round_s = 100.0
    clock.now += 30.0  # the round has run 30 s of an expected 100
    answer = poll(sites[outsider])
    assert answer.WhichOneof("instruction") == "wait" and "running without you" in answer.wait.reason
    delay = answer.wait.retry_after_ms / 1000.0
    # the 70 s left, plus a quarter to 1.25 poll waits at random (their returns spread)
    assert 70.0 + 0.25 * POLL_WAIT <= delay <= 70.0 + 1.25 * POLL_WAIT + 0.01
    with coordinator._cond:
        # away for longer than a site sent away between rounds ever is: not drawn for a cohort now
        assert outsider not in coordinator._available()
        clock.now += delay - 1.25 * POLL_WAIT + 0.5  # due back within 1.25 poll waits: drawn again
        assert outsider in coordinator._available()
        clock.now += POLL_WAIT + POLL_WAIT + 5.0 + 1.0  # long overdue and never came back: gone
        assert outsider not in coordinator._available()
    # a member of the running round is never sent away for long
    member = next(n for n in names if n != outsider)
    answer = poll(sites[member])
    assert answer.WhichOneof("instruction") != "wait" or answer.wait.retry_after_ms <= 200
    store.close()


def test_before_any_round_completed_the_estimate_is_the_round_age_and_it_is_capped(tmp_path: Path) -> None:
    clock = Clock()
    names = ["a", "b", "c"]
    coordinator, store = job(tmp_path, names, clock)
    coordinator.max_waiting_polls = 0
    sites = {name: join(coordinator, name) for name in names}
    outsider = start_round(coordinator, names)
    clock.now += 20.0  # no round has completed: expect it to run as long again
    delay = poll(sites[outsider]).wait.retry_after_ms / 1000.0
    assert 20.0 + 0.25 * POLL_WAIT <= delay <= 20.0 + 1.25 * POLL_WAIT + 0.01
    coordinator._last_round_s = 10_000.0  # a round that takes hours: sent away for MAX_STEER_S at most
    assert poll(sites[outsider]).wait.retry_after_ms / 1000.0 == pytest.approx(MAX_STEER_S, abs=0.01)
    store.close()


def test_between_rounds_a_busy_server_still_sends_sites_away_only_briefly(tmp_path: Path) -> None:
    clock = Clock()
    coordinator, store = job(tmp_path, ["a", "b"], clock)
    coordinator.max_waiting_polls = 0
    site = join(coordinator, "a")
    coordinator._last_round_s = 100.0  # no round runs: nothing to steer past
    answer = poll(site)
    assert "busy" in answer.wait.reason
    assert 0.25 * POLL_WAIT * 1000 <= answer.wait.retry_after_ms <= 1.25 * POLL_WAIT * 1000
    with coordinator._cond:
        assert "a" in coordinator._available()  # it will be back in time for the next cohort
    store.close()


def test_the_server_lingers_for_a_site_it_sent_away_until_it_hears_the_job_is_done(tmp_path: Path) -> None:
    coordinator, store = job(tmp_path, ["a", "b"], linger=0.2)
    site = join(coordinator, "a")
    join(coordinator, "b")
    with coordinator._cond:
        coordinator._clients["a"].back_by = time.monotonic() + 1.5  # as pace steering leaves it
        coordinator._clients["b"].last_polled = float("-inf")  # b is gone: nobody waits for it
    heard: list[tuple[str, float]] = []
    started = time.monotonic()

    def comes_back() -> None:
        time.sleep(1.0)
        heard.append((poll(site, wait_ms=500).WhichOneof("instruction") or "", time.monotonic() - started))

    returning = threading.Thread(target=comes_back)
    returning.start()
    coordinator._announce_done("job over")
    lingered = time.monotonic() - started
    returning.join(5)
    assert heard and heard[0][0] == "job_done"
    # it waited for the site (not just its 0.2 s linger), and stopped as soon as the site had heard
    assert heard[0][1] <= lingered < 3.0
    store.close()


class StubbornlyBusy(InProcessTransport):
    """Sends the site away once for ``retry_after_ms``, then has a round result for it."""

    def __init__(self, coordinator: Coordinator, name: str, retry_after_ms: int) -> None:
        super().__init__(coordinator, name)
        self.retry_after_ms = retry_after_ms
        self.polls = 0

    def poll(self, request: Any) -> Any:
        self.polls += 1
        if self.polls == 1:
            return pb.PollResponse(wait=pb.Wait(retry_after_ms=self.retry_after_ms, reason="come back as it ends"))
        return pb.PollResponse(round_result=pb.RoundResult())


def first_instruction(tmp_path: Path, transport: Callable[[Coordinator], InProcessTransport],
                      sleep: Callable[[float], None], **options: Any) -> str:
    """The real client session of site-0 over ``transport``: join, then its first instruction that
    is not a Wait (the kind of it), with ``sleep`` in place of its pauses."""
    from fedveil.tasks.synthetic import task as synthetic
    from tests.test_clients_round_lifecycle import config, federation

    store = RunStore(tmp_path / "run.sqlite")
    coordinator = Coordinator(config(), synthetic, store, new_run=True)
    fed = federation(coordinator, synthetic, 0)
    fed.transport = transport(coordinator)
    fed._sleep = sleep
    fed.options = dataclasses.replace(fed.options, **options)
    try:
        fed._ensure_joined()
        return fed._next_instruction().WhichOneof("instruction") or ""
    finally:
        coordinator.stop()
        store.close()


@pytest.mark.parametrize(("retry_after_ms", "slept"), [(20_000, 20.0), (10**9, MAX_RETRY_AFTER_S)])
def test_a_site_waits_as_long_as_it_is_steered_to_up_to_its_cap(tmp_path: Path, retry_after_ms: int,
                                                                  slept: float) -> None:
    sleeps: list[float] = []
    kind = first_instruction(tmp_path, lambda c: StubbornlyBusy(c, "site-0", retry_after_ms), sleeps.append,
                             poll_wait_ms=2000)
    assert kind == "round_result"
    assert sleeps == [slept]


class CutOnce(InProcessTransport):
    """The first poll is cut on the way, as a connection dropped by an overloaded server cuts it."""

    def __init__(self, coordinator: Coordinator, name: str) -> None:
        super().__init__(coordinator, name)
        self.polls = 0
        self.sequences: list[int] = []

    def poll(self, request: Any) -> Any:
        import grpc

        from fedveil.protocol.errors import error_from_status

        self.polls += 1
        self.sequences.append(request.header.sequence)
        if self.polls == 1:
            raise error_from_status(grpc.StatusCode.CANCELLED, "Cancelled", rpc="Poll")
        return pb.PollResponse(round_result=pb.RoundResult())


def test_a_poll_cut_on_the_way_is_retried_not_fatal(tmp_path: Path) -> None:
    """With 10,000 sites on 16 processes, 7,021 gave up on CANCELLED, each worker's shared connection
    dropped under load: the site now retries it with its backoff, as it does UNAVAILABLE."""
    cuts: list[CutOnce] = []

    def transport(coordinator: Coordinator) -> CutOnce:
        cuts.append(CutOnce(coordinator, "site-0"))
        return cuts[0]

    assert first_instruction(tmp_path, transport, lambda _s: None) == "round_result"
    assert cuts[0].polls == 2
    # the retry has a header of its own: the cut poll may have reached the server, which would
    # refuse its sequence number again as a replay
    first, retry = cuts[0].sequences
    assert retry > first


def test_with_many_sites_their_returns_are_spread_to_a_bounded_rate(tmp_path: Path) -> None:
    from fedveil.server.coordinator.state import STEERED_RETURNS_PER_S, _Client

    clock = Clock()
    coordinator, store = job(tmp_path, ["a", "b"], clock)
    coordinator.max_waiting_polls = 0
    site = join(coordinator, "a")
    with coordinator._cond:  # 3,000 other joined sites (the server's own records of them)
        for i in range(3000):
            coordinator._clients[f"s{i}"] = _Client(name=f"s{i}", session_id=b"x" * 16, last_polled=clock.now)
    spread = 3001 / STEERED_RETURNS_PER_S  # 30 s, where a poll wait is 4 s
    delays = [poll(site).wait.retry_after_ms / 1000.0 for _ in range(40)]
    assert all(0.25 * POLL_WAIT <= d <= 0.25 * POLL_WAIT + spread + 0.01 for d in delays)
    assert max(delays) > 1.25 * POLL_WAIT + 5  # 40 draws over 30 s: some beyond the small-federation spread
    with coordinator._cond:
        coordinator._clients["a"].back_by = clock.now + 25.0
    # away for 25 s: not drawn for a cohort yet, but still a connected site
    with coordinator._cond:
        assert "a" not in coordinator._available()
    assert coordinator.connected_sites() == 3001
    # late back (overdue by more than a poll wait): no longer connected, but still a joined session,
    # which is what the Ray backend waits for before its first round; a closed session is neither
    with coordinator._cond:
        coordinator._clients["a"].back_by = clock.now - POLL_WAIT - 10.0
        coordinator._clients["a"].last_polled = clock.now - 60.0
        coordinator._clients["s0"].disconnected = True
    assert coordinator.connected_sites() == 2999
    assert coordinator.joined_sites() == 3000
    store.close()


@pytest.mark.parametrize(("code", "details", "retried"), [
    ("CANCELLED", "", True),
    ("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!", True),  # gRPC refusing a call for load
    ("RESOURCE_EXHAUSTED", "Received message larger than max (600 vs. 500)", False),  # a message too large
    ("UNAVAILABLE", "", True),
    ("PERMISSION_DENIED", "", False),
    # gRPC core's own details for TLS handshakes that no retry mends (captured from grpcio 1.7x): fail at once
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:46209: Tls handshake "
                    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK", False),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:40085: Custom "
                    "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check "
                    "failed.", False),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:33581: Tls handshake "
                    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
                    "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK", False),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:443: Cannot check "
                    "peer: missing selected ALPN property.", False),  # a TLS proxy that speaks no HTTP/2
    # the same words in details a server or a proxy sent (not gRPC core's own): a server-side failure, retried
    ("UNAVAILABLE", "upstream connect error or disconnect/reset before headers. reset reason: connection failure, "
                    "transport failure reason: TLS_error:|268435581:SSL routines:OPENSSL_internal:"
                    "CERTIFICATE_VERIFY_FAILED", True),
    ("UNAVAILABLE", "Received http2 header with status: 503 WRONG_VERSION_NUMBER", True),
    # a refused client certificate, a plaintext client at a TLS server, a server not up yet: retried
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:45439: Socket "
                    "closed", True),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect "
                    "to remote host: Connection refused", True),
])
def test_which_statuses_a_site_retries(code: str, details: str, retried: bool) -> None:
    import grpc

    from fedveil.protocol.errors import TlsRefused, Unavailable, error_from_status

    err = error_from_status(getattr(grpc.StatusCode, code), details, rpc="Poll")
    # a TlsRefused fails a site's first Join at once, and is retried like any UNAVAILABLE later
    assert (isinstance(err, Unavailable) and not isinstance(err, TlsRefused)) is retried
