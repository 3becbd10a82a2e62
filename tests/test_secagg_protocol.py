"""End-to-end behaviour of the SecAgg / SecAgg+ state machines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedveil.secagg import (
    ConfigError,
    ConsistencyCheckError,
    DoubleShareRequestError,
    GraphSpec,
    InvalidSignatureError,
    MalformedMessageError,
    RoundAborted,
    RoundAbortedError,
    SecAggClient,
    SecAggConfig,
    ShareDecryptionError,
    TooFewSurvivorsError,
    UnexpectedMessageError,
    UnmaskingRefusedError,
    WrongRoundError,
    collusion_bound,
    plan_threshold,
    run_round,
)
from fedveil.secagg.client import ClientR1ShareKeys, ClientR2MaskedInput, ClientR3Unmasking
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    MaskedInputResponse,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
    decode_message,
)
from fedveil.secagg.server import (
    SecAggServer,
    ServerR1ShareKeys,
    ServerR2MaskedInputCollection,
    ServerR3Unmasking,
    _ShareTable,
)
from fedveil.secagg.session import Session
from tests.secagg_helpers import ManualRound, random_inputs, ring_sum

SEED32 = bytes(range(32))
"""Stands in for the cohort's commit-then-reveal graph seed (fedveil.secagg.beacon) in active mode."""

STAGES = ("keys", "shares", "masked", "unmask")
NO_COLLUSION = 0.0
"""max_corrupt_fraction of an honest-but-curious server without colluding clients: any 2 <= t <= h is
allowed. Tests of dropout handling use it to reach small thresholds; the collusion rule has its own tests
(tests/test_secagg_threshold.py)."""


def _survivors_expected(n: int, stage: str, dropped: set[int]) -> list[int]:
    # Clients dropping at "unmask" already sent their masked input: they stay in the sum.
    return list(range(n)) if stage == "unmask" else [c for c in range(n) if c not in dropped]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_exact_sum_for_random_sizes_dropouts_and_stages(data):
    n = data.draw(st.integers(3, 14), label="n")
    m = data.draw(st.integers(1, 300), label="m")
    harary = data.draw(st.booleans(), label="harary") and n >= 6
    bits = data.draw(st.sampled_from([32, 64, 20, 45]), label="ring_bits")
    if harary:
        spec = GraphSpec("harary", 2 * data.draw(st.integers(1, max(1, (n - 4) // 2)), label="half_degree"))
        holders = spec.holders_count(n)
    else:
        spec, holders = GraphSpec(), n
    fraction = data.draw(st.sampled_from([NO_COLLUSION, 0.1, 1 / 3]), label="max_corrupt_fraction")
    corrupt, _ = collusion_bound(n, spec.degree if spec.sparse(n) else 0, fraction)
    if corrupt >= holders - 1:  # colluders could be all of a client's neighbours: refused whatever t
        with pytest.raises(ConfigError, match="neighbours"):
            SecAggConfig(n, holders, m, graph=spec, max_corrupt_fraction=fraction)
        fraction, corrupt = NO_COLLUSION, 0
    t = data.draw(st.integers(max(2, corrupt + 1), holders), label="t")  # passive mode: t > c
    stage = data.draw(st.sampled_from(STAGES), label="stage")
    dropped = data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="dropped")
    config = SecAggConfig(n, t, m, round_id=data.draw(st.integers(0, 2**64 - 1)), ring_bits=bits, graph=spec,
                          max_corrupt_fraction=fraction)
    inputs = random_inputs(config, seed=data.draw(st.integers(0, 1000)))
    sim = run_round(config, inputs, dropouts={stage: dropped}, wire=data.draw(st.booleans()))
    if sim.completed:
        assert sim.result is not None
        expected = _survivors_expected(n, stage, dropped)
        survivors = list(sim.result.survivors)
        if survivors != expected:
            # Harary: advertisers left with too few live holders are left out (they would refuse);
            # that takes more than h - t dropouts around them
            assert harary and set(survivors) < set(expected) and len(dropped) > holders - t
        assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, survivors))
    else:
        # Aborts only happen when some neighbourhood really lost too many clients.
        assert sim.abort_reason
        survivors = set(range(n)) - dropped
        if not harary:
            # fewer than t, or so few live neighbours that colluders could be all of them (live_problem)
            assert len(survivors) < t or len(survivors) - 1 <= corrupt
        else:  # at most h - t (and fewer than h - c - 1) dropouts can never starve a neighbourhood
            assert len(dropped) > holders - t or len(dropped) >= holders - corrupt - 1
        assert not sim.client_errors or all("Abort" in e or "TooFew" in e for e in sim.client_errors.values())


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("graph", [GraphSpec(), GraphSpec("harary", 4)])
def test_dropouts_at_every_stage_with_t_remaining(stage, graph):
    n = 10
    t = 3 if graph.kind == "harary" else 6
    config = SecAggConfig(n, t, 257, round_id=3, graph=graph, max_corrupt_fraction=NO_COLLUSION)
    inputs = random_inputs(config, 1)
    dropped = {0, 5} if graph.kind == "harary" else {1, 2, 7, 9}
    sim = run_round(config, inputs, dropouts={stage: dropped})
    assert sim.completed, sim.abort_reason
    expected = _survivors_expected(n, stage, dropped)
    assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, expected))


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_aborts_cleanly(stage):
    n, t = 8, 5
    config = SecAggConfig(n, t, 64, round_id=9)
    sim = run_round(config, random_inputs(config), dropouts={stage: {0, 1, 2, 3}})
    assert not sim.completed
    assert sim.result is None
    assert "threshold" in (sim.abort_reason or "")


def test_abort_reveals_nothing_and_notifies_clients():
    config = SecAggConfig(6, 5, 32, round_id=1)
    r = ManualRound(config)
    r.advertise()
    out = r.close()
    out = r.step(out)  # shares
    out = r.step(out, skip={0, 1})  # two clients never send their masked input: 4 < t
    assert r.server.aborted
    assert set(out) == set(range(6))
    assert all(isinstance(m, RoundAborted) for m in out.values())
    with pytest.raises(RoundAbortedError):
        _ = r.server.result
    # The server discarded its running sum; no unmasking request was ever sent.
    assert r.server.state.ctx.running_sum is None
    for c in range(2, 6):
        r.clients[c].handle(out[c])
        assert r.clients[c].aborted


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


@pytest.mark.parametrize("graph", [GraphSpec(), GraphSpec("harary", 4)])
@pytest.mark.parametrize("stage", ["shares", "masked", "unmask"])
def test_no_client_input_is_ever_unmaskable_from_what_the_server_receives(graph, stage):
    """Over a whole round, the server never receives a self-mask share of a client whose masked
    input it did not get, and never both kinds of share for one client (from anyone)."""
    n = 11
    config = SecAggConfig(n, 3, 16, round_id=21, graph=graph, max_corrupt_fraction=NO_COLLUSION)
    r = ManualRound(config)
    r.advertise()
    out = r.close()
    dropped = {2, 7}
    out = r.step(out, skip=dropped if stage == "shares" else ())
    replies = r.deliver(out, skip=dropped if stage == "masked" else ())
    r.send(replies)
    masked_from = set(replies)
    out = r.close()
    unmask = r.deliver(out, skip=dropped if stage == "unmask" else ())
    self_mask_of, mask_key_of = set(), set()
    for reply in unmask.values():
        assert isinstance(reply, UnmaskingResponse)
        self_mask_of |= set(reply.self_mask_owners.tolist())
        mask_key_of |= set(reply.mask_key_owners.tolist())
    assert self_mask_of <= masked_from
    assert not self_mask_of & mask_key_of
    if stage == "masked":
        assert mask_key_of & dropped  # the masks of the dropped clients really are removed
    r.send(unmask)
    r.close()
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, sorted(masked_from)))


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


def test_deadline_close_treats_silent_clients_as_dropouts():
    config = SecAggConfig(6, 4, 32, round_id=11)
    r = ManualRound(config)
    r.advertise()
    assert r.server.pending == ()
    out = r.close()
    replies = r.deliver(out)
    for c in (0, 1, 2, 3, 4):  # client 5's reply arrives after the deadline
        r.server.receive(c, replies[c])
    assert r.server.pending == (5,)
    out = r.close()
    with pytest.raises(UnexpectedMessageError):
        r.server.receive(5, replies[5])  # late
    out = r.step(out)
    r.step(out)
    assert r.server.result.survivors == (0, 1, 2, 3, 4)
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(5)))


def test_masked_vector_is_indistinguishable_from_uniform():
    """Chi-square on byte frequencies and per-bit balance of one client's masked input.

    The input is all zeros, the worst case for leakage. 2^18 bytes, 255 degrees of freedom: the
    0.999 quantile of chi2(255) is about 330.5; each bit's frequency within 5 sigma of 1/2.
    """
    m = 1 << 16
    config = SecAggConfig(3, 2, m, round_id=5)
    inputs = {c: np.zeros(m, np.uint32) for c in range(3)}
    r = ManualRound(config, inputs)
    r.advertise()
    out = r.step(r.close())
    masked = r.deliver(out)[0]
    assert isinstance(masked, MaskedInputResponse)
    data = masked.vector.view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 330.5
    bits = np.unpackbits(data).reshape(-1, 8)
    freq = bits.mean(axis=0)
    sigma = 0.5 / np.sqrt(bits.shape[0])
    assert np.all(np.abs(freq - 0.5) < 5 * sigma)
    # And a biased vector would fail the same test (the test can fail).
    biased = np.bincount((np.arange(data.size) % 200).astype(np.uint8), minlength=256)
    assert float(((biased - expected) ** 2 / expected).sum()) > 330.5


@pytest.mark.parametrize("threads", [1, 2])
def test_server_memory_is_independent_of_n_times_m(threads):
    """Unmasking peak memory stays O(m): no per-client vectors are kept. With threads, each extra
    thread adds its own accumulator and chunk buffer (O(m) each), still nothing per client."""
    import tracemalloc

    m = 50_000
    peaks = {}
    for n in (6, 24):
        config = SecAggConfig(n, plan_threshold(n).threshold, m, round_id=1)
        inputs = random_inputs(config, 2)
        r = ManualRound(config, inputs, server_threads=threads)
        r.advertise()
        out = r.step(r.close())
        out = r.step(out, skip={0})
        replies = r.deliver(out)
        tracemalloc.start()
        r.send(replies)
        r.close()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[n] = peak
        assert r.server.completed
    vector_bytes = 4 * m
    # a thread's accumulator and chunk buffer, and the larger shared zero chunk (when they are freed
    # relative to one another varies by a vector from run to run); 18 more clients would be 18 vectors
    assert peaks[24] < (3 + 4 * (threads - 1)) * vector_bytes
    assert peaks[24] < peaks[6] + 2 * vector_bytes


@pytest.mark.parametrize("threads", [1, 4])
def test_unmasking_in_threads_is_exact_with_dropouts(threads):
    """The server expands its unmasking masks in ``threads`` threads: the sum is exact with
    leavers at the masked-input stage, over a vector longer than one threaded chunk."""
    n, m = 12, 70_001
    config = SecAggConfig(n, 4, m, round_id=5, graph=GraphSpec("harary", 6), max_corrupt_fraction=NO_COLLUSION)
    r = ManualRound(config, random_inputs(config, 4), server_threads=threads)
    r.advertise()
    out = r.step(r.step(r.close()), skip={1, 8})
    r.send(r.deliver(out))
    r.close()
    assert r.server.completed, r.server.abort_reason
    survivors = [c for c in range(n) if c not in {1, 8}]
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, survivors))


def test_server_threads_below_one_are_rejected():
    with pytest.raises(ConfigError, match="threads: must be >= 1"):
        SecAggServer(SecAggConfig(4, 3, 8, round_id=1), threads=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.sets(st.integers(0, 30), max_size=12)), max_size=15,
                unique_by=lambda entry: entry[0]))
def test_share_table_groups_each_owners_shares_in_point_order(responses):
    """Every (owner, holder point) row comes back under its owner, in ascending point order, with
    its own limbs; owners nobody sent a share for are absent."""
    table = _ShareTable(3)
    expected: dict[int, list[tuple[int, list[int]]]] = {}
    for point, owners in responses:
        ordered = sorted(owners, reverse=True)  # arrival order is not point order
        rows = np.asarray([[point, owner, point * 100 + owner] for owner in ordered], dtype=np.uint32).reshape(-1, 3)
        table.add(point, np.asarray(ordered, dtype=np.uint32), rows)
        for owner, row in zip(ordered, rows.tolist(), strict=True):
            expected.setdefault(owner, []).append((point, row))
    grouped = table.grouped()
    assert set(grouped) == set(expected)
    for owner, entries in expected.items():
        entries.sort()
        xs, rows = grouped[owner]
        assert xs.tolist() == [p for p, _ in entries]
        assert rows.tolist() == [row for _, row in entries]


def test_server_receive_accumulates_instead_of_storing():
    config = SecAggConfig(8, 5, 1000, round_id=1)
    r = ManualRound(config)
    r.advertise()
    out = r.step(r.close())
    replies = r.deliver(out)
    r.send(replies)
    ctx = r.server.state.ctx
    arrays = [v for v in vars(ctx).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and arrays[0].shape == (1000,)  # the running sum only
    assert not any(isinstance(v, MaskedInputResponse) for v in vars(r.server.state).values())


# --- active-adversary mode ------------------------------------------------------------------------

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
    forged = dataclasses.replace(advs[1], mask_public=advs[2].mask_public)
    with pytest.raises(InvalidSignatureError):
        r.server.receive(1, forged)
    for c, adv in advs.items():
        r.server.receive(c, adv)
    out = r.close()
    # A server that substitutes a key in the broadcast is caught by every client.
    msg = out[0]
    bad = tuple(dataclasses.replace(a, share_public=advs[4].mask_public) if a.client_id == 3 else a
                for a in msg.advertisements)
    with pytest.raises(InvalidSignatureError):
        r.clients[0].handle(dataclasses.replace(msg, advertisements=bad))
    assert r.clients[0].aborted


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


def test_a_survivor_forwarding_a_bad_signature_cannot_make_honest_clients_abort():
    """The server forwards survivor-set signatures unverified; each client counts only the valid
    ones, so one garbage signature costs nothing while t valid ones remain, and the round is exact.
    With fewer than t valid the check fails as before."""
    config, keys = _active_config(n=6)  # t from the threshold rule 2t > h + c
    t = config.threshold
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    r.advertise()
    checks = r.step(r.step(r.close()))
    replies = r.deliver(checks)
    bad_signers = list(range(config.num_clients - t))  # leaves exactly t valid
    for c in bad_signers:
        replies[c] = dataclasses.replace(replies[c], signature=bytes(64))
    r.send(replies)
    unmask = r.close()
    assert set(unmask[0].signatures) == set(range(config.num_clients))  # forwarded as they came
    r.send(r.deliver(unmask))
    r.close()
    assert r.server.completed
    assert np.array_equal(r.server.result.ring_sum, ring_sum(config, r.inputs, range(config.num_clients)))
    # one more bad signature leaves t - 1 valid: every client refuses to unmask
    r = ManualRound(config, identity_key=dict(enumerate(keys)))
    r.advertise()
    checks = r.step(r.step(r.close()))
    replies = r.deliver(checks)
    for c in range(config.num_clients - t + 1):
        replies[c] = dataclasses.replace(replies[c], signature=bytes(64))
    r.send(replies)
    unmask = r.close()
    with pytest.raises(ConsistencyCheckError, match=rf"only {t - 1} of client \d+'s share holders signed"):
        r.clients[config.num_clients - 1].handle(unmask[config.num_clients - 1])


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


def test_decoded_messages_drive_the_round():
    config = SecAggConfig(5, 3, 33, round_id=12, ring_bits=64)
    inputs = random_inputs(config)
    sim = run_round(config, inputs, dropouts={"masked": {4}}, wire=True)
    assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(4)))
    adv = SecAggClient(0, config).advertise_keys()
    assert decode_message(adv.to_bytes()).share_public == adv.share_public


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
    every client, sum discarded), not as an exception out of close_stage."""
    config = SecAggConfig(5, 3, 16, round_id=8)
    r, out = _round_until_unmasking(config, skip_masked={4})
    replies = r.deliver(out)
    for c, reply in replies.items():
        assert isinstance(reply, UnmaskingResponse)
        # Every share of every self-mask seed set to 2^20: they interpolate to limbs 2^20 >= 2^16.
        junk = np.full_like(reply.self_mask_shares, 1 << 20)
        r.server.receive(c, dataclasses.replace(reply, self_mask_shares=junk))
    out = r.close()
    assert r.server.aborted
    assert "inconsistent" in (r.server.abort_reason or "")
    assert r.server.state.ctx.running_sum is None
    assert set(out) == {0, 1, 2, 3} and all(isinstance(m, RoundAborted) for m in out.values())
    with pytest.raises(RoundAbortedError):
        _ = r.server.result
