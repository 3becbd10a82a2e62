"""A site whose message for a stage is refused is a dropout of that stage at once.

The server refuses a malformed or false stage message with INVALID_ARGUMENT, and an honest client
stops on it, so nothing more comes from that site in the round. Before, the stage still waited out its
deadline for it: one site sending share boxes to the wrong holders, a masked input of the wrong size or
an unmasking answer that does not parse cost every round it was drawn for a stage timeout (only a
refused acceptance left the round at once). Each case here runs with an hour's stage and training
deadlines under a 60 s watchdog: the round must go on without the site straight away, and its
dropout is recorded with the refusal. Three honest scripted sites and one malicious one (``evil``),
which speaks the protocol correctly except for the one message it spoils.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.client import GrpcTransport
from fedveil.protocol.errors import MalformedMessage, ProtocolError, error_from_status
from fedveil.protocol.transport import InProcessTransport
from fedveil.server.coordinator import Coordinator
from tests.grpc_helpers import Federation_, start_tls_job, stop_tls_job
from tests.server_helpers import ActiveScripted, Scripted, coordinator_watchdog, make_job, run_job, vectors
from tests.site_helpers import Renumbered

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
NAMES = ["a", "b", "c", "evil"]
AN_HOUR = 3600.0
Spoil = Callable[[Any], Any]


class Spoiler(InProcessTransport):
    """The malicious site's transport: its message of one RPC goes through ``spoil`` first, which
    changes the request in place or returns another RPC's (name, request) to send instead. Every
    call reaches the coordinator through :meth:`_relay`, which records the refusals."""

    def __init__(self, coordinator: Coordinator, name: str, rpc: str, spoil: Spoil) -> None:
        super().__init__(_Relay(self), name)
        self.coordinator, self.rpc, self.spoil = coordinator, rpc, spoil
        self.refused: list[MalformedMessage] = []

    def _relay(self, rpc: str, caller: str, request: Any) -> Any:
        if rpc == self.rpc:
            instead = self.spoil(request)
            if instead is not None:
                rpc, request = instead
        try:
            return getattr(self.coordinator, rpc)(caller, request)
        except MalformedMessage as err:
            self.refused.append(err)
            raise


class _Relay:
    """The service a :class:`Spoiler` calls: each RPC method is its spoiler's relay."""

    def __init__(self, spoiler: Spoiler) -> None:
        self._spoiler = spoiler

    def __getattr__(self, rpc: str) -> Callable[[str, Any], Any]:
        return lambda caller, request: self._spoiler._relay(rpc, caller, request)


def _short_key(r: pb.AdvertiseKeysRequest) -> None:
    r.encryption_public_key = b"12345"


def _missing_box(r: pb.ShareKeysRequest) -> None:
    del r.shares[-1]


def _box_twice(r: pb.ShareKeysRequest) -> None:
    r.shares.append(r.shares[0])


def _short_vector(r: pb.MaskedInputRequest) -> None:
    r.masked_vector = r.masked_vector[:-4]


def _empty_complaint(r: pb.MaskedInputRequest) -> tuple[str, Any]:
    return "complain_about_shares", pb.ShareComplaintsRequest(header=r.header)


def _short_salt(r: pb.UnmaskRequest) -> None:
    r.shares[0].salt = bytes(15)


def _owner_twice(r: pb.UnmaskRequest) -> None:
    r.shares.append(r.shares[0])


def _run(tmp_path: Path, rpc: str, spoil: Spoil, *, active: bool = False,
         **config: Any) -> tuple[Any, Any, Coordinator, Spoiler, list[np.ndarray]]:
    with coordinator_watchdog(60.0) as stop_later:
        coordinator, store = make_job(tmp_path, NAMES, stage_timeout=AN_HOUR, round_timeout=AN_HOUR,
                                      active_adversary=active, **config)
        stop_later(coordinator)
        vecs = vectors(4)
        spoiler = Spoiler(coordinator, "evil", rpc, spoil)
        sites: list[Any]
        if active:
            sites = [ActiveScripted(coordinator, n, v) for n, v in zip(NAMES[:3], vecs[:3], strict=True)]
            sites.append(ActiveScripted(coordinator, "evil", vecs[3], transport=spoiler))
        else:
            sites = [Scripted(coordinator, n, v) for n, v in zip(NAMES[:3], vecs[:3], strict=True)]
            sites.append(Scripted(coordinator, "evil", vecs[3], transport=spoiler))
        summary = run_job(coordinator, sites)
    return summary, store, coordinator, spoiler, vecs


CASES = [
    # (rpc, spoil, stage the site is dropped at, what its refusal says, whether its input is in the sum)
    ("advertise_keys", _short_key, "training", "encryption_public_key: expected 32 bytes, got 5", False),
    ("share_keys", _missing_box, "share-keys", "must send one share box to each of its", False),
    ("share_keys", _box_twice, "share-keys", "appears twice", False),
    ("submit_masked_input", _short_vector, "masked-input", "masked_vector: expected", False),
    ("submit_masked_input", _empty_complaint, "masked-input", "a complaint names at least one sender", False),
    ("unmask", _short_salt, "unmasking", "salt: expected 16 bytes, got 15", True),
    ("unmask", _owner_twice, "unmasking", "listed a share owner twice", True),
]


@pytest.mark.parametrize(("rpc", "spoil", "stage", "says", "counted"), CASES,
                         ids=[f"{c[0]}-{c[1].__name__.strip('_')}" for c in CASES])
def test_a_refused_stage_message_drops_the_site_at_once(tmp_path: Path, rpc: str, spoil: Spoil, stage: str,
                                                        says: str, counted: bool) -> None:
    summary, store, coordinator, spoiler, vecs = _run(tmp_path, rpc, spoil)
    assert spoiler.refused and says in str(spoiler.refused[0])
    assert summary.status == "completed" and summary.completed_rounds == 1, summary.message
    ((_round, _attempt, name, where, reason),) = store.dropouts(coordinator.run_id)
    assert (name, where) == ("evil", stage)
    assert reason == f"its message was refused: {spoiler.refused[0]}"
    (rec,) = store.rounds(coordinator.run_id)
    inputs = vecs if counted else vecs[:3]  # at unmasking its masked input is already in the sum
    assert rec.survivors == len(inputs)
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(inputs) / len(inputs), atol=1e-4)
    store.close()


@pytest.mark.parametrize("signature", [b"\x5a" * 64, b"\x5a" * 63], ids=["forged", "short"])
def test_a_refused_survivor_set_signature_drops_the_site_at_once(tmp_path: Path, signature: bytes) -> None:
    """Active mode: a signature that does not verify never counts towards the threshold (the server
    checks each); the signer is a dropout of the consistency stage, its masked input still in the sum."""
    def forge(r: pb.ConfirmSurvivorsRequest) -> None:
        r.signature = signature

    summary, store, coordinator, spoiler, vecs = _run(tmp_path, "confirm_survivors", forge, active=True,
                                                      weighted=False)
    says = "does not verify" if len(signature) == 64 else "signature: expected 64 bytes, got 63"
    assert spoiler.refused and says in str(spoiler.refused[0])
    assert summary.status == "completed" and summary.completed_rounds == 1, summary.message
    ((_round, _attempt, name, where, reason),) = store.dropouts(coordinator.run_id)
    assert (name, where) == ("evil", "consistency") and reason.startswith("its message was refused: ")
    (rec,) = store.rounds(coordinator.run_id)
    assert rec.survivors == 4
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(vecs) / 4, atol=1e-4)
    store.close()


@pytest.mark.parametrize("contribution", [bytes(31), b"\x5a" * 32], ids=["short", "not-committed"])
def test_a_refused_reveal_is_withheld_at_once_and_the_retry_goes_on_without_it(tmp_path: Path,
                                                                               contribution: bytes) -> None:
    """A reveal the beacon refuses is a withheld one: the attempt ends as soon as the others are in
    (not at the stage's deadline), the site is barred from the round, and the retry draws the others."""
    def spoil(r: pb.RevealRequest) -> None:
        r.contribution = contribution

    # an hour's --cohort-wait: the first attempt waits for all four (with three connected it could be
    # drawn without evil); the retry is drawn at once, since nobody else can join it
    summary, store, coordinator, spoiler, vecs = _run(tmp_path, "reveal_contribution", spoil, min_clients=3,
                                                      cohort_wait=AN_HOUR)
    says = "expected 32 bytes, got 31" if len(contribution) == 31 else "does not open its commitment"
    assert spoiler.refused and says in str(spoiler.refused[0])
    assert summary.status == "completed" and summary.completed_rounds == 1, summary.message
    first, done = store.rounds(coordinator.run_id)
    assert (first.status, done.status, done.survivors) == ("aborted", "completed", 3)
    assert "withheld their reveal" in (first.reason or "")
    ((_round, attempt, name, where, reason),) = store.dropouts(coordinator.run_id)
    assert (attempt, name, where) == (1, "evil", "reveal") and reason.startswith("its message was refused: ")
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(vecs[:3]) / 3, atol=1e-4)
    store.close()


def test_a_malformed_message_from_outside_the_stage_names_its_field_and_drops_nobody(tmp_path: Path) -> None:
    """The refusal needs the sender's session and round: a malformed message without them gets its
    field's error, as before, and takes no member out of a round."""
    coordinator, store = make_job(tmp_path, NAMES)
    outsider = InProcessTransport(coordinator, "a")
    with pytest.raises(MalformedMessage, match=r"shares\[1\]\.peer_id: 3 appears twice"):
        outsider.share_keys(pb.ShareKeysRequest(shares=[pb.EncryptedShare(peer_id=3, ciphertext=b"x")] * 2))
    with pytest.raises(MalformedMessage, match="contribution: expected 32 bytes, got 3"):
        outsider.reveal_contribution(pb.RevealRequest(contribution=b"abc"))
    with pytest.raises(MalformedMessage, match="signature: expected 64 bytes, got 1"):
        outsider.confirm_survivors(pb.ConfirmSurvivorsRequest(signature=b"x"))
    with pytest.raises(ProtocolError):  # a well-formed one gets its header's error
        outsider.reveal_contribution(pb.RevealRequest(contribution=bytes(32)))
    store.close()


@pytest.mark.parametrize("refused", [[99], [0, 0]], ids=["outside", "twice"])
def test_a_decline_naming_members_it_cannot_drops_the_site_at_once(tmp_path: Path, refused: list[int]) -> None:
    """A decline's ``refused_members`` must name other members, once each; a list that does not is
    refused, and the decliner is out of the round at once all the same."""
    def spoil(r: pb.RoundResponse) -> None:
        r.accept, r.commitment = False, b""
        r.refused_members.extend(refused)

    summary, store, coordinator, spoiler, vecs = _run(tmp_path, "respond_to_round", spoil)
    assert spoiler.refused and "refused_members[" in str(spoiler.refused[0])
    assert summary.status == "completed" and summary.completed_rounds == 1, summary.message
    ((_round, _attempt, name, where, reason),) = store.dropouts(coordinator.run_id)
    assert (name, where) == ("evil", "commit") and reason == f"its decline was refused: {spoiler.refused[0]}"
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(vecs[:3]) / 3, atol=1e-4)
    store.close()


@pytest.mark.parametrize("spoil", ["nan", "version"])
def test_a_refused_final_evaluation_report_is_not_waited_for(tmp_path: Path, spoil: str) -> None:
    """The clear final evaluation waits for each participant's report; a refused one (a metric that is
    not finite, another model version) ends that site's part at once instead of at the deadline."""
    def spoiled(r: pb.MetricsReport) -> None:
        if spoil == "nan":
            r.metrics[0].value = float("nan")
        else:
            r.model_version += 7

    summary, store, coordinator, spoiler, _vecs = _run(tmp_path, "report_metrics", spoiled, evaluation="clear",
                                                       final_evaluation=True)
    assert spoiler.refused and ("metrics" in str(spoiler.refused[0]) or "model_version" in str(spoiler.refused[0]))
    assert summary.status == "completed", summary.message
    reporters = sorted(row[0] for row in store.evaluations(coordinator.run_id, 1))
    assert reporters == ["a", "b", "c"] and summary.final_metrics["loss"] == pytest.approx(1.0)
    store.close()


def _raw_upload(t: GrpcTransport, request: pb.MaskedInputRequest, total: int, data: bytes) -> pb.Ack:
    """A masked input sent over the chunked upload with ``total`` declared and ``data`` sent."""
    def chunks() -> Any:
        yield pb.MaskedInputChunk(header=request.header, total_bytes=total)
        for offset in range(0, len(data), 16):
            yield pb.MaskedInputChunk(data=data[offset:offset + 16])

    try:
        ack: pb.Ack = t._upload(chunks(), metadata=t._metadata, timeout=30)
    except grpc.RpcError as err:
        raise error_from_status(err.code(), err.details(), rpc="UploadMaskedInput") from None  # type: ignore[attr-defined]
    return ack


UPLOAD_SPOILS: dict[str, tuple[Callable[[bytes], tuple[int, bytes]], str]] = {
    "short-total": (lambda masked: (len(masked) - 4, masked[:-4]), "total_bytes: expected"),
    "overrun": (lambda masked: (len(masked), masked + bytes(4)), "overrun the"),
}


Upload = Callable[[GrpcTransport, Renumbered, pb.MaskedInputRequest], pb.Ack]


@contextmanager
def _upload_job(tmp_path: Path, upload: Upload) -> Iterator[tuple[Federation_, list[np.ndarray]]]:
    """Four sites over TLS gRPC with an hour's stage deadline, mallory's masked input sent by ``upload``
    (its transport, which renumbers every request, and the request); the job has had a minute to end."""
    names = ("alice", "bob", "carol", "mallory")
    fed, server = start_tls_job(tmp_path, rounds=1, names=names, clients_per_round=4, stage_timeout=AN_HOUR,
                                active=False)
    try:
        vecs = vectors(4)
        evil = fed.transport("mallory")
        renumbered = Renumbered(evil)
        evil.submit_masked_input = lambda request: upload(evil, renumbered, request)  # type: ignore[method-assign]
        clients = [Scripted(fed.coordinator, n, v, transport=renumbered if n == "mallory" else fed.transport(n))
                   for n, v in zip(names, vecs, strict=True)]
        fed.run_scripted(clients, job_timeout_s=60)
        yield fed, vecs
    finally:
        stop_tls_job(fed, server)


@pytest.mark.parametrize("spoil", sorted(UPLOAD_SPOILS))
def test_a_refused_chunked_upload_drops_the_site_at_once(tmp_path: Path, spoil: str) -> None:
    """Over gRPC a masked input above 64 KiB (every real model's) travels in chunks, whose sizes the
    transport checks itself before the coordinator sees the vector: a refused stream must drop its
    sender from the stage as a refused SubmitMaskedInput does (the review of 2026-12-08 found it still
    held the stage). An hour's stage deadline; the job must end within a minute."""
    shape, says = UPLOAD_SPOILS[spoil]
    refused: list[ProtocolError] = []

    def upload(evil: GrpcTransport, _renumbered: Renumbered, request: pb.MaskedInputRequest) -> pb.Ack:
        try:
            return _raw_upload(evil, request, *shape(request.masked_vector))
        except ProtocolError as err:
            refused.append(err)
            raise

    with _upload_job(tmp_path, upload) as (fed, vecs):
        assert refused and isinstance(refused[0], MalformedMessage) and says in str(refused[0])
        assert fed.summary and fed.summary[0].status == "completed", "the stage waited for the refused upload"
        store = fed.coordinator.store
        ((_round, _attempt, name, where, reason),) = store.dropouts(fed.coordinator.run_id)
        assert (name, where) == ("mallory", "masked-input") and reason == f"its message was refused: {refused[0]}"
        np.testing.assert_allclose(store.aggregate(fed.coordinator.run_id, 1), sum(vecs[:3]) / 3, atol=1e-4)  # type: ignore[arg-type]


def test_an_upload_that_ends_short_is_refused_without_dropping_the_site(tmp_path: Path) -> None:
    """A stream that ends before its declared size is refused, but the site stays in the stage and may
    upload again: a broken connection can end the stream this way before gRPC marks the call cancelled
    (the second review of 1d0cfcf dropped an honest site whose deadline expired mid-upload), so it is
    not taken as the site's own doing. Here the site's retry is accepted and its input counts."""
    refused: list[ProtocolError] = []

    def upload(evil: GrpcTransport, renumbered: Renumbered, request: pb.MaskedInputRequest) -> pb.Ack:
        masked = request.masked_vector
        try:
            _raw_upload(evil, request, len(masked), masked[:-4])
        except ProtocolError as err:
            refused.append(err)
        request.header.sequence = renumbered.next_sequence()
        return GrpcTransport.submit_masked_input(evil, request)

    with _upload_job(tmp_path, upload) as (fed, vecs):
        assert refused and isinstance(refused[0], MalformedMessage) and "the upload ended after" in str(refused[0])
        assert fed.summary and fed.summary[0].status == "completed"
        store = fed.coordinator.store
        assert store.dropouts(fed.coordinator.run_id) == []
        np.testing.assert_allclose(store.aggregate(fed.coordinator.run_id, 1), sum(vecs) / 4, atol=1e-4)  # type: ignore[arg-type]
