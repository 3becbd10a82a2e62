"""The real federation on one :class:`~fedveil.demo.data.DemoSplit`, for baselines, tuning and benchmarks.

Every federation the demo reports runs through :func:`fedveil.demo.federation.run_federation`: the
job runner, the coordinator, secure aggregation and each hospital's real client. This module gives
the callers that only need a split's figures (the federated non-private baseline, the recipe's
cross-validation in :mod:`fedveil.demo.tuning`, ``benchmarks/demo_utility.py``) one call for it:
:func:`score_recipe` writes each hospital's share into its own data directory under a throwaway
folder (unless the caller already has the files), runs the job in process and scores the served
model on the evaluation patients it is given.

The score is the served model's: the mean of the last ``recipe.average_last`` global models
(:mod:`fedveil.demo.served_model`; post-processing of released models, so it costs no privacy).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedveil.demo import healthcare
from fedveil.demo.data import DemoSplit, Site
from fedveil.demo.federation import DpMode, DropoutPlan, FederationResult, FederationSettings, run_federation
from fedveil.demo.recipe import Recipe, site_dataset

DEMO_SHARE = "demo-share.csv"


def hospital_dir(out: Path, hospital: str) -> Path:
    return out / "hospitals" / hospital


def write_hospital_shares(split: DemoSplit, out: Path) -> dict[str, Path]:
    """Each hospital's demo share in its own data directory; returns hospital → file."""
    files: dict[str, Path] = {}
    for site in split.hospitals:
        d = hospital_dir(out, site.name)
        d.mkdir(parents=True, exist_ok=True)
        path = d / DEMO_SHARE
        path.write_text(healthcare.SCHEMA.to_csv(site.features, site.labels))
        files[site.name] = path
    return files


@dataclass(frozen=True)
class RecipeScore:
    """One federation on a split: the served model's metrics on the evaluation patients."""

    accuracy: float
    auc: float
    loss: float
    #: the largest patient-level ε any hospital spent (None without local DP)
    epsilon_max: float | None
    result: FederationResult


def split_settings(split: DemoSplit, recipe: Recipe, *, dp: DpMode, seed: int) -> FederationSettings:
    """What the demo runs on a split: every hospital in every round, the recipe's rounds and ε, in process."""
    return FederationSettings(rounds=recipe.rounds, hospitals_per_round=len(split.hospitals), dp=dp,
                              epsilon_budget=recipe.target_epsilon, transport="in-process", seed=seed)


def score_recipe(
    split: DemoSplit,
    recipe: Recipe,
    *,
    evaluation: Site,
    seed: int,
    dp: DpMode = "local",
    dropout_plan: DropoutPlan | None = None,
    site_files: Mapping[str, Path] | None = None,
    stage_timeout: float | None = None,
) -> RecipeScore:
    """Run the federation on ``split`` with ``recipe`` and score the served model on ``evaluation``.

    ``stage_timeout`` (seconds; the demo's default when None) is how long a round's stage waits for
    a silent hospital of ``dropout_plan`` before it goes on without it.
    """
    settings = split_settings(split, recipe, dp=dp, seed=seed)
    if stage_timeout is not None:
        settings = dataclasses.replace(settings, stage_timeout=stage_timeout)
    evaluation_set = site_dataset(evaluation)
    with tempfile.TemporaryDirectory(prefix="fedveil-split-run-") as tmp:
        folder = Path(tmp)
        files = dict(site_files) if site_files is not None else write_hospital_shares(split, folder)
        result = run_federation(store_path=folder / "run.sqlite", site_files=files, test=evaluation_set,
                                settings=settings, recipe=recipe, dropout_plan=dropout_plan)
    if result.status != "completed" or result.served is None:  # a partial run would skew the comparison
        raise RuntimeError(f"the federation did not complete ({result.status}): {result.message}"
                           + "".join(f"; {name}: {err}" for name, err in sorted(result.client_errors.items())))
    served = result.served
    spent = [float(h["epsilon"]) for h in result.hospitals.values() if h.get("epsilon") is not None]
    return RecipeScore(served.accuracy, served.auc, served.loss, max(spent) if spent else None, result)
