"""The gRPC service on 127.0.0.1 with TLS: what an authenticated client may send — validation,
limits, ordering and replay, chunked uploads and their slots, and held polls.

A real coordinator runs behind a real gRPC server (:mod:`tests.grpc_helpers`); clients are real gRPC
channels. Refused input must get the documented status code and leave the server serving everyone else.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedveil.clients.api import run_client
from fedveil.clients.session import Federation
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage, MessageTooLarge, OutOfOrder, PermissionDenied, Replayed
from fedveil.protocol.service import ServerLimits
from fedveil.secagg import beacon
from fedveil.secagg.messages import MASK_KEY_LIMBS, SELF_MASK_LIMBS
from tests.grpc_helpers import Federation_, join_session, poll_until, start_tls_job, stop_tls_job
from tests.identity_helpers import secure_options, site_policy
from tests.server_helpers import Scripted, vectors

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_malformed_and_oversized_input_is_rejected_while_others_train(fed: Federation_) -> None:
    attacker = fed.transport("mallory")
    with pytest.raises(MalformedMessage, match="not a valid JoinRequest") as info:
        attacker.call_raw("Join", b"\xff\xff\xff\xff garbage")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(MalformedMessage):
        attacker.call_raw("AdvertiseKeys", b"\x0a\xff")
    with pytest.raises(MessageTooLarge) as big:
        attacker.call_raw("SubmitMaskedInput", os.urandom(fed.limit + 1024))
    assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw_upload = attacker._channel.stream_unary("/fedveil.v3.Federation/UploadMaskedInput")
    for stream, pattern in (([b"\xff\xfe garbage"], "chunk 0 is not a valid"), ([], "no chunks")):
        with pytest.raises(grpc.RpcError) as rpc_err:
            raw_upload(iter(stream), metadata=attacker._metadata, timeout=10)
        assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert pattern in rpc_err.value.details()  # type: ignore[attr-defined]
    raw_fetch = attacker._channel.unary_stream("/fedveil.v3.Federation/FetchModel")
    with pytest.raises(grpc.RpcError) as rpc_err:
        list(raw_fetch(b"\x0a\xff", metadata=attacker._metadata, timeout=10))
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessage, match="encryption_public_key: expected 32 bytes, got 5"):
        attacker.advertise_keys(pb.AdvertiseKeysRequest(encryption_public_key=b"12345", masking_public_key=b"x" * 32))
    good = pb.RevealedShare(owner_id=1, kind=pb.SHARE_KIND_SELF_MASK_SEED, share=bytes(4 * SELF_MASK_LIMBS),
                            salt=bytes(16))
    with pytest.raises(MalformedMessage, match=r"shares\[1\]\.kind: 9 is not a share kind"):
        attacker.unmask(pb.UnmaskRequest(shares=[good, pb.RevealedShare(owner_id=2, kind=9, share=good.share)]))
    with pytest.raises(MalformedMessage, match=rf"shares\[1\]\.share: expected {4 * MASK_KEY_LIMBS} bytes, got 3"):
        attacker.unmask(pb.UnmaskRequest(shares=[good, pb.RevealedShare(
            owner_id=2, kind=pb.SHARE_KIND_MASKING_KEY, share=b"abc")]))
    with pytest.raises(MalformedMessage, match=r"shares\[1\]\.salt: expected 16 bytes, got 15"):
        attacker.unmask(pb.UnmaskRequest(shares=[good, pb.RevealedShare(
            owner_id=2, kind=pb.SHARE_KIND_MASKING_KEY, share=bytes(4 * MASK_KEY_LIMBS), salt=bytes(15))]))
    with pytest.raises(MalformedMessage, match=r"header\.session_id"):
        attacker.poll(pb.PollRequest(header=pb.RequestHeader(protocol_version=PROTOCOL_VERSION, session_id=b"x")))
    with pytest.raises(OutOfOrder, match="unknown or replaced session"):
        attacker.poll(pb.PollRequest(header=pb.RequestHeader(protocol_version=PROTOCOL_VERSION,
                                                             session_id=b"\x00" * 16)))

    # Meanwhile the attacker keeps hammering; two honest clients run a whole job.
    stop = threading.Event()
    refused: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            for rpc, payload in (("Join", os.urandom(64)), ("ShareKeys", b"\x0a\x05\x08\xff\xff\xff\xff"),
                                 ("SubmitMaskedInput", os.urandom(fed.limit + 10))):
                try:
                    attacker.call_raw(rpc, payload, timeout=10)
                except (MalformedMessage, MessageTooLarge, OutOfOrder) as err:
                    refused.append(type(err).__name__)
            time.sleep(0.05)

    noise = threading.Thread(target=hammer, daemon=True)
    noise.start()
    outcomes: dict[str, list[str]] = {}

    def honest(i: int, name: str) -> None:
        data = fed.task.synthetic_data(i, 2, 11)  # type: ignore[misc]
        client = Federation(fed.transport(name), fed.task.name, fed.task.build_model(),  # a cohort of two
                            secure_options(name, seed=i, poll_wait_ms=1000, policy=site_policy(min_cohort=2)))
        outcomes[name] = [o.outcome for o in run_client(client, fed.task, data)]

    threads = [threading.Thread(target=honest, args=(i, n), daemon=True) for i, n in enumerate(("alice", "bob"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    fed.thread.join(60)
    stop.set()
    noise.join(30)
    attacker.close()
    assert outcomes == {"alice": ["completed"], "bob": ["completed"]}
    assert fed.summary and fed.summary[0].status == "completed" and fed.summary[0].completed_rounds == 1
    assert {"MalformedMessage", "MessageTooLarge"} <= set(refused)


def test_chunked_transfers_carry_the_exact_updates(passive_fed: Federation_) -> None:
    fed = passive_fed
    vecs = vectors(2)
    clients = [Scripted(fed.coordinator, n, v, w, transport=fed.transport(n))
               for n, v, w in zip(("alice", "bob"), vecs, (1.0, 3.0), strict=True)]
    fed.run_scripted(clients, job_timeout_s=60)
    assert [c.error for c in clients] == [None, None] and all(c.done for c in clients)
    assert fed.summary and fed.summary[0].status == "completed"
    expected = (1.0 * vecs[0] + 3.0 * vecs[1]) / 4.0
    np.testing.assert_allclose(fed.coordinator.store.aggregate(fed.coordinator.run_id, 1), expected, atol=1e-4)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_stalled_upload_is_cancelled_and_the_round_goes_on(tmp_path: Path) -> None:
    limits = ServerLimits(max_message_bytes=4 << 20, workers=16, max_concurrent_rpcs=64, max_concurrent_uploads=1,
                          upload_timeout_s=1.0)
    # threshold 2 of 3 (passive mode: t > c = 1; the scripted clients cannot sign) so that the round
    # survives the cancelled upload
    fed, server = start_tls_job(tmp_path, rounds=1, names=("a", "b", "c"), clients_per_round=3, limits=limits,
                                stage_timeout=4.0, threshold=2, active=False)
    try:
        vecs = vectors(3)
        clients = [Scripted(fed.coordinator, n, v, transport=fed.transport(n))
                   for n, v in zip("abc", vecs, strict=True)]
        clients[2].stall_upload_s = 5.0
        fed.run_scripted(clients, job_timeout_s=90)
        assert [c.error for c in clients] == [None, None, None]
        assert clients[2].upload_error == grpc.StatusCode.CANCELLED
        assert fed.summary and fed.summary[0].status == "completed"
        store = fed.coordinator.store
        assert store.dropouts(fed.coordinator.run_id) == [(1, 1, "c", "masked-input", "missed the stage deadline")]
        np.testing.assert_allclose(store.aggregate(fed.coordinator.run_id, 1), (vecs[0] + vecs[1]) / 2, atol=1e-4)  # type: ignore[arg-type]
    finally:
        stop_tls_job(fed, server)


def test_out_of_order_replayed_and_foreign_messages(passive_fed: Federation_) -> None:
    fed = passive_fed  # raw key advertisements without signatures: a passive job
    alice, bob = fed.transport("alice"), fed.transport("bob")
    sa, sb = join_session(alice), join_session(bob)
    bob.poll(pb.PollRequest(header=sb.header(), max_wait_ms=10))  # asks for work: it may be drawn from now on
    start = poll_until(alice, sa, "round_start").round_start
    start_b = poll_until(bob, sb, "round_start").round_start
    rnd, nonce = start.round, start.round_nonce
    keys = {"encryption_public_key": os.urandom(32), "masking_public_key": os.urandom(32)}

    # a later stage's message while the round is at its first stage (commit): FAILED_PRECONDITION
    with pytest.raises(OutOfOrder, match="stage masked-input is not open; round 1 is at commit") as info:
        alice.submit_masked_input(pb.MaskedInputRequest(header=sa.header(rnd, nonce), masked_vector=b"\x00" * 48))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    upload = pb.MaskedInputRequest(header=sa.header(rnd, nonce), masked_vector=b"\x00" * 48)
    with pytest.raises(OutOfOrder, match="stage masked-input is not open"):
        alice.submit_masked_input(upload)  # 48 bytes in 16-byte chunks: UploadMaskedInput
    # keys before the graph seed is agreed (commit, then reveal): FAILED_PRECONDITION too
    with pytest.raises(OutOfOrder, match="stage training is not open; round 1 is at commit"):
        alice.advertise_keys(pb.AdvertiseKeysRequest(header=sa.header(rnd, nonce), **keys))
    # both commit to a contribution and reveal it: the round moves on to training
    mine = {}
    for t, s, st in ((alice, sa, start), (bob, sb, start_b)):
        mine[t] = os.urandom(32)
        t.respond_to_round(pb.RoundResponse(header=s.header(rnd, nonce), accept=True, commitment=beacon.commitment(
            st.secagg.round_id, st.client_id, mine[t]), weight=1.0))
    for t, s in ((alice, sa), (bob, sb)):
        poll_until(t, s, "commitments")
        t.reveal_contribution(pb.RevealRequest(header=s.header(rnd, nonce), contribution=mine[t]))
    for t, s in ((alice, sa), (bob, sb)):
        poll_until(t, s, "contributions")
    # the RoundStart arrived without model bytes, and the transport fetched them
    assert len(start.model.data) == start.model.size_bytes == 44 and start.model.sha256
    # a wrong nonce or round: FAILED_PRECONDITION
    with pytest.raises(OutOfOrder, match="not running"):
        alice.advertise_keys(pb.AdvertiseKeysRequest(header=sa.header(rnd, os.urandom(16)), **keys))
    with pytest.raises(OutOfOrder, match="not running"):
        alice.advertise_keys(pb.AdvertiseKeysRequest(header=sa.header(rnd + 1, nonce), **keys))
    # accepted once ...
    header = sa.header(rnd, nonce)
    ack = alice.advertise_keys(pb.AdvertiseKeysRequest(header=header, **keys))
    assert ack.round == rnd and ack.stage == pb.STAGE_TRAINING
    # ... the identical message again (same sequence number) is a replay: ALREADY_EXISTS
    with pytest.raises(Replayed, match="replayed message") as info:
        alice.advertise_keys(pb.AdvertiseKeysRequest(header=header, **keys))
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    # ... and a fresh copy for the same stage too
    with pytest.raises(Replayed, match="already received"):
        alice.advertise_keys(pb.AdvertiseKeysRequest(header=sa.header(rnd, nonce), **keys))
    # an enrolled client outside the cohort may not speak for the round: PERMISSION_DENIED
    mallory = fed.transport("mallory")
    sm = join_session(mallory)
    with pytest.raises(PermissionDenied, match="not in the cohort"):
        mallory.advertise_keys(pb.AdvertiseKeysRequest(header=sm.header(rnd, nonce), **keys))
    # a session replaced by a new Join is refused; the client became a dropout of the round
    sa2 = join_session(alice)
    with pytest.raises(OutOfOrder, match="unknown or replaced session"):
        alice.poll(pb.PollRequest(header=sa.header(), max_wait_ms=10))
    result = poll_until(alice, sa2, "round_result").round_result
    assert result.round == rnd and result.outcome == pb.ROUND_OUTCOME_DROPPED
    # a header from another run
    bad_run = pb.RequestHeader(protocol_version=PROTOCOL_VERSION, session_id=sb.session_id, run_id="run-other",
                               sequence=10_000)
    with pytest.raises(OutOfOrder, match="not the current run"):
        bob.poll(pb.PollRequest(header=bad_run, max_wait_ms=10))
    for t in (alice, bob, mallory):
        t.close()



def test_a_client_whose_poll_is_cancelled_no_longer_counts_as_connected(fed: Federation_) -> None:
    t = fed.transport("mallory")
    session = join_session(t, "mallory")
    assert "mallory" not in fed.coordinator._available()  # joined, but it has not asked for work yet
    t.poll(pb.PollRequest(header=session.header(), max_wait_ms=10))
    assert "mallory" in fed.coordinator._available()
    raw_poll = t._channel.unary_unary("/fedveil.v3.Federation/Poll", request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=pb.PollResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:  # the client gives up on a held poll: its process died
        raw_poll(pb.PollRequest(header=session.header(), max_wait_ms=1500), metadata=t._metadata, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while "mallory" in fed.coordinator._available() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "mallory" not in fed.coordinator._available()
    # it comes back as soon as it speaks again
    resp = t.poll(pb.PollRequest(header=session.header(), max_wait_ms=10))
    assert resp.WhichOneof("instruction") == "wait"
    assert "mallory" in fed.coordinator._available()
    t.close()


@dataclass
class _SlotHolder(Scripted):
    """Uploads the old way (data in the first chunk), then holds its upload slot until ``release``."""

    granted: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def _stalled_upload(self, t: Any, header: pb.RequestHeader, masked: bytes) -> None:
        calls: list[Any] = []

        def chunks() -> Iterator[pb.MaskedInputChunk]:
            yield pb.MaskedInputChunk(header=header, total_bytes=len(masked), data=masked[:8])
            while not calls:
                time.sleep(0.01)
            calls[0].initial_metadata()  # the server has granted this upload its slot
            self.granted.set()
            self.release.wait(60)
            yield pb.MaskedInputChunk(data=masked[8:])

        calls.append(t._upload.future(chunks(), metadata=t._metadata, timeout=90))
        self.upload_error = calls[0].exception()


class _RecordingUpload:
    """Wraps ``GrpcTransport._upload``: records each chunk's data size as the client sends it."""

    def __init__(self, upload: Any, before: threading.Event) -> None:
        self._upload = upload
        self._before = before
        self.sent: list[int] = []
        self.total = 0
        """The upload's size as its header chunk announced it."""
        self.queued = threading.Event()

    def _recorded(self, requests: Iterator[pb.MaskedInputChunk]) -> Iterator[pb.MaskedInputChunk]:
        self._before.wait(60)
        for chunk in requests:
            self.total = self.total or int(chunk.total_bytes)
            self.sent.append(len(chunk.data))
            self.queued.set()
            yield chunk

    def future(self, requests: Iterator[pb.MaskedInputChunk], **kwargs: Any) -> Any:
        return self._upload.future(self._recorded(requests), **kwargs)

    def __call__(self, requests: Iterator[pb.MaskedInputChunk], **kwargs: Any) -> Any:
        return self._upload(self._recorded(requests), **kwargs)


@pytest.mark.slow
def test_a_queued_upload_sends_no_data_until_the_server_grants_it_a_slot(tmp_path: Path) -> None:
    limits = ServerLimits(max_message_bytes=4 << 20, workers=16, max_concurrent_rpcs=64, max_concurrent_uploads=1)
    # threshold 2 of 3 (passive mode: t > c = 1; the scripted clients cannot sign): one client's shares
    # are not needed
    fed, server = start_tls_job(tmp_path, rounds=1, names=("a", "b", "c"), clients_per_round=3, limits=limits,
                                stage_timeout=5.0, threshold=2, active=False)
    try:
        vecs = vectors(3)
        # b takes a slot (the only one) and holds it; it does not unmask, so c's shares stand in
        holder = _SlotHolder(fed.coordinator, "b", vecs[1], transport=fed.transport("b"), stall_upload_s=1.0)
        queued = Scripted(fed.coordinator, "a", vecs[0], transport=fed.transport("a"))
        other = Scripted(fed.coordinator, "c", vecs[2], transport=fed.transport("c"))
        recorder = _RecordingUpload(queued.transport._upload, holder.granted)
        queued.transport._upload = recorder
        threads = [threading.Thread(target=c.run, daemon=True) for c in (holder, queued, other)]
        for th in threads:
            th.start()
        assert recorder.queued.wait(60), "client a never started its upload"
        time.sleep(0.5)  # room for a client that does not wait for its slot to send its data
        sent_while_queued = list(recorder.sent)
        holder.release.set()
        fed.thread.join(60)
        for th in threads:
            th.join(30)
        assert sent_while_queued == [0]  # the header chunk only: the bytes waited on the client
        # then the masked vector in 16-byte chunks, once the slot was granted: 11 update coordinates and, with
        # secure evaluation (the default), the cohort's metric sums, so more than the bare update's 48 bytes
        whole, rest = divmod(recorder.total, 16)
        assert recorder.total > 48 and recorder.sent == [0] + [16] * whole + ([rest] if rest else [])
        assert [holder.error, queued.error, other.error, holder.upload_error] == [None, None, None, None]
        assert fed.summary and fed.summary[0].status == "completed"
        # b's upload (old style: data in the first chunk) counts, reassembled exactly
        np.testing.assert_allclose(fed.coordinator.store.aggregate(fed.coordinator.run_id, 1),  # type: ignore[arg-type]
                                   (vecs[0] + vecs[1] + vecs[2]) / 3, atol=1e-4)
    finally:
        stop_tls_job(fed, server)
