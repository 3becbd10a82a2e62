"""User-level ε for the cohort sampling that really happened (issue 10: ε under-reported).

Every expected ε here is computed with dp-accounting's own API (``dp_accounting.rdp.RdpAccountant``,
``dp_accounting.pld.PLDAccountant``), never through fedveil, so a wrong relation, a wrong population or
a wrong sensitivity in fedveil cannot hide behind itself.

The issue's figures: noise multiplier z = 1.0, 5 rounds, δ = 1e-5, RDP accountant. 10 sites enrolled,
4 online, K = 4: the old rule took q = K / max(enrolled, connected) = 0.4 and reported ε = 7.15; every
online site was in every round, so q = 1 and ε = 12.30.
"""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import NeighboringRelation as Rel
from hypothesis import given
from hypothesis import strategies as st

from fedveil.cli import main
from fedveil.dp.accounting import (
    ADD_REMOVE,
    REPLACE_ONE,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    RdpCurveEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    accountant_from_state_dict,
    event_from_dict,
)
from fedveil.dp.ledger import FEDERATION, LedgerConfig, LedgerFormatError, PrivacyLedger
from fedveil.dp.report import build_report, render_markdown, render_text, report_to_dict
from fedveil.dp.sampling import user_level_event
from fedveil.server.config import ServerConfig, ServerConfigError
from fedveil.server.training import GlobalModel

Z, ROUNDS, DELTA = 1.0, 5, 1e-5
G = dp_accounting.GaussianDpEvent


def dpa_rdp(event: dp_accounting.DpEvent, relation: Rel = Rel.ADD_OR_REMOVE_ONE) -> float:
    """ε by dp-accounting's RDP accountant (its default orders)."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def dpa_pld(event: dp_accounting.DpEvent, relation: Rel = Rel.ADD_OR_REMOVE_ONE) -> float:
    acc = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def times(event: dp_accounting.DpEvent, n: int = ROUNDS) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(event, n)


def ledger_epsilon(events: list, accountant: str = "rdp") -> PrivacyLedger:
    ledger = PrivacyLedger(LedgerConfig(accountant=accountant, federation_delta=DELTA))
    for r, event in enumerate(events, start=1):
        ledger.reserve(r, federation=event, mechanism="dp-fedavg")
    return ledger


# --------------------------------------------------------------------------------------------------
# (a) 10 enrolled, 4 online, K = 4: q = 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amplification", [True, False])
def test_all_online_sites_taken_is_the_plain_gaussian(amplification: bool) -> None:
    event, details = user_level_event(Z, 4, 4, amplification=amplification)
    assert event == SubsampledGaussianEvent(1.0, Z)
    assert details["sampling"] == "none" and details["sample_rate"] == 1.0 and details["amplification"] is False
    assert details["available"] == 4 and "all 4 sites" in details["amplification_reason"]
    ledger = ledger_epsilon([event] * ROUNDS)
    plain = dpa_rdp(times(G(Z)))
    assert ledger.epsilon() == pytest.approx(plain, rel=1e-9)
    assert plain == pytest.approx(12.30, abs=0.005)
    # The attacker's figure: the old rule's q = 4/10 under-reports by 5 units of ε.
    old_rule = dpa_rdp(times(dp_accounting.PoissonSampledDpEvent(4 / 10, G(Z))))
    assert old_rule == pytest.approx(7.15, abs=0.005)
    assert ledger.epsilon() > old_rule + 5


def test_the_server_accounts_the_sites_available_at_the_draw_not_the_enrolled() -> None:
    config = ServerConfig.from_flat(task="t:t", rounds=ROUNDS, clients_per_round=4, min_clients=2, dp="central",
                          dp_noise_multiplier=Z, dp_delta=DELTA)
    model = GlobalModel(config, np.zeros(11, dtype=np.float32), seed=1)
    for r in range(1, ROUNDS + 1):
        plan = model.plan(r, 4, 3, b"ctx")
        spend = model.reserve_budget(plan, 4)
        assert spend is not None
    assert model.ledger is not None
    assert model.ledger.epsilon() == pytest.approx(dpa_rdp(times(G(Z))), rel=1e-9)
    details = dict(model.ledger.entries[-1].details)
    assert details["available"] == 4 and details["sampling"] == "none" and details["amplification"] is False


# --------------------------------------------------------------------------------------------------
# (b) 10 online, K = 4, amplification on: K of N without replacement (replace-one)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fixed_cohort_with_amplification_matches_dp_accounting_without_replacement() -> None:
    event, details = user_level_event(Z, 4, 10, sampling="fixed", amplification=True)
    assert event == SampledWithoutReplacementGaussianEvent(population=10, sample_size=4, noise_multiplier=Z)
    assert details["sampling"] == "without_replacement" and details["relation"] == REPLACE_ONE
    assert details["sample_rate"] == pytest.approx(0.4) and details["amplification"] is True
    ledger = ledger_epsilon([event] * ROUNDS)
    assert ledger.relation() == REPLACE_ONE
    # dp-accounting's RDP accountant takes the multiplier over the replace-one sensitivity 2S: z / 2.
    expected = dpa_rdp(times(dp_accounting.SampledWithoutReplacementDpEvent(10, 4, G(Z / 2))), Rel.REPLACE_ONE)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(24.71, abs=0.01)


@pytest.mark.slow
def test_replace_one_sensitivity_is_twice_the_clip_norm() -> None:
    """The attacker's test of the halving: with K = N the event is the plain Gaussian under replace-one.
    dp-accounting's PLD accountant doubles the sensitivity itself under REPLACE_ONE and is near exact;
    fedveil's RDP figure must bound it from above. Forgetting the halving (z instead of z / 2) would
    report a value below that exact figure, i.e. under-report."""
    acc = RDPAccountant()
    acc.compose(SampledWithoutReplacementGaussianEvent(10, 10, Z, ROUNDS))
    exact = dpa_pld(times(G(Z)), Rel.REPLACE_ONE)
    assert exact <= acc.get_epsilon(DELTA) <= exact * 1.1
    wrong = dpa_rdp(times(dp_accounting.SampledWithoutReplacementDpEvent(10, 10, G(Z))), Rel.REPLACE_ONE)
    assert wrong < exact  # what a missing halving would claim
    # The same convention in dp-accounting's RDP for the plain Gaussian: replace-one at z / 2.
    assert acc.get_epsilon(DELTA) == pytest.approx(dpa_rdp(times(G(Z / 2)), Rel.REPLACE_ONE), rel=1e-9)


@pytest.mark.slow
def test_poisson_sampling_with_amplification_matches_dp_accounting() -> None:
    event, details = user_level_event(Z, 4, 10, sampling="poisson", amplification=True)
    assert event == SubsampledGaussianEvent(0.4, Z) and details["relation"] == ADD_REMOVE
    ledger = ledger_epsilon([event] * ROUNDS)
    # fedveil's Poisson curve is Opacus's, dp-accounting computes the same bound with its own series
    # (here it drops orders 1.1-1.8 as unconverged): the two agree to 1e-4.
    assert ledger.epsilon() == pytest.approx(dpa_rdp(times(dp_accounting.PoissonSampledDpEvent(0.4, G(Z)))),
                                             rel=1e-3)


@pytest.mark.slow
def test_plain_rounds_then_sampled_rounds_compose_under_replace_one() -> None:
    """Rounds where every available site was taken, then rounds of 4 of 10: the whole history is
    re-expressed under replace-one (the plain rounds at z / 2), as dp-accounting composes it."""
    plain, _ = user_level_event(Z, 4, 4)
    sampled, _ = user_level_event(Z, 4, 10)
    ledger = ledger_epsilon([plain, plain, sampled, sampled, sampled])
    before_switch = dpa_rdp(times(G(Z), 2))
    assert [h.epsilon_cumulative for h in ledger.party_history(FEDERATION)][1] == pytest.approx(before_switch)
    expected = dpa_rdp(
        dp_accounting.ComposedDpEvent([
            times(G(Z / 2), 2), times(dp_accounting.SampledWithoutReplacementDpEvent(10, 4, G(Z / 2)), 3),
        ]),
        Rel.REPLACE_ONE,
    )
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert [h.relation for h in ledger.party_history(FEDERATION)] == [ADD_REMOVE] * 2 + [REPLACE_ONE] * 3
    # The what-if the budget check uses agrees with composing for real.
    acc = RDPAccountant()
    acc.compose(plain.with_steps(2))
    assert acc.epsilon_after([sampled.with_steps(3)], DELTA) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 10, 40])
def test_amplification_never_hurts_within_replace_one(n: int) -> None:
    """dp-accounting's without-replacement bound alone is looser than taking everyone for 4 of 5
    (31.4 against 30.1 here); fedveil caps it at the plain Gaussian's curve, which bounds the sampled
    mechanism too, so claiming amplification never reports more than not sampling at all."""
    sampled = RDPAccountant()
    sampled.compose(SampledWithoutReplacementGaussianEvent(n, 4, Z, ROUNDS))
    everyone = dpa_rdp(times(G(Z / 2)), Rel.REPLACE_ONE)
    alone = dpa_rdp(times(dp_accounting.SampledWithoutReplacementDpEvent(n, 4, G(Z / 2))), Rel.REPLACE_ONE)
    assert sampled.get_epsilon(DELTA) <= min(everyone, alone) * (1 + 1e-12)
    if n == 5:
        assert alone > everyone and sampled.get_epsilon(DELTA) < alone
    else:
        assert sampled.get_epsilon(DELTA) == pytest.approx(alone, rel=1e-9) and alone < everyone


# --------------------------------------------------------------------------------------------------
# (c) amplification off: q = 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_without_amplification_every_round_is_the_plain_gaussian(sampling: str) -> None:
    event, details = user_level_event(Z, 4, 10, sampling=sampling, amplification=False)
    assert event == SubsampledGaussianEvent(1.0, Z)
    assert details["amplification"] is False and details["sampling"] == "none"
    assert "not claimed" in details["amplification_reason"]
    assert ledger_epsilon([event] * ROUNDS).epsilon() == pytest.approx(dpa_rdp(times(G(Z))), rel=1e-9)


@pytest.mark.slow
def test_the_server_default_claims_no_amplification_and_refuses_a_claim_against_it() -> None:
    config = ServerConfig.from_flat(task="t:t", rounds=3, clients_per_round=4, min_clients=2, dp="central",
                          dp_noise_multiplier=Z, dp_delta=DELTA)
    assert config.privacy.sampling_amplification is False
    model = GlobalModel(config, np.zeros(11, dtype=np.float32), seed=1)
    with pytest.raises(ValueError, match="--dp-sampling-amplification"):
        model.reserve_budget(model.plan(1, 4, 3, b"ctx"), 10, amplification=True)
    model.reserve_budget(model.plan(1, 4, 3, b"ctx"), 10)  # 4 of 10 online, but accounted at q = 1
    assert model.ledger is not None and model.ledger.entries[-1].event == SubsampledGaussianEvent(1.0, Z)

    on = ServerConfig.from_flat(task="t:t", rounds=3, clients_per_round=4, min_clients=2, dp="central",
                      dp_noise_multiplier=Z, dp_delta=DELTA, dp_sampling_amplification=True)
    model = GlobalModel(on, np.zeros(11, dtype=np.float32), seed=1)
    model.reserve_budget(model.plan(1, 4, 3, b"ctx"), 10)
    model.reserve_budget(model.plan(2, 4, 3, b"ctx"), 10, amplification=False)  # withdrawn for this round
    assert model.ledger is not None
    assert [e.event for e in model.ledger.entries] == [
        SampledWithoutReplacementGaussianEvent(10, 4, Z), SubsampledGaussianEvent(1.0, Z)
    ]


def test_distributed_dp_claims_no_amplification() -> None:
    config = ServerConfig.from_flat(task="t:t", rounds=2, clients_per_round=4, min_clients=2, dp="distributed",
                          dp_noise_multiplier=Z, dp_delta=DELTA)
    model = GlobalModel(config, np.zeros(11, dtype=np.float32), seed=1)
    plan = model.plan(1, 4, 3, b"ctx")
    model.reserve_budget(plan, 40)
    assert model.ledger is not None
    entry = model.ledger.entries[-1]
    assert isinstance(entry.event, RdpCurveEvent) and dict(entry.event.params)["sample_rate"] == 1.0
    details = dict(entry.details)
    assert details["amplification"] is False and details["sampling"] == "none" and details["available"] == 40
    assert "distributed DP claims no sampling amplification" in details["amplification_reason"]


# --------------------------------------------------------------------------------------------------
# (d) the ledger holds, serialises and reports it
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ledger_round_trip_keeps_events_relation_and_epsilon() -> None:
    plain, d1 = user_level_event(Z, 4, 4)
    sampled, d2 = user_level_event(Z, 4, 10)
    ledger = PrivacyLedger(LedgerConfig(federation_delta=DELTA, federation_epsilon_budget=100.0))
    ledger.reserve(1, federation=plain, mechanism="dp-fedavg", details=d1)
    ledger.reserve(2, federation=sampled, mechanism="dp-fedavg", details=d2)
    ledger.reserve(3, federation=sampled, mechanism="dp-fedavg", details=d2)
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.entries == ledger.entries
    assert again.epsilon() == ledger.epsilon() and again.relation() == REPLACE_ONE
    assert event_from_dict(sampled.to_dict()) == sampled
    acc = RDPAccountant()
    acc.compose(plain)
    acc.compose(sampled.with_steps(2))
    restored = accountant_from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history and restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sample_size", 11, "sample_size must be at most population 10"),
        ("population", True, "population must be an integer"),
        ("sample_size", 0, "sample_size must be an integer >= 1"),
        ("noise_multiplier", "1", "noise_multiplier must be a number"),
        ("population", None, "population must be an integer"),
    ],
)
@pytest.mark.slow
def test_a_corrupt_without_replacement_event_is_refused_naming_the_field(field: str, value: object,
                                                                         message: str) -> None:
    ledger = ledger_epsilon([SampledWithoutReplacementGaussianEvent(10, 4, Z)])
    doc = json.loads(ledger.to_json())
    doc["entries"][0]["event"][field] = value
    with pytest.raises(LedgerFormatError, match=message):
        PrivacyLedger.from_dict(doc)
    del doc["entries"][0]["event"][field]
    with pytest.raises(LedgerFormatError, match=f"lacks field '{field}'"):
        PrivacyLedger.from_dict(doc)


@pytest.mark.slow
def test_report_shows_the_sampling_of_every_round_in_every_format() -> None:
    plain, d1 = user_level_event(Z, 4, 4)
    sampled, d2 = user_level_event(Z, 4, 10)
    ledger = PrivacyLedger(LedgerConfig(federation_delta=DELTA))
    ledger.reserve(1, federation=plain, clients={"a": SubsampledGaussianEvent(0.05, 1.1, 20)}, details=d1)
    ledger.reserve(2, federation=sampled, details=d2)
    report = build_report(ledger)
    data = report_to_dict(report)
    assert [r["federation"]["sampling"] for r in data["rounds"]] == ["none", "without replacement 4 of 10"]
    assert data["rounds"][0]["clients"]["a"]["sampling"] == "Poisson q=0.05"
    assert data["federation_relation"] == REPLACE_ONE
    assert data["rounds"][1]["federation"]["parameters"]["amplification_reason"].startswith("4 of the 10")
    text = render_text(report)
    header = next(line for line in text.splitlines() if line.startswith("round"))
    assert header.split()[:5] == ["round", "party", "level", "mechanism", "sampling"]
    assert "without replacement 4 of 10" in text and "Poisson q=0.05" in text
    assert "neighbouring relation: replace one site" in text.splitlines()[1]
    assert "amplification_reason" not in text  # long prose stays in the JSON report
    md = render_markdown(report)
    assert "| sampling |" in md and "| none |" in md and "| Poisson q=0.05 |" in md


# --------------------------------------------------------------------------------------------------
# (e) an accountant that cannot do it refuses clearly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", [PLDAccountant, PRVAccountant])
def test_pld_and_prv_refuse_sampling_without_replacement(accountant: type) -> None:
    acc = accountant()
    event = SampledWithoutReplacementGaussianEvent(10, 4, Z)
    with pytest.raises(UnsupportedEventError, match=r"cannot account sampling without replacement.*'rdp'"):
        acc.compose(event)
    assert not acc.supports(event) and acc.history == []
    # dp-accounting's own PLD accountant cannot do it either (so there is nothing to defer to).
    assert not dp_accounting.pld.PLDAccountant(Rel.REPLACE_ONE).supports(
        dp_accounting.SampledWithoutReplacementDpEvent(10, 4, G(Z / 2)))


def test_a_ledger_with_pld_refuses_the_round_and_records_nothing() -> None:
    ledger = PrivacyLedger(LedgerConfig(accountant="pld"))
    with pytest.raises(UnsupportedEventError, match="PLD accountant cannot account sampling without replacement"):
        ledger.reserve(1, federation=SampledWithoutReplacementGaussianEvent(10, 4, Z))
    assert ledger.entries == ()


@pytest.mark.parametrize(
    "earlier",
    [SubsampledGaussianEvent(0.4, Z), RdpCurveEvent.from_function("distributed_skellam", lambda a: a / 2.0)],
)
@pytest.mark.slow
def test_add_remove_only_events_do_not_mix_with_replace_one(earlier: object) -> None:
    acc = RDPAccountant()
    acc.compose(earlier)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedEventError, match="analysed only under add/remove"):
        acc.compose(SampledWithoutReplacementGaussianEvent(10, 4, Z))
    with pytest.raises(UnsupportedEventError, match="analysed only under add/remove"):
        acc.epsilon_after([SampledWithoutReplacementGaussianEvent(10, 4, Z)], DELTA)
    later = RDPAccountant()
    later.compose(SampledWithoutReplacementGaussianEvent(10, 4, Z))
    with pytest.raises(UnsupportedEventError, match="analysed only under add/remove"):
        later.compose(earlier)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_server_config_refuses_amplification_without_the_rdp_accountant(accountant: str) -> None:
    with pytest.raises(ServerConfigError) as err:
        ServerConfig.from_flat(task="t:t", rounds=1, clients_per_round=4, min_clients=2, dp="central",
                     dp_accountant=accountant, dp_sampling_amplification=True)
    assert err.value.flag == "--dp-accountant" and "sampling without replacement" in err.value.detail
    ServerConfig.from_flat(task="t:t", rounds=1, clients_per_round=4, min_clients=2, dp="central",
                           dp_accountant=accountant)


@pytest.mark.parametrize("mode", ["none", "local", "distributed"])
def test_amplification_is_a_central_dp_flag(mode: str) -> None:
    with pytest.raises(ServerConfigError) as err:
        ServerConfig.from_flat(task="t:t", rounds=1, clients_per_round=4, min_clients=2, dp=mode,
                     dp_sampling_amplification=True)
    assert err.value.flag == "--dp-sampling-amplification"


def test_server_cli_refuses_amplification_with_pld(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "run.db"), "--insecure",
                 "--task", "fedveil.tasks.synthetic:task", "--rounds", "1", "--clients-per-round", "4",
                 "--dp", "central", "--dp-accountant", "pld", "--dp-sampling-amplification"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --dp-accountant: must be rdp with --dp-sampling-amplification")


def test_a_run_started_before_the_flag_existed_resumes_with_the_default() -> None:
    config = ServerConfig.from_flat(task="t:t", rounds=1, clients_per_round=4, min_clients=2, dp="central")
    stored = config.resume_key()
    del stored["dp_sampling_amplification"]
    assert config.differences(stored) == []
    on = ServerConfig.from_flat(task="t:t", rounds=1, clients_per_round=4, min_clients=2, dp="central",
                      dp_sampling_amplification=True)
    assert on.differences(stored) == [
        "--dp-sampling-amplification: the run was started with False, now True"
    ]


@given(
    n=st.integers(1, 500), k=st.integers(1, 500), amplification=st.booleans(),
    sampling=st.sampled_from(["fixed", "poisson"]), z=st.floats(0.0, 50.0),
)
def test_amplification_is_claimed_exactly_when_someone_available_was_left_out_and_it_is_allowed(
    n: int, k: int, amplification: bool, sampling: str, z: float
) -> None:
    event, details = user_level_event(z, k, n, sampling=sampling, amplification=amplification)
    json.dumps(details, allow_nan=False)  # the ledger stores it
    assert details["available"] == n and details["cohort"] == k and details["amplification_reason"]
    claimed = amplification and k < n
    assert details["amplification"] is claimed
    if not claimed:
        assert event == SubsampledGaussianEvent(1.0, z) and details["sampling"] == "none"
        assert details["sample_rate"] == 1.0 and details["relation"] == ADD_REMOVE
    elif sampling == "fixed":
        assert event == SampledWithoutReplacementGaussianEvent(n, k, z) and details["relation"] == REPLACE_ONE
        assert details["sample_rate"] == k / n < 1.0 and details["sampling"] == "without_replacement"
    else:
        assert event == SubsampledGaussianEvent(k / n, z) and details["relation"] == ADD_REMOVE
        assert details["sampling"] == "poisson"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((Z, 0, 4), "cohort_size must be an integer >= 1"),
        ((Z, 4, 0), "available_at_draw must be an integer >= 1"),
        ((-1.0, 4, 10), "noise_multiplier must be a finite number >= 0"),
        ((Z, 4.0, 10), "cohort_size must be an integer"),
    ],
)
def test_user_level_event_names_the_bad_argument(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        user_level_event(*args)
    with pytest.raises(ValueError, match="sampling must be one of fixed, poisson"):
        user_level_event(Z, 4, 10, sampling="shuffle")


# --------------------------------------------------------------------------------------------------
# The scenario through the real coordinator: 10 enrolled, 4 online, K = 4
# --------------------------------------------------------------------------------------------------


def _four_of_ten_online(tmp_path: Path, **overrides: object) -> PrivacyLedger:
    from fedveil.server.store import RunStore, load_ledger
    from tests.server_helpers import Scripted, make_job, run_job, vectors

    with RunStore(tmp_path / "run.db") as store:
        for i in range(6):
            store.enroll(f"offline-{i}")  # enrolled, never connected: they could not have been drawn
    online = ["a", "b", "c", "d"]
    coordinator, store = make_job(tmp_path, online, rounds=ROUNDS, dp="central", dp_clip=2.0,
                                  dp_noise_multiplier=Z, dp_delta=DELTA, **overrides)
    assert len(store.enrolled_clients()) == 10
    # updates of norm under 0.3 x round, so that four of them stay within the bound n·S for all 5 rounds (a
    # rejected round would leave the model unchanged, which sites without --trust-server decline to see again)
    sites = [Scripted(coordinator, n, 0.3 * v) for n, v in zip(online, vectors(4), strict=True)]
    summary = run_job(coordinator, sites)
    store.close()
    assert summary.status == "completed" and summary.completed_rounds == ROUNDS and summary.rejected_rounds == 0
    ledger = load_ledger(tmp_path / "run.db")
    assert isinstance(ledger, PrivacyLedger) and summary.epsilon == pytest.approx(ledger.epsilon())
    return ledger


@pytest.mark.timeout(180)
def test_four_of_ten_online_is_reported_as_the_plain_gaussian(tmp_path: Path) -> None:
    ledger = _four_of_ten_online(tmp_path)
    assert ledger.epsilon() == pytest.approx(dpa_rdp(times(G(Z))), rel=1e-9)  # 12.30, not 7.15
    assert {e.event for e in ledger.entries} == {SubsampledGaussianEvent(1.0, Z)}


@pytest.mark.timeout(180)
def test_four_of_ten_online_with_amplification_is_still_the_plain_gaussian(tmp_path: Path) -> None:
    """With amplification claimed, the population is still the 4 sites that could be drawn: all were."""
    ledger = _four_of_ten_online(tmp_path, dp_sampling_amplification=True)
    assert {e.event for e in ledger.entries} == {SubsampledGaussianEvent(1.0, Z)}
    assert ledger.relation() == ADD_REMOVE
    assert ledger.epsilon() == pytest.approx(dpa_rdp(times(G(Z))), rel=1e-9)


def test_the_demo_calibrates_its_noise_for_the_accounting_the_server_does() -> None:
    """Two of five hospitals per round: the demo used to solve z at q = 2/5, the server now accounts
    q = 1, so the job would stop on its budget early. The demo's z must meet the budget at q = 1."""
    from fedveil.demo.federation import FederationSettings, server_config
    from fedveil.demo.recipe import Recipe

    recipe = Recipe()
    settings = FederationSettings(rounds=4, hospitals_per_round=2, dp="central", epsilon_budget=3.0)
    config = server_config(settings, recipe, 5)
    assert config.privacy.sampling_amplification is False
    model = GlobalModel(config, np.zeros(11, dtype=np.float32), seed=1)
    for r in range(1, settings.rounds + 1):
        model.reserve_budget(model.plan(r, 2, 2, b"ctx"), 5)  # raises BudgetExceededError if z is too small
    assert model.ledger is not None and 0.99 * 3.0 <= model.ledger.epsilon() <= 3.0


def test_no_amplification_is_claimed_while_the_sites_of_a_rejected_round_are_left_out(tmp_path: Path) -> None:
    """After a rejected round the server draws the next cohorts from the sites that did not release over
    the unchanged model: that draw depends on the rejected round's secret one, so the rounds drawn so are
    accounted without sampling amplification (the review of 2026-12-07), and the claim returns with the
    next model."""
    from fedveil.dp.ledger import BudgetExceededError
    from tests.server_helpers import make_job

    coordinator, store = make_job(tmp_path, ["a", "b", "c", "d"], dp="central", dp_clip=1.0, dp_noise_multiplier=1.0,
                                  dp_sampling_amplification=True, clients_per_round=2, min_clients=2)
    claimed: list[bool | None] = []

    def reserve(plan: object, available: int, *, amplification: bool | None = None) -> None:
        claimed.append(amplification)  # then refuse, so the attempt ends before any site is asked anything
        raise BudgetExceededError(party="federation", round_index=1, epsilon_before=0.0, epsilon_after=1.0,
                                  budget=0.5, delta=1e-5)

    coordinator.model.reserve_budget = reserve  # type: ignore[method-assign]
    coordinator._run_round(1, ["a", "b", "c", "d"])
    coordinator._released_unchanged = {"a": "released a sum over the unchanged model"}
    coordinator._run_round(1, ["b", "c", "d"])
    store.close()
    assert claimed == [True, False]
