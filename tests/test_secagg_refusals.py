"""What the SecAgg state machines refuse: requests that would reveal too much, tampered, replayed,
spoofed or out-of-state messages, and unmasking shares that interpolate to nothing. Each raises a
named error, and a message one party refuses changes nothing for the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import (
    DoubleShareRequestError,
    MalformedMessageError,
    ProtocolError,
    RoundAborted,
    RoundAbortedError,
    SecAggClient,
    SecAggConfig,
    ShareDecryptionError,
    TooFewSurvivorsError,
    UnexpectedMessageError,
    UnmaskingRefusedError,
    WrongRoundError,
)
from fedveil.secagg.client import ClientR1ShareKeys, ClientR2MaskedInput, ClientR3Unmasking
from fedveil.secagg.messages import (
    SELF_MASK_LIMBS,
    AdvertiseKeys,
    MaskedInputRequest,
    MaskedInputResponse,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
)
from fedveil.secagg.server import ServerR1ShareKeys, ServerR2MaskedInputCollection
from fedveil.secagg.shamir import PRIME
from fedveil.secagg.unmasking import ServerR3Unmasking
from tests.secagg_helpers import ManualRound, random_inputs, redeal, ring_sum


def _round_until_unmasking(config, skip_masked=()):
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.close())
    out = r.step(out, skip=skip_masked)
    return r, out


def test_client_refuses_double_share_request():
    config = SecAggConfig(6, 3, 16, round_id=2)
    r, out = _round_until_unmasking(config, skip_masked={5})
    honest = out[0]
    assert isinstance(honest, UnmaskingRequest)
    # The server claims client 3 both survived and dropped: answering would give it both shares.
    evil = dataclasses.replace(honest, dropped=np.array([3, 5], np.uint32))
    with pytest.raises(DoubleShareRequestError):
        r.clients[0].handle(evil)
    assert r.clients[0].aborted
    # Listing the client itself as dropped is refused too.
    evil_self = dataclasses.replace(out[1], survivors=np.array([0, 2, 3, 4], np.uint32),
                                    dropped=np.array([1, 5], np.uint32))
    with pytest.raises(UnmaskingRefusedError):
        r.clients[1].handle(evil_self)


def test_client_answers_once_and_never_both_shares():
    config = SecAggConfig(6, 3, 16, round_id=2)
    r, out = _round_until_unmasking(config, skip_masked={5})
    reply = r.clients[0].handle(out[0])
    assert isinstance(reply, UnmaskingResponse)
    assert set(reply.self_mask_owners.tolist()).isdisjoint(reply.mask_key_owners.tolist())
    assert reply.mask_key_owners.tolist() == [5]
    # A second request (say with 4 now "dropped") is out of state: the client has completed.
    second = dataclasses.replace(out[0], survivors=np.array([0, 1, 2, 3], np.uint32),
                                 dropped=np.array([4, 5], np.uint32))
    with pytest.raises(UnexpectedMessageError):
        r.clients[0].handle(second)


def test_client_refuses_survivor_set_smaller_than_threshold():
    config = SecAggConfig(6, 4, 16, round_id=2)
    r, out = _round_until_unmasking(config)
    small = dataclasses.replace(out[0], survivors=np.array([0, 1, 2], np.uint32), dropped=np.array([], np.uint32))
    with pytest.raises(TooFewSurvivorsError):
        r.clients[0].handle(small)
    assert r.clients[0].aborted


def test_tampered_share_ciphertext_rejected():
    config = SecAggConfig(5, 3, 16, round_id=4)
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.close())
    msg = out[2]
    assert isinstance(msg, MaskedInputRequest)
    sender = next(iter(msg.boxes))
    box = bytearray(msg.boxes[sender])
    box[7] ^= 0x01
    tampered = dataclasses.replace(msg, boxes={**msg.boxes, sender: bytes(box)})
    with pytest.raises(ShareDecryptionError, match=f"from client {sender}"):
        r.clients[2].handle(tampered)
    assert r.clients[2].aborted
    # A box re-addressed to another recipient fails as well (recipient is associated data).
    other = out[3]
    swapped = {s: msg.boxes[s] for s in other.boxes if s in msg.boxes}
    with pytest.raises(ShareDecryptionError):
        r.clients[3].handle(dataclasses.replace(other, boxes={**other.boxes, **swapped}))


def test_message_replayed_from_another_round_rejected():
    config1 = SecAggConfig(5, 3, 16, round_id=1)
    config2 = config1.for_round(2)
    r1 = ManualRound(config1)
    r1.advertise()
    out1 = r1.step(r1.close())
    r2 = ManualRound(config2)
    old_adv = SecAggClient(0, config1).advertise_keys()
    with pytest.raises(WrongRoundError):
        r2.server.receive(0, old_adv)
    with pytest.raises(WrongRoundError):
        r2.server.receive(0, old_adv.to_bytes())
    r2.advertise()
    out2 = r2.close()
    with pytest.raises(WrongRoundError):
        r2.clients[1].handle(out1[1])  # round 1's MaskedInputRequest
    assert not r2.clients[1].aborted  # the replay was ignored, the round goes on
    out2 = r2.step(out2)
    # Even with the header rewritten to round 2, round-1 share boxes fail (session id in the AD).
    forged = dataclasses.replace(out1[1], round_id=2)
    with pytest.raises(ShareDecryptionError):
        r2.clients[1].handle(forged)


def test_out_of_state_messages_rejected_and_ignored():
    config = SecAggConfig(4, 3, 8, round_id=7)
    r = ManualRound(config)
    vec = np.zeros(8, np.uint32)
    with pytest.raises(UnexpectedMessageError):
        r.server.receive(0, MaskedInputResponse(7, 0, vec))
    with pytest.raises(UnexpectedMessageError):
        r.clients[0].handle(UnmaskingRequest(7, 0))
    r.advertise()
    with pytest.raises(UnexpectedMessageError):  # advertising twice
        r.server.receive(0, AdvertiseKeys(7, 0, b"a" * 32, b"b" * 32))
    with pytest.raises(UnexpectedMessageError):
        r.clients[1].advertise_keys()
    out = r.close()
    assert isinstance(r.server.state, ServerR1ShareKeys)
    assert isinstance(r.clients[0].state, ClientR1ShareKeys)
    with pytest.raises(UnexpectedMessageError):
        r.server.receive(1, MaskedInputResponse(7, 1, vec))
    with pytest.raises(UnexpectedMessageError):
        r.clients[0].handle(MaskedInputRequest(7, 0, {}))
    with pytest.raises(MalformedMessageError):
        r.clients[0].handle(b"garbage")
    # None of that changed anything: the round completes exactly.
    out = r.step(out)
    assert isinstance(r.clients[0].state, ClientR2MaskedInput)
    assert isinstance(r.server.state, ServerR2MaskedInputCollection)
    out = r.step(out)
    assert isinstance(r.clients[0].state, ClientR3Unmasking)
    assert isinstance(r.server.state, ServerR3Unmasking)
    with pytest.raises(UnexpectedMessageError):
        r.clients[0].handle(ShareKeysRequest(7, 0, ()))
    r.step(out)
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(4)))


def test_server_rejects_spoofed_sender_and_bad_vectors():
    config = SecAggConfig(4, 3, 8, round_id=7)
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.close())
    replies = r.deliver(out)
    from fedveil.secagg import ProtocolError

    with pytest.raises(ProtocolError):
        r.server.receive(1, replies[0])  # client 1 sending client 0's message
    with pytest.raises(MalformedMessageError):
        r.server.receive(0, MaskedInputResponse(7, 0, np.zeros(9, np.uint32)))
    with pytest.raises(MalformedMessageError):
        r.server.receive(0, MaskedInputResponse(7, 0, np.zeros(8, np.uint64)))
    r.send(replies)
    r.step(r.close())
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(4)))


def test_clients_refuse_unmasking_after_an_abort():
    config = SecAggConfig(6, 5, 32, round_id=1)
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.step(r.close()), skip={0, 1})  # 4 masked inputs < t: the server aborts
    assert r.server.aborted
    for c in range(2, 6):
        r.clients[c].handle(out[c])
        late = UnmaskingRequest(1, c, np.arange(2, 6, dtype=np.uint32), np.array([0, 1], np.uint32))
        with pytest.raises(UnexpectedMessageError):
            r.clients[c].handle(late)
        assert r.clients[c].aborted


def test_client_refuses_survivors_it_knows_dropped_before_sharing():
    """Bonawitz et al.'s check U3 ⊆ U2 in the client's own view: a survivor set padded with
    neighbours that never sent this client their shares (or with ids outside the session)
    must not count towards t, and a client refuses to answer it."""
    config = SecAggConfig(7, 3, 16, round_id=2)
    r = ManualRound(config)
    r.advertise()
    out = r.close()
    out = r.step(out, skip={5, 6})  # 5 and 6 drop before sharing: U2 = {0, ..., 4}
    out = r.step(out)
    honest = out[0]
    assert honest.survivors.tolist() == [0, 1, 2, 3, 4]
    # Padded with 5 and 6 the set reaches t = 3 and lets the server name 1..4 as dropped.
    padded = dataclasses.replace(honest, survivors=np.array([0, 5, 6], np.uint32),
                                 dropped=np.array([1, 2, 3, 4], np.uint32))
    with pytest.raises(UnmaskingRefusedError, match="never sent"):
        r.clients[0].handle(padded)
    assert r.clients[0].aborted
    # Ids of clients that are not in the session are refused too.
    bogus = dataclasses.replace(out[1], survivors=np.array([1, 2, 3, 4, 1000], np.uint32))
    with pytest.raises(UnmaskingRefusedError, match="not in this round"):
        r.clients[1].handle(bogus)
    # The honest request is still answered by the others and the round completes exactly.
    r.step({c: out[c] for c in (2, 3, 4)})
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(5)))


def test_inconsistent_unmasking_shares_abort_cleanly():
    """Shares that interpolate to no valid seed end the round as an abort (RoundAborted to
    every client, sum discarded), not as an exception out of close_stage; their dealer is named."""
    config = SecAggConfig(5, 3, 16, round_id=8)
    r = ManualRound(config)
    r.advertise()
    replies = r.deliver(r.close())

    def junk(_holders, shares):
        # every share of client 2's self-mask seed set to 2^20: they interpolate to limbs 2^20 >= 2^16
        shares[:, :SELF_MASK_LIMBS] = 1 << 20
        return shares

    redeal(r, replies, 2, tamper=junk)
    r.send(replies)
    out = r.step(r.close(), skip={4})
    replies = r.deliver(out)
    r.send(replies)
    out = r.close()
    assert r.server.aborted
    assert "inconsistent" in (r.server.abort_reason or "")
    assert set(r.server.misconduct) == {2} and "self-mask seed" in r.server.misconduct[2]
    assert r.server.state.ctx.running_sum is None
    assert set(out) == {0, 1, 2, 3} and all(isinstance(m, RoundAborted) for m in out.values())
    with pytest.raises(RoundAbortedError):
        _ = r.server.result


def test_a_holder_returning_a_share_its_owner_did_not_deal_is_refused_and_named():
    """A holder adds one to a share before it returns it: the share no longer opens its owner's
    commitment, so the server refuses that answer, names the holder, and completes without it."""
    config = SecAggConfig(5, 3, 16, round_id=8)
    r, out = _round_until_unmasking(config)
    replies = r.deliver(out)
    liar = 1
    reply = replies[liar]
    assert isinstance(reply, UnmaskingResponse)
    wrong = reply.self_mask_shares.astype(np.int64)
    wrong[0, 0] = (wrong[0, 0] + 1) % PRIME  # the share of client 0's seed (not its own)
    with pytest.raises(ProtocolError, match="client 1 returned a share of the self-mask seed of client 0 that "
                                            "client 0 did not commit to"):
        r.server.receive(liar, dataclasses.replace(reply, self_mask_shares=wrong.astype(np.uint32)))
    # a salt that is not the one in the box fails the same way
    salts = reply.self_mask_salts.copy()
    salts[0, 0] ^= 1
    with pytest.raises(ProtocolError, match="did not commit to"):
        r.server.receive(liar, dataclasses.replace(reply, self_mask_salts=salts))
    r.send({c: m for c, m in replies.items() if c != liar})
    r.close()
    assert r.server.completed and r.server.result.faulty_holders == (liar,)
    assert set(r.server.misconduct) == {liar}
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(5)))


# --- property test of the state machines under arbitrary message sequences -----------------------

_CLIENT_TO_SERVER = (AdvertiseKeys, ShareKeysResponse, MaskedInputResponse, UnmaskingResponse)
_AWAITED_BY_CLIENT = {"R1ShareKeys": ShareKeysRequest, "R2MaskedInput": MaskedInputRequest,
                      "R3Unmasking": UnmaskingRequest}


def _honest_round_messages(config, inputs):
    """Every message, both directions, of one honest round."""
    r = ManualRound(config, inputs)
    msgs = [client.advertise_keys() for client in r.clients.values()]
    for c, adv in enumerate(msgs):
        r.server.receive(c, adv)
    out = r.close()
    while out:
        msgs += out.values()
        replies = r.deliver(out)
        msgs += replies.values()
        r.send(replies)
        out = r.close()
    assert r.server.completed
    return msgs


_FUZZ_CONFIG = SecAggConfig(4, 3, 8, round_id=1)
_FUZZ_INPUTS = random_inputs(_FUZZ_CONFIG)
# Replays: a run of this same round (other keys) and a run of the next round.
_FUZZ_POOL = [*_honest_round_messages(_FUZZ_CONFIG, _FUZZ_INPUTS),
              *_honest_round_messages(_FUZZ_CONFIG.for_round(2), _FUZZ_INPUTS)]


def _throw(r, script, *, clients_only=False):
    """Deliver foreign messages that cannot belong here; each must raise and change nothing."""
    from fedveil.secagg import SecAggError

    for who, idx in script:
        msg = _FUZZ_POOL[idx % len(_FUZZ_POOL)]
        if isinstance(msg, _CLIENT_TO_SERVER):
            if clients_only:
                continue
            # Called only when every expected reply is in: a message of the right kind is a duplicate.
            ctx = r.server.state.ctx
            before = (r.server.stage, r.server.pending, None if ctx.running_sum is None else ctx.running_sum.copy())
            with pytest.raises(SecAggError):
                r.server.receive(msg.client_id, msg)
            after = (r.server.stage, r.server.pending, ctx.running_sum)
            assert after[:2] == before[:2]
            assert (after[2] is None) == (before[2] is None)
            assert before[2] is None or np.array_equal(after[2], before[2])
        else:
            client = r.clients[who]
            fwd = dataclasses.replace(msg, client_id=who)
            if fwd.round_id == _FUZZ_CONFIG.round_id and isinstance(fwd, _AWAITED_BY_CLIENT.get(client.stage, ())):
                continue  # this round, the awaited kind: a forgery the client may rightly abort on
            stage = client.stage
            with pytest.raises((WrongRoundError, UnexpectedMessageError)):
                client.handle(fwd)
            assert client.stage == stage


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6)), max_size=8), min_size=4, max_size=4))
def test_foreign_and_out_of_state_messages_change_nothing(scripts):
    """Messages replayed from another run or round, or of a kind the current state does not
    take, raise a named error and leave every state machine as it was, at every stage; the
    honest round then still ends exactly."""
    r = ManualRound(_FUZZ_CONFIG, _FUZZ_INPUTS)
    _throw(r, scripts[3], clients_only=True)  # the server still awaits every advertisement
    r.advertise()
    out = r.close()
    for script in scripts[:3]:
        replies = r.deliver(out)
        r.send(replies)
        _throw(r, script)
        out = r.close()
    _throw(r, scripts[3])
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(_FUZZ_CONFIG, _FUZZ_INPUTS, range(4)))


def test_unmasking_answers_checked_ahead_are_not_checked_again_and_a_lie_is_still_refused(monkeypatch):
    """A driver checks an answer's commitments outside its lock (SecAggServer.verify_unmasking): a sound
    answer is then fed without a second check, and a lying one is not recorded, so receive refuses it."""
    config = SecAggConfig(5, 3, 16, round_id=8)
    r, out = _round_until_unmasking(config)
    replies = r.deliver(out)
    calls: list[int] = []
    real = ServerR3Unmasking.commitment_fault

    def counting(self, holder, msg):
        calls.append(holder)
        return real(self, holder, msg)

    monkeypatch.setattr(ServerR3Unmasking, "commitment_fault", counting)
    for c in (0, 2, 3):
        r.server.verify_unmasking(c, replies[c])
        r.server.receive(c, replies[c])
    assert calls == [0, 2, 3]  # once each, ahead of receive
    liar, lie = 1, replies[1]
    assert isinstance(lie, UnmaskingResponse)
    wrong = lie.self_mask_shares.astype(np.int64)
    wrong[0, 0] = (wrong[0, 0] + 1) % PRIME
    lie = dataclasses.replace(lie, self_mask_shares=wrong.astype(np.uint32))
    r.server.verify_unmasking(liar, lie)
    r.server.verify_unmasking(4, lie)  # an answer checked for another sender is not recorded either
    assert r.server.misconduct == {}  # the check ahead changes nothing
    with pytest.raises(ProtocolError, match="did not commit to"):
        r.server.receive(liar, lie)
    assert set(r.server.misconduct) == {liar}
    r.server.receive(4, replies[4])
    r.close()
    assert r.server.completed and r.server.result.faulty_holders == (liar,)
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(5)))
