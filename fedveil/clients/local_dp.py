"""The client's local (sample-level) DP-SGD across rounds, configured by the server's round.

One :class:`LocalDpClient` per client process holds one :class:`fedveil.dp.local.LocalDPSession`,
hence one accountant for the client's whole participation: the client, not the server, knows
how much privacy its own records have spent, and reports it (``LocalPrivacySpend``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedveil.dp.local import LocalDPConfig, LocalDPSession
from fedveil.protocol import fedveil_pb2 as pb


def local_dp_config(params: pb.LocalDpParams, *, seed: int | None = None, local_epochs: int = 1) -> LocalDPConfig:
    """The DP-SGD configuration a round's ``LocalDpParams`` describe (target ε when it is set)."""
    target = float(params.target_epsilon)
    return LocalDPConfig(
        max_grad_norm=float(params.max_grad_norm),
        noise_multiplier=None if target > 0 else float(params.noise_multiplier),
        target_epsilon=target if target > 0 else None,
        planned_rounds=int(params.planned_rounds) if target > 0 else None,
        local_epochs=max(int(local_epochs), 1),
        delta=float(params.delta) if params.delta > 0 else 1e-5,
        max_physical_batch_size=int(params.max_physical_batch_size) or None,
        seed=seed,
    )


class LocalDpClient:
    """Privatize the user's objects each round and keep the client's own accountant."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self.session: LocalDPSession | None = None
        self._wrapped: nn.Module | None = None
        self._last_steps = 0

    def privatize(
        self, params: pb.LocalDpParams, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
        local_epochs: int = 1,
    ) -> tuple[Any, Any, Any]:
        if self.session is None:
            self.session = LocalDPSession(local_dp_config(params, seed=self._seed, local_epochs=local_epochs))
        wrapped = self.session.privatize(model, optimizer, loader)
        self._wrapped = wrapped[0]
        return wrapped

    @property
    def active(self) -> bool:
        return self._wrapped is not None

    def finish_round(self) -> dict[str, torch.Tensor]:
        """Account the round and return the trained model's plain state dict."""
        if self.session is None or self._wrapped is None:
            raise RuntimeError("finish_round() without privatize()")
        state = self.session.finish_round(self._wrapped)
        event = self.session.last_round_event
        self._last_steps = int(event.steps) if event is not None else 0
        self._wrapped = None
        return state

    @property
    def last_event(self) -> Any:
        """The DP-SGD event of the round just finished (its sampling rate, noise and steps)."""
        return self.session.last_round_event if self.session is not None else None

    def spend(self) -> pb.LocalPrivacySpend | None:
        if self.session is None or self.session.rounds_completed == 0:
            return None
        cfg = self.session.config
        return pb.LocalPrivacySpend(
            epsilon=float(self.session.epsilon()),
            delta=float(cfg.delta),
            noise_multiplier=float(self.session.noise_multiplier or 0.0),
            sample_rate=float(self.session.sample_rate or 0.0),
            steps=self._last_steps,
            accountant=cfg.accountant,
        )
