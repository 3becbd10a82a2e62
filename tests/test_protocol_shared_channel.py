"""Calls that wait on their completion, and sites that share one channel (issue 13).

A simulation worker's sites share one gRPC channel and wait for each call on an event its
completion sets (:func:`fedveil.protocol.client.settled`). Sharing must not blur who is speaking:
each call still carries its own site's token, so a site on the shared channel is still only itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from fedveil.protocol import SERVICE_NAME
from fedveil.protocol import client as grpc_client
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.client import ChannelConfig, GrpcTransport, open_channel, settled
from fedveil.protocol.errors import OutOfOrder, PermissionDenied, Unauthenticated, Unavailable
from fedveil.protocol.transport import ClientSession
from tests.grpc_helpers import Federation_, join_request

pytestmark = pytest.mark.timeout(120)


def test_sites_on_one_shared_channel_each_speak_only_for_themselves(fed: Federation_) -> None:
    channel = open_channel(ChannelConfig(target=f"127.0.0.1:{fed.port}", ca_cert_pem=fed.ca.cert_pem))
    on_shared = {name: GrpcTransport(channel, fed.tokens[name], rpc_timeout_s=20.0, owns_channel=False)
                 for name in ("alice", "bob", "mallory")}
    joined = {name: on_shared[name].join(join_request(name, fed.task.name)) for name in ("alice", "bob")}
    assert [answer.client_name for answer in joined.values()] == ["alice", "bob"]
    sessions = {name: ClientSession.from_join(answer) for name, answer in joined.items()}
    # mallory, on the same channel, cannot take alice's identity: her token names her, not alice
    with pytest.raises(PermissionDenied, match="identity"):
        on_shared["mallory"].join(join_request("alice", fed.task.name))
    # nor act in alice's session: the server looks the session up under the token's name, mallory's
    with pytest.raises(OutOfOrder, match="unknown or replaced session"):
        on_shared["mallory"].poll(pb.PollRequest(header=sessions["alice"].header(), max_wait_ms=0))
    # a forged token on the shared channel is refused, and the channel serves the others after it
    forger = GrpcTransport(channel, fed.tokens["alice"][:-4] + "AAAA", rpc_timeout_s=20.0, owns_channel=False)
    with pytest.raises(Unauthenticated):
        forger.join(join_request("alice", fed.task.name))
    # a site that leaves closes its transport, not the channel the others still use
    on_shared["alice"].close()
    forger.close()
    answer = on_shared["bob"].poll(pb.PollRequest(header=sessions["bob"].header(), max_wait_ms=0))
    assert answer.WhichOneof("instruction") in {"wait", "round_start"}
    owner = GrpcTransport(channel, fed.tokens["bob"], rpc_timeout_s=5.0)
    owner.close()  # the owner's close does close it
    with pytest.raises(ValueError, match="Channel closed"):
        on_shared["bob"].poll(pb.PollRequest(header=sessions["bob"].header(), max_wait_ms=0))


@pytest.fixture
def silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A server whose Poll answers after 5 s: longer than the calls below may wait."""
    release = threading.Event()

    def poll(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        release.wait(5.0)
        return pb.PollResponse(wait=pb.Wait(retry_after_ms=0)).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Poll": grpc.unary_unary_rpc_method_handler(poll)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, release
    release.set()
    server.stop(0).wait(5)


def test_a_held_call_past_its_deadline_ends_and_says_so(silent_server: tuple[int, threading.Event]) -> None:
    transport = GrpcTransport.connect(ChannelConfig(target=f"127.0.0.1:{silent_server[0]}", insecure=True),
                                      rpc_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(Unavailable, match="Deadline Exceeded"):
        transport.poll(pb.PollRequest(max_wait_ms=0))
    assert time.monotonic() - start < 3.0  # gRPC's own deadline ended it, not the server's answer
    transport.close()


class _NeverDone:
    """A call whose completion never arrives (what ``settled`` must not wait on forever)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []
        self.cancelled = False

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self.callbacks.append(fn)

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def result(self) -> Any:
        if self.cancelled:
            raise grpc.FutureCancelledError()
        raise AssertionError("result() read before the call ended")


def test_a_completion_that_never_arrives_is_cancelled_past_deadline_and_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_client, "SETTLE_GRACE_S", 0.1)
    call = _NeverDone()
    start = time.monotonic()
    with pytest.raises(grpc.FutureCancelledError):
        settled(call, 0.1)  # type: ignore[arg-type]
    assert call.cancelled and len(call.callbacks) == 1 and time.monotonic() - start >= 0.2
    # through a transport, the site hears a deadline (retried like any unavailable server)
    transport = GrpcTransport(grpc.insecure_channel("127.0.0.1:1"), rpc_timeout_s=0.1)
    stuck = _NeverDone()
    transport._calls["Join"] = type("Stuck", (), {"future": lambda *_a, **_k: stuck})()  # type: ignore[assignment]
    with pytest.raises(Unavailable, match=r"no answer 0\.2 s after the call"):
        transport.join(pb.JoinRequest())
    assert stuck.cancelled
    transport.close()


def test_held_calls_on_a_shared_channel_each_get_their_answer_when_it_comes(
        silent_server: tuple[int, threading.Event]) -> None:
    port, release = silent_server
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    answers: list[tuple[str, float]] = []

    def site() -> None:
        answer = GrpcTransport(channel, rpc_timeout_s=30.0, owns_channel=False).poll(pb.PollRequest(max_wait_ms=0))
        answers.append((answer.WhichOneof("instruction") or "", time.monotonic()))

    threads = [threading.Thread(target=site) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert answers == []  # all 20 are held
    released_at = time.monotonic()
    release.set()
    for thread in threads:
        thread.join(10)
    assert [kind for kind, _ in answers] == ["wait"] * 20
    assert max(at for _, at in answers) - released_at < 2.0  # woken by the completions, not by a timeout
    channel.close()
