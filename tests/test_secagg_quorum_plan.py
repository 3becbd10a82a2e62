"""The quorum plan of a site's consistency check (``fedveil.secagg.survivor_checks.quorum_plan``):
which peers' holder quorums it counts before it reveals, and which signatures it verifies for them.
``fedveil bench simulate`` counts a site's Ed25519 verifications with it, so its defining
properties are checked here on random sparse and complete graphs."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg.graph import GraphSpec, MaskingGraph, build_graph
from fedveil.secagg.survivor_checks import QuorumPlan, quorum_plan
from fedveil.simulation.scalebench import survivor_set_verifications


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 40), data=st.data())
def test_every_checked_peer_gets_t_planned_signers_among_its_holders(n: int, data: st.DataObject) -> None:
    degree = data.draw(st.sampled_from([d for d in range(2, n - 2, 2)] or [2]))
    spec = GraphSpec("harary", degree) if degree < n - 2 else GraphSpec("complete")
    graph = build_graph(spec, n, list(range(n)), os.urandom(16))
    dropped = frozenset(data.draw(st.lists(st.integers(0, n - 1), max_size=n // 3, unique=True)))
    survivors = frozenset(range(n)) - dropped
    me = data.draw(st.sampled_from(sorted(survivors)))
    signed = frozenset(data.draw(st.lists(st.sampled_from(sorted(survivors)), unique=True))) | {me}
    threshold = data.draw(st.integers(1, spec.holders_count(n)))
    plan = quorum_plan(graph, me, survivors, dropped, signed, threshold)

    assert plan.owners == [p for p in graph.holders(me) if p in survivors or p in dropped]
    assert set(plan.signers) <= signed and plan.signers == sorted(set(plan.signers))
    for owner in plan.owners:  # every live neighbour of a surviving owner is checked (second hop)
        if owner in survivors:
            assert {p for p in graph.holders(owner) if p in survivors} <= set(plan.checked)
    planned = set(plan.signers)
    for peer in plan.checked:
        holders = graph.holder_set(peer)
        assert len(planned & holders) >= min(threshold, len(signed & holders))


def test_the_bench_counts_t_on_the_complete_graph_and_the_second_hop_on_a_sparse_one() -> None:
    # complete graph: every owner's holders are the whole cohort, so t signatures cover all quorums
    assert survivor_set_verifications(30, GraphSpec("complete"), 20, dropped=3) == 20
    # n = 1,000, k = 252, t = 195 (the measured shape): the second hop reaches about 590 signers,
    # more than the k + t = 447 the bench's floor counted before
    count = survivor_set_verifications(1000, GraphSpec("harary", 252), 195, dropped=100)
    assert 447 < count <= 900


def _set_by_set_plan(graph: MaskingGraph, me: int, survivors: frozenset[int], dropped: frozenset[int],
                     signed: frozenset[int], threshold: int) -> QuorumPlan:
    """The plan as the definition reads, one Python set per peer (the code before vectorizing)."""
    owners = [p for p in graph.holders(me) if p in survivors or p in dropped]
    second_hop: dict[int, int] = {}
    for owner in owners:
        if owner in survivors:
            for peer in graph.holders(owner):
                if peer in survivors and peer not in second_hop:
                    second_hop[peer] = owner
    checked = [*owners, *sorted(set(second_hop).difference(owners))]
    planned: set[int] = set()
    for peer in checked:
        peer_holders = graph.holder_set(peer)
        missing = threshold - len(planned.intersection(peer_holders))
        if missing > 0:
            planned.update(sorted(signed.intersection(peer_holders).difference(planned))[:missing])
    return QuorumPlan(owners, second_hop, checked, sorted(planned))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(3, 60), data=st.data())
def test_the_vectorized_plan_is_the_set_by_set_plan(n: int, data: st.DataObject) -> None:
    """Same owners, second hop (with the first owner reaching each peer), checked peers and planned
    signers as the plain set-by-set walk, on sparse and complete live graphs with leavers."""
    degree = data.draw(st.sampled_from([d for d in range(2, n - 2, 2)] or [2]))
    spec = GraphSpec("harary", degree) if degree < n - 2 else GraphSpec("complete")
    advertised = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=n)))
    graph = build_graph(spec, n, advertised, os.urandom(16))
    dropped = frozenset(data.draw(st.lists(st.sampled_from(advertised), max_size=len(advertised) // 2, unique=True)))
    survivors = frozenset(advertised) - dropped
    if not survivors:
        return
    me = data.draw(st.sampled_from(sorted(survivors)))
    signed = frozenset(data.draw(st.lists(st.sampled_from(sorted(survivors)), unique=True))) | {me}
    threshold = data.draw(st.integers(1, spec.holders_count(n)))
    assert quorum_plan(graph, me, survivors, dropped, signed, threshold) == \
        _set_by_set_plan(graph, me, survivors, dropped, signed, threshold)
