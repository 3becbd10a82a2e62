"""A server that spends the other sites' per-round evaluations in an attempt without the victim, so
that the next attempt's "secure" evaluation sum holds the victim's metrics alone.

Found by the adversarial review of 2026-12-07. Attempt 1 draws the cohort without the victim: the
others agree the graph seed, evaluate (spending ``max_evaluations_per_round``, default 1) and
train, and the server drops their key advertisements, so nothing is released and no retry rule
fires. Attempt 2 draws everyone. The others used to add zeros to the evaluation section (their cap
was spent) beside their real updates, so the released sum was exactly the victim's loss, accuracy
and example count: with a crafted model, a counting query on its records. Now a site asked for
evaluation sums either answers again for the model it already evaluated in the round (the same
answer, nothing new) or declines the attempt; it never adds zeros.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.task import model_to_vector, vector_to_model
from fedveil.tasks.synthetic import mlp
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, RecordingCoordinator, job_config, run_job, turnkey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


class Isolating(RecordingCoordinator):
    """The real coordinator, but attempt 1 of round 1 is drawn without the victim; records releases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial = self.model.params.copy()
        self.attempts = 0

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        self.attempts += 1
        if number == 1 and self.attempts == 1:
            available = [name for name in available if name != VICTIM]
        return super()._run_round(number, available, purpose)


class DropsFirstAttemptKeys:
    """Forwards every RPC, but swallows the key advertisements of attempt 1: it ends with nothing released."""

    def __init__(self, coordinator: Isolating, swallow: bool) -> None:
        self.coordinator, self.swallow = coordinator, swallow

    def __getattr__(self, rpc: str) -> Any:
        return getattr(self.coordinator, rpc)

    def advertise_keys(self, caller: str, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        if self.swallow and self.coordinator.attempts == 1:
            return pb.Ack(round=request.header.round)
        return self.coordinator.advertise_keys(caller, request)


@pytest.mark.parametrize("attack", [False, True])
def test_a_later_attempt_never_leaves_one_sites_evaluation_alone(tmp_path: Path, attack: bool) -> None:
    consortium = Consortium.create(NAMES)
    holder: dict[str, Isolating] = {}

    def front(coordinator: Coordinator) -> DropsFirstAttemptKeys:
        assert isinstance(coordinator, Isolating)
        holder["c"] = coordinator
        return DropsFirstAttemptKeys(coordinator, swallow=attack)

    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES)]
    config = job_config(rounds=1, min_clients=3, evaluate=True, stage_timeout=3.0, round_timeout=20.0,
                        max_round_attempts=3, cohort_wait=1.0)
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, service=front,
                                       coordinator_cls=Isolating)
    assert not errors
    coordinator = holder["c"]
    model = synthetic.build_model()
    vector_to_model(coordinator.initial.astype("float32"), model)
    victim_data = synthetic.synthetic_data(0, 4, 3)
    with torch.no_grad():
        victim = synthetic.evaluate(model, victim_data)
    if not attack:  # the control: attempt 1 (without the victim) releases the other three's sums
        assert summary.completed_rounds == 1 and len(coordinator.applied) == 1
        return
    released = [a.evaluation for a in coordinator.applied if a.evaluation]
    for metrics, examples in released:  # whatever was released covers more than the victim's records
        assert examples > victim["examples"] + 1e-6
        assert abs(metrics["accuracy"] - victim["accuracy"]) > 1e-6 or abs(metrics["loss"] - victim["loss"]) > 1e-6
    if released:  # the others answered attempt 2 again for the model they evaluated in attempt 1
        assert released[-1][1] == pytest.approx(sum(len(synthetic.synthetic_data(i, 4, 3)) for i in range(4)))
    histories = {fed.client_name: history for fed, history in (r for r in results if r is not None)}
    assert all(outcome.outcome != "declined" or "max_evaluations_per_round" in outcome.reason
               for name, history in histories.items() for outcome in history if name != VICTIM)


class Honest(RecordingCoordinator):
    """The real coordinator, recording its releases; the last one built is ``Honest.last``."""

    last: RecordingCoordinator | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Honest.last = self


class ClaimsEveryoneEvaluates(Honest):
    """Asks every cohort for secure evaluation sums, whatever the sites said at Join."""

    def _evaluates(self, name: str) -> bool:
        return True


@pytest.mark.parametrize("attack", [False, True])
def test_sites_without_an_evaluator_decline_rather_than_add_zeros(tmp_path: Path, attack: bool) -> None:
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, n, i, consortium, **({} if n == VICTIM else {"evaluate": None}))
             for i, n in enumerate(NAMES)]
    config = job_config(rounds=1, evaluate=True, stage_timeout=3.0, round_timeout=20.0, max_round_attempts=2)
    coordinator_cls = ClaimsEveryoneEvaluates if attack else Honest
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, coordinator_cls=coordinator_cls)
    assert not errors and Honest.last is not None
    histories = {fed.client_name: [o.outcome for o in history] for fed, history in results}
    released = Honest.last.applied
    assert all(not a.evaluation for a in released)  # never the victim's metrics alone, nor any sums
    if not attack:  # the honest server left evaluation out of this cohort, and the round trained
        assert summary.completed_rounds == 1 and len(released) == 1, summary
        assert all(h == ["completed"] for h in histories.values()), histories
        return
    assert summary.completed_rounds == 0 and not released, summary
    declined = [fed.history[-1].reason for fed, _ in results if fed.client_name != VICTIM]
    assert len(declined) == 3 and all("encoding.evaluation" in r and "no evaluation function" in r for r in declined)


def _crafted_mlp(threshold: float = 2.2) -> np.ndarray:
    """A model whose loss is infinite on any record with x0 > ``threshold`` (every site but the victim
    has one) and finite elsewhere, its logit there a query the server chose."""
    model = mlp.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, second = model[0], model[2]
        first.weight[0, 0], first.bias[0] = 1e38, -1e38 * threshold  # h0 = relu(1e38 (x0 - threshold))
        query = torch.linspace(-0.5, 0.5, 10)
        first.weight[1], first.bias[1] = query, 0.3  # h1 - h2 = query . x + 0.3
        first.weight[2], first.bias[2] = -query, -0.3
        second.weight[0, 0], second.weight[0, 1], second.weight[0, 2] = 1e38, 1.0, -1.0
    return model_to_vector(model).astype(np.float32)


class Crafting(Honest):
    """Starts the job from :func:`_crafted_mlp` (or, as the control, from an ordinary model)."""

    crafted = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if Crafting.crafted:
            self.model.params = _crafted_mlp()


@pytest.mark.parametrize("attack", [False, True])
def test_a_crafted_model_cannot_zero_the_other_sites_metrics(tmp_path: Path, attack: bool) -> None:
    """The second review of 2026-12-07: the evaluation encoding gave a non-finite metric weight 0, so
    with this model the other sites added zeros for the loss and the "secure" loss was the victim's
    alone, on a query the server chose. Now a site whose requested metric is missing, not finite or at
    the round's clip sits the round out."""
    model = mlp.build_model()
    vector_to_model(_crafted_mlp(), model)
    with torch.no_grad():
        losses = [mlp.evaluate(model, mlp.synthetic_data(i, 4, 3))["loss"] for i in range(4)]
    assert math.isfinite(losses[0]) and not any(math.isfinite(loss) for loss in losses[1:])  # the setting
    Crafting.crafted = attack
    consortium = Consortium.create(NAMES)
    sites = [turnkey(mlp, n, i, consortium) for i, n in enumerate(NAMES)]
    config = job_config(task="fedveil.tasks.synthetic:mlp", rounds=1, evaluate=True, stage_timeout=3.0,
                        round_timeout=20.0, max_round_attempts=2)
    summary, results, errors = run_job(tmp_path, config, mlp, sites, coordinator_cls=Crafting)
    assert not errors and Honest.last is not None
    released = [a.evaluation for a in Honest.last.applied if a.evaluation]
    if not attack:  # the control: an ordinary model's metrics are summed over all four sites
        assert summary.completed_rounds == 1 and released and released[0][1] == pytest.approx(800.0)
        return
    for metrics, _ in released:  # never the victim's loss alone
        assert not math.isclose(metrics.get("loss", math.nan), losses[0], rel_tol=1e-6), metrics
    # each of the others sat its first attempt out; told why, the server asked them for no sums after that
    reasons = [history[0].reason for fed, history in results if fed.client_name != VICTIM]
    assert len(reasons) == 3 and all("missing, not finite or at the round's clip" in r for r in reasons), reasons


def test_a_site_whose_metric_is_undefined_on_its_data_trains_on_without_evaluation(tmp_path: Path) -> None:
    """An honest site whose metric is undefined on its records (ROC AUC on one class; here a NaN loss)
    sits out the first round that asks it for sums and says why (``cannot_evaluate``); the honest server
    then leaves evaluation out of its cohorts, so it trains in the next round instead of sitting out all."""
    consortium = Consortium.create(NAMES)

    def undefined(model: Any) -> dict[str, float]:
        return {"loss": math.nan, "accuracy": 0.5, "examples": 10.0}

    sites = [turnkey(synthetic, n, i, consortium, **({"evaluate": undefined} if n == "site-1" else {}))
             for i, n in enumerate(NAMES)]
    config = job_config(rounds=2, min_clients=3, evaluate=True, stage_timeout=3.0, round_timeout=20.0,
                        max_round_attempts=2)
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, coordinator_cls=Honest)
    assert not errors and summary.completed_rounds == 2, summary
    histories = {fed.client_name: [o.outcome for o in history] for fed, history in results}
    assert histories["site-1"] == ["declined", "completed"], histories
    assert Honest.last is not None
    evaluated = [a.evaluation for a in Honest.last.applied]
    assert evaluated[0] and not evaluated[1]  # round 1 summed the other three's metrics; round 2 asked none
