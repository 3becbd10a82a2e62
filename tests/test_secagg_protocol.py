"""End-to-end behaviour of the SecAgg / SecAgg+ state machines: exact sums under dropouts at every
stage, clean aborts, and the server's memory and threads while it unmasks.

What a party must refuse is tests/test_secagg_refusals.py; active-adversary mode is
tests/test_secagg_active_mode.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedveil.secagg import (
    ConfigError,
    GraphSpec,
    RoundAborted,
    RoundAbortedError,
    SecAggClient,
    SecAggConfig,
    UnexpectedMessageError,
    collusion_bound,
    plan_threshold,
    run_round,
)
from fedveil.secagg.messages import MaskedInputResponse, UnmaskingResponse, decode_message
from fedveil.secagg.server import SecAggServer
from fedveil.secagg.unmasking import _ShareTable
from tests.secagg_helpers import ManualRound, random_inputs, ring_sum

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


def test_decoded_messages_drive_the_round():
    config = SecAggConfig(5, 3, 33, round_id=12, ring_bits=64)
    inputs = random_inputs(config)
    sim = run_round(config, inputs, dropouts={"masked": {4}}, wire=True)
    assert np.array_equal(sim.result.ring_sum, ring_sum(config, inputs, range(4)))
    adv = SecAggClient(0, config).advertise_keys()
    assert decode_message(adv.to_bytes()).share_public == adv.share_public
