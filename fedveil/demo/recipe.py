"""The demo's training recipe and each hospital's local DP-SGD trainer.

:class:`Recipe` holds every hyper-parameter of the healthcare federation. Its defaults were
chosen by cross-validation on the non-test patients only (:mod:`fedveil.demo.tuning`; the
search, its grid and its results are reproducible with ``python -m fedveil.demo.tuning``).

:class:`HospitalTrainer` is one hospital's side of a round: it loads the global weights,
trains ``local_epochs`` epochs of DP-SGD (Opacus, Poisson sampling, per-example clipping to
``clip_norm``, Gaussian noise) and returns its new weights. Each hospital keeps its own
accountant for the whole run and solves, once, for the noise multiplier that keeps its
patient-level ε at or below ``target_epsilon`` if it takes part in every planned round; a
hospital that drops out of some rounds spends less. Smaller hospitals have a larger sampling
rate, so they need more noise for the same ε.

:func:`simulate` is the plain in-process FedAvg loop used for tuning and for the federated
non-private baseline: the same trainers and server optimizer as the demo, with the weighted
mean computed in the clear instead of by secure aggregation (which yields the same sum, up to
its fixed-point encoding).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedveil.demo import healthcare
from fedveil.demo.data import DemoSplit, Site

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
    server_optimizer: ServerOptimizerName = "fedavg"
    server_lr: float = 1.0
    accountant: str = "rdp"
    feature_transform: healthcare.FeatureTransform = healthcare.FEATURE_TRANSFORM
    #: Serve the average of the last ``average_last`` global models (Polyak-Ruppert averaging on
    #: the server: post-processing of released models, so it costs no privacy); 0 = the last one.
    average_last: int = 0

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
            ("average_last", 0 <= self.average_last <= self.rounds, self.average_last),
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


@dataclass
class HospitalTrainer:
    """One hospital: its data, and (with DP) its :class:`fedveil.dp.local.LocalDPSession`.

    The session holds the hospital's one accountant for the whole run and solves, at the first
    round, for the noise multiplier that meets ``target_epsilon`` over ``rounds`` rounds.
    """

    name: str
    dataset: TensorDataset
    recipe: Recipe
    private: bool = True
    seed: int | None = None
    rounds_joined: int = field(init=False, default=0)
    session: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.dataset) < 1:
            raise ValueError(f"{self.name}: no training data")
        if self.private:
            from fedveil.dp.local import LocalDPConfig, LocalDPSession

            self.session = LocalDPSession(
                LocalDPConfig(
                    max_grad_norm=self.recipe.clip_norm,
                    target_epsilon=self.recipe.target_epsilon,
                    planned_rounds=self.recipe.rounds,
                    local_epochs=self.recipe.local_epochs,
                    delta=self.recipe.delta,
                    accountant=self.recipe.accountant,
                    seed=self.seed,
                    client_id=self.name,
                )
            )

    @property
    def size(self) -> int:
        return len(self.dataset)

    @property
    def noise_multiplier(self) -> float | None:
        return None if self.session is None else self.session.noise_multiplier

    def epsilon(self) -> float:
        """Patient-level ε spent so far (0 before the first round; ∞ without DP)."""
        if not self.private:
            return math.inf
        return 0.0 if self.rounds_joined == 0 else float(self.session.epsilon())

    def make_loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=min(self.recipe.batch_size, self.size), shuffle=True)

    def train(self, global_model: torch.nn.Module, generator_seed: int) -> tuple[dict[str, torch.Tensor], float]:
        """Train a copy of the global model locally; return its plain state dict and mean loss."""
        torch.manual_seed(generator_seed)
        model = copy.deepcopy(global_model)
        model.train()
        loader = self.make_loader()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.recipe.local_lr)
        if self.session is None:
            losses = [healthcare.train_epoch(model, loader, optimizer) for _ in range(self.recipe.local_epochs)]
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            dp_model, dp_opt, dp_loader = self.session.privatize(model, optimizer, loader)
            losses = [healthcare.train_epoch(dp_model, dp_loader, dp_opt) for _ in range(self.recipe.local_epochs)]
            state = self.session.finish_round(dp_model)
        self.rounds_joined += 1
        finite = [v for v in losses if not math.isnan(v)]
        return state, float(np.mean(finite)) if finite else float("nan")


def make_server_optimizer(recipe: Recipe) -> Any:
    from fedveil.server.optimizers import make_optimizer

    return make_optimizer(recipe.server_optimizer, lr=recipe.server_lr)


def simulate(
    split: DemoSplit,
    recipe: Recipe,
    *,
    seed: int = 0,
    private: bool = True,
    eval_site: Site | None = None,
    participation: Callable[[int], Sequence[int]] | None = None,
) -> tuple[torch.nn.Module, list[dict[str, float]], list[HospitalTrainer]]:
    """Plain in-process FedAvg/FedAdam over the split's hospitals (no secure aggregation).

    ``participation(round_index)`` returns the hospitals (indices) that take part in a round;
    all of them by default. Returns the final global model, per-round metrics on ``eval_site``
    (the validation set by default) and the trainers (for their ε).
    """
    from fedveil.server.optimizers import flatten_state, unflatten_state, weighted_mean

    torch.manual_seed(seed)
    evaluation = site_dataset(eval_site if eval_site is not None else split.validation)
    trainers = [
        HospitalTrainer(h.name, site_dataset(h), recipe, private=private, seed=seed * 7919 + i)
        for i, h in enumerate(split.hospitals)
    ]
    model = healthcare.RiskModel(recipe.feature_transform)
    server_opt = make_server_optimizer(recipe)
    history: list[dict[str, float]] = []
    averager = ModelAverager(recipe.average_last)
    for r in range(recipe.rounds):
        chosen = list(participation(r)) if participation is not None else list(range(len(trainers)))
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        g = flatten_state(global_state)
        updates, weights = [], []
        for i in chosen:
            state, _ = trainers[i].train(model, generator_seed=seed * 1_000_003 + r * 1009 + i)
            updates.append(flatten_state(state) - g)
            weights.append(float(trainers[i].size))
        if updates:
            new = server_opt.step(g, weighted_mean(updates, weights))
            model.load_state_dict(unflatten_state(new, global_state))
        averager.add(model)
        served = averager.model(model)
        metrics = healthcare.evaluate(served, evaluation)
        metrics["round"] = float(r + 1)
        history.append(metrics)
    return averager.model(model), history, trainers


class ModelAverager:
    """Keeps the last ``k`` global models and serves their average (k = 0: the latest model)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._window: list[dict[str, torch.Tensor]] = []

    def add(self, model: torch.nn.Module) -> None:
        if self.k <= 0:
            return
        self._window.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        del self._window[: -self.k]

    def model(self, latest: torch.nn.Module) -> torch.nn.Module:
        if self.k <= 0 or not self._window:
            return latest
        out = copy.deepcopy(latest)
        avg = {n: torch.stack([w[n] for w in self._window]).mean(dim=0) for n in self._window[0]}
        out.load_state_dict(avg)
        return out
