"""Grinding the SecAgg+ graph by choosing whose keys enter the round, run against the real client.

In SecAgg+ the server decides which advertised keys it forwards. If the Harary layout were
computed over the clients whose keys the server chose to include, the server — which knows the
cohort's commit-then-reveal graph seed once the beacon is done, before any key is forwarded —
could try subsets until a victim's k neighbours hold more colluders than the bound c the
threshold was sized for, and then run the split-survivor attack (2t ≤ h + c_actual: see
tests/test_secagg_threshold_attack.py) on it. The attacker below does that with a dynamic
programme over which honest advertisers to drop, using the library's own session graph to see
the layout each subset gives (victim in slot 0, colluders interleaved every third slot, chosen
before the seed). Against the layout fixed over the whole cohort, the subset changes nothing but
who is live: the victim's live holders keep at most c colluders, or it refuses the round.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import SecAggClient, SecAggConfig, SecAggError
from fedveil.secagg.messages import AdvertiseKeys, ShareKeysRequest, ShareKeysResponse
from fedveil.secagg.session import Session
from fedveil.secagg.threshold import (
    collusion_bound,
    corrupt_clients,
    live_problem,
    min_threshold,
    plan_threshold,
    threshold_problem,
)

VICTIM = 0
ROUND = 41


def _cohort(n: int, degree: int = 0) -> tuple[SecAggConfig, dict[int, SecAggClient], dict[int, AdvertiseKeys]]:
    plan = plan_threshold(n, "harary", degree=degree)
    signing = [Ed25519PrivateKey.generate() for _ in range(n)]
    config = SecAggConfig(n, plan.threshold, 4, round_id=ROUND, graph=plan.spec, active=True,
                          identity_keys=tuple(k.public_key().public_bytes_raw() for k in signing),
                          graph_seed=os.urandom(32))  # the beacon's seed: uniform, known to the server
    clients = {c: SecAggClient(c, config, identity_key=signing[c]) for c in range(n)}
    for c, client in clients.items():
        client.set_input(np.zeros(4, config.ring.dtype))
    return config, clients, {c: client.advertise_keys() for c, client in clients.items()}


def _neighbour_ranks(config: SecAggConfig, advs: dict[int, AdvertiseKeys], m: int) -> set[int]:
    """The attacker's model of the layout: the graph over the advertisers 0..m-1, read from the
    library's session, gives the neighbours of rank 0 by rank."""
    return set(Session.from_advertisements(config, [advs[i] for i in range(m)]).graph.neighbors(VICTIM))


def grind(config: SecAggConfig, advs: dict[int, AdvertiseKeys], colluders: set[int], sizes: range) -> list[int]:
    """The subset (victim at rank 0) that puts the most colluders on the victim's neighbour ranks.

    Dynamic programme over (rank, slots used): a neighbour rank gains one when the slot taken there is
    a colluder; skipping a slot drops that advertiser.
    """
    n = config.num_clients
    good = np.array([c in colluders for c in range(1, n)], dtype=np.int64)
    slots = n - 1
    best: tuple[int, list[int]] = (-1, [])
    for m in sizes:
        ranks = _neighbour_ranks(config, advs, m)
        rows = [np.zeros(slots + 1, np.int64)]
        for j in range(1, m):
            gain = good if j in ranks else np.zeros(slots, np.int64)
            take = np.full(slots + 1, -(1 << 40), np.int64)
            take[1:] = rows[-1][:-1] + gain
            rows.append(np.maximum.accumulate(take))
        if rows[-1][slots] <= best[0]:
            continue
        chosen, i = [], slots
        for j in range(m - 1, 0, -1):
            gain_at = (lambda s: int(good[s - 1])) if j in ranks else (lambda s: 0)
            while rows[j][i] != rows[j - 1][i - 1] + gain_at(i):
                i -= 1
            chosen.append(i)  # slot i (ids 1..n-1 map to slots 1..n-1)
            i -= 1
        best = (int(rows[-1][slots]), [VICTIM, *sorted(chosen)])
    return best[1]


def _victim_view(config: SecAggConfig, victim: SecAggClient, advs: dict[int, AdvertiseKeys],
                 subset: list[int]) -> tuple[int, ...] | None:
    """The victim's holders as its own session computes them, or None when it refused the round."""
    try:
        reply = victim.handle(ShareKeysRequest(config.round_id, VICTIM, tuple(advs[c] for c in sorted(subset))))
    except SecAggError:
        return None
    assert isinstance(reply, ShareKeysResponse)
    holders = victim._ctx.session.graph.holders(VICTIM)  # type: ignore[union-attr]
    assert set(reply.boxes) == set(holders) - {VICTIM}  # the shares went exactly there
    return holders


def test_grinding_the_advertiser_subset_does_not_surround_the_victim():
    """n = 500, the library's own SecAgg+ parameters; the server may drop up to 85 honest advertisers."""
    n = 500
    config, clients, advs = _cohort(n)
    h, t = config.graph.holders_count(n), config.threshold
    colluders = {c for c in range(1, n) if c % 3 == 0}
    colluders = set(sorted(colluders)[:corrupt_clients(n, config.max_corrupt_fraction)])
    c_bound, _ = collusion_bound(n, config.graph.degree, config.max_corrupt_fraction)
    subset = grind(config, advs, colluders, range(415, n))
    holders = _victim_view(config, clients[VICTIM], advs, subset)
    if holders is None:
        return  # refused: nothing of the victim left it
    colluding = len(colluders.intersection(holders))
    # The split attack needs 2t <= |holders| + colluding; the bound keeps it out of reach.
    assert colluding <= c_bound, (colluding, c_bound, len(subset))
    assert threshold_problem(t, len(holders), colluding) is None, (t, len(holders), colluding)
    assert len(holders) <= h


def test_dropping_the_victims_honest_neighbours_makes_it_refuse():
    """Forwarding only colluders around the victim leaves it too few live holders: it declines."""
    n = 500
    config, clients, advs = _cohort(n)
    colluders = set(range(3, n, 3))
    full = Session.from_advertisements(config, advs.values()).graph
    honest_neighbours = set(full.neighbors(VICTIM)) - colluders
    subset = [c for c in range(n) if c not in honest_neighbours]
    with pytest.raises(SecAggError, match="holders"):
        clients[VICTIM].handle(ShareKeysRequest(config.round_id, VICTIM, tuple(advs[c] for c in subset)))
    assert not colluders.isdisjoint(full.neighbors(VICTIM))


def test_the_live_graph_is_the_cohort_layout_restricted_to_the_advertisers():
    n = 60
    config, _clients, advs = _cohort(n, degree=40)
    full = Session.from_advertisements(config, advs.values()).graph
    rng = np.random.default_rng(5)
    for _ in range(20):
        live = sorted(int(c) for c in rng.choice(n, size=int(rng.integers(config.threshold, n)), replace=False))
        graph = Session.from_advertisements(config, [advs[c] for c in live]).graph
        for node in live:
            assert graph.neighbors(node) == tuple(v for v in full.neighbors(node) if v in set(live))


# --- the bound, as a property over n, k, c ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(h=st.integers(2, 400), data=st.data())
def test_min_threshold_is_the_smallest_safe_threshold(h, data):
    c = data.draw(st.integers(0, h - 2))
    t = min_threshold(h, c)
    assert 2 * t > h + c and t <= h and threshold_problem(t, h, c) is None
    assert t - 1 < 2 or threshold_problem(t - 1, h, c) is not None
    # the split: a + c >= t and b + c >= t with a + b <= h - c has no solution
    assert not any(a + c >= t and (h - c - a) + c >= t for a in range(h - c + 1))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(3, 400), data=st.data())
def test_a_live_neighbourhood_the_client_accepts_keeps_an_honest_neighbour(h, data):
    c = data.draw(st.integers(0, h - 3))
    t = data.draw(st.integers(min_threshold(h, c), h))
    live = data.draw(st.integers(1, h))
    problem = live_problem(live, t, c)
    if problem is None:
        assert live >= t and live - 1 - c >= 1  # an honest live neighbour whatever the colluders' places
        assert 2 * t > live + c  # and the split attack stays out of reach on the live holders
    else:
        assert live < t or live - 1 <= c


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 600), half=st.integers(1, 150), f=st.sampled_from([0.0, 0.1, 0.2, 1 / 3, 0.45]))
def test_collusion_bound_stays_within_the_cohorts_colluders_and_the_degree(n, half, f):
    k = 2 * half
    c, failure = collusion_bound(n, k, f)
    assert 0 <= c <= min(corrupt_clients(n, f), n - 1)
    if 2 <= k < n - 2:
        assert c <= k and (failure == -float("inf") or failure <= -40.0)
    else:
        assert c == min(corrupt_clients(n, f), n - 1) and failure == -float("inf")
