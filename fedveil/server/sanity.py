"""Bounded influence: the decoded aggregate must be one that honest sites could have produced.

Secure aggregation hides each input, so the server cannot check one site's update; a malicious
site can send any ring vector. What the server can check is the *sum*: every honest site's
encoded update lies in a known set (each coordinate within the fixed-point clip, or the L2 ball
of radius S under user-level DP, its weight within [1, max_weight] as it declared in the clear),
so the sum of the survivors' inputs lies in that set scaled by their number (or total weight).
A sum outside it proves that some input was not an honest one: the round is rejected — not
applied, recorded with the reason — and the job goes on with the next round (no retry, which a
malicious site could otherwise trigger forever).

What a malicious site can still do inside the bounds: push the sum anywhere within them, e.g.
an update of norm S in an adversarial direction, or a coordinate at ±clip with its full declared
weight. Verifiable norm bounds inside secure aggregation (input-validation proofs) are out of
scope (docs/threat-model.md).
"""

from __future__ import annotations

import math

import numpy as np

from fedveil.errors import FedveilError

#: Gaussian-norm tail parameter for distributed DP: ||N(0, σ² I_d)|| ≤ σ(√d + t) except with
#: probability e^{-t²/2}; t = 8 gives ~1e-14.
NOISE_TAIL = 8.0


class AggregateRejected(FedveilError, ValueError):
    """The decoded sum is outside what honest sites can produce; the message says how."""


def check_coordinates(mean: np.ndarray, clip: float, *, slack: float) -> None:
    """A (weighted) mean of inputs clipped to [-clip, clip] per coordinate stays in that box."""
    worst = float(np.max(np.abs(mean))) if mean.size else 0.0
    if not math.isfinite(worst) or worst > clip + slack:
        raise AggregateRejected(f"a coordinate of the mean update is {worst:.4g}, outside the clip range "
                                f"±{clip:g} every honest input respects")


def check_weight(decoded: float, declared: float, *, slack: float) -> None:
    """The weights summed inside the masks must be the ones the survivors declared in the clear."""
    if not math.isfinite(decoded) or abs(decoded - declared) > slack:
        raise AggregateRejected(f"the masked weights sum to {decoded:.6g}, the survivors declared {declared:.6g} "
                                "(a site encoded a weight other than the one it declared)")


def check_norm(total: np.ndarray, bound: float, what: str) -> None:
    norm = float(np.linalg.norm(total))
    if not math.isfinite(norm) or norm > bound:
        raise AggregateRejected(f"the {what} has L2 norm {norm:.4g}, above {bound:.4g}, the most honest sites "
                                "can produce")


def check_count(count: float, survivors: int, *, slack: float) -> None:
    """Adaptive clipping's unclipped-site count lies in [0, survivors]."""
    if not math.isfinite(count) or count < -slack or count > survivors + slack:
        raise AggregateRejected(f"the unclipped-site count decodes to {count:.4g}, outside [0, {survivors}]")


def distributed_bound(survivors: int, clip_norm: float, inflation: float, noise_stddev: float, dim: int) -> float:
    """Largest norm of a decoded distributed-DP sum of honest inputs: the clipped updates (their
    norm inflated by rounding) plus the summed noise's high-probability norm."""
    return survivors * clip_norm * inflation + noise_stddev * (math.sqrt(dim) + NOISE_TAIL)
