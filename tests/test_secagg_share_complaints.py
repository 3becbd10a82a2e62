"""Verifiable complaints about share boxes (fedveil.secagg.share_complaints): a sender that seals garbage
is blamed, a holder that frames an honest sender is blamed, and nothing is revealed about a box its
sender did not sign."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl import bindings as nb

import fedveil.secagg.client as client_module
from fedveil.secagg import (
    ProtocolError,
    ShareComplaintsError,
    UnexpectedMessageError,
    run_round,
)
from fedveil.secagg.keys import (
    advertisement_payload,
    generate_round_keys,
    is_small_order,
)
from fedveil.secagg.messages import (
    MaskedInputResponse,
    ShareKeysResponse,
)
from fedveil.secagg.share_complaints import (
    CIPHERTEXT_BYTES,
    PROOF_BYTES,
    SHARED_POINT_BYTES,
    SIGNED_BYTES,
    ComplaintVerdict,
    ShareComplaint,
    build_complaint,
    judge,
    key_possession_valid,
    montgomery_u,
    prime_order_point,
    prove_key_possession,
    prove_shared_point,
    verify_shared_point,
)
from tests.secagg_helpers import ManualRound, random_inputs, ring_sum
from tests.share_complaint_helpers import (
    _P,
    SID,
    N,
    _complaints_of,
    _config,
    _finish,
    _garbage_box,
    _garble,
    _masked_stage,
    _round,
    _share_keys,
    _sid_keys,
    _torsion_key,
)

# --- the DLEQ proof -------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_shared_point_is_the_x25519_exchange_and_its_proof_verifies(holder_seed, sender_seed):
    holder = generate_round_keys(holder_seed).share_private
    sender = generate_round_keys(sender_seed).share_private
    sender_public = sender.public_key().public_bytes_raw()
    z, proof = prove_shared_point(holder, sender_public, 3, 7, SID)
    assert len(z) == SHARED_POINT_BYTES and len(proof) == PROOF_BYTES
    exchange = holder.exchange(sender.public_key())
    assert montgomery_u(z) == exchange == sender.exchange(holder.public_key())
    holder_public = holder.public_key().public_bytes_raw()
    assert verify_shared_point(holder_public, sender_public, 3, 7, SID, z, proof) == exchange


def _flip_scalar(scalar: bytes) -> bytes:
    one = (1).to_bytes(32, "little")
    return nb.crypto_core_ed25519_scalar_add(scalar, one)


ALTERATIONS = ["z_bit", "z_negated", "z_random_point", "pk_negated", "pk_other", "c", "s", "s_noncanonical",
               "session", "sender", "holder", "other_peer", "swapped_ends", "foreign_key"]


@pytest.mark.parametrize("alteration", ALTERATIONS)
def test_an_altered_proof_is_rejected(alteration):
    holder, sender, other = (X25519PrivateKey.generate() for _ in range(3))
    h_pub, s_pub, o_pub = (k.public_key().public_bytes_raw() for k in (holder, sender, other))
    z, proof = prove_shared_point(holder, s_pub, 1, 2, SID)
    assert verify_shared_point(h_pub, s_pub, 1, 2, SID, z, proof) is not None
    pk, c, s = proof[:32], proof[32:64], proof[64:]
    args = dict(holder_public=h_pub, sender_public=s_pub, sender=1, holder=2, session_id=SID, shared_point=z,
                proof=proof)
    if alteration == "z_bit":
        args["shared_point"] = bytes([z[0] ^ 4]) + z[1:]
    elif alteration == "z_negated":  # the same u (so the same box key), not the proven point
        args["shared_point"] = z[:31] + bytes([z[31] ^ 0x80])
    elif alteration == "z_random_point":
        args["shared_point"] = nb.crypto_scalarmult_ed25519_base_noclamp(nb.crypto_core_ed25519_scalar_reduce(
            os.urandom(64)))
    elif alteration == "pk_negated":  # passes the u-coordinate check, fails the proof
        args["proof"] = pk[:31] + bytes([pk[31] ^ 0x80]) + c + s
    elif alteration == "pk_other":
        args["proof"] = prime_order_point(o_pub) + c + s
    elif alteration == "c":
        args["proof"] = pk + _flip_scalar(c) + s
    elif alteration == "s":
        args["proof"] = pk + c + _flip_scalar(s)
    elif alteration == "s_noncanonical":  # s + L: the same point, not the same bytes
        big = int.from_bytes(s, "little") + (1 << 252) + 27742317777372353535851937790883648493
        if big >= 1 << 256:
            pytest.skip("s + L does not fit in 32 bytes")
        args["proof"] = pk + c + big.to_bytes(32, "little")
    elif alteration == "session":
        args["session_id"] = bytes(32)
    elif alteration == "sender":
        args["sender"] = 4
    elif alteration == "holder":
        args["holder"] = 4
    elif alteration == "other_peer":  # the holder's genuine point with another peer, proven for that peer
        z2, proof2 = prove_shared_point(holder, o_pub, 1, 2, SID)
        assert verify_shared_point(h_pub, o_pub, 1, 2, SID, z2, proof2) is not None
        args["shared_point"] = z2
        rejected_proof = verify_shared_point(h_pub, s_pub, 1, 2, SID, z2, proof2)
        assert rejected_proof is None
    elif alteration == "swapped_ends":
        args["sender"], args["holder"] = 2, 1
    elif alteration == "foreign_key":  # a sound proof, but over a key that is not the holder's
        args["shared_point"], args["proof"] = prove_shared_point(other, s_pub, 1, 2, SID)
    assert verify_shared_point(**args) is None


def test_hostile_bytes_never_raise():
    holder, sender = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    h_pub, s_pub = (k.public_key().public_bytes_raw() for k in (holder, sender))
    for z, proof in [(bytes(32), bytes(96)), (b"\xff" * 32, b"\xff" * 96), (os.urandom(32), os.urandom(96)),
                     (bytes(31), bytes(96)), (bytes(32), bytes(95)), (b"", b"")]:
        assert verify_shared_point(h_pub, s_pub, 1, 2, SID, z, proof) is None
    z, proof = prove_shared_point(holder, s_pub, 1, 2, SID)
    for bad_key in (bytes(32), b"\xff" * 32, (_P - 1).to_bytes(32, "little"), os.urandom(31)):
        assert verify_shared_point(h_pub, bad_key, 1, 2, SID, z, proof) is None
        assert verify_shared_point(bad_key, s_pub, 1, 2, SID, z, proof) is None


def test_torsion_key_is_refused_by_the_proof_but_not_by_x25519():
    """What X25519 does with an honest key plus a point of order 8: the clamped scalar (a multiple of 8)
    kills the torsion, so the exchange gives the honest key's secret; no proof can be built over it."""
    sender, holder = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    honest = sender.public_key().public_bytes_raw()
    twisted = _torsion_key(honest)
    assert twisted != honest and not is_small_order(twisted)
    assert holder.exchange(X25519PublicKey.from_public_bytes(twisted)) == holder.exchange(sender.public_key())
    assert prime_order_point(honest) is not None and prime_order_point(twisted) is None
    with pytest.raises(ProtocolError, match="prime-order"):
        prove_shared_point(holder, twisted, 1, 2, SID)
    # encodings an honest X25519 implementation never produces are refused as well
    u = int.from_bytes(honest, "little")
    for bad in (honest[:31] + bytes([honest[31] | 0x80]), (u + _P).to_bytes(33, "little")[:32], bytes(32),
                (1).to_bytes(32, "little"), (_P - 1).to_bytes(32, "little")):
        assert prime_order_point(bad) is None
    assert prime_order_point((9).to_bytes(32, "little")) is not None  # the base point


# --- complaints in a real round --------------------------------------------------------------------

@pytest.mark.parametrize("active", [False, True])
def test_garbage_sender_is_blamed_by_every_holder(active):
    r = _round(active)
    sender = 2
    replies = _share_keys(r)
    _garble(r, replies, sender)
    out = _masked_stage(r, replies)
    complaints, replies = _complaints_of(r, out)
    assert set(complaints) == set(range(N)) - {sender}
    for holder, items in complaints.items():
        assert [(c.sender, c.kind) for c in items] == [(sender, "undecryptable")]
        assert len(items[0].shared_point) == 32 and len(items[0].proof) == 96
        verdicts = r.server.judge_complaints(holder, items)
        assert [(v.upheld, v.guilty) for v in verdicts] == [(True, sender)]
        assert isinstance(verdicts[0], ComplaintVerdict) and "uploaded" in verdicts[0].reason
    assert r.server.blamed == frozenset({sender})
    assert set(r.server.verdicts) == set(complaints)
    assert r.server.pending == (sender,)
    for holder in complaints:  # they left the stage
        with pytest.raises(UnexpectedMessageError, match="complained"):
            r.server.receive(holder, MaskedInputResponse(r.config.round_id, holder, r.config.ring.zeros(8)))
        with pytest.raises(UnexpectedMessageError):
            r.server.judge_complaints(holder, complaints[holder])
    r.send(replies)
    r.close()
    assert r.server.aborted  # one of five masked inputs: below t
    assert r.server._ctx.boxes == {}  # the stored boxes are dropped when the stage closes


@pytest.mark.parametrize("active", [False, True])
def test_a_complaining_holder_is_a_dropout_and_the_round_completes(active):
    r = _round(active)
    sender, victim = 1, 3
    replies = _share_keys(r)
    _garble(r, replies, sender, [victim])
    out = _masked_stage(r, replies)
    complaints, replies = _complaints_of(r, out)
    assert set(complaints) == {victim}
    assert [(v.upheld, v.guilty) for v in r.server.judge_complaints(victim, complaints[victim])] == [(True, sender)]
    assert victim not in r.server.pending
    r.send(replies)
    _finish(r, r.close(), skip={victim})
    assert r.server.completed, r.server.abort_reason
    assert r.server.result.dropped == (victim,)
    expected = ring_sum(r.config, r.inputs, [c for c in range(N) if c != victim])
    assert np.array_equal(r.server.result.ring_sum, expected)
    assert r.server.blamed == frozenset({sender})


@pytest.mark.parametrize("active", [False, True])
def test_a_holder_that_frames_an_honest_sender_is_blamed(active):
    r = _round(active)
    holder, sender = 0, 4
    out = _masked_stage(r, _share_keys(r))
    sid = r.server.session_id
    private, _ = _sid_keys(r, holder)
    sender_public = r.server._ctx.session.advertisements[sender].share_public
    z, proof = prove_shared_point(private, sender_public, sender, holder, sid)
    random_point = nb.crypto_scalarmult_ed25519_base_noclamp(nb.crypto_core_ed25519_scalar_reduce(os.urandom(64)))
    cases = {
        "valid proof, box opens": ShareComplaint(sender, "undecryptable", z, proof),
        "bogus Z": ShareComplaint(sender, "undecryptable", random_point, proof),
        "bogus proof": ShareComplaint(sender, "undecryptable", z, os.urandom(96)),
        "proof for another session": ShareComplaint(sender, "undecryptable",
                                                    *prove_shared_point(private, sender_public, sender, holder,
                                                                        bytes(32))),
        "key is fine": ShareComplaint(sender, "bad_key"),
    }
    for name, complaint in cases.items():
        server = _fresh_server_copy(r)
        (verdict,) = server.judge_complaints(holder, [complaint])
        assert (verdict.upheld, verdict.guilty) == (False, holder), name
        assert server.blamed == frozenset({holder})
    assert r.clients[holder].handle(out[holder]) is not None  # the box does open


def _fresh_server_copy(r: ManualRound):
    """The round's server as it stands (judging mutates it), so each case is judged afresh."""
    import copy

    return copy.deepcopy(r.server)


def test_box_altered_in_transit_reveals_nothing_and_convicts_nobody():
    r = _round(True)
    holder, sender = 3, 0
    out = _masked_stage(r, _share_keys(r))
    msg = out[holder]
    box = bytearray(msg.boxes[sender])
    box[5] ^= 1  # the ciphertext; the server's stored copy is intact
    with pytest.raises(ShareComplaintsError, match=f"from client {sender}") as caught:
        r.clients[holder].handle(dataclasses.replace(msg, boxes={**msg.boxes, sender: bytes(box)}))
    (complaint,) = caught.value.complaints
    assert complaint.kind == "bad_signature"
    assert complaint.shared_point == b"" and complaint.proof == b""  # no pair secret for an unsigned box
    (verdict,) = r.server.judge_complaints(holder, caught.value.complaints)
    assert (verdict.upheld, verdict.guilty) == (False, None) and "inconclusive" in verdict.reason
    assert r.server.blamed == frozenset()
    assert holder not in r.server.pending


def test_a_box_that_opens_is_accepted_without_checking_its_signature():
    """The signature costs nothing when the box opens: only a failing box has its signature checked."""
    r = _round(True)
    holder, sender = 2, 1
    out = _masked_stage(r, _share_keys(r))
    msg = out[holder]
    box = msg.boxes[sender][:SIGNED_BYTES] + bytes(64)
    assert r.clients[holder].handle(dataclasses.replace(msg, boxes={**msg.boxes, sender: box})) is not None


def test_a_sender_that_uploads_a_badly_signed_box_is_blamed():
    r = _round(True)
    sender, victim = 4, 0
    replies = _share_keys(r)
    _garble(r, replies, sender, [victim], signed=False)
    out = _masked_stage(r, replies)
    complaints, _ = _complaints_of(r, out)
    (complaint,) = complaints[victim]
    assert complaint.kind == "bad_signature" and complaint.shared_point == b"" and complaint.proof == b""
    (verdict,) = r.server.judge_complaints(victim, complaints[victim])
    assert (verdict.upheld, verdict.guilty) == (True, sender)
    assert r.server.blamed == frozenset({sender})


@pytest.mark.parametrize("active", [False, True])
def test_a_sender_with_a_key_off_the_prime_order_subgroup_is_blamed(active):
    r = _round(active)
    sender = 2
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    twisted = _torsion_key(advs[sender].share_public)
    signature = b""
    if active:
        signature = r.keys[sender].sign(advertisement_payload(r.config.round_id, r.config.parameters_bytes(), sender,
                                                              twisted, advs[sender].mask_public))
    advs[sender] = dataclasses.replace(advs[sender], share_public=twisted, signature=signature)
    for c, adv in advs.items():
        r.server.receive(c, adv)
    replies = r.deliver(r.close(), skip={sender})  # the sender's own client would not accept its forged key
    replies[sender] = ShareKeysResponse(r.config.round_id, sender,
                                        {h: _garbage_box(r, sender, h) for h in range(N) if h != sender})
    out = _masked_stage(r, replies)
    complaints, _ = _complaints_of(r, {c: m for c, m in out.items() if c != sender})
    assert set(complaints) == set(range(N)) - {sender}
    for holder, items in complaints.items():
        assert [(c.sender, c.kind, c.shared_point, c.proof) for c in items] == [(sender, "bad_key", b"", b"")]
        assert [(v.upheld, v.guilty) for v in r.server.judge_complaints(holder, items)] == [(True, sender)]
    assert r.server.blamed == frozenset({sender})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_verdicts_blame_exactly_the_garbage_senders(data):
    active = data.draw(st.booleans(), label="active")
    r = _round(active)
    replies = _share_keys(r)
    garbage: dict[int, set[int]] = {}
    for sender in data.draw(st.sets(st.integers(0, N - 1)), label="garbage senders"):
        holders = data.draw(st.sets(st.sampled_from([h for h in range(N) if h != sender]), min_size=1),
                            label=f"holders of {sender}")
        garbage[sender] = holders
        _garble(r, replies, sender, holders)
    out = _masked_stage(r, replies)
    complaints, _ = _complaints_of(r, out)
    victims = {h for holders in garbage.values() for h in holders}
    assert set(complaints) == victims
    for holder, items in complaints.items():
        assert {c.sender for c in items} == {s for s, hs in garbage.items() if holder in hs}
        for verdict in r.server.judge_complaints(holder, items):
            assert verdict.complaint.kind == "undecryptable"
            assert (verdict.upheld, verdict.guilty) == (True, verdict.complaint.sender)
    assert r.server.blamed == frozenset(garbage)


def test_simulation_feeds_complaints_to_the_server(monkeypatch):
    config, keys = _config(True)
    sender = 1
    real_seal = client_module.seal_share

    def seal(key, plaintext, from_id, to_id, session):
        return os.urandom(CIPHERTEXT_BYTES) if from_id == sender else real_seal(key, plaintext, from_id, to_id,
                                                                                 session)

    monkeypatch.setattr(client_module, "seal_share", seal)
    sim = run_round(config, random_inputs(config), identity_keys=dict(enumerate(keys)), wire=True)
    assert not sim.completed
    assert sim.blamed == frozenset({sender})
    assert set(sim.verdicts) == set(range(N)) - {sender}
    assert all("ShareComplaintsError" in sim.client_errors[h] for h in sim.verdicts)


# --- the proof that a sender knows its share key's secret --------------------------------------------

def test_a_possession_proof_is_bound_to_its_key_client_and_round_attempt():
    key = X25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    proof = prove_key_possession(key, 7, 3)
    assert len(proof) == PROOF_BYTES and key_possession_valid(public, proof, 7, 3)
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert not key_possession_valid(other, proof, 7, 3)  # another key
    assert not key_possession_valid(public, proof, 7, 4)  # copied by another client
    assert not key_possession_valid(public, proof, 8, 3)  # replayed in another attempt
    for i in (0, 40, 70, 95):  # any altered byte
        assert not key_possession_valid(public, proof[:i] + bytes([proof[i] ^ 1]) + proof[i + 1:], 7, 3)
    assert not key_possession_valid(public, b"", 7, 3) and not key_possession_valid(public, os.urandom(96), 7, 3)


def test_a_holder_reveals_no_pair_secret_for_a_sender_that_copied_another_clients_key():
    """The cryptography review of 2026-12-07: a colluder Z advertised victim U's share key, shown to a
    holder W whose list left U out (so no duplicate shows), and sent W garbage. W's complaint revealed
    DH(c_W, c_U), which opens U's box to W: t such holders gave the server both of U's secrets. Now W
    reveals a pair secret only for a sender key with a valid proof that the sender knows its secret; the
    copied key has none (U's proof names U), and the server convicts Z on W's ``bad_key`` complaint."""
    rid, sid, victim, colluder, holder = 11, os.urandom(32), 0, 9, 4
    victim_key, holder_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    copied = victim_key.public_key().public_bytes_raw()
    garbage = os.urandom(SIGNED_BYTES)
    for proof in (prove_key_possession(victim_key, rid, victim), b""):  # U's own proof, or none
        complaint = build_complaint(private=holder_key, sender_public=copied, sender_possession=proof,
                                    sender_identity=None, box=garbage, sender=colluder, holder=holder,
                                    session_id=sid, round_id=rid)
        assert (complaint.kind, complaint.shared_point, complaint.proof) == ("bad_key", b"", b"")
        verdict = judge(complaint, holder=holder, holder_public=holder_key.public_key().public_bytes_raw(),
                        sender_public=copied, sender_possession=proof, sender_identity=None, stored_box=garbage,
                        session_id=sid, round_id=rid)
        assert (verdict.upheld, verdict.guilty) == (True, colluder)
    # the control: a garbage sender with its own key and proof is complained about with the pair's point
    sender_key = X25519PrivateKey.generate()
    own = sender_key.public_key().public_bytes_raw()
    complaint = build_complaint(private=holder_key, sender_public=own, sender_possession=prove_key_possession(
        sender_key, rid, colluder), sender_identity=None, box=garbage, sender=colluder, holder=holder,
        session_id=sid, round_id=rid)
    assert complaint.kind == "undecryptable" and complaint.shared_point
    # a false bad_key complaint about a sender whose key and proof are valid convicts the holder
    false = judge(ShareComplaint(colluder, "bad_key"), holder=holder,
                  holder_public=holder_key.public_key().public_bytes_raw(), sender_public=own,
                  sender_possession=prove_key_possession(sender_key, rid, colluder), sender_identity=None,
                  stored_box=garbage, session_id=sid, round_id=rid)
    assert (false.upheld, false.guilty) == (False, holder)
