"""The model the demo serves: the mean of the last few released global models.

With DP-SGD noise in every update, the global model of the last round wanders around the optimum:
one run of the demo read 0.947 test accuracy at round 24 and 0.894 at round 30. Averaging the last
``k`` released models (Polyak and Juditsky 1992; De et al. 2022 serve an average of DP-SGD's
parameters) steadies it. The average is post-processing of models the federation already released,
so it costs no privacy. The recipe's ``average_last`` sets ``k``; tuning stage 7
(:mod:`fedveil.demo.tuning`) chose 5 on the validation folds only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn


def tail_mean(states: Sequence[Mapping[str, torch.Tensor]], model: nn.Module) -> nn.Module:
    """``model`` loaded with the element-wise mean of ``states`` (global models' state dicts)."""
    if not states:
        raise ValueError("tail_mean: no global model to average")
    model.load_state_dict({n: torch.stack([s[n] for s in states]).mean(dim=0) for n in states[0]})
    return model


class ServedModel:
    """Keeps the last ``average_last`` released global models and serves their mean.

    ``average_last = 0`` serves the last released model as it is. Before ``average_last`` rounds
    have been released, the mean runs over those there are.
    """

    def __init__(self, average_last: int, build_model: Callable[[], nn.Module]) -> None:
        if average_last < 0:
            raise ValueError(f"average_last must be 0 or more (got {average_last})")
        self.average_last = average_last
        self._build_model = build_model
        self._window: collections.deque[tuple[int, dict[str, torch.Tensor]]] = collections.deque(
            maxlen=max(1, average_last))

    def add(self, round_number: int, model: nn.Module) -> None:
        """Record the global model released by round ``round_number`` (a copy is kept)."""
        self._window.append((round_number, {n: v.detach().clone() for n, v in model.state_dict().items()}))

    @property
    def rounds(self) -> list[int]:
        """The rounds whose models the served model averages (oldest first)."""
        return [number for number, _ in self._window]

    def model(self) -> nn.Module:
        """A fresh model holding the mean of the kept global models."""
        return tail_mean([state for _, state in self._window], self._build_model())

    def describe(self) -> str:
        """How the served model was made, for reports ("the served model is the …"): "mean of the global
        models of rounds 26–30", or "global model of round 1" while one round is released."""
        rounds = self.rounds
        if not rounds:
            return "no global model released"
        if len(rounds) == 1:
            return f"global model of round {rounds[0]}"
        return f"mean of the global models of rounds {rounds[0]}–{rounds[-1]}"
