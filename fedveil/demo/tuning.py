"""Honest tuning of the demo's recipe: cross-validation on the non-test patients only.

Each candidate recipe is run with local DP-SGD at the target ε on every fold of
:func:`fedveil.demo.data.make_split` (fold k held out as validation, the other folds spread
across the hospitals) and scored by the mean validation loss (binary cross-entropy; accuracy
and ROC AUC are reported too but saturate on 91 patients). The test set is never loaded here.
Each run is the real federation (:func:`fedveil.demo.split_runs.score_recipe`: the job runner,
secure aggregation and each hospital's client, in process, no dropouts), so a stage takes
longer than the plain in-memory FedAvg loop the search first ran with; the results of stages
1-6 in ``docs/demo.md`` were measured with that loop (the same DP-SGD and server optimizer, the
weighted mean in the clear); stage 7 ran through the real federation.

Run ``python -m fedveil.demo.tuning --stage N [--base JSON] [--seeds S]``; each stage prints a
table and writes ``tuning-stage-N.json``. Candidates are overrides of :class:`Recipe`'s current
defaults (which are the result), so to reproduce the search as it ran pass the defaults of the
time with ``--base`` (stages 1-6 ran before the recipe served the mean of the last 5 global
models, so add ``"average_last": 0`` to their bases):

1. ``--base '{"rounds": 20, "feature_transform": "linear"}'``: learning rate × batch × clip norm;
2. ``--base '{"rounds": 20, "feature_transform": "linear", "local_lr": 2.0, "batch_size": 32,
   "clip_norm": 1.0}'``: one change at a time around the best of stage 1 (larger step or
   batch, clip norm, rounds and local epochs, log-scaled features, FedAdam);
3. same base: serve the mean of the last k global models (k = 0, 5, 10);
4. same base, ``--seeds 3``: the closest candidates again, three seeds per fold;
5. same base, ``--seeds 3``: the two best of stage 4 combined (30 rounds + log features), and
   40 rounds.

Stages 1-5 ran on split seed 0 (``--split-seed 0``). When the demo moved to split seed 1 (see
:data:`fedveil.demo.data.DEMO_SPLIT_SEED`), the finalists were re-selected on seed 1's non-test
patients, because seed 0's tuning pool overlaps seed 1's test set:

6. same base, ``--seeds 3``: every candidate of stages 4 and 5, on the default split seed.
7. no base (the chosen recipe), ``--seeds 3``: serve the mean of the last k global models
   (k = 0, 3, 5, 10). Once DP noise came from OS entropy on every run (issue 9), the demo's
   result varies from run to run; tail averaging is free post-processing that may steady it.
   k = 5 won (``docs/demo.md``) and is now the recipe's ``average_last``.
8. no base (the chosen recipe), ``--seeds 3``: the recipe itself as the stage's control, and the
   single changes that stages 2 and 6 found helpful on linear features but never tried with log
   features and tail averaging (40 rounds, clip norm 0.5, FedAdam, batch 64). Decided before it
   ran: a candidate replaces the recipe only if its mean validation loss is at least 0.01 below the
   control's and its worst run's accuracy and ROC AUC are no lower. Clip norm 0.5 and FedAdam (η 0.1)
   passed; FedAdam, with the lower loss and the better worst runs, is now the recipe (``docs/demo.md``),
   so to rerun the stage as it ran pass ``--base '{"server_optimizer": "fedavg", "server_lr": 1.0}'``.
9. no base, ``--seeds 3``: the recipe (RDP) as control, and the same recipe accounted with PLD.
   Once the sites accounted DP-SGD with the job's accountant (``dp.local.accountant``), PLD gives
   each hospital the same ε = 3 with about 7% less noise. Unlike a hyper-parameter it costs nothing
   and is not picked from many, so the rule, decided before it ran, has no margin: PLD replaces RDP
   if its mean validation loss is no higher than the control's and its worst run's accuracy and
   ROC AUC are no lower. It was not: loss 0.1245 against 0.1249 and worst accuracy 0.923 against
   0.912, but worst ROC AUC 0.975 against 0.978, so the recipe stays on RDP (``docs/demo.md``).
10. no base, ``--seeds 3``: the recipe (FedAdam) as control, and the two changes that passed or nearly
    passed stage 8's rule beside FedAdam but never ran with it: clip norm 0.5, batch 64, and both.
    Single demo runs still miss issue 5's target about one time in four. Decided before it ran, as
    in stage 8: a candidate replaces the recipe only if its mean validation loss is at least 0.01
    below the control's and its worst run's accuracy and ROC AUC are no lower; of several that pass,
    the one with the lowest loss. None passed: both together scored 0.1171 against the control's
    0.1193, with a better worst accuracy (0.934 against 0.923) but a lower worst ROC AUC (0.972 against
    0.974); each alone scored worse than the control. The recipe is unchanged (``docs/demo.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.demo.data import DEMO_SPLIT_SEED, N_FOLDS, make_split
from fedveil.demo.recipe import Recipe
from fedveil.demo.split_runs import score_recipe

STAGES: dict[int, list[dict[str, Any]]] = {
    1: [
        {"local_lr": lr, "batch_size": b, "clip_norm": c}
        for lr in (0.5, 1.0, 2.0)
        for b in (16, 32)
        for c in (0.5, 1.0)
    ],
    2: [
        {"local_lr": 4.0},
        {"batch_size": 64},
        {"clip_norm": 2.0},
        {"rounds": 30},
        {"rounds": 10, "local_epochs": 2},
        {"feature_transform": "log"},
        {"server_optimizer": "fedadam", "server_lr": 0.1},
    ],
    3: [{"average_last": 0}, {"average_last": 5}, {"average_last": 10}],
    4: [
        {},
        {"feature_transform": "log"},
        {"rounds": 30},
        {"server_optimizer": "fedadam", "server_lr": 0.1},
        {"clip_norm": 0.5},
    ],
    5: [{"rounds": 30, "feature_transform": "log"}, {"rounds": 40}],
}
#: Stage 6: the finalists of stages 4 and 5 together, for re-selection on another split.
STAGES[6] = [*STAGES[4], *STAGES[5]]
STAGES[7] = [{"average_last": k} for k in (0, 3, 5, 10)]
#: Stage 8: the recipe as control, and one change at a time that never ran with log features.
STAGES[8] = [
    {},
    {"rounds": 40},
    {"clip_norm": 0.5},
    {"server_optimizer": "fedadam", "server_lr": 0.1},
    {"batch_size": 64},
]
#: Stage 9: the recipe's accountant, RDP (control) against PLD, the hospitals' DP-SGD included.
STAGES[9] = [{}, {"accountant": "pld"}]
#: Stage 10: the FedAdam recipe as control, with stage 8's other near-winners on top of it.
STAGES[10] = [{}, {"clip_norm": 0.5}, {"batch_size": 64}, {"clip_norm": 0.5, "batch_size": 64}]


def cross_validate(
    recipe: Recipe, hospitals: int = 5, seeds: Sequence[int] = (0,), split_seed: int = DEMO_SPLIT_SEED
) -> dict[str, float]:
    """Mean validation metrics over all folds (and seeds), plus the worst hospital ε seen."""
    losses, accs, aucs, eps = [], [], [], []
    for fold in range(N_FOLDS):
        split = make_split(hospitals, seed=split_seed, fold=fold)
        for seed in seeds:
            score = score_recipe(split, recipe, evaluation=split.validation, seed=seed)
            losses.append(score.loss)
            accs.append(score.accuracy)
            aucs.append(score.auc)
            eps.append(score.epsilon_max if score.epsilon_max is not None else float("nan"))
    return {
        "val_loss": float(np.mean(losses)),
        "val_accuracy": float(np.mean(accs)),
        "val_accuracy_min": float(np.min(accs)),
        "val_auc": float(np.mean(aucs)),
        "val_auc_min": float(np.min(aucs)),
        "epsilon_max": float(np.max(eps)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    parser.add_argument("--base", type=str, default="{}", help="JSON recipe overrides every candidate starts from")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--split-seed", type=int, default=DEMO_SPLIT_SEED, help="split whose non-test folds are used")
    parser.add_argument("--only", type=str, default=None, help="comma-separated candidate indices of the stage to run")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    base = json.loads(args.base)
    rows: list[dict[str, Any]] = []
    candidates = STAGES[args.stage]
    if args.only is not None:
        candidates = [candidates[int(i)] for i in args.only.split(",")]
    for overrides in candidates:
        recipe = dataclasses.replace(Recipe(), **{**base, **overrides})
        start = time.time()
        scores = cross_validate(recipe, seeds=tuple(range(args.seeds)), split_seed=args.split_seed)
        row = {"overrides": {**base, **overrides}, **scores, "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: float(r["val_loss"]))  # type: ignore[arg-type]
    print("best:", json.dumps(rows[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tuning-stage-{args.stage}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
