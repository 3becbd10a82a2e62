"""Evaluation under local DP is a query the site's ε does not cover (issue 9, attack 4; the second
independent rerun: a crafted model answered an exact counting query on a site's records through the
secure evaluation sums, and local DP-SGD noises only training).

Sites with the default policy say at Join that they do not evaluate under local DP, and an honest
server asks them for no evaluation sums. A server that asks anyway gets nothing: each such site
declines the round (adding zeros instead would leave the other sites' sums alone in the secure total).
The control runs against sites that opt in (``evaluate_under_local_dp``): the sums then carry every
site's examples. (A server asks under local DP only with ``--evaluate-under-local-dp``; by default it
runs no evaluation there, checked last.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedveil.clients.admission import evaluation_refusal
from fedveil.clients.policy import SitePolicy
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.server.mechanisms.local import LocalDP
from fedveil.server.mechanisms.no_privacy import NoPrivacy
from fedveil.server.sanity import AggregateRejected
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import RESPONSIVE_DEADLINES, Consortium, job_config, run_job, turnkey

NAMES = [f"site-{i}" for i in range(4)]


class EvaluationRecordingServer(Coordinator):
    """The real coordinator, keeping every secure evaluation sum it decodes (examples, metrics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evaluations: list[tuple[float, dict[str, float]]] = []

    def _record_secure_evaluation(self, rnd: Any, evaluation: Any, survivors: int) -> None:
        if evaluation is not None:
            metrics, examples = evaluation
            self.evaluations.append((float(examples), dict(metrics)))
        super()._record_secure_evaluation(rnd, evaluation, survivors)


class AsksAnyway(EvaluationRecordingServer):
    """Asks every cohort for secure evaluation sums, whatever the sites said at Join."""

    def _evaluates(self, name: str) -> bool:
        return True


def local_dp_job(tmp_path: Path, job: dict[str, Any] | None = None, server: type[EvaluationRecordingServer] =
                 EvaluationRecordingServer, **policy: Any) -> tuple[EvaluationRecordingServer, Any, list[Any]]:
    """A 2-round local-DP job of 4 sites with ``policy``; by default the server asks for the cohort's
    secure evaluation in every round where the sites evaluate (``job`` overrides the settings). Returns
    the server, the summary and each site's round history."""
    tmp_path.mkdir(exist_ok=True)
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, name, i, consortium, policy=consortium.policy(**policy))
             for i, name in enumerate(NAMES)]
    config = job_config(**{"rounds": 2, "dp": "local", "dp_local_noise_multiplier": 1.0, "evaluation": "secure",
                           "evaluate_under_local_dp": True, **RESPONSIVE_DEADLINES, **(job or {})})
    servers: list[EvaluationRecordingServer] = []

    class Recording(server):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    summary, results, errors = run_job(tmp_path, config, synthetic, sites, coordinator_cls=Recording)
    assert not errors, errors
    return servers[0], summary, [[outcome.outcome for outcome in history] for _fed, history in results]


@pytest.mark.slow
def test_default_sites_give_no_evaluation_sums_under_local_dp(tmp_path: Path) -> None:
    server, summary, outcomes = local_dp_job(tmp_path / "honest")
    assert summary.completed_rounds == 2, summary  # training goes on, with no sums asked for
    assert server.evaluations == [] and outcomes == [["completed", "completed"]] * len(NAMES)
    # a server that asks anyway: every site declines, and no evaluation sum (zeros included) is released
    server, summary, outcomes = local_dp_job(tmp_path / "asks", server=AsksAnyway)
    assert summary.completed_rounds == 0 and server.evaluations == [], (summary, server.evaluations)
    assert all(set(history) == {"declined"} for history in outcomes), outcomes


@pytest.mark.slow
def test_sites_that_opt_in_evaluate_under_local_dp(tmp_path: Path) -> None:
    # one evaluation per attempt: on a loaded machine an attempt can time out after the sites evaluated,
    # and with the default cap of 1 the retry's sums would hold no examples (seen once under load)
    server, summary, _ = local_dp_job(tmp_path, evaluate_under_local_dp=True, max_evaluations_per_round=2)
    assert summary.completed_rounds == 2, summary
    assert server.evaluations and all(examples > 0 for examples, _ in server.evaluations), \
        (server.evaluations, summary)


def test_the_refusal_names_the_policy_setting_and_covers_user_level_modes() -> None:
    policy = SitePolicy(trust_server=True)
    refusal = evaluation_refusal(policy, "local")
    assert refusal is not None and "evaluate_under_local_dp" in refusal
    assert evaluation_refusal(SitePolicy(trust_server=True, evaluate_under_local_dp=True), "local") is None
    assert evaluation_refusal(policy, "none") is None
    for mode in ("central", "distributed"):  # never: user-level ε does not cover metrics (review of 2026-12-07)
        assert "user-level DP" in (evaluation_refusal(policy, mode) or "")
        assert evaluation_refusal(SitePolicy(trust_server=True, evaluate_under_local_dp=True), mode) is not None


@pytest.mark.slow
def test_a_local_dp_job_asks_for_no_evaluation_unless_told_to(tmp_path: Path) -> None:
    """Without ``--evaluate-under-local-dp`` the server asks for nothing, not even from sites that
    would answer: no evaluation sums in the rounds, and no final evaluation-only round for the
    default sites to decline (before, that round was asked, declined by all and counted aborted)."""
    server, summary, outcomes = local_dp_job(tmp_path / "off", {"evaluate_under_local_dp": False,
                                                                "final_evaluation": True},
                                             evaluate_under_local_dp=True)
    assert summary.completed_rounds == 2 and summary.aborted_attempts == 0, summary
    assert server.evaluations == [] and summary.final_metrics == {}
    assert outcomes == [["completed", "completed"]] * len(NAMES)
    # the control: told to, the server asks the sites that opt in, in every round and at the end
    server, summary, outcomes = local_dp_job(tmp_path / "on", {"final_evaluation": True},
                                             evaluate_under_local_dp=True, max_evaluations_per_round=2)
    assert len(server.evaluations) == 3 and summary.aborted_attempts == 0, summary
    assert outcomes == [["completed", "completed", "completed"]] * len(NAMES)
    # told to, with default sites: they said they do not evaluate, so nothing is asked (no final round either)
    server, summary, outcomes = local_dp_job(tmp_path / "default", {"final_evaluation": True})
    assert server.evaluations == [] and summary.aborted_attempts == 0, summary
    assert outcomes == [["completed", "completed"]] * len(NAMES)


def test_the_server_names_the_flag_when_local_dp_turns_evaluation_off() -> None:
    config = job_config(dp="local", dp_local_noise_multiplier=1.0)
    refusal = LocalDP(config, 10).evaluation_refusal()
    assert refusal is not None and "--evaluate-under-local-dp" in refusal
    assert LocalDP(config.replace(evaluate_under_local_dp=True), 10).evaluation_refusal() is None
    assert NoPrivacy(job_config(), 10).evaluation_refusal() is None


class ReplaysTheModel(EvaluationRecordingServer):
    """Draws round 1 without the victim, applies nothing, and shows the same model to everyone in round 2:
    the difference of the two secure evaluation sums would be the victim's metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.model

        def commit(applied: Any) -> None:  # the global model stays as it was
            model.version += 1

        model.commit = commit  # type: ignore[method-assign]

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        if number == 1:
            available = [n for n in available if n != NAMES[0]]
        return super()._run_round(number, available, purpose)


@pytest.mark.slow
def test_a_replayed_model_is_not_evaluated_again_under_local_dp(tmp_path: Path) -> None:
    """The second review of 2026-12-07: local DP's fresh DP-SGD noise protects a replayed model's update,
    so the replay check was skipped, but the evaluation sums carry no noise: a site that opted in to
    evaluating under local DP evaluated the replayed model again, and the two sums differenced to the
    victim's exact loss, accuracy and examples. Now a site that would evaluate declines a model it
    already released a sum over."""
    server, _, outcomes = local_dp_job(tmp_path, {"min_clients": 3, "max_round_attempts": 2},
                                       server=ReplaysTheModel, evaluate_under_local_dp=True)
    assert [examples for examples, _ in server.evaluations] == [600.0]  # round 1's three sites, never again
    assert all(history[-1] == "declined" for history in outcomes[1:]), outcomes
    # they decline the evaluation, not a training round over the model (fresh DP-SGD noise covers an update):
    # their declines do not ask an honest server to leave them out of training (the review of 2026-12-07)
    assert server._released_unchanged == {}


class RejectsRoundOne(EvaluationRecordingServer):
    """An honest server whose first round's sum fails its sanity checks (a malicious site's doing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        real, calls = self.model.apply, []

        def apply(plan: Any, ring_sum: Any, survivors: Any, declared: Any = None) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise AggregateRejected("the sum failed the sanity checks")
            return real(plan, ring_sum, survivors, declared)

        self.model.apply = apply  # type: ignore[method-assign]


@pytest.mark.slow
def test_after_a_rejected_round_the_server_asks_no_evaluation_of_the_unchanged_model(tmp_path: Path) -> None:
    """The sites decline to evaluate a model they released a sum over; after a rejected round the model is
    that one, so the honest server asks for no evaluation until it changes (before, under local DP with
    the evaluation opt-in, every attempt of the next round was declined and the job failed)."""
    server, summary, outcomes = local_dp_job(tmp_path, {"rounds": 3, "max_round_attempts": 2},
                                             server=RejectsRoundOne, evaluate_under_local_dp=True,
                                             max_evaluations_per_round=2)
    assert summary.status == "completed" and summary.completed_rounds == 3 and summary.rejected_rounds == 1, summary
    assert len(server.evaluations) == 1  # round 3's: round 1's sum was rejected, round 2 asked for none
    assert outcomes == [["aborted", "completed", "completed"]] * len(NAMES), outcomes
