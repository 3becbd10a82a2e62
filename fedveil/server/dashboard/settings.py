"""The run settings the browser sends, and the error every refused request raises."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fedveil.errors import FedveilError

DP_MODES = ("local", "central", "distributed", "none")


class DashboardError(FedveilError, ValueError):
    """A request the dashboard refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RunSettings:
    """What the browser's "start a run" form sends."""

    rounds: int = 10
    sites_per_round: int = 5
    dp: str = "local"
    epsilon_budget: float = 3.0

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], *, max_sites: int, max_rounds: int = 200) -> RunSettings:
        unknown = sorted(set(payload) - {"rounds", "sites_per_round", "dp", "epsilon_budget"})
        if unknown:
            raise DashboardError(f"unknown setting(s): {', '.join(unknown)}")
        defaults = cls()
        rounds = _int_field(payload, "rounds", defaults.rounds, 1, max_rounds)
        per_round = _int_field(payload, "sites_per_round", min(defaults.sites_per_round, max_sites), 2,
                               max_sites)
        dp = payload.get("dp", defaults.dp)
        if dp not in DP_MODES:
            raise DashboardError(f"dp: must be one of {', '.join(DP_MODES)} (got {dp!r})")
        budget_raw = payload.get("epsilon_budget", defaults.epsilon_budget)
        try:
            if isinstance(budget_raw, bool):
                raise ValueError
            budget = float(budget_raw)
        except (TypeError, ValueError, OverflowError):
            raise DashboardError(f"epsilon_budget: not a number (got {_shown(budget_raw)})") from None
        if not (math.isfinite(budget) and 0.05 <= budget <= 100):
            raise DashboardError(f"epsilon_budget: must be between 0.05 and 100 (got {_shown(budget_raw)})")
        return cls(rounds=rounds, sites_per_round=per_round, dp=str(dp), epsilon_budget=budget)


def _int_field(payload: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    raw = payload.get(name, default)
    if isinstance(raw, bool):
        raise DashboardError(f"{name}: not a whole number (got {raw!r})")
    try:
        value = int(raw)
        if isinstance(raw, float | str) and float(raw) != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise DashboardError(f"{name}: not a whole number (got {_shown(raw)})") from None
    if not low <= value <= high:
        raise DashboardError(f"{name}: must be between {low} and {high} (got {_shown(value)})")
    return value


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about hostile input."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

