"""The user-level DP event of one round, from the cohort sampling that really happened.

Why: amplification by sampling (a site that is only sometimes in the cohort leaks less) is only as
true as its premises. DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018) states it for a cohort drawn at
random from a population whose other members *could* have been drawn. fedveil's coordinator draws a
fixed-size cohort of K sites uniformly without replacement among the N sites connected at that moment,
so the only sound population is N, the sites available at the draw — not the enrolled ones, which
could not have been picked while offline. With 10 enrolled, 4 online and K = 4, every online site is in
every round: q = 1, and no amplification exists.

The rules of :func:`user_level_event`:

- K ≥ N (the whole available set is taken): plain Gaussian, q = 1, add/remove relation.
- ``amplification=False``: q = 1 as well. Use it whenever the premises fail: which sites are online is
  rarely random (a site's uptime is not a coin flip), and whoever sees the participant lists (the
  server's operator, a dashboard, any cohort member, who learns its peers in secure aggregation) knows
  exactly who could have been affected, which is what sampling amplification assumes nobody knows.
- ``sampling="fixed"`` (what the coordinator does), amplification on, K < N: a
  :class:`~fedveil.dp.accounting.SampledWithoutReplacementGaussianEvent` (K of N). Its analysis holds
  under the replace-one relation only (Wang, Balle, Kasiviswanathan 2019), with the Gaussian's
  multiplier halved (sensitivity 2S); the ledger's whole user-level ε is then under replace-one.
- ``sampling="poisson"`` (each available site joins independently with probability q = K / N; for a
  coordinator that samples that way, which fedveil's does not), amplification on, K < N: a
  :class:`~fedveil.dp.accounting.SubsampledGaussianEvent` with that q (add/remove).

Pure: no I/O, no global state.
"""

from __future__ import annotations

from typing import Any, Final

from fedveil.dp.accounting import (
    ADD_REMOVE,
    DpEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
    _check_count,
    _check_noise,
)

#: ``"fixed"``: K of the N available, uniformly without replacement (fedveil's coordinator);
#: ``"poisson"``: each available site independently with probability K / N.
SAMPLING_KINDS: Final[tuple[str, ...]] = ("fixed", "poisson")


def user_level_event(
    noise_multiplier: float,
    cohort_size: int,
    available_at_draw: int,
    sampling: str = "fixed",
    amplification: bool = True,
) -> tuple[DpEvent, dict[str, Any]]:
    """The user-level event of ONE round of central DP (DP-FedAvg) and a JSON-ready dict for the ledger.

    ``noise_multiplier`` is z (noise std over the clip norm S); ``cohort_size`` is K, the cohort that was
    drawn (the expected size under Poisson sampling); ``available_at_draw`` is N, the number of sites
    that could have been drawn when the cohort was drawn (the connected ones). The details give
    ``sampling`` (``"none"``, ``"without_replacement"`` or ``"poisson"``), ``available`` (N), ``cohort``
    (K), ``sample_rate`` (the q accounted: 1 without amplification), ``relation``, ``amplification``
    (whether it is claimed) and ``amplification_reason`` (why or why not).
    """
    z = noise_multiplier
    _check_noise(z)
    _check_count(cohort_size, "cohort_size")
    _check_count(available_at_draw, "available_at_draw")
    if sampling not in SAMPLING_KINDS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_KINDS)} (got {sampling!r})")
    if not isinstance(amplification, bool):
        raise ValueError(f"amplification must be True or False (got {amplification!r})")
    k, n = cohort_size, available_at_draw
    details: dict[str, Any] = {"available": n, "cohort": k}
    if k >= n:
        reason = f"the cohort took all {n} sites available at the draw: nothing was sampled"
    elif not amplification:
        reason = (
            "not claimed: site availability is not assumed random and participant lists are not assumed "
            "secret, so every available site is accounted as if it took part"
        )
    else:
        reason = ""
    if reason:
        event: DpEvent = SubsampledGaussianEvent(1.0, float(z))
        details.update(sampling="none", sample_rate=1.0, relation=ADD_REMOVE, amplification=False,
                       amplification_reason=reason)
        return event, details
    if sampling == "fixed":
        wor = SampledWithoutReplacementGaussianEvent(n, k, float(z))
        details.update(
            sampling="without_replacement", sample_rate=wor.sample_rate, relation=wor.relation, amplification=True,
            amplification_reason=(
                f"{k} of the {n} sites available at the draw, uniformly without replacement; holds under the "
                "replace-one relation while the draw's randomness and the participant lists stay secret"
            ),
        )
        return wor, details
    q = k / n
    details.update(
        sampling="poisson", sample_rate=q, relation=ADD_REMOVE, amplification=True,
        amplification_reason=(
            f"each of the {n} sites available at the draw joined independently with probability {q:.6g}; holds "
            "while the draw's randomness and the participant lists stay secret"
        ),
    )
    return SubsampledGaussianEvent(q, float(z)), details
