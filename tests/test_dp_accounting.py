"""Accountants against Google's dp-accounting, composition laws, the noise solver, serialization."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as google_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.dp.accounting import (
    DEFAULT_ORDERS,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    RdpCurveEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    accountant_from_state_dict,
    event_from_dict,
    make_accountant,
    rdp_to_epsilon,
)
from fedveil.dp.calibration import compute_epsilon, solve_noise_multiplier

DELTA = 1e-5


def google_event(q: float, z: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )


def google_rdp_epsilon(events: list[tuple[float, float, int]], delta: float, orders=DEFAULT_ORDERS) -> float:
    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    for q, z, t in events:
        acc.compose(google_event(q, z, t))
    return float(acc.get_epsilon(delta))


def google_pld_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for q, z, t in events:
        acc.compose(google_event(q, z, t))
    return float(acc.get_epsilon(delta))


# Typical DP-SGD (small q) and DP-FedAvg (q up to 1, one step per round) settings.
RDP_CASES = [
    (0.001, 0.8, 10_000),
    (0.004, 1.0, 2_500),
    (0.01, 1.1, 10_000),
    (0.01, 0.9, 1_000),
    (0.02, 1.5, 500),
    (0.02, 3.0, 10_000),
    (1.0, 1.0, 1),
    (1.0, 2.0, 3),
    (1.0, 8.0, 1_000),
]


@pytest.mark.parametrize(("q", "z", "steps"), RDP_CASES)
def test_rdp_epsilon_matches_dp_accounting_to_0_1_percent(q: float, z: float, steps: int) -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=z, sample_rate=q, steps=steps)
    ours = acc.get_epsilon(DELTA)
    theirs = google_rdp_epsilon([(q, z, steps)], DELTA)
    assert ours > 0
    assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)


@pytest.mark.parametrize("q", [0.001, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("z", [0.5, 0.8, 1.0, 2.0, 5.0])
def test_rdp_curve_at_integer_orders_equals_dp_accounting(q: float, z: float) -> None:
    # At integer orders both libraries evaluate the same finite binomial sum (Mironov et al. 2019).
    orders = np.arange(2.0, 64.0)
    ours = RDPAccountant(orders)
    ours.step(noise_multiplier=z, sample_rate=q)
    theirs = google_rdp._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
    np.testing.assert_allclose(ours.rdp, theirs, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("q", "z", "steps"), [(0.1, 0.8, 100), (0.3, 2.0, 100), (0.05, 1.0, 10_000)])
def test_rdp_fractional_orders_are_never_looser_than_dp_accounting_and_never_below_pld(
    q: float, z: float, steps: int
) -> None:
    # dp-accounting bounds the fractional-order series by summing absolute values; Opacus sums it with
    # signs. So ours may be lower than dp-accounting's at large q, but it must stay above the (tight) PLD.
    ours = compute_epsilon(sample_rate=q, noise_multiplier=z, steps=steps, delta=DELTA, accountant="rdp")
    assert ours <= google_rdp_epsilon([(q, z, steps)], DELTA) * (1 + 1e-9)
    assert ours >= google_pld_epsilon([(q, z, steps)], DELTA)


@pytest.mark.slow
@pytest.mark.parametrize(("q", "z", "steps"), [(0.01, 1.1, 1_000), (0.004, 0.8, 2_500), (1.0, 3.0, 20)])
def test_prv_and_pld_agree_within_stated_errors(q: float, z: float, steps: int) -> None:
    prv = PRVAccountant()
    prv.step(noise_multiplier=z, sample_rate=q, steps=steps)
    eps_prv = prv.get_epsilon(DELTA)
    eps_google_pld = google_pld_epsilon([(q, z, steps)], DELTA)
    # PRV returns its upper bound estimate + eps_error; the true ε is within 2·eps_error below it. The
    # PLD is a pessimistic bound whose discretization slack is far below 0.01 here.
    assert eps_prv >= eps_google_pld - 0.01
    assert eps_prv - 2 * prv.eps_error <= eps_google_pld + 0.01
    # both numerical accountants are tighter than RDP
    assert eps_prv <= compute_epsilon(sample_rate=q, noise_multiplier=z, steps=steps, delta=DELTA, accountant="rdp")


def test_prv_refuses_compositions_whose_grid_is_too_large() -> None:
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=1_000)
    small = acc.domain_points(DELTA)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=99_000)
    assert acc.domain_points(DELTA) > 10 * small  # grows like sqrt(T) times the ε range
    acc.max_domain_points = int(small)
    with pytest.raises(ValueError, match="grid"):
        acc.get_epsilon(DELTA)


@pytest.mark.slow
def test_pld_matches_dp_accounting_for_heterogeneous_history() -> None:
    events = [(0.01, 1.1, 300), (0.02, 0.9, 100), (0.01, 1.1, 50)]
    acc = PLDAccountant()
    for q, z, t in events:
        acc.compose(SubsampledGaussianEvent(q, z, t))
    assert acc.get_epsilon(DELTA) == pytest.approx(google_pld_epsilon(events, DELTA), rel=1e-9)


def test_rdp_heterogeneous_matches_dp_accounting() -> None:
    events = [(0.01, 1.1, 300), (0.02, 0.9, 100), (1.0, 5.0, 10)]
    acc = RDPAccountant()
    for q, z, t in events:
        acc.compose(SubsampledGaussianEvent(q, z, t))
    theirs = google_rdp_epsilon(events, DELTA)
    assert abs(acc.get_epsilon(DELTA) - theirs) <= 1e-3 * theirs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_round_by_round_equals_one_shot(name: str) -> None:
    rounds, q, z = 40, 0.02, 1.0
    step_by_step = make_accountant(name)
    for _ in range(rounds):
        step_by_step.step(noise_multiplier=z, sample_rate=q, steps=5)
    one_shot = make_accountant(name)
    one_shot.compose(SubsampledGaussianEvent(q, z, rounds * 5))
    assert len(step_by_step.history) == 1  # identical rounds merge: O(1) state
    assert step_by_step.total_steps == rounds * 5
    assert step_by_step.get_epsilon(DELTA) == pytest.approx(one_shot.get_epsilon(DELTA), rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    q=st.floats(min_value=1e-3, max_value=1.0),
    z=st.floats(min_value=0.6, max_value=10.0),
    parts=st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=8),
)
@pytest.mark.slow
def test_rdp_composition_is_additive_property(q: float, z: float, parts: list[int]) -> None:
    acc = RDPAccountant()
    for p in parts:
        acc.step(noise_multiplier=z, sample_rate=q, steps=p)
        acc.compose(RdpCurveEvent.from_function("free", np.zeros_like))  # a zero-cost mechanism in between
    one = RDPAccountant()
    one.step(noise_multiplier=z, sample_rate=q, steps=sum(parts))
    np.testing.assert_allclose(acc.rdp, one.rdp, rtol=1e-10)
    assert acc.get_epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-10)


def test_rdp_curve_event_equals_gaussian_when_given_the_gaussian_curve() -> None:
    sigma = 2.0
    curve = RdpCurveEvent.from_function("my-gaussian", lambda a: a / (2 * sigma**2), steps=7, params={"sigma": sigma})
    generic = RDPAccountant()
    generic.compose(curve)
    builtin = RDPAccountant()
    builtin.step(noise_multiplier=sigma, sample_rate=1.0, steps=7)
    assert generic.get_epsilon(DELTA) == pytest.approx(builtin.get_epsilon(DELTA), rel=1e-12)


def test_rdp_curve_on_a_coarser_grid_is_a_sound_upper_bound() -> None:
    sigma = 1.5
    fine = RDPAccountant()
    fine.compose(RdpCurveEvent.from_function("g", lambda a: a / (2 * sigma**2)))
    coarse = RDPAccountant()
    coarse.compose(RdpCurveEvent.from_function("g", lambda a: a / (2 * sigma**2), orders=[2.0, 4.0, 8.0, 16.0, 32.0]))
    assert coarse.get_epsilon(DELTA) >= fine.get_epsilon(DELTA)
    assert coarse.get_epsilon(DELTA) < 2 * fine.get_epsilon(DELTA)


@pytest.mark.parametrize("name", ["prv", "pld"])
def test_numerical_accountants_refuse_rdp_only_mechanisms(name: str) -> None:
    acc = make_accountant(name)
    event = RdpCurveEvent.from_function("skellam", lambda a: a * 0.01)
    assert not acc.supports(event)
    with pytest.raises(UnsupportedEventError, match="skellam"):
        acc.compose(event)
    assert acc.history == []


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_zero_noise_means_infinite_epsilon(name: str) -> None:
    assert math.isinf(compute_epsilon(sample_rate=0.1, noise_multiplier=0.0, steps=3, delta=DELTA, accountant=name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_state_dict_json_round_trip(name: str) -> None:
    acc = make_accountant(name)
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
    acc.step(noise_multiplier=0.9, sample_rate=0.02, steps=30)
    if name == "rdp":
        acc.compose(RdpCurveEvent.from_function("skellam", lambda a: a * 0.001, params={"mu": 12.0}))
    restored = accountant_from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert type(restored) is type(acc)
    assert restored.history == acc.history
    assert restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="cannot load"):
        make_accountant("rdp" if name != "rdp" else "pld").load_state_dict(acc.state_dict())


def test_epsilon_after_is_a_what_if() -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    before = acc.get_epsilon(DELTA)
    projected = acc.epsilon_after([SubsampledGaussianEvent(0.01, 1.0, 10)], DELTA)
    assert acc.get_epsilon(DELTA) == before
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    assert acc.get_epsilon(DELTA) == pytest.approx(projected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "q", "steps", "target"),
    [("rdp", 0.01, 1_000, 1.0), ("rdp", 0.004, 10_000, 8.0), ("pld", 0.01, 1_000, 2.0), ("prv", 0.02, 500, 3.0)],
)
@pytest.mark.slow
def test_noise_solver_is_within_one_percent_and_never_above_target(
    name: str, q: float, steps: int, target: float
) -> None:
    sol = solve_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=name)
    z = sol.noise_multiplier
    eps = compute_epsilon(sample_rate=q, noise_multiplier=z, steps=steps, delta=DELTA, accountant=name)
    assert eps == pytest.approx(sol.epsilon, rel=1e-12)
    assert 0.99 * target <= eps <= target
    # and it is close to the smallest such noise: 2 % less noise overspends
    assert compute_epsilon(
        sample_rate=q, noise_multiplier=0.98 * sol.noise_multiplier, steps=steps, delta=DELTA, accountant=name
    ) > 0.99 * target


@pytest.mark.slow
def test_noise_solver_reports_unreachable_targets() -> None:
    # the doubling bracket gives up past the cap: z = 1, 2, 4 are tried (each a PRV evaluation), then 8 > cap
    with pytest.raises(ValueError, match=r"unreachable with the prv accountant: even noise_multiplier=4 gives"):
        solve_noise_multiplier(
            target_epsilon=1e-3, delta=DELTA, sample_rate=0.5, steps=10, accountant="prv", max_noise_multiplier=4
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_rate": 0.0, "noise_multiplier": 1.0}, "sample_rate"),
        ({"sample_rate": 1.5, "noise_multiplier": 1.0}, "sample_rate"),
        ({"sample_rate": 0.1, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sample_rate": 0.1, "noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 0}, "steps"),
    ],
)
def test_event_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SubsampledGaussianEvent(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_delta_validation(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=1, delta=delta)


def test_unknown_accountant_and_bad_event_dicts() -> None:
    with pytest.raises(ValueError, match="accountant"):
        make_accountant("gdp")
    with pytest.raises(ValueError, match="unknown event kind"):
        event_from_dict({"kind": "laplace"})
    with pytest.raises(ValueError, match="steps"):
        event_from_dict({"kind": "subsampled_gaussian", "sample_rate": 0.1, "noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="strictly increasing"):
        RdpCurveEvent("x", (3.0, 2.0), (0.1, 0.2))


def test_rdp_to_epsilon_matches_dp_accounting_conversion() -> None:
    orders = np.asarray(DEFAULT_ORDERS)
    rdp = orders / (2 * 1.3**2) * 17
    ours, order = rdp_to_epsilon(orders, rdp, 1e-6)
    theirs, their_order = google_rdp.compute_epsilon(list(orders), list(rdp), 1e-6)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert order == their_order


def test_an_implausibly_large_noise_multiplier_is_bounded_by_the_plain_gaussian() -> None:
    """A site may report z = 1e6; Opacus's series would take tens of seconds for it. Above the cut-off
    the subsampled RDP is the plain Gaussian's α / (2z²), an upper bound (q ≤ 1 never hurts)."""
    from fedveil.dp.rdp import SUBSAMPLED_EXACT_MAX_NOISE, subsampled_gaussian_rdp

    orders = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    z = 1e6
    assert z > SUBSAMPLED_EXACT_MAX_NOISE
    assert np.array_equal(subsampled_gaussian_rdp(0.5, z, orders), orders / (2 * z * z))
    acc = RDPAccountant()
    acc.compose(SubsampledGaussianEvent(0.5, z, 10**6))
    assert 0 < acc.get_epsilon(DELTA) < 0.1


def test_the_pld_memo_answers_each_history_delta_and_interval_with_its_own_epsilon() -> None:
    """The PLD accountant memoizes ε per (history, δ, interval) and each step's distribution per (q, z):
    a second ask is the same number, and nothing leaks between keys or accountants."""
    def eps(events: list[tuple[float, float, int]], delta: float, interval: float = 1e-4) -> float:
        acc = PLDAccountant(value_discretization_interval=interval)
        for q, z, t in events:
            acc.compose(SubsampledGaussianEvent(q, z, t))
        return acc.get_epsilon(delta)

    history = [(0.25, 4.0, 40), (0.5, 5.5, 10)]
    first = eps(history, DELTA)
    assert eps(history, DELTA) == first == google_pld_epsilon(history, DELTA)
    assert eps(history, 10 * DELTA) < first  # another δ, another answer
    assert eps(history[:1], DELTA) < first  # a prefix of the history is not the history
    assert eps(list(reversed(history)), DELTA) == pytest.approx(first, rel=1e-6)  # composition commutes
    coarse = eps(history, DELTA, interval=1e-2)
    assert coarse != first and coarse >= first  # a coarser pessimistic grid: its own, looser number
