"""RDP of the subsampled Gaussian mechanisms (Opacus analysis; Wang, Balle, Kasiviswanathan 2019
for sampling without replacement) and the RDP → (ε, δ) conversion. Pure module: no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fedveil.dp.events import (
    ADD_REMOVE,
    REPLACE_ONE,
    DpEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    check_delta,
)

# --------------------------------------------------------------------------------------------------
# RDP math (Opacus analysis) and conversion
# --------------------------------------------------------------------------------------------------


SUBSAMPLED_EXACT_MAX_NOISE = 100.0
"""Above this noise multiplier the subsampled RDP is bounded by the plain Gaussian's α / (2z²): Opacus's
series for fractional orders grows with z (tens of seconds at z = 1e6, a number any site can report),
and at such z both are negligible."""


def subsampled_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian mechanism at ``orders`` (Mironov, Talwar, Zhang
    2019), computed by Opacus's ``accountants.analysis.rdp``; above :data:`SUBSAMPLED_EXACT_MAX_NOISE` the
    plain Gaussian's α / (2z²), an upper bound (subsampling never increases RDP under add/remove)."""
    if noise_multiplier > SUBSAMPLED_EXACT_MAX_NOISE:
        grid = np.asarray(orders, dtype=np.float64)
        return grid / (2.0 * float(noise_multiplier) ** 2)
    from opacus.accountants.analysis import rdp as opacus_rdp

    return np.asarray(
        opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
        dtype=np.float64,
    )


def sampled_without_replacement_gaussian_rdp(
    population: int, sample_size: int, noise_multiplier: float, orders: np.ndarray
) -> np.ndarray:
    """RDP (replace-one) of ONE :class:`SampledWithoutReplacementGaussianEvent` at ``orders``.

    dp-accounting's bound (Wang, Balle, Kasiviswanathan 2019, Thm 27; non-integer orders interpolated by
    their Cor. 10), the function its ``RdpAccountant`` applies to ``SampledWithoutReplacementDpEvent``,
    evaluated at the replace-one multiplier z / 2 (sensitivity 2S, see the event's docstring), and capped
    order by order at the plain Gaussian's α / (2 (z/2)^2). The cap is itself a bound for the sampled
    mechanism (couple both inputs on the same cohort: each pair of outputs is a Gaussian pair at most 2S
    apart or identical, and exp((α−1) D_α) is jointly convex), so the pointwise minimum is one too.
    dp-accounting's bound alone exceeds it at small orders, and at all orders up to 5-10 when K is close
    to N (e.g. 4 of 5): without the cap, "amplification" would cost more than taking everyone.
    """
    grid = np.asarray(orders, dtype=np.float64)
    z = noise_multiplier / 2.0
    if z == 0.0:
        return np.full(grid.shape, np.inf)
    from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp

    # A module-level function of dp-accounting (not exported): tests pin it to the public RdpAccountant.
    values = dpa_rdp._compute_rdp_sample_wor_gaussian(sample_size / population, z, [float(a) for a in grid])
    return np.minimum(np.asarray(values, dtype=np.float64), grid / (2.0 * z * z))


def composed_relation(events: Iterable[DpEvent]) -> str:
    """The relation ``events`` compose under: replace-one as soon as one event needs it, else add/remove."""
    return REPLACE_ONE if any(e.relation == REPLACE_ONE for e in events) else ADD_REMOVE


def _describe(event: DpEvent) -> str:
    if isinstance(event, SubsampledGaussianEvent):
        return f"a Poisson-subsampled Gaussian event (q = {event.sample_rate:g})"
    if isinstance(event, SampledWithoutReplacementGaussianEvent):
        return f"a without-replacement Gaussian event ({event.sample_size} of {event.population})"
    return f"the RDP-curve event {event.mechanism!r}"


def check_relations(history: Sequence[DpEvent], event: DpEvent) -> None:
    """Raise :class:`UnsupportedEventError` unless ``event`` and ``history`` compose under one relation.

    Under replace-one, a plain Gaussian round (q = 1, sensitivity S under add/remove) is the Gaussian
    with sensitivity 2S, i.e. multiplier z / 2; a Poisson-subsampled event with q < 1 and an RDP curve
    are bounds for add/remove only, and fedveil does not convert them.
    """
    events = [*history, event]
    if composed_relation(events) == ADD_REMOVE:
        return
    for e in events:
        if e.relation == REPLACE_ONE or (isinstance(e, SubsampledGaussianEvent) and e.sample_rate == 1.0):
            continue
        raise UnsupportedEventError(
            f"cannot compose {_describe(e)} with sampling without replacement: a fixed-size cohort is accounted "
            "under the replace-one relation, and this event is analysed only under add/remove (only plain "
            "Gaussian rounds, q = 1, are re-expressed under replace-one, at noise multiplier z / 2)"
        )


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """Convert an RDP curve to (ε, δ)-DP: ε = min_α rdp(α) + log1p(−1/α) − (log δ + log α)/(α − 1).

    This is the improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Rényi
    DP", Thm 21) = Canonne, Kamath, Steinke 2020 (Prop 12), the one used by both Opacus and dp-accounting.
    Returns ``(epsilon, optimal_order)``.
    """
    check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if np.all(r == 0.0):
        return 0.0, float(a[0])
    with np.errstate(over="ignore", invalid="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
        # KL bound: delta >= sqrt(1 - exp(-rdp(1))) ≥ ... gives ε = 0 (as dp-accounting does).
        kl_zero = delta**2 + np.expm1(-r) > 0.0
    eps = np.where(kl_zero, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


