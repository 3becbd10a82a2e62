"""The collusion rule 2t > h + c and the choice of graph and threshold (fedveil.secagg.threshold).

The attack the rule stops is run against the real state machines in
tests/test_secagg_threshold_attack.py; here are its arithmetic and its bounds, checked against
independent exact computations (rational arithmetic, scipy).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedveil.secagg import ConfigError, GraphSpec, SecAggConfig, plan_threshold
from fedveil.secagg.graph import is_sparse
from fedveil.secagg.threshold import (
    DEFAULT_MAX_CORRUPT_FRACTION,
    cohort_bound,
    collusion_bound,
    log2_binomial_tail,
    log2_hypergeometric_tail,
    min_threshold,
    satisfies,
    surround_problem,
    threshold_problem,
)


@st.composite
def fractions_below_half(draw: st.DrawFn) -> Fraction:
    q = draw(st.integers(1, 30))
    return Fraction(draw(st.integers(0, (q - 1) // 2)), q)


@st.composite
def cohorts(draw: st.DrawFn, max_n: int = 300) -> tuple[int, int]:
    """(n, k): k = 0 (complete) or an even degree, possibly ≥ n − 2 (then complete too)."""
    n = draw(st.integers(2, max_n))
    return n, 2 * draw(st.integers(0, n // 2))


# --- the rule --------------------------------------------------------------------------------------

@given(h=st.integers(1, 5000), data=st.data())
def test_min_threshold_is_the_smallest_t_with_2t_above_h_plus_c(h, data):
    c = data.draw(st.integers(0, h - 1))
    t = min_threshold(h, c)
    assert 2 * t > h + c and t <= h
    assert 2 * (t - 1) <= h + c  # smallest
    surrounded = c >= h - 1  # colluders may be all of a client's neighbours (or it has none)
    assert (surround_problem(h, c) is not None) == surrounded
    assert satisfies(t, h, c) == (t >= 2 and not surrounded)
    assert not satisfies(t - 1, h, c) and not satisfies(h + 1, h, c)
    if not surrounded:  # every honest survivor keeps an honest surviving holder besides itself
        assert t >= c + 2
    # passive mode: t > c only (colluders alone cannot reconstruct)
    assert satisfies(max(2, c + 1), h, c, active=False) == (max(2, c + 1) <= h and not surrounded)
    assert not satisfies(c, h, c, active=False)


def test_min_threshold_and_problem_name_what_is_wrong():
    with pytest.raises(ConfigError, match="corrupt"):
        min_threshold(5, 5)  # c < h: the victim itself is honest
    with pytest.raises(ConfigError, match="holders"):
        min_threshold(0, 0)
    assert min_threshold(5, 1) == 4 and min_threshold(10, 3) == 7 and min_threshold(35, 0) == 18
    msg = threshold_problem(6, 10, 3)
    assert msg is not None and "2t > h + c = 10 + 3" in msg and "smallest safe t is 7" in msg
    assert "exceeds the h=10 holders" in (threshold_problem(11, 10, 3) or "")
    assert threshold_problem(7, 10, 3) is None and threshold_problem(4, 10, 3, active=False) is None


# --- the bound on colluders ------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(nk=cohorts(), f=fractions_below_half())
def test_complete_graph_bound_is_floor_f_n(nk, f):
    n, k = nk
    k = 0 if is_sparse(k, n) else k
    c, failure = collusion_bound(n, k, float(f))
    assert c == min(math.floor(f * n), n - 1) and failure == -math.inf


@settings(max_examples=200, deadline=None)
@given(nk=cohorts(), f1=fractions_below_half(), f2=fractions_below_half(), bits=st.sampled_from([10.0, 40.0]))
def test_collusion_bound_is_monotone_in_f_and_k(nk, f1, f2, bits):
    n, k = nk
    lo, hi = sorted((float(f1), float(f2)))
    c_lo, _ = collusion_bound(n, k, lo, security_bits=bits)
    c_hi, _ = collusion_bound(n, k, hi, security_bits=bits)
    assert c_lo <= c_hi
    if k:  # k = 0 is the complete graph, the most neighbours; k + 2 may reach it too
        c_k, _ = collusion_bound(n, k, hi, security_bits=bits)
        c_more, _ = collusion_bound(n, k + 2, hi, security_bits=bits)
        c_complete, _ = collusion_bound(n, 0, hi, security_bits=bits)
        assert c_k <= c_more <= c_complete


def _exact_tail(population: int, colluders: int, draws: int, c: int) -> Fraction:
    """P[H > c] as a rational, from binomial coefficients."""
    num = sum(math.comb(colluders, i) * math.comb(population - colluders, draws - i) for i in range(c + 1, draws + 1))
    return Fraction(num, math.comb(population, draws))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(6, 90), data=st.data(), f=fractions_below_half(), bits=st.sampled_from([3, 10, 20, 40]))
def test_harary_bound_meets_the_security_bits_exactly(n, data, f, bits):
    k = 2 * data.draw(st.integers(1, (n - 3) // 2))
    c, failure = collusion_bound(n, k, float(f), security_bits=float(bits))
    colluders = math.floor(f * n)
    limit = Fraction(1, 2**bits)
    union = n * _exact_tail(n - 1, colluders, k, c)
    assert union <= limit * (1 + Fraction(1, 10**9))  # really at most 2^-bits
    if c > 0:  # and the smallest such c
        assert n * _exact_tail(n - 1, colluders, k, c - 1) > limit * (1 - Fraction(1, 10**9))
    if union == 0:
        assert failure == -math.inf
    else:
        assert failure == pytest.approx(math.log2(union), abs=1e-9)
        # scipy's hypergeometric law agrees (independent implementation)
        ref = math.log2(n) + math.log2(sum(stats.hypergeom.pmf(i, n - 1, colluders, k) for i in range(c + 1, k + 1)))
        assert failure == pytest.approx(ref, abs=1e-6)


def test_bound_uses_the_cohorts_colluders():
    assert collusion_bound(69, 0, 1 / 3) == (23, -math.inf)
    assert collusion_bound(9, 0, 1 / 3)[0] == 3  # float 1/3 * 9 is exactly 3 here; the floor must be too


def test_tails_match_scipy_and_direct_sums():
    n, p = 20, 0.1
    for t in (0, 1, 5, 12, 20):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(t, n + 1))
        assert log2_binomial_tail(n, p, t) == pytest.approx(math.log2(direct), abs=1e-9)
    for n, p, t in ((1000, 0.1, 200), (10_000, 0.05, 700), (5000, 0.3, 1400)):  # truncated sums
        ref = stats.binom.logsf(t - 1, n, p) / math.log(2)
        assert log2_binomial_tail(n, p, t) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    for c in (9, 12, 15):  # scipy: sf(c, M=population, n=successes, N=draws)
        assert log2_hypergeometric_tail(49, 16, 34, c) == pytest.approx(
            math.log2(stats.hypergeom.sf(c, 49, 16, 34)), abs=1e-9)
    assert log2_hypergeometric_tail(49, 16, 34, 16) == -math.inf


# --- planning ----------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(nk=cohorts(120), f=fractions_below_half(), dropout=st.sampled_from([0.0, 0.05, 0.1, 0.3]), data=st.data())
def test_plan_is_safe_and_an_explicit_threshold_is_checked(nk, f, dropout, data):
    n, k = nk
    graph = "harary" if k else "complete"
    try:
        plan = plan_threshold(n, graph, degree=k, expected_dropout=dropout, max_corrupt_fraction=float(f))
    except ConfigError as err:  # only a given sparse degree whose colluders could surround a client
        assert str(err).startswith("degree: ") and "neighbours" in str(err) and is_sparse(k, n)
        return
    h, c, t = plan.holders, plan.corrupt, plan.threshold
    assert surround_problem(h, c) is None
    assert h == (k + 1 if is_sparse(k, n) else n) and plan.spec.holders_count(n) == h
    assert t <= h and satisfies(t, h, c) and t == min_threshold(h, c)
    assert plan.dropout_failure_log2 <= 0
    explicit = data.draw(st.integers(1, n + 1), label="threshold")
    for active in (True, False):
        if threshold_problem(explicit, h, c, active=active) is None:
            assert plan.with_threshold(explicit, active=active).threshold == explicit
        else:
            with pytest.raises(ConfigError, match="threshold"):
                plan_threshold(n, graph, degree=k, expected_dropout=dropout, max_corrupt_fraction=float(f),
                               threshold=explicit, active=active)


@pytest.mark.parametrize("n", [100, 500, 1000, 5000])
def test_derived_degree_is_the_smallest_that_meets_both_bounds(n):
    plan = plan_threshold(n, "harary")
    assert plan.degree > 0 and plan.spec == GraphSpec("harary", plan.degree)
    assert plan.collusion_failure_log2 <= -40 and plan.dropout_failure_log2 <= -20
    # c is sized for the layout over the whole cohort (advertisers are only its live view)
    assert (plan.holders, plan.corrupt) == cohort_bound(n, plan.degree, 1 / 3)
    assert plan.corrupt == collusion_bound(n, plan.degree, 1 / 3)[0]
    ref = math.log2(n) + stats.binom.logsf(plan.holders - plan.threshold, plan.holders, 0.1) / math.log(2)
    assert plan.dropout_failure_log2 == pytest.approx(ref, abs=1e-6)
    smaller = plan_threshold(n, "harary", degree=plan.degree - 2)
    assert smaller.dropout_failure_log2 > -20


def test_small_cohorts_fall_back_to_the_complete_graph_and_report_their_failure():
    for n, t, c in ((5, 4, 1), (10, 7, 3), (11, 8, 3), (50, 34, 16)):
        plan = plan_threshold(n, "harary")
        assert (plan.degree, plan.holders, plan.threshold, plan.corrupt) == (0, n, t, c)
        assert plan.collusion_failure_log2 == -math.inf
        ref = stats.binom.logsf(n - t, n, 0.1) / math.log(2)  # P[more than n - t of n drop]
        assert plan.dropout_failure_log2 == pytest.approx(ref, abs=1e-9)
    assert plan_threshold(2).threshold == 2 and plan_threshold(3).threshold == 3


def test_plan_validates_its_inputs():
    for kwargs, field in ((dict(max_corrupt_fraction=0.5), "max_corrupt_fraction"),
                          (dict(max_corrupt_fraction=-0.1), "max_corrupt_fraction"),
                          (dict(max_corrupt_fraction=float("nan")), "max_corrupt_fraction"),
                          (dict(expected_dropout=1.0), "expected_dropout"),
                          (dict(degree=3, graph="harary"), "degree"),
                          (dict(degree=4), "degree"),  # complete graph with a degree
                          (dict(graph="ring"), "graph"),
                          (dict(security_bits=0.0), "security_bits"),
                          (dict(threshold=6), "threshold")):  # n = 10, c = 3: needs 7
        with pytest.raises(ConfigError, match=field):
            plan_threshold(10, **kwargs)
    with pytest.raises(ConfigError, match="num_clients"):
        plan_threshold(1)
    with pytest.raises(ConfigError, match=r"2t > h \+ c = 10 \+ 3.*smallest safe t is 7"):
        plan_threshold(10, threshold=6)
    assert plan_threshold(10, threshold=4, active=False).threshold == 4  # passive: t > c = 3
    assert DEFAULT_MAX_CORRUPT_FRACTION == pytest.approx(1 / 3)


def test_colluders_that_could_surround_a_client_are_refused_whatever_t():
    """All k neighbours colluding know the client's pairwise masks; the self-mask seed is revealed
    for every survivor, so its input would be exposed. A sparse graph needs c < k."""
    with pytest.raises(ConfigError, match=r"degree: c=4 colluders may be all 4 neighbours"):
        plan_threshold(100, "harary", degree=4)
    with pytest.raises(ConfigError, match="neighbours"):
        SecAggConfig(20, 5, 8, graph=GraphSpec("harary", 4))  # passive mode too
    assert threshold_problem(5, 5, 4) is not None and threshold_problem(5, 5, 3) is None
    # with no expected dropout the derived degree is the smallest that leaves an honest neighbour
    plan = plan_threshold(100, "harary", expected_dropout=0.0)
    assert (plan.degree, plan.corrupt, plan.threshold) == (24, 23, 25)
    with pytest.raises(ConfigError, match="degree: c=22 colluders may be all 22 neighbours"):
        plan_threshold(100, "harary", degree=22, expected_dropout=0.0)


def test_describe_and_to_dict_for_logs_and_bench_output():
    plan = plan_threshold(1000, "harary")
    line = plan.describe()
    for part in (f"n=1000, k={plan.degree}", f"t={plan.threshold}", f"c={plan.corrupt}", "collusion failure 2^-4",
                 "dropout failure 2^-2"):
        assert part in line
    d = plan_threshold(5).to_dict()
    assert d["threshold"] == 4 and d["corrupt_bound"] == 1 and d["degree"] == 0
    assert d["collusion_failure_log2"] is None and d["dropout_failure_log2"] < 0
    assert "collusion failure 0" in plan_threshold(5).describe()
