"""Noise calibration: ε of a DP-SGD run, and the smallest noise multiplier that meets a target ε.

The front doors (``fedveil.compute_epsilon``, ``fedveil budget plan``, the demo's ε targets) ask the
accountants of :mod:`fedveil.dp.accounting` two questions: what ε does a noise multiplier z give for
``steps`` Poisson-subsampled Gaussian steps (Abadi et al. 2016), and which z gives a target ε. ε is
monotone decreasing in z, so a doubling bracket and bisection answer the second on the conservative
side (Opacus's ``get_noise_multiplier`` does the same). Pure module: no I/O, no global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedveil.dp.accounting import AccountingLimitError, make_accountant
from fedveil.dp.events import ACCOUNTANTS, SubsampledGaussianEvent, _check_sample_rate, _check_steps, check_delta


def compute_epsilon(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    check_delta(delta)
    acc = make_accountant(accountant)
    acc.compose(SubsampledGaussianEvent(sample_rate, noise_multiplier, steps))
    return acc.get_epsilon(delta)


@dataclass(frozen=True)
class NoiseSolution:
    """Result of :func:`solve_noise_multiplier`: ``epsilon`` ≤ ``target_epsilon`` and within the tolerance."""

    noise_multiplier: float
    epsilon: float
    target_epsilon: float
    evaluations: int


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rel_tolerance: float = 0.005,
    max_noise_multiplier: float = 1e4,
) -> NoiseSolution:
    """Smallest-found noise multiplier z with target·(1 − rel_tolerance) ≤ ε(z) ≤ target.

    ε is decreasing in z, so a doubling bracket followed by bisection finds it; the returned z always
    meets the target (conservative side). Raises :class:`AccountingLimitError` if the target is
    unreachable (e.g. the PRV accountant's ε has an ``eps_error`` floor).
    """
    if not isinstance(target_epsilon, (int, float)) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0 (got {target_epsilon!r})")
    check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
    if not 0.0 < rel_tolerance < 1.0:
        raise ValueError(f"rel_tolerance must be in (0, 1) (got {rel_tolerance!r})")

    evaluations = 0

    def eps_of(z: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return compute_epsilon(
            sample_rate=sample_rate, noise_multiplier=z, steps=steps, delta=delta, accountant=accountant
        )

    lo = 0.0  # ε(0) = ∞ > target
    hi = 1.0
    eps_hi = eps_of(hi)
    while eps_hi > target_epsilon:
        lo = hi
        hi *= 2.0
        if hi > max_noise_multiplier:
            raise AccountingLimitError(
                f"target_epsilon {target_epsilon} is unreachable with the {accountant} accountant: even "
                f"noise_multiplier={lo:g} gives epsilon={eps_hi:.6g}"
            )
        eps_hi = eps_of(hi)
    floor = target_epsilon * (1.0 - rel_tolerance)
    for _ in range(200):
        if eps_hi >= floor or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        eps_mid = eps_of(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return NoiseSolution(
        noise_multiplier=hi, epsilon=eps_hi, target_epsilon=float(target_epsilon), evaluations=evaluations
    )
