"""The quorum plan of a site's consistency check (``fedveil.secagg.survivor_checks.quorum_plan``):
which peers' holder quorums it counts before it reveals, and which signatures it verifies for them.
``fedveil bench simulate`` counts a site's Ed25519 verifications with it, so its defining
properties are checked here on random sparse and complete graphs."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg.graph import GraphSpec, build_graph
from fedveil.secagg.survivor_checks import quorum_plan
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
