"""Privacy ledger: per-round/cumulative ε, the budget stop, JSON round trip, corrupt input, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from fedveil.dp.accounting import RDPAccountant, RdpCurveEvent, SubsampledGaussianEvent, UnsupportedEventError
from fedveil.dp.ledger import (
    FEDERATION,
    BudgetExceededError,
    LedgerConfig,
    LedgerFormatError,
    PrivacyLedger,
)
from fedveil.dp.report import build_report, render_markdown, render_plot, render_text, report_to_dict

FED = SubsampledGaussianEvent(sample_rate=0.1, noise_multiplier=1.2)  # cohort 10 of 100, one step per round
SGD_A = SubsampledGaussianEvent(sample_rate=0.05, noise_multiplier=1.1, steps=20)
SGD_B = SubsampledGaussianEvent(sample_rate=0.02, noise_multiplier=1.3, steps=50)


def eps_direct(event: SubsampledGaussianEvent, rounds: int, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.compose(event.with_steps(event.steps * rounds))
    return acc.get_epsilon(delta)


def three_round_ledger(**config: object) -> PrivacyLedger:
    ledger = PrivacyLedger(LedgerConfig(**config))  # type: ignore[arg-type]
    ledger.reserve(0, federation=FED, clients={"a": SGD_A, "b": SGD_B}, mechanism="dp-fedavg", details={"clip": 0.5})
    ledger.reserve(1, federation=FED, clients={"a": SGD_A}, mechanism="dp-fedavg", details={"clip": 0.5})
    ledger.reserve(2, federation=FED, clients={"a": SGD_A, "b": SGD_B}, mechanism="dp-fedavg", details={"clip": 0.5})
    return ledger


@pytest.mark.slow
def test_cumulative_and_per_round_epsilon_match_direct_accounting() -> None:
    ledger = three_round_ledger()
    assert ledger.epsilon(FEDERATION) == pytest.approx(eps_direct(FED, 3), rel=1e-12)
    assert ledger.epsilon("a") == pytest.approx(eps_direct(SGD_A, 3), rel=1e-12)
    assert ledger.epsilon("b") == pytest.approx(eps_direct(SGD_B, 2), rel=1e-12)  # b skipped round 1
    hist = ledger.party_history("b")
    assert [h.round_index for h in hist] == [0, 2]
    assert hist[0].epsilon_round == pytest.approx(eps_direct(SGD_B, 1))
    assert hist[1].epsilon_cumulative == pytest.approx(eps_direct(SGD_B, 2))
    assert ledger.clients == ["a", "b"]
    assert ledger.rounds == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4, 9])
def test_budget_stop_fires_exactly_when_the_next_round_would_overspend(k: int) -> None:
    budget = eps_direct(FED, k)  # exactly what k rounds cost, computed independently
    ledger = PrivacyLedger(LedgerConfig(federation_epsilon_budget=budget))
    for r in range(k):
        ledger.reserve(r, federation=FED)
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(k, federation=FED)
    err = info.value
    assert err.party == FEDERATION and err.round_index == k
    assert err.epsilon_before == pytest.approx(budget, rel=1e-12)
    assert err.epsilon_after == pytest.approx(eps_direct(FED, k + 1), rel=1e-12)
    assert err.remaining == pytest.approx(0.0, abs=1e-9)
    assert "round" in str(err) and "left" in str(err) and "would spend" in str(err)
    assert len(ledger.entries) == k  # the refused round was not recorded
    # check_budget alone agrees and does not record
    with pytest.raises(BudgetExceededError):
        ledger.check_budget(k, federation=FED)


@pytest.mark.slow
def test_budget_between_rounds_reports_what_is_left() -> None:
    budget = 0.5 * (eps_direct(FED, 3) + eps_direct(FED, 4))
    ledger = PrivacyLedger(LedgerConfig(federation_epsilon_budget=budget))
    for r in range(3):
        ledger.reserve(r, federation=FED)
    assert ledger.remaining() == pytest.approx(budget - eps_direct(FED, 3))
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(3, federation=FED)
    assert info.value.remaining == pytest.approx(budget - eps_direct(FED, 3))
    assert info.value.would_spend == pytest.approx(eps_direct(FED, 4) - eps_direct(FED, 3))


def test_client_budget_refuses_the_whole_round_all_or_nothing() -> None:
    budget = eps_direct(SGD_A, 2)
    ledger = PrivacyLedger(LedgerConfig(client_epsilon_budget=budget))
    ledger.reserve(0, federation=FED, clients={"a": SGD_A, "b": SGD_B})
    ledger.reserve(1, federation=FED, clients={"a": SGD_A, "b": SGD_B})
    before = ledger.to_json()
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(2, federation=FED, clients={"a": SGD_A, "b": SGD_B})
    assert info.value.party == "a"
    assert ledger.to_json() == before  # neither the federation nor b was recorded
    ledger.reserve(2, federation=FED, clients={"b": SGD_B})  # b alone still fits
    assert ledger.epsilon("b") == pytest.approx(eps_direct(SGD_B, 3))


@pytest.mark.slow
def test_json_round_trip_preserves_everything() -> None:
    ledger = three_round_ledger(federation_epsilon_budget=50.0, client_epsilon_budget=40.0, client_delta=1e-4)
    ledger.record(3, federation=RdpCurveEvent.from_function("skellam", lambda a: a * 0.002, params={"mu": 40.0}))
    text = ledger.to_json()
    restored = PrivacyLedger.from_json(text)
    assert restored.to_json() == text
    assert restored.config == ledger.config
    assert restored.entries == ledger.entries
    for party in (FEDERATION, "a", "b"):
        assert restored.epsilon(party) == ledger.epsilon(party)
    assert json.loads(text)["entries"][0]["level"] == "user"


def test_infinite_rdp_orders_survive_strict_json() -> None:
    # A mechanism's bound may be infinite at high orders (e.g. Skellam/DDG outside their valid range).
    curve = RdpCurveEvent.from_function("skellam", lambda a: np.where(a < 30, a * 0.01, np.inf))
    ledger = PrivacyLedger()
    ledger.reserve(0, federation=curve)
    text = ledger.to_json()  # allow_nan=False inside: would raise on a bare inf
    restored = PrivacyLedger.from_json(text)
    assert restored.entries == ledger.entries
    assert restored.epsilon() == ledger.epsilon() and np.isfinite(ledger.epsilon())


def _valid_doc() -> dict:
    return json.loads(three_round_ledger().to_json())


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.pop("config"), "config"),
        (lambda d: d["config"].update(accountant="gdp"), "config"),
        (lambda d: d["config"].update(federation_delta=2.0), "federation_delta"),
        (lambda d: d.update(entries={}), "entries"),
        (lambda d: d["entries"][1].pop("event"), "entries[1]"),
        (lambda d: d["entries"][0]["event"].update(kind="laplace"), "unknown event kind"),
        (lambda d: d["entries"][2]["event"].update(sample_rate=-0.5), "sample_rate"),
        (lambda d: d["entries"][0].update(round="zero"), "round"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), "comes before"),
    ],
)
@pytest.mark.slow
def test_corrupt_ledgers_raise_a_named_error(mutate, fragment: str) -> None:
    doc = _valid_doc()
    mutate(doc)
    with pytest.raises(LedgerFormatError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        PrivacyLedger.from_dict(doc)


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", "null", '"ledger"'])
def test_non_ledger_json_is_refused(text: str) -> None:
    with pytest.raises(LedgerFormatError):
        PrivacyLedger.from_json(text)


def test_pld_ledger_refuses_rdp_only_mechanisms_without_recording() -> None:
    ledger = PrivacyLedger(LedgerConfig(accountant="pld"))
    curve = RdpCurveEvent.from_function("ddg", lambda a: a * 0.01)
    with pytest.raises(UnsupportedEventError, match="ddg"):
        ledger.reserve(0, federation=curve)
    with pytest.raises(UnsupportedEventError):
        ledger.record(0, federation=FED, clients={"a": curve})
    assert ledger.entries == ()


def test_distributed_dp_curve_composes_in_rdp_ledger() -> None:
    sigma = 3.0
    curve = RdpCurveEvent.from_function("skellam", lambda a: a / (2 * sigma**2), params={"mu": 9.0})
    ledger = PrivacyLedger()
    for r in range(5):
        ledger.reserve(r, federation=curve)
    assert ledger.epsilon() == pytest.approx(eps_direct(SubsampledGaussianEvent(1.0, sigma), 5), rel=1e-12)
    assert ledger.party_history(FEDERATION)[0].mechanism == "skellam"


def test_round_order_and_ids_are_validated() -> None:
    ledger = three_round_ledger()
    with pytest.raises(ValueError, match="comes before"):
        ledger.reserve(1, federation=FED)
    with pytest.raises(ValueError, match="client id"):
        ledger.reserve(5, clients={FEDERATION: SGD_A})
    with pytest.raises(ValueError, match="round_index"):
        ledger.reserve(-1, federation=FED)
    with pytest.raises(ValueError, match="needs"):
        ledger.reserve(5)
    with pytest.raises(ValueError, match="details"):
        ledger.reserve(5, federation=FED, details={"clip": float("nan")})
    assert ledger.rounds == [0, 1, 2]


@pytest.mark.slow
def test_cancel_round_takes_back_the_federation_reservation_of_the_latest_round() -> None:
    ledger = three_round_ledger()
    assert ledger.cancel_round(2) == 1
    assert ledger.epsilon() == pytest.approx(eps_direct(FED, 2))
    assert ledger.epsilon("a") == pytest.approx(eps_direct(SGD_A, 3))  # local training did happen
    with pytest.raises(ValueError, match="latest"):
        ledger.cancel_round(0)
    assert ledger.cancel_round(2, include_clients=True) == 2
    assert ledger.epsilon("a") == pytest.approx(eps_direct(SGD_A, 2))
    assert ledger.epsilon("b") == pytest.approx(eps_direct(SGD_B, 1))
    ledger.reserve(2, federation=FED)  # the round can be retried
    assert ledger.epsilon() == pytest.approx(eps_direct(FED, 3))


@pytest.mark.slow
def test_report_figures_and_renderings() -> None:
    ledger = three_round_ledger(federation_epsilon_budget=10.0, client_epsilon_budget=8.0)
    report = build_report(ledger)
    assert [r.round_index for r in report.rounds] == [0, 1, 2]
    assert report.rounds[1].clients.keys() == {"a"}
    fed = report.rounds[2].federation
    assert fed is not None and fed.mechanism == "dp-fedavg"
    assert fed.epsilon_cumulative == pytest.approx(eps_direct(FED, 3))
    assert fed.budget_remaining == pytest.approx(10.0 - eps_direct(FED, 3))
    assert fed.parameters == {"sample_rate": 0.1, "noise_multiplier": 1.2, "steps": 1, "clip": 0.5}
    assert report.client_epsilons["b"] == pytest.approx(eps_direct(SGD_B, 2))

    data = report_to_dict(report)
    json.dumps(data, allow_nan=False)
    assert len(data["rounds"]) == 3
    assert data["rounds"][0]["clients"]["b"]["epsilon_round"] == pytest.approx(eps_direct(SGD_B, 1))

    text = render_text(report)
    assert "federation (user level)" in text and "client b (sample level)" in text
    assert f"{eps_direct(FED, 3):.4f}" in text
    md = render_markdown(report)
    assert md.count("\n| 2 |") == 3  # round 2: federation + two clients
    assert "|---|" in md

    fig = render_plot(report)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert sum(lbl.startswith("federation (") for lbl in labels) == 1
    assert sum(lbl.startswith("client ") and "(sample" in lbl for lbl in labels) == 2
    fed_line = next(line for line in ax.get_lines() if line.get_label().startswith("federation ("))
    assert list(fed_line.get_ydata()) == pytest.approx([eps_direct(FED, r) for r in (1, 2, 3)])


def test_empty_ledger_reports_cleanly() -> None:
    report = build_report(PrivacyLedger())
    assert report.rounds == [] and report.federation_epsilon is None
    text = render_text(report)
    assert "(no rounds recorded)" in text
    # No user-level mechanism must never read as ε = 0 to a privacy officer.
    assert "no user-level mechanism recorded" in text and "ε = 0" not in text
    as_dict = report_to_dict(report)
    assert as_dict["rounds"] == [] and as_dict["federation_epsilon"] is None
    assert as_dict["user_level_mechanism"] is False
    render_plot(report)


def test_the_plot_shows_an_infinite_epsilon_instead_of_dropping_it() -> None:
    """A client whose round had no noise has ε = ∞: its line must still be drawn, marked as such."""
    ledger = PrivacyLedger(LedgerConfig(client_epsilon_budget=3.0))
    ledger.record(0, clients={"a": SGD_A, "b": SGD_B})
    ledger.record(1, clients={"a": SGD_A, "b": SubsampledGaussianEvent(sample_rate=0.02, noise_multiplier=0.0)})
    report = build_report(ledger)
    assert math.isinf(report.client_epsilons["b"])
    ax = render_plot(report).axes[0]
    line_b = next(line for line in ax.get_lines() if line.get_label().startswith("client b"))
    ys = list(line_b.get_ydata())
    assert len(ys) == 2 and all(math.isfinite(y) for y in ys) and ys[1] > 3.0  # drawn, above the budget
    assert "ε = ∞" in line_b.get_label() and any(t.get_text() == "ε = ∞" for t in ax.texts)


def test_the_plot_of_a_site_with_an_unprotected_release_says_its_user_level_epsilon_is_infinite() -> None:
    """A site's ledger holds its protected releases only: its federation line is finite, so the plot
    must say the site's user-level ε is ∞ and label the line as the protected releases only."""
    ledger = PrivacyLedger(LedgerConfig(federation_delta=1e-5))
    ledger.record(1, federation=FED)
    report = build_report(ledger)
    assert not any("∞" in t.get_text() for t in render_plot(report).texts)
    fig = render_plot(report, "1 release(s) without noise this site can rely on")
    assert any(t.get_text().startswith("user-level ε = ∞: 1 release(s)") for t in fig.texts)
    ax = fig.axes[0]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("federation"))
    assert line.get_label().endswith("protected releases only")


def test_a_kept_release_survives_a_retrys_cancel_and_a_restart() -> None:
    """Review of 2026-12-07: an attempt that aborted after the masked inputs counts as a release, but the next
    attempt's early abort (cancel_round) and a server restart (which cancels every round above the model's
    version) took its entry back, and the server's ε undercounted."""
    ledger = PrivacyLedger(LedgerConfig(federation_delta=1e-5))
    ledger.reserve(1, federation=FED)  # attempt 1: aborted at the consistency check, after masked inputs
    ledger.keep_round(1)
    one = ledger.epsilon()
    ledger.reserve(1, federation=FED)  # attempt 2: aborted before any masked input
    assert ledger.cancel_round(1) == 1 and ledger.epsilon() == pytest.approx(one)
    assert ledger.cancel_round(1) == 0  # nothing left to take back: the kept release stays
    restarted = PrivacyLedger.from_json(ledger.to_json())
    assert restarted.cancel_round(1) == 0 and restarted.epsilon() == pytest.approx(one)
    restarted.reserve(1, federation=FED)  # attempt 3 completes: two releases in all
    assert restarted.epsilon() == pytest.approx(eps_direct(FED, 2))
