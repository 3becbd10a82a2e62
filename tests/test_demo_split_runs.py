"""The real federation on one demo split (fedveil.demo.split_runs): what the baseline, the recipe
search and benchmarks/demo_utility.py score, and the baseline's replay of the private run's dropouts."""

from __future__ import annotations

import pytest
import torch

from fedveil.demo import healthcare
from fedveil.demo.data import make_split
from fedveil.demo.federation import DropoutPlan, RoundReport
from fedveil.demo.recipe import Recipe
from fedveil.demo.served_model import ServedModel, tail_mean
from fedveil.demo.split_runs import score_recipe

torch.set_num_threads(1)
NAMES = [f"hospital-{i}" for i in range(1, 6)]


def report(number: int, participants: list[str], dropped: list[str]) -> RoundReport:
    return RoundReport(round=number, accuracy=0.9, auc=0.9, loss=0.3, participants=participants, dropped=dropped,
                       epsilon_sample={}, epsilon_sample_max=None, epsilon_user=None, budget_remaining={},
                       seconds=1.0)


def test_replayed_dropouts_silence_whoever_did_not_take_part() -> None:
    rounds = [report(1, NAMES, []), report(2, NAMES[1:], NAMES[:1]),
              # hospital-5 took no part in round 3 without being counted a dropout (it declined)
              report(3, NAMES[1:4], NAMES[:1])]
    plan = DropoutPlan.replay(rounds, NAMES)
    assert plan.silent == {2: frozenset({"hospital-1"}), 3: frozenset({"hospital-1", "hospital-5"})}
    assert plan.is_silent("hospital-5", 3) and not plan.is_silent("hospital-5", 2)
    assert not plan.is_silent("hospital-1", 4)  # a round the private run never reached: everyone takes part


def test_the_task_variant_scales_features_as_the_recipe_asks() -> None:
    assert healthcare.task_with(healthcare.FEATURE_TRANSFORM) is healthcare.task
    other = "linear" if healthcare.FEATURE_TRANSFORM == "log" else "log"
    variant = healthcare.task_with(other)
    assert variant.name == healthcare.task.name
    model, default = variant.build_model(), healthcare.task.build_model()
    assert model.state_dict().keys() == default.state_dict().keys()  # the same trained parameters
    assert model.scale.transform == other and default.scale.transform == healthcare.FEATURE_TRANSFORM
    x = torch.from_numpy(make_split(3).test.features[:4])
    assert not torch.allclose(model.scale(x), default.scale(x))
    with pytest.raises(ValueError, match="feature_transform"):
        healthcare.task_with("cubic")  # type: ignore[arg-type]


def test_tail_mean_averages_the_last_global_models() -> None:
    a, b = healthcare.build_model(), healthcare.build_model()
    with torch.no_grad():
        a.linear.weight.fill_(1.0)
        b.linear.weight.fill_(3.0)
        b.linear.bias.fill_(-2.0)
    served = tail_mean([a.state_dict(), b.state_dict()], healthcare.build_model())
    assert torch.equal(served.linear.weight, torch.full_like(a.linear.weight, 2.0))
    assert torch.equal(served.linear.bias, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="no global model"):
        tail_mean([], healthcare.build_model())


def filled(value: float) -> torch.nn.Module:
    model = healthcare.build_model()
    with torch.no_grad():
        model.linear.weight.fill_(value)
        model.linear.bias.fill_(-value)
    return model


def test_the_served_model_is_the_mean_of_the_last_k_released_models() -> None:
    served = ServedModel(3, healthcare.build_model)
    assert served.describe() == "no global model released"
    with pytest.raises(ValueError, match="no global model"):
        served.model()
    source = filled(1.0)
    served.add(1, source)
    with torch.no_grad():
        source.linear.weight.fill_(100.0)  # the served model keeps a copy, not the caller's model
    assert served.rounds == [1] and served.describe() == "global model of round 1"
    assert torch.equal(served.model().linear.weight, torch.full((1, 30), 1.0))
    for number, value in ((2, 2.0), (3, 3.0), (4, 7.0)):
        served.add(number, filled(value))
    # rounds 2-4 only: (2 + 3 + 7) / 3
    assert served.rounds == [2, 3, 4] and served.describe() == "mean of the global models of rounds 2–4"
    model = served.model()
    assert torch.allclose(model.linear.weight, torch.full((1, 30), 4.0))
    assert torch.allclose(model.linear.bias, torch.tensor([-4.0]))
    assert model is not served.model()  # a fresh model each time: a caller cannot change what is served


def test_average_last_zero_serves_the_last_model_and_a_negative_window_is_refused() -> None:
    served = ServedModel(0, healthcare.build_model)
    served.add(1, filled(1.0))
    served.add(2, filled(5.0))
    assert served.rounds == [2] and torch.equal(served.model().linear.weight, torch.full((1, 30), 5.0))
    with pytest.raises(ValueError, match="average_last must be 0 or more"):
        ServedModel(-1, healthcare.build_model)
    with pytest.raises(ValueError, match="recipe average_last is out of range"):
        Recipe(average_last=-1)
    assert Recipe(rounds=2).average_last == 5  # fewer rounds than the window: the mean of those there are


@pytest.mark.slow
def test_a_recipe_is_scored_by_the_real_federation() -> None:
    split = make_split(3, seed=1)
    score = score_recipe(split, Recipe(rounds=2), evaluation=split.validation, seed=2)
    result = score.result
    assert result.status == "completed" and len(result.rounds) == 2
    assert [r.participants for r in result.rounds] == [[h.name for h in split.hospitals]] * 2
    # the score is the served model's: with the recipe's window of 5, the mean of both rounds' models
    assert result.served is not None and result.served.rounds == [1, 2]
    assert (score.accuracy, score.auc, score.loss) == (result.served.accuracy, result.served.auc, result.served.loss)
    # each hospital's own DP-SGD spent its budget, within the recipe's target
    assert score.epsilon_max is not None and 0 < score.epsilon_max <= 3.0 + 1e-9
    assert 0.5 < score.auc <= 1.0
