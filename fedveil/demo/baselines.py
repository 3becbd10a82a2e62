"""Comparison baselines for the demo, on exactly the same split as the private federation.

(a) **Centralized, non-private**: all hospitals' patients pooled in one place (what the
federation exists to avoid), the same model fitted to convergence by L-BFGS with an L2 penalty
chosen on the validation set. It is the ceiling the private federation is measured against.

(b) **Federated, non-private**: the same federation (hospitals, rounds, local optimizer, server
optimizer, seed, and the same hospitals dropping out in the same rounds) without DP-SGD noise or
clipping, run as the private one is: the job runner, the coordinator, secure aggregation (in
process) and each hospital's real client. The gap between (b) and the private run is the price of
privacy alone, and the gap between (a) and (b) the price of keeping the data apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedveil.demo import healthcare
from fedveil.demo.data import DemoSplit
from fedveil.demo.federation import DropoutPlan, FederationResult
from fedveil.demo.recipe import Recipe, site_dataset
from fedveil.demo.split_runs import score_recipe

L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
#: Seconds a stage of the non-private baseline waits for a silent hospital. Without DP-SGD an
#: in-process round's stages take well under 0.1 s, so 1 s keeps the replayed dropouts from
#: costing the demo the private run's 3 s each.
BASELINE_STAGE_TIMEOUT = 1.0


@dataclass(frozen=True)
class BaselineResult:
    name: str
    accuracy: float
    auc: float
    loss: float
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "accuracy": self.accuracy, "auc": self.auc, "loss": self.loss, "detail": self.detail}


def fit_centralized(features: torch.Tensor, labels: torch.Tensor, l2: float, transform: str) -> nn.Module:
    """Full-batch L-BFGS on mean cross-entropy + (l2 / 2)·‖w‖² (bias not penalised)."""
    model = healthcare.RiskModel(transform)  # type: ignore[arg-type]
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )
    loss_fn = nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(features), labels) + 0.5 * l2 * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    return model


def centralized(split: DemoSplit, recipe: Recipe) -> tuple[BaselineResult, nn.Module]:
    """Baseline (a): pooled data, non-private; L2 strength picked by validation loss."""
    torch.manual_seed(0)
    x, y = split.pooled_train
    features, labels = torch.from_numpy(x), torch.from_numpy(y)
    validation = site_dataset(split.validation)
    best: tuple[float, float, nn.Module] | None = None
    for l2 in L2_GRID:
        model = fit_centralized(features, labels, l2, recipe.feature_transform)
        val_loss = healthcare.evaluate(model, validation)["loss"]
        if best is None or val_loss < best[0]:
            best = (val_loss, l2, model)
    assert best is not None
    _, l2, model = best
    m = healthcare.evaluate(model, site_dataset(split.test))
    detail = f"all {len(y)} training patients pooled; L-BFGS, L2 = {l2:g} (chosen on validation)"
    return BaselineResult("centralized, non-private", m["accuracy"], m["auc"], m["loss"], detail), model


def federated_non_private(
    split: DemoSplit,
    recipe: Recipe,
    *,
    seed: int,
    dropout_plan: DropoutPlan | None = None,
    site_files: Mapping[str, Path] | None = None,
) -> tuple[BaselineResult, FederationResult]:
    """Baseline (b): the same federation and dropouts without DP, through the same job runner and
    secure aggregation as the private run (in process); scored on the test set."""
    score = score_recipe(split, recipe, evaluation=split.test, seed=seed, dp="none", dropout_plan=dropout_plan,
                         site_files=site_files, stage_timeout=BASELINE_STAGE_TIMEOUT)
    result = score.result
    dropouts = sum(len(r.dropped) for r in result.rounds)
    detail = (f"{len(split.hospitals)} hospitals, {len(result.rounds)} rounds, {recipe.server_optimizer}, no DP, "
              f"secure aggregation, {dropouts} dropouts")
    return BaselineResult("federated, non-private", score.accuracy, score.auc, score.loss, detail), result
