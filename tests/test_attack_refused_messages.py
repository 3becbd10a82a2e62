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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import MalformedMessage, ProtocolError
from fedveil.protocol.transport import InProcessTransport
from fedveil.server.coordinator import Coordinator
from tests.server_helpers import ActiveScripted, Scripted, coordinator_watchdog, make_job, run_job, vectors

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
NAMES = ["a", "b", "c", "evil"]
AN_HOUR = 3600.0
Spoil = Callable[[Any], Any]


class Spoiler(InProcessTransport):
    """The malicious site's transport: its message of one RPC goes through ``spoil`` first, which
    changes the request in place or returns another RPC's (name, request) to send instead."""

    def __init__(self, coordinator: Coordinator, name: str, rpc: str, spoil: Spoil) -> None:
        super().__init__(coordinator, name)
        self.rpc, self.spoil = rpc, spoil
        self.refused: list[MalformedMessage] = []

    def _send(self, rpc: str, request: Any) -> pb.Ack:
        if rpc == self.rpc:
            instead = self.spoil(request)
            if instead is not None:
                rpc, request = instead
        try:
            ack: pb.Ack = getattr(super(), rpc)(request)
        except MalformedMessage as err:
            self.refused.append(err)
            raise
        return ack

    def reveal_contribution(self, request: pb.RevealRequest) -> pb.Ack:
        return self._send("reveal_contribution", request)

    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        return self._send("advertise_keys", request)

    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack:
        return self._send("share_keys", request)

    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack:
        return self._send("submit_masked_input", request)

    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        return self._send("confirm_survivors", request)

    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack:
        return self._send("unmask", request)


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
