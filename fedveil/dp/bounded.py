"""ε computations with a bound on the work: for views of ledgers whose entries may be hostile.

A site's sample-level entries in a ledger come from parameters the site reported. The PLD and PRV
accountants compose numerically, and their cost grows with the composed privacy loss: a claimed
``steps = 1e8`` at sample rate 0.5 kept a run view computing for minutes (and gigabytes), and the
per-round history of a long run costs one numerical composition per round and party. The RDP
accountant's cost does not depend on ``steps`` (RDP is linear in it), and its ε is a valid upper
bound too, only looser (Mironov 2017; Balle et al. 2020 for the conversion).

So :func:`bounded_epsilon` runs the ledger's own accountant only when its estimated work fits a
:class:`WorkBound`, and otherwise returns the RDP bound, saying so (the accountant used is part of
the answer). Estimates, for PLD (Google's ``dp_accounting``, Doroshenko et al. 2022): the one-step
grids (:meth:`~fedveil.dp.accounting.PLDAccountant.base_grid_points`, summed over the mechanisms
composed), and the composed privacy loss,
whose support reaches about ε at a tiny δ, which the RDP ε bounds: grid ≈ 2·ε_RDP / interval; for
both PLD and PRV, the number of distinct mechanisms and of composed steps, and the number of
numerical evaluations per view. The bound object is the caller's (this module holds no state): it also memoizes ε by
(accountant, δ, events), so a caller that keeps it across ledger versions computes only what is new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedveil.dp.accounting import (
    DpEvent,
    PLDAccountant,
    PrivacyAccountant,
    RDPAccountant,
    SubsampledGaussianEvent,
)


@dataclass
class WorkBound:
    """Limits on numerical ε computations, the work counted against them, and a memo.

    Call :meth:`start` before each view so its counters (not its memo) begin at zero."""

    max_numeric_steps: int = 1_000_000
    """Composed steps above which PLD/PRV are not run (1e6 steps at q = 0.01, z = 1 take ~2 s)."""
    max_grid_points: float = 5e6
    """Estimated PLD grid above which PLD is not run (matches ``PLDAccountant.max_grid_points``)."""
    max_numeric_evaluations: int = 256
    """Numerical evaluations per view; the rest of the view uses RDP."""
    max_numeric_events: int = 64
    """Distinct mechanisms in one composition (each costs PLD/PRV its own discretization)."""
    max_memo_entries: int = 50_000
    numeric_evaluations: int = 0
    fallbacks: int = 0
    memo: dict[tuple[object, ...], tuple[float, str]] = field(default_factory=dict, repr=False)
    _rdp: RDPAccountant = field(default_factory=RDPAccountant, repr=False)

    def start(self) -> None:
        self.numeric_evaluations = 0
        self.fallbacks = 0
        if len(self.memo) > self.max_memo_entries:
            self.memo.clear()

    def rdp_epsilon(self, events: Sequence[DpEvent], delta: float, rdp: RDPAccountant | None = None) -> float:
        """ε of ``events`` under RDP, sharing the curve cache of ``rdp`` (else the one kept in this bound)."""
        acc = (rdp if rdp is not None else self._rdp).fresh()
        for e in events:
            acc.compose(e)
        return acc.get_epsilon(delta)


def merged(events: Sequence[DpEvent]) -> tuple[DpEvent, ...]:
    """``events`` with consecutive runs of the same mechanism merged (steps added), as accountants
    keep their history: the same composition, and a short memo key for a site with fixed (q, z)."""
    out: list[DpEvent] = []
    for e in events:
        if out and out[-1].same_mechanism(e):
            out[-1] = out[-1].with_steps(out[-1].steps + e.steps)
        else:
            out.append(e)
    return tuple(out)


def bounded_epsilon(
    prototype: PrivacyAccountant, events: Sequence[DpEvent], delta: float, bound: WorkBound
) -> tuple[float, str]:
    """ε of composing ``events`` with ``prototype``'s kind of accountant when its work fits ``bound``,
    else the RDP accountant's ε. Returns ``(epsilon, name of the accountant used)``."""
    history = merged(events)
    settings = sorted((k, repr(v)) for k, v in prototype.state_dict().items() if k != "history")
    key = (tuple(settings), delta, history)
    hit = bound.memo.get(key)
    if hit is not None:
        return hit
    rdp = bound.rdp_epsilon(history, delta, prototype if isinstance(prototype, RDPAccountant) else None)
    result = (rdp, "rdp")
    if prototype.name != "rdp" and math.isfinite(rdp) and _fits(prototype, history, rdp, bound):
        acc = prototype.fresh()
        bound.numeric_evaluations += 1
        try:
            for e in history:
                acc.compose(e)
            result = (acc.get_epsilon(delta), prototype.name)
        except (ValueError, ArithmeticError, MemoryError):
            result = (rdp, "rdp")
    if result[1] != prototype.name:
        bound.fallbacks += 1
    bound.memo[key] = result
    return result


def _fits(prototype: PrivacyAccountant, history: Sequence[DpEvent], rdp_epsilon: float, bound: WorkBound) -> bool:
    if bound.numeric_evaluations >= bound.max_numeric_evaluations:
        return False
    if len(history) > bound.max_numeric_events or sum(e.steps for e in history) > bound.max_numeric_steps:
        return False
    if isinstance(prototype, PLDAccountant):
        gaussians = [e for e in history if isinstance(e, SubsampledGaussianEvent)]
        if any(e.noise_multiplier == 0.0 for e in gaussians):
            return False
        base = sum(prototype.base_grid_points(e.noise_multiplier) for e in gaussians)
        composed = 2.0 * rdp_epsilon / prototype.value_discretization_interval
        if max(base, composed) > bound.max_grid_points:
            return False
    return True
