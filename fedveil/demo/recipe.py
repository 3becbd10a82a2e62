"""The demo's training recipe: every hyper-parameter of the healthcare federation.

:class:`Recipe`'s defaults were chosen by cross-validation on the non-test patients only
(:mod:`fedveil.demo.tuning`; the search, its grid and its results are reproducible with
``python -m fedveil.demo.tuning``). Every run with a recipe is the real federation
(:func:`fedveil.demo.federation.run_federation`): each hospital's client trains
``local_epochs`` epochs of DP-SGD (Opacus, Poisson sampling, per-example clipping to
``clip_norm``, Gaussian noise) through :class:`fedveil.dp.local.LocalDPSession`, which keeps one
accountant for the whole run and solves, once, for the noise multiplier that keeps the hospital's
patient-level ε at or below ``target_epsilon`` if it takes part in every planned round (a hospital
that drops out of some rounds spends less; smaller hospitals have a larger sampling rate, so they
need more noise for the same ε).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch.utils.data import TensorDataset

from fedveil.demo import healthcare
from fedveil.demo.data import Site

ServerOptimizerName = Literal["fedavg", "fedadam"]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the healthcare federation (defaults: the tuned recipe)."""

    rounds: int = 30
    batch_size: int = 32
    local_epochs: int = 1
    local_lr: float = 2.0
    clip_norm: float = 1.0
    target_epsilon: float = 3.0
    delta: float = 1e-5
    #: FedAdam (Reddi et al. 2021) with η 0.1, chosen by tuning stage 8 on the validation folds: its
    #: worst runs were better than FedAvg's (docs/demo.md).
    server_optimizer: ServerOptimizerName = "fedadam"
    server_lr: float = 0.1
    accountant: str = "rdp"
    feature_transform: healthcare.FeatureTransform = healthcare.FEATURE_TRANSFORM
    #: Serve the mean of the last ``average_last`` released global models (Polyak-Ruppert averaging:
    #: post-processing, so it costs no privacy; fewer while fewer rounds are released); 0 serves the
    #: last one. Chosen by tuning stage 7 on the validation folds (:mod:`fedveil.demo.served_model`).
    average_last: int = 5

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, object]] = [
            ("rounds", self.rounds >= 1, self.rounds),
            ("batch_size", self.batch_size >= 1, self.batch_size),
            ("local_epochs", self.local_epochs >= 1, self.local_epochs),
            ("local_lr", math.isfinite(self.local_lr) and self.local_lr > 0, self.local_lr),
            ("clip_norm", math.isfinite(self.clip_norm) and self.clip_norm > 0, self.clip_norm),
            ("target_epsilon", self.target_epsilon > 0, self.target_epsilon),
            ("delta", 0 < self.delta < 1, self.delta),
            ("server_optimizer", self.server_optimizer in ("fedavg", "fedadam"), self.server_optimizer),
            ("server_lr", math.isfinite(self.server_lr) and self.server_lr > 0, self.server_lr),
            ("average_last", self.average_last >= 0, self.average_last),
        ]
        for name, ok, value in checks:
            if not ok:
                raise ValueError(f"recipe {name} is out of range (got {value!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps_per_epoch(self, n_examples: int) -> int:
        """Opacus's convention: ``ceil(n / batch)`` Poisson batches of rate ``1 / that`` per epoch."""
        return max(1, math.ceil(n_examples / self.batch_size))

    def sample_rate(self, n_examples: int) -> float:
        return 1.0 / self.steps_per_epoch(n_examples)

    def planned_steps(self, n_examples: int) -> int:
        return self.rounds * self.local_epochs * self.steps_per_epoch(n_examples)


def site_dataset(site: Site) -> TensorDataset:
    return TensorDataset(torch.from_numpy(site.features), torch.from_numpy(site.labels))
