"""A server that asks for more releases than a site's user-level budget affords.

``min_noise_multiplier`` bounds the noise of one release. How many releases there are is the
server's to say: the rounds a job announces (the site pins that count at its first join, but the
server picks it), then job after job. A site with ``max_user_epsilon`` composes the release it is
asked for with every release its ledger records, from the noise it can rely on only, and declines
the round before training when the sum would pass the cap. Without a cap the same jobs take it past.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.clients.admission import user_budget_refusal
from fedveil.clients.policy import PolicyError, PolicyViolation, SitePolicy, check_job
from fedveil.clients.site_state import Release, SiteState
from fedveil.commands.server import _print_summary
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import FEDERATION, LedgerConfig, PrivacyLedger
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, CONSORTIUM, Consortium, job_config, run_job, turnkey

torch.set_num_threads(1)
pytestmark = [pytest.mark.timeout(300)]
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


def _jobs(tmp_path: Path, rounds: list[int], cap: float) -> tuple[list[list[Any]], SiteState, list[Any]]:
    """Distributed-DP jobs, one after another, against the same victim state file: ``rounds`` per job.
    Returns the victim's history per job, its state, and each job's summary."""
    consortium = Consortium.create(NAMES)
    state_path = tmp_path / "victim-state.json"
    histories, summaries = [], []
    for job, count in enumerate(rounds):
        victim = turnkey(synthetic, VICTIM, 0, consortium, state_path=state_path,
                         policy=consortium.policy(max_user_epsilon=cap))
        sites = [victim, *(turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES) if n != VICTIM)]
        config = job_config(rounds=count, dp="distributed", dp_clip=1.0, dp_noise_multiplier=0.5, dp_bits=24,
                            evaluate=False, min_clients=3, seed=3 + job, stage_timeout=20.0, round_timeout=60.0,
                            cohort_wait=ALL_JOIN_WAIT)
        (tmp_path / f"job-{job}").mkdir()
        summary, results, errors = run_job(tmp_path / f"job-{job}", config, synthetic, sites, enrolled=NAMES)
        assert errors == [], errors
        assert summary.completed_rounds == count  # the other three go on either way
        histories.append(results[0][1])
        summaries.append(summary)
    return histories, SiteState.open(state_path), summaries


def _epsilon_of(state: SiteState, releases: int) -> float:
    """The user-level ε of the state's first ``releases`` releases, composed afresh."""
    entries = [e for e in state.ledger.entries if e.party == FEDERATION]
    assert len(entries) >= releases
    ledger = PrivacyLedger(LedgerConfig(accountant="rdp", federation_delta=state.delta))
    for i, entry in enumerate(entries[:releases]):
        ledger.record(i + 1, federation=entry.event)
    return ledger.epsilon(FEDERATION)


@pytest.mark.slow
def test_releases_past_the_user_level_cap_are_declined_within_a_job_and_across_jobs(tmp_path: Path) -> None:
    """Control: no cap, a 3-round job; the victim releases three times. The cap sits between the ε
    of one release and of two, so a capped victim releases once in a 3-round job and declines the
    second round, saying its budget is spent, and is not drawn for the third; in a second job
    against the same state file it declines the first round and is drawn no more."""
    (tmp_path / "control").mkdir()
    (uncapped,), control, (control_summary,) = _jobs(tmp_path / "control", [3], cap=0.0)
    assert [h.outcome for h in uncapped] == ["completed"] * 3
    one, two = _epsilon_of(control, 1), _epsilon_of(control, 2)
    assert 0 < one < two < control.user_epsilon() < math.inf  # what the cap prevents
    cap = (one + two) / 2

    (tmp_path / "capped").mkdir()
    (first, second), state, summaries = _jobs(tmp_path / "capped", [3, 2], cap=cap)
    # the site says its budget is spent, so the server draws it no more in that job: one decline per job
    assert [h.outcome for h in first] == ["completed", "declined"]
    assert [h.outcome for h in second] == ["declined"]
    for outcome in (first[1], *second):
        assert "max_user_epsilon" in outcome.reason and "user-level ε to" in outcome.reason, outcome.reason
    assert control_summary.out_of_budget == {}
    for summary in summaries:
        assert list(summary.out_of_budget) == [VICTIM] and "max_user_epsilon" in summary.out_of_budget[VICTIM]
    assert len(state.releases) == 1 and state.user_epsilon() == pytest.approx(one) and state.user_epsilon() <= cap


def _state_with(tmp_path: Path, *events: SubsampledGaussianEvent | None) -> SiteState:
    state = SiteState.open(tmp_path / "s.json")
    for i, event in enumerate(events, start=1):
        mode = "distributed" if event is not None else "none"
        state.sent_masked_input(Release("run", i, 1, mode, event is not None), event, {})
    return state


def test_the_cap_composes_every_recorded_release_with_the_one_asked_for(tmp_path: Path) -> None:
    event = SubsampledGaussianEvent(1.0, 2.0)
    state = _state_with(tmp_path, event, event)
    after_three = state.user_epsilon_after(event)
    assert after_three > state.user_epsilon() > 0
    assert user_budget_refusal(SitePolicy(trust_server=True), state, "distributed", event) is None  # no cap
    within = SitePolicy(trust_server=True, max_user_epsilon=after_three * 1.01)
    assert user_budget_refusal(within, state, "distributed", event) is None
    over = SitePolicy(trust_server=True, max_user_epsilon=after_three * 0.99)
    refusal = user_budget_refusal(over, state, "distributed", event)
    assert refusal is not None and refusal[0] == "round"
    assert f"{after_three:.4g}" in refusal[1] and "2 earlier release(s)" in refusal[1]
    # read back from the file: the same figure (the cap counts earlier jobs through --state)
    assert SiteState.open(tmp_path / "s.json").user_epsilon_after(event) == pytest.approx(after_three)


@pytest.mark.parametrize("mode", ["none", "local", "central"])
def test_with_a_cap_a_release_without_user_level_noise_the_site_relies_on_is_declined(tmp_path: Path,
                                                                                      mode: str) -> None:
    """No DP, DP-SGD (sample level only) and central noise the site does not trust: no user-level bound."""
    policy = SitePolicy(trust_server=True, max_user_epsilon=100.0)
    refusal = user_budget_refusal(policy, _state_with(tmp_path), mode, None)
    assert refusal is not None and refusal[0] == "dp.mode"
    assert f"dp.mode {mode!r}" in refusal[1] and "max_user_epsilon=100" in refusal[1]
    assert user_budget_refusal(SitePolicy(trust_server=True), _state_with(tmp_path), mode, None) is None


def test_after_an_unprotected_release_no_release_fits_a_cap(tmp_path: Path) -> None:
    state = _state_with(tmp_path, None)
    refusal = user_budget_refusal(SitePolicy(trust_server=True, max_user_epsilon=100.0), state, "distributed",
                                  SubsampledGaussianEvent(1.0, 50.0))
    assert refusal is not None and "an earlier release had none" in refusal[1]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "5"])
def test_a_bad_cap_is_an_error_naming_the_field(bad: Any) -> None:
    with pytest.raises(PolicyError, match="max_user_epsilon"):
        SitePolicy(trust_server=True, max_user_epsilon=bad)


@pytest.mark.parametrize(("mode", "trust", "refused"), [("none", True, True), ("local", True, True),
                                                        ("central", False, True), ("central", True, False),
                                                        ("distributed", False, False)])
def test_a_site_with_a_cap_refuses_at_join_a_job_whose_releases_it_could_never_bound(mode: str, trust: bool,
                                                                                      refused: bool) -> None:
    consortium = Consortium.create(NAMES)
    policy = consortium.policy(trust_server=trust, max_user_epsilon=5.0)
    job = pb.JobInfo(dp_mode=mode, active_adversary=True, consortium=CONSORTIUM)
    if refused:
        with pytest.raises(PolicyViolation, match=r"job\.dp_mode: .*max_user_epsilon=5"):
            check_job(policy, job)
    else:
        check_job(policy, job)
    check_job(consortium.policy(trust_server=trust), job)  # no cap: the job's mode is the site's to allow


@pytest.mark.slow
def test_a_site_whose_local_dp_budget_is_spent_is_not_drawn_again(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Fixed noise z = 1.2: one round of DP-SGD costs the victim ε ≈ 2.84, two ≈ 3.56, and its own
    budget is 3.2. It declines round 2 saying its budget is spent, and the server leaves it out of
    round 3, which the other three complete. (Before, it was drawn and declined every round, each
    time a slot the round could have given another site.)"""
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, VICTIM, 0, consortium, policy=consortium.policy(max_local_epsilon=3.2)),
             *(turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES) if n != VICTIM)]
    config = job_config(rounds=3, dp="local", dp_local_noise_multiplier=1.2, min_clients=3, stage_timeout=20.0,
                        round_timeout=60.0, cohort_wait=ALL_JOIN_WAIT)
    summary, results, errors = run_job(tmp_path, config, synthetic, sites)
    assert errors == [], errors
    assert summary.completed_rounds == 3
    assert [(h.round, h.outcome) for h in results[0][1]] == [(1, "completed"), (2, "declined")]
    assert list(summary.out_of_budget) == [VICTIM] and "budget" in summary.out_of_budget[VICTIM]
    assert summary.to_dict()["out_of_budget"] == summary.out_of_budget
    _print_summary(summary.to_dict(), as_json=False)  # what `fedveil server` prints at the end
    assert f"out of its own privacy budget, not drawn again: {VICTIM}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("dp", ["distributed", "central"])
def test_clear_metrics_never_leave_under_user_level_dp(tmp_path: Path, dp: str) -> None:
    """Review of 2026-12-07: a server that turned per-site clear evaluation back on under user-level DP got
    the victim's exact loss, accuracy and example count each round (a counting query with a crafted
    model), while its ledger showed a finite user-level ε. Now a site never evaluates under user-level DP,
    whatever the server asks and whatever its own evaluation policy says."""
    from fedveil.server.coordinator import Coordinator
    from tests.attack_helpers import TamperingServer

    class AsksForClearMetrics(Coordinator):
        @property
        def _evaluation_mode(self) -> str:
            return "clear"  # the honest server turns evaluation off under user-level DP

    consortium = Consortium.create(NAMES)
    spy: dict[str, TamperingServer] = {}

    def front(coordinator: Coordinator) -> TamperingServer:
        spy["s"] = TamperingServer(coordinator, VICTIM)  # records what the victim sends
        return spy["s"]

    trust = {"trust_server": True} if dp == "central" else {}
    victim = turnkey(synthetic, VICTIM, 0, consortium, policy=consortium.policy(evaluation="clear", **trust))
    sites = [victim, *(turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES) if n != VICTIM)]
    config = job_config(rounds=1, dp=dp, dp_clip=1.0, dp_noise_multiplier=3.0, evaluate=True, min_clients=3,
                        stage_timeout=20.0, round_timeout=60.0, cohort_wait=ALL_JOIN_WAIT)
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, service=front,
                                       coordinator_cls=AsksForClearMetrics, enrolled=NAMES)
    assert not errors and summary.completed_rounds == 1
    assert [h.outcome for h in results[0][1]] == ["completed"]
    reports = spy["s"].sent.named("report_metrics")
    assert all(not r.metrics for r in reports), [(m.name, m.value) for r in reports for m in r.metrics]


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan])
def test_a_trusting_site_refuses_central_dp_without_a_clip(clip: float) -> None:
    """Review of 2026-12-07 (side note): with clip 0 a trusting site sent its update unclipped while its ledger
    recorded a Gaussian event at z, which assumes the clip's sensitivity."""
    from fedveil.clients.mechanisms.central import CentralDP

    start = pb.RoundStart(dp=pb.DpParams(mode="central", noise_multiplier=1.0, update_clip_norm=clip))
    with pytest.raises(PolicyViolation, match="update_clip_norm") as err:
        CentralDP().dp_terms(SitePolicy(trust_server=True), start, honest=3)
    assert err.value.field == "dp.update_clip_norm"
    start.dp.update_clip_norm = 1.0
    assert CentralDP().dp_terms(SitePolicy(trust_server=True), start, honest=3).guaranteed_event is not None
