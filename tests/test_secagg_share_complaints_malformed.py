"""Share complaints the judge refuses: malformed, misplaced or out of stage, each naming the field."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedveil.secagg import (
    GraphSpec,
    MalformedMessageError,
    ProtocolError,
    ShareComplaintsError,
    ShareDecryptionError,
    UnexpectedMessageError,
)
from fedveil.secagg.share_complaints import (
    CIPHERTEXT_BYTES,
    SIGNED_BYTES,
    ShareComplaint,
    box_bytes,
    prove_shared_point,
)
from tests.secagg_helpers import ManualRound
from tests.share_complaint_helpers import (
    _masked_stage,
    _round,
    _share_keys,
    _sid_keys,
)

# --- malformed complaints --------------------------------------------------------------------------

def _at_masked_stage(active: bool = False, **kwargs) -> tuple[ManualRound, dict]:
    r = _round(active, **kwargs)
    return r, _masked_stage(r, _share_keys(r))


def _valid(r: ManualRound, holder: int, sender: int) -> ShareComplaint:
    private, _ = _sid_keys(r, holder)
    sender_public = r.server._ctx.session.advertisements[sender].share_public
    return ShareComplaint(sender, "undecryptable", *prove_shared_point(private, sender_public, sender, holder,
                                                                       r.server.session_id))


@pytest.mark.parametrize(("complaint", "error", "field"), [
    (ShareComplaint(1, "garbled"), MalformedMessageError, r"complaints\[0\]\.kind"),
    (ShareComplaint(1, "undecryptable", bytes(31), bytes(96)), MalformedMessageError, r"complaints\[0\]\.shared_point"),
    (ShareComplaint(1, "undecryptable", bytes(32), bytes(97)), MalformedMessageError, r"complaints\[0\]\.proof"),
    (ShareComplaint(1, "bad_key", bytes(32)), MalformedMessageError, r"complaints\[0\]\.shared_point"),
    (ShareComplaint(1, "bad_key", b"", bytes(96)), MalformedMessageError, r"complaints\[0\]\.proof"),
    (ShareComplaint(1, "bad_signature"), MalformedMessageError, r"complaints\[0\]\.kind"),  # passive mode
    (ShareComplaint(-1, "bad_key"), MalformedMessageError, r"complaints\[0\]\.sender"),
    (ShareComplaint(True, "bad_key"), MalformedMessageError, r"complaints\[0\]\.sender"),
    (ShareComplaint(0, "bad_key"), ProtocolError, r"complaints\[0\]\.sender"),  # the holder itself
    (ShareComplaint(9, "bad_key"), ProtocolError, r"complaints\[0\]\.sender"),  # not in the round
])
def test_malformed_complaints_are_refused_naming_the_field(complaint, error, field):
    r, out = _at_masked_stage()
    with pytest.raises(error, match=field):
        r.server.judge_complaints(0, [complaint])
    assert r.server.verdicts == {} and r.server.blamed == frozenset() and 0 in r.server.pending
    r.server.receive(0, r.clients[0].handle(out[0]))  # nothing changed: the holder may still send its input


def test_duplicate_and_surplus_and_empty_complaints_are_refused():
    r, out = _at_masked_stage()
    good = _valid(r, 0, 1)
    with pytest.raises(MalformedMessageError, match=r"complaints\[1\]\.sender.*twice"):
        r.server.judge_complaints(0, [good, good])
    with pytest.raises(ProtocolError, match="5 complaints about the 4 share boxes"):
        r.server.judge_complaints(0, [good] + [ShareComplaint(s, "bad_key") for s in range(1, 5)])
    with pytest.raises(MalformedMessageError, match="at least one"):
        r.server.judge_complaints(0, [])
    with pytest.raises(MalformedMessageError, match=r"complaints\[0\]"):
        r.server.judge_complaints(0, [(1, "bad_key", b"", b"")])
    assert r.server.verdicts == {} and 0 in r.server.pending
    r.server.receive(0, r.clients[0].handle(out[0]))
    with pytest.raises(UnexpectedMessageError, match="already sent"):  # its input is in the sum: too late
        r.server.judge_complaints(0, [good])


def test_complaint_about_a_non_neighbour_or_a_dropped_sender_is_refused():
    # SecAgg+: client 0's neighbours on a Harary graph of degree 4 over 7 nodes leave two non-neighbours.
    r = _round(False, n=7, graph=GraphSpec("harary", 4))
    replies = _share_keys(r, skip={6})  # client 6 drops before sending shares
    out = _masked_stage(r, {c: m for c, m in replies.items() if c != 6})
    holder = next(c for c in out if 6 in r.server._ctx.session.graph.neighbors(c))
    graph = r.server._ctx.session.graph
    strangers = [c for c in range(7) if c != holder and c not in graph.neighbors(holder)]
    assert strangers
    for sender in [*strangers, 6]:
        with pytest.raises(ProtocolError, match=rf"complaints\[0\]\.sender: client {holder} was sent no share box"):
            r.server.judge_complaints(holder, [ShareComplaint(sender, "bad_key")])
    assert r.server.verdicts == {}


def test_complaints_are_judged_only_in_the_masked_input_stage():
    r = _round(False)
    with pytest.raises(UnexpectedMessageError, match="masked-input stage"):
        r.server.judge_complaints(0, [ShareComplaint(1, "bad_key")])
    out = _masked_stage(r, _share_keys(r))
    good = _valid(r, 0, 1)
    r.send({c: r.clients[c].handle(m) for c, m in out.items() if c != 0})
    r.close()
    with pytest.raises(UnexpectedMessageError, match="masked-input stage"):
        r.server.judge_complaints(0, [good])


def test_server_box_size_depends_on_the_mode():
    # AES-GCM over 24 limbs and 2 salts (96 + 32 + 16-byte tag), two 32-byte commitments, a 64-byte signature
    assert CIPHERTEXT_BYTES == 144 and box_bytes(False) == SIGNED_BYTES == 208 and box_bytes(True) == 272
    for active in (False, True):
        r = _round(active)
        replies = _share_keys(r)
        wrong = box_bytes(not active)
        reply = replies[0]
        bad = dataclasses.replace(reply, boxes={h: os.urandom(wrong) for h in reply.boxes})
        with pytest.raises(MalformedMessageError, match=f"must be {box_bytes(active)} bytes"):
            r.server.receive(0, bad)
        r.server.receive(0, reply)


def test_complaint_error_is_a_share_decryption_error_and_pickles():
    complaint = ShareComplaint(3, "bad_key")
    err = ShareComplaintsError("share box from client 3 failed", (complaint,))
    assert isinstance(err, ShareDecryptionError)
    again = pickle.loads(pickle.dumps(err))
    assert again.complaints == (complaint,) and str(again) == str(err)
    secret = ShareComplaint(1, "undecryptable", b"\x01" * 32, b"\x02" * 96)
    assert "\\x01" not in repr(secret) and "shared_point" not in repr(secret)
    assert ShareComplaint(1, "bad_key").check() == ShareComplaint(1, "bad_key")


def test_the_advertisement_of_a_sender_is_what_the_judge_uses():
    """A holder cannot dodge the proof with its own view of a key: the server judges against the keys
    it routed (the session's), so a proof made over another sender key fails."""
    r, _ = _at_masked_stage(True)
    private, _ = _sid_keys(r, 0)
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    z, proof = prove_shared_point(private, other, 1, 0, r.server.session_id)
    (verdict,) = r.server.judge_complaints(0, [ShareComplaint(1, "undecryptable", z, proof)])
    assert (verdict.upheld, verdict.guilty) == (False, 0) and "proof" in verdict.reason
