"""Share commitments (fedveil.secagg.share_commitments): they bind every field, the salts are the
owner's own and deterministic, and a box whose commitments do not match its shares convicts its
sender through the holder's complaint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg.keys import share_box_payload
from fedveil.secagg.messages import SALT_BYTES, SHARE_LIMBS
from fedveil.secagg.shamir import PRIME
from fedveil.secagg.share_commitments import (
    COMMITMENTS_BYTES,
    MASK_KEY,
    PLAINTEXT_BYTES,
    SELF_MASK,
    commit,
    commitment_salts,
    commitments,
    matches,
    part_of,
    plaintext,
    split_plaintext,
)
from fedveil.secagg.share_complaints import SIGNED_BYTES
from tests.share_complaint_helpers import _complaints_of, _masked_stage, _round, _share_keys

limbs_strategy = st.lists(st.integers(0, PRIME - 1), min_size=SHARE_LIMBS, max_size=SHARE_LIMBS).map(
    lambda values: np.asarray(values, dtype=np.int64))
salts_strategy = st.binary(min_size=2 * SALT_BYTES, max_size=2 * SALT_BYTES).map(
    lambda raw: np.frombuffer(raw, np.uint8).reshape(2, SALT_BYTES).copy())


@settings(max_examples=60, deadline=None)
@given(limbs_strategy, salts_strategy, st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.data())
def test_a_commitment_binds_the_session_both_ends_the_secret_the_share_and_the_salt(
        limbs: np.ndarray, salts: np.ndarray, sid: bytes, owner: int, holder: int, data: st.DataObject) -> None:
    both = commitments(sid, owner, holder, limbs, salts)
    assert len(both) == COMMITMENTS_BYTES
    sm, mk = limbs[:8], limbs[8:]
    assert matches(part_of(both, SELF_MASK), sid, owner, holder, SELF_MASK, sm, bytes(salts[SELF_MASK]))
    assert matches(part_of(both, MASK_KEY), sid, owner, holder, MASK_KEY, mk, bytes(salts[MASK_KEY]))
    expected = part_of(both, SELF_MASK)
    salt = bytes(salts[SELF_MASK])
    # any one field changed: no longer opens
    other_owner = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != owner))
    other_holder = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != holder))
    other_sid = data.draw(st.binary(min_size=32, max_size=32).filter(lambda v: v != sid))
    assert not matches(expected, sid, other_owner, holder, SELF_MASK, sm, salt)
    assert not matches(expected, sid, owner, other_holder, SELF_MASK, sm, salt)
    assert not matches(expected, other_sid, owner, holder, SELF_MASK, sm, salt)
    assert not matches(expected, sid, owner, holder, MASK_KEY, sm, salt)
    index = data.draw(st.integers(0, 7))
    moved = sm.copy()
    moved[index] = (moved[index] + 1) % PRIME
    assert not matches(expected, sid, owner, holder, SELF_MASK, moved, salt)
    flipped = bytearray(salt)
    flipped[data.draw(st.integers(0, SALT_BYTES - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert not matches(expected, sid, owner, holder, SELF_MASK, sm, bytes(flipped))


@settings(max_examples=40, deadline=None)
@given(limbs_strategy, salts_strategy)
def test_the_plaintext_round_trips_and_a_wrong_length_is_refused(limbs: np.ndarray, salts: np.ndarray) -> None:
    raw = plaintext(limbs, salts)
    assert len(raw) == PLAINTEXT_BYTES
    back_limbs, back_salts = split_plaintext(raw)
    assert np.array_equal(back_limbs, limbs) and np.array_equal(back_salts, salts)
    with pytest.raises(ValueError, match=f"plaintext is {PLAINTEXT_BYTES} bytes"):
        split_plaintext(raw[:-1])


def test_salts_come_from_the_sharing_seed_and_differ_per_holder_and_session() -> None:
    seed, sid = bytes(range(32)), bytes(range(32, 64))
    salts = commitment_salts(seed, sid, 50)
    assert salts.shape == (50, 2, SALT_BYTES) and salts.dtype == np.uint8
    assert np.array_equal(salts, commitment_salts(seed, sid, 50))  # deterministic given the seed
    assert len({row.tobytes() for row in salts.reshape(100, SALT_BYTES)}) == 100
    assert not np.array_equal(salts, commitment_salts(seed, bytes(32), 50))  # another session
    assert not np.array_equal(salts, commitment_salts(bytes(32), sid, 50))  # another owner's seed
    assert commit(sid, 1, 2, SELF_MASK, np.zeros(8, np.int64), bytes(salts[0, 0])) != commit(
        sid, 1, 2, SELF_MASK, np.zeros(8, np.int64), bytes(salts[1, 0]))  # the same share hides behind each salt


@pytest.mark.parametrize("active", [False, True], ids=["passive", "active"])
def test_a_box_whose_commitments_do_not_match_its_shares_convicts_its_sender(active: bool) -> None:
    """The sender seals honest shares but commits to others (in active mode it signs that): the holder
    refuses the box and complains; the server opens it under the proven key and blames the sender."""
    r = _round(active)
    sender, holder = 3, 1
    replies = _share_keys(r)
    reply = replies[sender]
    box = bytearray(reply.boxes[holder][:SIGNED_BYTES])
    box[SIGNED_BYTES - 1] ^= 1  # the last byte of the masking key's commitment
    body = bytes(box)
    if active:
        body += r.keys[sender].sign(share_box_payload(r.server.session_id, sender, holder, body))
    replies[sender] = dataclasses.replace(reply, boxes={**reply.boxes, holder: body})
    out = _masked_stage(r, replies)
    complaints, _ = _complaints_of(r, out)
    assert set(complaints) == {holder}
    (complaint,) = complaints[holder]
    assert complaint.sender == sender and complaint.kind == "undecryptable"
    (verdict,) = r.server.judge_complaints(holder, complaints[holder])
    assert (verdict.upheld, verdict.guilty) == (True, sender)
    assert "does not match its commitments" in verdict.reason


def test_a_server_that_alters_a_commitment_learns_no_pair_key() -> None:
    """Active mode: a malicious server flips a bit of a commitment in a box it routes, hoping the holder
    reveals the pair's point to prove the mismatch (which would open the pair's two boxes). The box's
    signature covers the commitments, so the holder only says the signature fails, revealing nothing,
    and the verdict convicts nobody (the server's own copy of the box is intact)."""
    r = _round(True)
    sender, holder = 3, 1
    out = _masked_stage(r, _share_keys(r))
    msg = out[holder]
    box = bytearray(msg.boxes[sender])
    box[SIGNED_BYTES - COMMITMENTS_BYTES] ^= 0x80  # the first commitment, as the server forwards it
    out[holder] = dataclasses.replace(msg, boxes={**msg.boxes, sender: bytes(box)})
    complaints, _ = _complaints_of(r, out)
    (complaint,) = complaints[holder]
    assert complaint.kind == "bad_signature" and complaint.shared_point == b"" and complaint.proof == b""
    (verdict,) = r.server.judge_complaints(holder, complaints[holder])
    assert verdict.guilty is None and not verdict.upheld


def test_a_simulated_round_reports_a_holder_that_returns_another_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """fedveil.secagg.run_round with one client whose unmasking answer carries a share its owner never
    committed to: the round completes exactly without that answer and names the client."""
    from fedveil.secagg import SecAggConfig, run_round
    from fedveil.secagg.client import ClientR3Unmasking
    from fedveil.secagg.messages import UnmaskingResponse
    from tests.secagg_helpers import random_inputs, ring_sum

    liar = 2
    real = ClientR3Unmasking.handle

    def handle(self, msg):  # type: ignore[no-untyped-def]
        state, reply = real(self, msg)
        if self.ctx.client_id == liar and isinstance(reply, UnmaskingResponse):
            shares = reply.self_mask_shares.astype(np.int64)
            shares[-1, 0] = (shares[-1, 0] + 1) % PRIME  # the share of client 4's seed
            reply = dataclasses.replace(reply, self_mask_shares=shares.astype(np.uint32))
        return state, reply

    monkeypatch.setattr(ClientR3Unmasking, "handle", handle)
    config = SecAggConfig(5, 3, 16, round_id=12)
    inputs = random_inputs(config)
    sim = run_round(config, inputs)
    assert sim.completed and sim.result is not None
    assert sim.result.faulty_holders == (liar,) and set(sim.misconduct) == {liar}
    assert "refused by the server" in sim.client_errors[liar]
    assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(5)))
