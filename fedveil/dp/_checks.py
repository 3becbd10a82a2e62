"""Argument checks shared by the DP modules: errors name the parameter and the value at fault."""

from __future__ import annotations

import math
from typing import Any


def positive(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is finite and > 0."""
    return _finite(name, value, "positive", strictly=True)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is finite and >= 0."""
    return _finite(name, value, "non-negative", strictly=False)


def _finite(name: str, value: Any, kind: str, *, strictly: bool) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a {kind} number (got {value!r})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a {kind} number (got {value!r})") from None
    if not math.isfinite(number) or number < 0.0 or (strictly and number == 0.0):
        raise ValueError(f"{name} must be a {kind} finite number (got {value!r})")
    return number
