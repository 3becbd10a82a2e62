"""Injected dropouts for simulations and benchmarks: a site that leaves a round at its masked-input
stage, or declines it at its start.

Bonawitz et al.'s costliest dropout is the one at the masked-input stage: the site's keys and shares
are out, so the server must rebuild and remove every pairwise mask it shared with its surviving
neighbours. :class:`LeaveAtMaskedInput` wraps a site's transport and, in the rounds a
:class:`DropoutPlan` picks for that site, raises :class:`SimulatedDropout` instead of sending the
masked input. The site's loop catches it and moves on; the round iterator then tells the server the
site left (``RespondToRound`` with ``accept=false``), so the round does not wait for its deadline,
exactly as when a site's own training loop raises.

With ``stage="commit"`` the chosen sites instead decline the round up front (``RespondToRound``
with ``accept=false``): they never mask, and nothing needs removing.

Which sites drop is a keyed hash of (seed, round, site): independent of the backend, so the
in-process and Ray backends drop the same sites, and each site decides alone (no coordinator).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from fedveil.errors import FedveilError

DROPOUT_STAGES = ("commit", "masked-input")


class SimulatedDropout(FedveilError):
    """Raised by :class:`LeaveAtMaskedInput` in place of a masked-input upload (never by real code)."""


@dataclass(frozen=True)
class DropoutPlan:
    """Each site leaves each round at the masked-input stage with probability ``fraction``."""

    fraction: float
    seed: int = 0
    stage: str = "masked-input"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"dropout: must be in [0, 1) (got {self.fraction})")
        if self.stage not in DROPOUT_STAGES:
            raise ValueError(f"dropout stage: must be one of {', '.join(DROPOUT_STAGES)} (got {self.stage!r})")

    def drops(self, site: str, round_number: int) -> bool:
        if self.fraction == 0.0:
            return False
        digest = hashlib.sha256(b"fedveil-dropout" + struct.pack("<qq", self.seed, round_number)
                                + site.encode()).digest()
        return int.from_bytes(digest[:8], "little") < self.fraction * 2.0**64


class LeaveAtMaskedInput:
    """A transport that forwards every call, except the masked input of a round the plan drops (or,
    with ``stage="commit"``, that turns the site's acceptance of such a round into a decline)."""

    def __init__(self, inner: Any, site: str, plan: DropoutPlan) -> None:
        self._inner = inner
        self._site = site
        self._plan = plan
        self.dropped_rounds: list[int] = []

    def respond_to_round(self, request: Any) -> Any:
        number = int(request.header.round)
        if self._plan.stage == "commit" and request.accept and self._plan.drops(self._site, number):
            self.dropped_rounds.append(number)
            decline = type(request)(header=request.header, accept=False, decline_reason="injected dropout")
            return self._inner.respond_to_round(decline)
        return self._inner.respond_to_round(request)

    def submit_masked_input(self, request: Any) -> Any:
        number = int(request.header.round)
        if self._plan.stage == "masked-input" and self._plan.drops(self._site, number):
            self.dropped_rounds.append(number)
            raise SimulatedDropout(f"site {self._site} leaves round {number} at the masked-input stage")
        return self._inner.submit_masked_input(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
