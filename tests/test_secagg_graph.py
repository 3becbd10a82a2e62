"""Masking graphs (the choice of degree and threshold: tests/test_secagg_threshold.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import CompleteGraph, ConfigError, GraphSpec, HararyGraph
from fedveil.secagg.graph import LiveGraph, build_graph, cohort_layout, is_sparse


@settings(max_examples=50, deadline=None)
@given(n=st.integers(5, 120), data=st.data())
def test_harary_graph_is_k_regular_symmetric_and_seed_dependent(n, data):
    k = 2 * data.draw(st.integers(1, (n - 3) // 2))
    nodes = data.draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    g = HararyGraph(nodes, k, os.urandom(16))
    for v in g.nodes:
        nb = g.neighbors(v)
        assert len(nb) == k and v not in nb
        assert all(v in g.neighbors(u) for u in nb)
        assert g.holders(v) == tuple(sorted((*nb, v)))
    assert g.degree == k


def test_harary_relabelling_depends_on_seed_and_is_deterministic():
    nodes = list(range(50))
    seed = os.urandom(16)
    a = HararyGraph(nodes, 6, seed)
    b = HararyGraph(nodes, 6, seed)
    c = HararyGraph(nodes, 6, os.urandom(16))
    assert all(a.neighbors(v) == b.neighbors(v) for v in nodes)
    assert any(a.neighbors(v) != c.neighbors(v) for v in nodes)


def test_complete_graph_and_degeneration():
    g = CompleteGraph([3, 1, 2])
    assert g.neighbors(1) == (2, 3) and g.holders(2) == (1, 2, 3) and g.degree == 2
    assert isinstance(cohort_layout(GraphSpec("harary", 8), 9, os.urandom(16)), CompleteGraph)
    assert isinstance(cohort_layout(GraphSpec("harary", 4), 9, os.urandom(16)), HararyGraph)
    assert GraphSpec("harary", 4).holders_count(9) == 5
    assert GraphSpec("harary", 8).holders_count(9) == 9
    # One predicate decides sparse vs complete for building, holders and the collusion bound.
    for n in range(3, 20):
        for k in range(2, n + 2, 2):
            sparse = isinstance(cohort_layout(GraphSpec("harary", k), n, os.urandom(16)), HararyGraph)
            assert sparse == is_sparse(k, n) == GraphSpec("harary", k).sparse(n)
            assert GraphSpec("harary", k).holders_count(n) == (k + 1 if sparse else n)


def test_live_graph_is_the_layout_restricted_to_the_live_nodes():
    seed = os.urandom(16)
    layout = cohort_layout(GraphSpec("harary", 6), 30, seed)
    live = [v for v in range(30) if v % 4]
    g = build_graph(GraphSpec("harary", 6), 30, live, seed)
    assert isinstance(g, LiveGraph) and g.nodes == tuple(live) and g.degree == 6
    for v in live:
        assert g.neighbors(v) == tuple(u for u in layout.neighbors(v) if u % 4)
    with pytest.raises(ConfigError, match="not live"):
        g.neighbors(4)
    with pytest.raises(ConfigError, match="layout"):
        LiveGraph(layout, [1, 2, 31])


def test_graph_spec_validation():
    with pytest.raises(ConfigError, match="kind"):
        GraphSpec("ring")
    with pytest.raises(ConfigError, match="even"):
        GraphSpec("harary", 5)
    with pytest.raises(ConfigError, match="distinct"):
        CompleteGraph([1, 1])


def test_harary_neighbours_are_the_k_nearest_on_the_relabelled_cycle():
    nodes = list(range(0, 300, 3))
    g = HararyGraph(nodes, 10, os.urandom(16))
    order = [int(v) for v in g._order]  # the relabelled cycle: position p holds order[p]
    assert sorted(order) == nodes
    for p, v in enumerate(order):
        ring = {order[(p + d) % len(order)] for d in range(-5, 6) if d}
        assert g.neighbors(v) == tuple(sorted(ring))


def test_build_graph_is_shared_for_equal_inputs_and_rebuilt_for_others():
    spec, seed = GraphSpec("harary", 8), os.urandom(16)
    live = [v for v in range(40) if v % 5]
    a = build_graph(spec, 40, live, seed)
    assert build_graph(spec, 40, list(live), seed) is a  # the sites of one process share it
    fewer = build_graph(spec, 40, live[1:], seed)  # another advertiser set: its own live view
    assert fewer is not a and fewer.nodes == tuple(live[1:])
    for v in live[1:]:
        assert fewer.neighbors(v) == tuple(u for u in a.neighbors(v) if u != live[0])
    assert build_graph(spec, 40, live, os.urandom(16)) is not a
    assert a.holder_set(live[0]) == frozenset(a.holders(live[0])) and live[0] in a.holder_set(live[0])
    with pytest.raises(ConfigError, match="distinct"):
        build_graph(spec, 40, [1, 1, 2], seed)  # still refused on every call, not remembered
    with pytest.raises(ConfigError, match="distinct"):
        build_graph(spec, 40, [1, 1, 2], seed)
