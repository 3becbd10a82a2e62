"""Active-adversary mode of SecAgg (Bonawitz et al., CCS 2017, §4 and §6.1): signed key
advertisements, the consistency check of the survivor set, and the threshold rule 2t > h + c.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import (
    ConfigError,
    ConsistencyCheckError,
    GraphSpec,
    InvalidSignatureError,
    RoundAbortedError,
    SecAggClient,
    SecAggConfig,
    plan_threshold,
    run_round,
)
from fedveil.secagg.errors import ProtocolError
from fedveil.secagg.keys import advertisement_payload, sign
from fedveil.secagg.messages import ConsistencyCheckRequest, ShareKeysRequest, UnmaskingRequest
from fedveil.secagg.session import Session, check_advertisements, point_bytes
from tests.secagg_helpers import ManualRound, random_inputs, ring_sum

SEED32 = bytes(range(32))
"""Stands in for the cohort's commit-then-reveal graph seed (fedveil.secagg.beacon) in active mode."""


def _active_config(n=6, t=0, m=16, round_id=3, graph=None):
    """Active mode with t = the smallest t with 2t > h + c (f = 1/3, complete graph) unless given."""
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    config = SecAggConfig(n, t or plan_threshold(n).threshold, m, round_id=round_id, active=True,
                          graph=graph or GraphSpec(),
                          identity_keys=tuple(k.public_key().public_bytes_raw() for k in keys), graph_seed=SEED32)
    return config, keys


def test_active_mode_round_is_exact_with_dropouts():
    config, keys = _active_config(n=7)
    assert config.threshold == 5  # c = 2: 2t > 7 + 2
    inputs = random_inputs(config)
    for stage in ("keys", "shares", "masked", "consistency", "unmask"):
        sim = run_round(config, inputs, dropouts={stage: {2}}, identity_keys=dict(enumerate(keys)), wire=True)
        assert sim.completed, sim.abort_reason
        expected = [c for c in range(7) if not (c == 2 and stage in ("keys", "shares", "masked"))]
        assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, expected))


def test_active_mode_rejects_forged_advertisement():
    config, keys = _active_config()
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    fresh = X25519PrivateKey.generate().public_key().public_bytes_raw()
    forged = dataclasses.replace(advs[1], mask_public=fresh)
    with pytest.raises(InvalidSignatureError):
        r.server.receive(1, forged)
    for c, adv in advs.items():
        r.server.receive(c, adv)
    out = r.close()
    # A server that substitutes a key in the broadcast is caught by every client.
    msg = out[0]
    bad = tuple(dataclasses.replace(a, share_public=fresh) if a.client_id == 3 else a
                for a in msg.advertisements)
    with pytest.raises(InvalidSignatureError):
        r.clients[0].handle(dataclasses.replace(msg, advertisements=bad))
    assert r.clients[0].aborted


def test_no_two_advertisers_may_share_a_key_even_when_each_signs_its_own():
    """The cryptography review of 2026-12-07: a colluder advertised the victim's share key as its own
    (signed by its own identity) and sent garbage boxes; each honest holder's complaint then revealed
    its pair secret with the victim, which opened the victim's boxes. Such a list is refused by the
    server and by every site, whichever key is copied and however it is encoded."""
    config, keys = _active_config()
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    victim, colluder = 0, 4
    for copied in (advs[victim].share_public, advs[victim].mask_public,
                   (int.from_bytes(advs[victim].share_public, "little") | 1 << 255).to_bytes(32, "little")):
        own = advs[colluder].mask_public if copied != advs[colluder].mask_public else advs[colluder].share_public
        payload = advertisement_payload(config.round_id, config.parameters_bytes(), colluder, copied, own)
        forged = dataclasses.replace(advs[colluder], share_public=copied, mask_public=own,
                                     signature=sign(keys[colluder], payload))
        with pytest.raises(ProtocolError, match=f"client {colluder} advertised a public key of client {victim}"):
            check_advertisements(config, [advs[victim], forged])
        server = ManualRound(config, identity_key=dict(enumerate(keys))).server
        server.receive(victim, advs[victim])
        with pytest.raises(ProtocolError, match="advertised a public key of client"):
            server.receive(colluder, forged)
    # one advertiser's two keys as two encodings of one point (bit 255 set on the copy) are refused too
    key = advs[colluder].share_public
    alias = (int.from_bytes(key, "little") | 1 << 255).to_bytes(32, "little")
    with pytest.raises(ProtocolError, match="share and mask public keys must differ"):
        check_advertisements(config, [dataclasses.replace(advs[colluder], mask_public=alias)], signatures=False)
    check_advertisements(config, list(advs.values()))  # the control: honest keys are all distinct


def test_advertisements_verified_ahead_are_not_verified_again_and_forged_ones_still_fail(monkeypatch):
    """The server may check advertisement signatures ahead of receive() (a driver does it outside its
    lock, or over the cores). Only the very objects it found valid skip the check at receive(): a
    forged one is reported and still rejected, and an equal-looking copy is verified again."""
    import fedveil.secagg.signature_memo as verdicts_module  # session's check verifies through it

    config, keys = _active_config()
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    forged = dataclasses.replace(advs[1], mask_public=advs[2].mask_public)
    errors = r.server.verify_advertisements([forged, *(advs[c] for c in advs if c != 1)])
    assert list(errors) == [1] and isinstance(errors[1], InvalidSignatureError)
    checked: list[int] = []
    real = verdicts_module.valid_signatures
    monkeypatch.setattr(verdicts_module, "valid_signatures", lambda items: checked.append(len(items)) or real(items))
    with pytest.raises(InvalidSignatureError):
        r.server.receive(1, forged)
    assert checked == [1]
    for c in (0, 2, 3):
        r.server.receive(c, advs[c])
    assert checked == [1]  # found valid ahead: not verified again
    r.server.receive(4, dataclasses.replace(advs[4]))  # an equal copy is another object: verified
    assert checked == [1, 1]
    r.server.receive(1, advs[1])
    r.server.receive(5, advs[5])
    out = r.close()
    assert set(out) == set(range(6))


def test_active_mode_catches_server_showing_different_survivor_sets():
    config, keys = _active_config(n=9)
    assert config.threshold == 7  # c = 3: 2t > 9 + 3
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    r.advertise()
    out = r.step(r.close())
    replies = r.deliver(out)
    r.send({c: v for c, v in replies.items() if c != 8})
    out = r.close()
    assert all(isinstance(m, ConsistencyCheckRequest) for m in out.values())
    # Malicious server: tells clients 0-3 that 7 dropped too, clients 4-7 the honest set.
    lie = np.arange(7, dtype=np.uint32)
    sigs = {}
    for c in range(8):
        msg = out[c] if c >= 4 else dataclasses.replace(out[c], survivors=lie)
        sigs[c] = r.clients[c].handle(msg).signature
    honest_set = out[0].survivors
    # It then forwards an unmasking request to client 4 claiming 7 dropped (to get 7's key shares)
    # with the signatures it collected: clients 0-3 signed the lie, 4-7 the honest set.
    request = UnmaskingRequest(config.round_id, 4, lie, np.array([7, 8], np.uint32), sigs)
    with pytest.raises(ConsistencyCheckError):
        r.clients[4].handle(request)
    assert r.clients[4].aborted
    # Sending the honest set with the mixed signatures is caught too.
    request0 = UnmaskingRequest(config.round_id, 5, honest_set, np.array([8], np.uint32), sigs)
    with pytest.raises(ConsistencyCheckError):
        r.clients[5].handle(request0)
    # And the liars' group holds only 4 signatures on its set, fewer than t = 7.
    request1 = UnmaskingRequest(config.round_id, 0, lie, np.array([7, 8], np.uint32),
                                {c: sigs[c] for c in range(4)})
    with pytest.raises(ConsistencyCheckError, match="fewer than threshold"):
        r.clients[0].handle(request1)


def test_active_mode_needs_2t_above_holders_plus_colluders():
    """Each honest holder reveals one kind of share per peer, so the server can only collect t of
    each kind for a peer (and unmask it) by showing two groups of holders different survivor
    sets, each topped up by the c colluders, who reveal both: with 2t <= h + c two such groups
    exist (tests/test_secagg_threshold.py runs the attack). Active mode therefore requires
    2t > h + c, with c = floor(f n) on the complete graph, in the configuration and at run time;
    passive mode t > c."""
    keys = tuple(Ed25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(9))
    with pytest.raises(ConfigError, match=r"threshold: t=4 does not satisfy 2t > h \+ c = 6 \+ 2"):
        SecAggConfig(6, 4, 8, active=True, identity_keys=keys[:6])  # a majority, but c = 2
    with pytest.raises(ConfigError, match="threshold"):  # 5 holders, c = 3 (hypergeometric bound)
        SecAggConfig(9, 4, 8, graph=GraphSpec("harary", 4), active=True, identity_keys=keys, graph_seed=SEED32)
    SecAggConfig(6, 5, 8, active=True, identity_keys=keys[:6])
    SecAggConfig(9, 5, 8, graph=GraphSpec("harary", 4), active=True, identity_keys=keys, graph_seed=SEED32)
    SecAggConfig(6, 4, 8, active=True, identity_keys=keys[:6], max_corrupt_fraction=0.0)  # c = 0: majority
    SecAggConfig(6, 3, 8)  # honest-but-curious mode: t > c = 2 suffices
    with pytest.raises(ConfigError, match="does not exceed the c=2 colluders"):
        SecAggConfig(6, 2, 8)
    # Harary k = 4 on 7 clients: 5 holders, c = 2, t = 4 is safe. If one client does not
    # advertise, the layout stays (a live view, never a complete graph over the 6): its
    # neighbours keep 4 live holders, 2t = 8 > 4 + 2, and the round completes without it.
    signing = [Ed25519PrivateKey.generate() for _ in range(7)]
    public = tuple(k.public_key().public_bytes_raw() for k in signing)
    config = SecAggConfig(7, 4, 8, round_id=4, graph=GraphSpec("harary", 4), active=True, identity_keys=public,
                          graph_seed=SEED32)
    inputs = random_inputs(config)
    sim = run_round(config, inputs, dropouts={"keys": {6}}, identity_keys=dict(enumerate(signing)))
    assert sim.completed and np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(6)))
    sim = run_round(config, inputs, dropouts={"masked": {6}}, identity_keys=dict(enumerate(signing)))
    assert sim.completed and np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(6)))


def test_fewer_advertisers_are_a_live_view_of_the_cohorts_layout():
    """A server that discards honest advertisements does not get a new layout: the graph stays the
    one over all 69 slots (c = 22 for them, t = 25), the 65 advertisers are its live view, and a
    client whose live holders fall below t (or to c + 1) is left out by the server and refuses if
    shown the round anyway."""
    n, k = 69, 26
    plan = plan_threshold(n, "harary", degree=k, expected_dropout=0.0)
    assert (plan.corrupt, plan.threshold) == (22, 25)
    config, keys = _active_config(n, plan.threshold, round_id=8, graph=plan.spec)
    assert config.threshold_problem() is None
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    advs = {c: cl.advertise_keys() for c, cl in r.clients.items()}
    live = [c for c in range(n) if c not in (3, 30, 31, 32)]
    full = Session.from_advertisements(config, advs.values()).graph
    view = Session.from_advertisements(config, [advs[c] for c in live]).graph
    for c in live:
        assert view.holders(c) == tuple(v for v in full.holders(c) if v in live)
    short = [c for c in live if len(view.holders(c)) < plan.threshold]
    for c in live:
        r.server.receive(c, advs[c])
    out = r.close()
    if len(live) - len(short) >= plan.threshold:
        assert not r.server.aborted and sorted(out) == [c for c in live if c not in short]
    fewest = min(live, key=lambda c: len(view.holders(c)))
    request = ShareKeysRequest(config.round_id, fewest, tuple(advs[c] for c in live))
    if short:
        with pytest.raises(RoundAbortedError, match="live"):
            r.clients[fewest].handle(request)
    else:
        reply = r.clients[fewest].handle(request)
        assert set(reply.boxes) == set(view.neighbors(fewest))


def test_active_mode_signatures_from_another_round_are_rejected():
    """Signed advertisements carry the round id and parameters, survivor-set signatures the
    session id: rewriting the header of a replay does not make its signature valid."""
    config1, keys = _active_config(n=5, round_id=40)  # t = 4 (c = 1)
    config2 = config1.for_round(41)
    old = SecAggClient(1, config1, identity_key=keys[1]).advertise_keys()
    replay = dataclasses.replace(old, round_id=41)
    r2 = ManualRound(config2, identity_key=dict(enumerate(keys)))
    with pytest.raises(InvalidSignatureError):
        r2.server.receive(1, replay)
    # A server that forwards the replayed key to the others is caught by every client.
    r2.advertise()
    out2 = r2.close()
    forged = tuple(replay if a.client_id == 1 else a for a in out2[0].advertisements)
    with pytest.raises(InvalidSignatureError):
        r2.clients[0].handle(dataclasses.replace(out2[0], advertisements=forged))
    # Survivor-set signatures of round 40 on the very same ids do not pass round 41's check.
    r1 = ManualRound(config1, identity_key=dict(enumerate(keys)))
    r1.advertise()
    out1 = r1.step(r1.step(r1.close()), skip={0})  # round 40's survivors are 1-4 as well
    assert out1[1].survivors.tolist() == [1, 2, 3, 4]
    old_sigs = {c: r1.clients[c].handle(out1[c]).signature for c in range(1, 5)}
    out2 = r2.step(r2.step(out2, skip={0}))  # client 0 aborted above: 1-4 carry on
    survivors = out2[2].survivors
    assert survivors.tolist() == [1, 2, 3, 4]
    r2.clients[2].handle(out2[2])  # signs round 41's set
    request = UnmaskingRequest(41, 2, survivors, np.array([], np.uint32), old_sigs)
    with pytest.raises(ConsistencyCheckError):
        r2.clients[2].handle(request)


def test_active_mode_needs_enough_signatures():
    config, keys = _active_config(n=5, t=4)
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    r.advertise()
    out = r.step(r.close())
    out = r.step(out)
    sigs = {c: r.clients[c].handle(out[c]).signature for c in range(5)}
    few = {c: sigs[c] for c in (0, 1, 2)}
    request = UnmaskingRequest(config.round_id, 0, out[0].survivors, np.array([], np.uint32), few)
    with pytest.raises(ConsistencyCheckError):
        r.clients[0].handle(request)


def test_a_bad_signature_forwarded_by_the_server_cannot_make_honest_clients_abort():
    """The server refuses a survivor-set signature that does not verify (next test); a deviating server may
    still forward bad ones. Each client counts only the valid ones, so garbage costs nothing while t valid
    ones remain, and the round is exact. With fewer than t valid the check fails as before."""
    config, keys = _active_config(n=6)  # t from the threshold rule 2t > h + c
    t = config.threshold

    def forwarded_with_garbage(bad: int) -> tuple[ManualRound, dict]:
        r = ManualRound(config, identity_key=dict(enumerate(keys)))
        r.advertise()
        r.send(r.deliver(r.step(r.step(r.close()))))
        unmask = r.close()
        for c, msg in unmask.items():
            unmask[c] = dataclasses.replace(msg, signatures={s: (bytes(64) if s < bad else sig)
                                                             for s, sig in msg.signatures.items()})
        return r, unmask

    r, unmask = forwarded_with_garbage(config.num_clients - t)  # leaves exactly t valid
    assert set(unmask[0].signatures) == set(range(config.num_clients))
    r.send(r.deliver(unmask))
    r.close()
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(config.num_clients)))
    r, unmask = forwarded_with_garbage(config.num_clients - t + 1)  # t - 1 valid: every client refuses
    with pytest.raises(ConsistencyCheckError, match=rf"only {t - 1} of client \d+'s share holders signed"):
        r.clients[config.num_clients - 1].handle(unmask[config.num_clients - 1])


def test_a_garbage_survivor_set_signature_never_counts_towards_the_servers_threshold(monkeypatch):
    """Review of 2026-12-07: the server counted any 64-byte survivor-set signature, so with one honest signer
    short of t a deviating site's garbage carried the attempt into an unmasking every honest site refused (a
    rejected round, charged as released) instead of an abort before release, which is retried."""
    from fedveil.secagg.messages import ConsistencyCheckResponse

    config, keys = _active_config(n=7)
    assert config.threshold == 5
    real_handle = SecAggClient.handle

    def handle(self, msg):
        reply = real_handle(self, msg)
        if self.client_id == 6 and isinstance(reply, ConsistencyCheckResponse):
            return dataclasses.replace(reply, signature=bytes(64))
        return reply

    monkeypatch.setattr(SecAggClient, "handle", handle)
    inputs = random_inputs(config)
    # two honest sites leave at the consistency check: four valid signers, and the garbage would be the fifth
    sim = run_round(config, inputs, dropouts={"consistency": {0, 1}}, identity_keys=dict(enumerate(keys)))
    assert not sim.completed
    assert "refused by the server: InvalidSignatureError" in sim.client_errors[6]
    assert "consistency" in (sim.abort_reason or "")
    assert not any("ConsistencyCheckError" in e for e in sim.client_errors.values())
    # with every honest signer there, the refused garbage costs only its sender's input
    sim = run_round(config, inputs, identity_keys=dict(enumerate(keys)))
    assert sim.completed and np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(7)))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32) | st.integers((1 << 255) - 19, (1 << 256) - 1).map(
    lambda v: v.to_bytes(32, "little")))
def test_point_bytes_is_the_u_coordinate_reduced_mod_p(raw: bytes) -> None:
    """The duplicate check compares canonical bytes; its fast path (bit 255 cleared) must agree with
    the full reduction on every encoding, those past p included."""
    p = (1 << 255) - 19
    assert point_bytes(raw) == ((int.from_bytes(raw, "little") & ((1 << 255) - 1)) % p).to_bytes(32, "little")
