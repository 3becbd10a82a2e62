"""Masking graphs and the SecAgg+ parameter helper."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.secagg import CompleteGraph, ConfigError, GraphSpec, HararyGraph, secagg_plus_parameters
from fedveil.secagg.graph import _log2_binom_tail_ge, build_graph


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
    assert isinstance(build_graph(GraphSpec("harary", 8), list(range(9)), os.urandom(16)), CompleteGraph)
    assert isinstance(build_graph(GraphSpec("harary", 4), list(range(9)), os.urandom(16)), HararyGraph)
    assert GraphSpec("harary", 4).holders_count(9) == 5
    assert GraphSpec("harary", 8).holders_count(9) == 9


def test_graph_spec_validation():
    with pytest.raises(ConfigError, match="kind"):
        GraphSpec("ring")
    with pytest.raises(ConfigError, match="even"):
        GraphSpec("harary", 5)
    with pytest.raises(ConfigError, match="distinct"):
        CompleteGraph([1, 1])


def test_binomial_tail_matches_direct_sum():
    n, p = 20, 0.1
    for t in (0, 1, 5, 12, 20):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(t, n + 1))
        assert _log2_binom_tail_ge(n, p, t) == pytest.approx(math.log2(direct), abs=1e-9)


@pytest.mark.parametrize("n,dropout", [(100, 0.1), (500, 0.1), (1000, 0.05), (10_000, 0.2)])
def test_parameters_meet_the_documented_bounds(n, dropout):
    p = secagg_plus_parameters(n, dropout, 0.05, security_bits=40, correctness_bits=20)
    assert p.degree > 0 and p.degree % 2 == 0 and p.degree < n
    h = p.degree + 1
    assert p.threshold > h / 2
    assert math.log2(n) + _log2_binom_tail_ge(h, 0.05, p.threshold) <= -40
    assert math.log2(n) + _log2_binom_tail_ge(h, dropout, h - p.threshold + 1) <= -20
    assert p.leak_log2 <= -40 and p.failure_log2 <= -20
    # Minimality: the next smaller even degree admits no threshold.
    if p.degree > 2:
        smaller = p.degree - 2 + 1
        ok = any(math.log2(n) + _log2_binom_tail_ge(smaller, 0.05, t) <= -40
                 and math.log2(n) + _log2_binom_tail_ge(smaller, dropout, smaller - t + 1) <= -20
                 for t in range(smaller // 2 + 1, smaller + 1))
        assert not ok
    assert p.spec == GraphSpec("harary", p.degree)


def test_parameters_fall_back_to_complete_graph_for_small_cohorts():
    p = secagg_plus_parameters(20, 0.1)
    assert p.degree == 0 and p.spec == GraphSpec("complete")
    assert 20 // 2 < p.threshold <= 20
    with pytest.raises(ConfigError, match="dropout_rate"):
        secagg_plus_parameters(20, 1.0)
