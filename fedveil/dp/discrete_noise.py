"""The discrete noise of distributed DP: Skellam and discrete-Gaussian samplers, sensitivity after
conditional rounding, and the two mechanisms' RDP bounds (Agarwal, Kairouz, Liu 2021; Kairouz, Liu,
Steinke 2021). :mod:`fedveil.dp.distributed` explains how they fit together. Pure module: no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from fedveil.dp._checks import non_negative, positive
from fedveil.dp.secure_random import RandomSource

Mechanism = Literal["skellam", "ddg"]
MECHANISMS: Final[tuple[str, ...]] = ("skellam", "ddg")

#: Conditional-rounding bias parameter used in the DDG and Skellam papers' experiments.
DEFAULT_BETA: Final[float] = math.exp(-0.5)
MIN_BITS: Final[int] = 2
#: float64 keeps at least 8 fractional bits below 2^45, so randomized rounding stays unbiased.
MAX_BITS: Final[int] = 48
#: The largest noise share's standard deviation (integer units), for both mechanisms. The samplers
#: work in float64, which holds every integer only below 2^53: a Poisson mean of 5.6e17 (bits=34)
#: made every Skellam draw a multiple of 32, so the noise left the sum's low bits untouched and a
#: server read the victim's update from them (review of 2026-12-07). At 2^20 a Skellam share's
#: Poisson mean is at most 2^39 and a discrete-Gaussian proposal below about 2^26, so the float64
#: proposals keep at least 13 fractional bits: each draw's distribution is exact but for a mass of
#: at most 2^-13 moved between neighbouring integers. Fewer bits keep the noise below the cap.
MAX_LOCAL_STDDEV: Final[float] = 2.0**20
_MAX_POISSON_MEAN: Final[float] = MAX_LOCAL_STDDEV**2 / 2.0
_MAX_ROUNDING_TRIES: Final[int] = 1000


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")
    return int(value)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} (got {bits!r})")
    return int(bits)


def _check_beta(beta: Any) -> float:
    number = non_negative("beta", beta)
    if number >= 1.0:
        raise ValueError(f"beta must lie in [0, 1) (got {beta!r})")
    return number


def _check_mechanism(mechanism: Any) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {', '.join(MECHANISMS)} (got {mechanism!r})")
    return str(mechanism)


# ----------------------------------------------------------------------------------------------
# Sensitivity after rounding
# ----------------------------------------------------------------------------------------------


def rounded_l2_norm_bound(l2_norm: float, beta: float, dim: int) -> float:
    """L2 bound ``Δ_2`` enforced by conditional randomized rounding of a vector of norm ≤ ``l2_norm``.

    ``l2_norm`` is already in the scaled (integer-grid) domain.  DDG, Theorem 1 / Prop. 22:
    ``min(l2 + sqrt(D), sqrt(l2^2 + D/4 + sqrt(2 ln(1/β)) (l2 + sqrt(D)/2)))``; ``β = 0`` keeps
    only the deterministic first term (no resampling ever needed).
    """
    norm = non_negative("l2_norm", l2_norm)
    b = _check_beta(beta)
    size = _positive_int("dim", dim)
    deterministic = norm + math.sqrt(size)
    if b == 0.0:
        return deterministic
    squared = norm**2 + 0.25 * size + math.sqrt(2.0 * math.log(1.0 / b)) * (norm + 0.5 * math.sqrt(size))
    return min(deterministic, math.sqrt(squared))


def rounded_l1_norm_bound(l2_bound: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm ≤ ``l2_bound``: ``min(Δ_2^2, sqrt(D) Δ_2)``."""
    norm = non_negative("l2_bound", l2_bound)
    size = _positive_int("dim", dim)
    return norm * min(norm, math.sqrt(size))


# ----------------------------------------------------------------------------------------------
# Samplers (vectorized; loops run over rejection rounds, never over elements)
# ----------------------------------------------------------------------------------------------


def sample_skellam(rng: RandomSource, variance: float, shape: int | tuple[int, ...]) -> NDArray[np.int64]:
    """Symmetric Skellam noise with the given variance: ``Poisson(v/2) − Poisson(v/2)``.

    Sums of independent Skellam variables are Skellam (variances add), which is what makes
    it a *distributed* mechanism: ``n`` shares of variance ``v`` sum to exactly ``Sk`` with
    variance ``n v`` (Agarwal et al. 2021).
    """
    var = non_negative("variance", variance)
    if var == 0.0:
        return np.zeros(shape, dtype=np.int64)
    mean = var / 2.0
    if mean > _MAX_POISSON_MEAN:
        raise ValueError(f"variance {variance!r} is too large for exact Skellam sampling (at most "
                         f"{2.0 * _MAX_POISSON_MEAN:.6g}, a standard deviation of 2^20)")
    return rng.poisson(mean, size=shape).astype(np.int64) - rng.poisson(mean, size=shape).astype(np.int64)


def sample_discrete_gaussian(
    rng: RandomSource, sigma: float, shape: int | tuple[int, ...]
) -> NDArray[np.int64]:
    """Discrete Gaussian ``N_Z(0, σ^2)``: ``P(y) ∝ exp(−y^2 / (2σ^2))`` on the integers.

    Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential Privacy",
    Algorithm 3): propose a discrete Laplace ``Y`` with scale ``t = floor(σ) + 1`` (the
    difference of two geometric variables) and accept with probability
    ``exp(−(|Y| − σ^2/t)^2 / (2σ^2))``.  Rejection runs in vectorized rounds.
    """
    s = non_negative("sigma", sigma)
    if s > MAX_LOCAL_STDDEV:
        raise ValueError(f"sigma {sigma!r} is too large for exact discrete-Gaussian sampling (at most 2^20)")
    out_shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    total = int(np.prod(out_shape)) if out_shape else 1
    out = np.zeros(total, dtype=np.int64)
    if s == 0.0 or total == 0:
        return out.reshape(out_shape)
    t = math.floor(s) + 1.0
    p = -math.expm1(-1.0 / t)  # success probability of Geometric on {1, 2, ...}
    filled = 0
    while filled < total:
        want = 2 * (total - filled) + 16
        proposal = rng.geometric(p, size=want).astype(np.int64) - rng.geometric(p, size=want).astype(np.int64)
        accept_prob = np.exp(-((np.abs(proposal) - s * s / t) ** 2) / (2.0 * s * s))
        accepted = proposal[rng.random(want) < accept_prob]
        take = min(accepted.size, total - filled)
        out[filled : filled + take] = accepted[:take]
        filled += take
    return out.reshape(out_shape)


def discrete_gaussian_variance(sigma: float) -> float:
    """Exact variance of ``N_Z(0, σ^2)`` (slightly below ``σ^2`` for small ``σ``)."""
    s = non_negative("sigma", sigma)
    if s == 0.0:
        return 0.0
    if s > 50.0:
        # The difference to σ^2 is of order σ^2 exp(−2π^2 σ^2): far below float64 resolution.
        return s * s
    support = np.arange(-math.ceil(40.0 * s) - 1, math.ceil(40.0 * s) + 2, dtype=np.float64)
    weights = np.exp(-(support**2) / (2.0 * s * s))
    return float(np.sum(weights * support**2) / np.sum(weights))


# ----------------------------------------------------------------------------------------------
# RDP bounds of the two mechanisms (integer units)
# ----------------------------------------------------------------------------------------------


def _orders_array(orders: ArrayLike) -> NDArray[np.float64]:
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or np.any(~np.isfinite(alphas)) or np.any(alphas <= 1.0):
        raise ValueError("orders must be a non-empty 1-D array of finite numbers > 1")
    return alphas


def skellam_rdp(orders: ArrayLike, l1: float, l2: float, total_variance: float) -> NDArray[np.float64]:
    """RDP of the multi-dimensional Skellam mechanism (Agarwal, Kairouz, Liu 2021) at ``orders``.

    ``total_variance`` is the variance of the summed noise per coordinate; ``l1``/``l2`` are the
    integer-domain sensitivities.  The bound holds for integer orders; other orders are charged
    at ``ceil(α)`` (RDP is non-decreasing in α).
    """
    alphas = np.ceil(_orders_array(orders))
    var = non_negative("total_variance", total_variance)
    if var == 0.0:
        return np.full(alphas.shape, np.inf)
    first = alphas * l2**2 / (2.0 * var)
    second = np.minimum(((2.0 * alphas - 1.0) * l2**2 + 6.0 * l1) / (4.0 * var**2), 3.0 * l1 / (2.0 * var))
    return np.asarray(first + second, dtype=np.float64)


def ddg_tau(local_sigma: float, n_clients: int) -> float:
    """DDG's ``τ = 10 Σ_{k=1}^{n−1} exp(−2π^2 σ^2 k/(k+1))`` (Kairouz et al. 2021, Theorem 1)."""
    s = non_negative("local_sigma", local_sigma)
    n = _positive_int("n_clients", n_clients)
    if n == 1:
        return 0.0
    k = np.arange(1, n, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * s * s * k / (k + 1.0))))


def ddg_rdp(
    orders: ArrayLike, l1: float, l2: float, local_sigma: float, n_clients: int, dim: int
) -> NDArray[np.float64]:
    """RDP of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, Thm. 1 with Prop. 14)."""
    alphas = _orders_array(orders)
    s = non_negative("local_sigma", local_sigma)
    n = _positive_int("n_clients", n_clients)
    size = _positive_int("dim", dim)
    if s == 0.0:
        return np.full(alphas.shape, np.inf)
    tau = ddg_tau(s, n)
    a2 = l2 / (math.sqrt(n) * s)
    a1 = l1 / (math.sqrt(n) * s)
    term1 = alphas * a2**2 / 2.0 + tau * size
    term2 = alphas * (a2**2 + 2.0 * a1 * tau + tau**2 * size) / 2.0
    term3 = alphas * (a2 + math.sqrt(size) * tau) ** 2 / 2.0
    return np.asarray(np.minimum(np.minimum(term1, term2), term3), dtype=np.float64)


def poisson_subsampled_rdp(
    rdp_fn: Callable[[NDArray[np.float64]], NDArray[np.float64]], sample_rate: float, orders: ArrayLike
) -> NDArray[np.float64]:
    """RDP at ``orders`` of a mechanism run on a Poisson sample (rate ``q``) of the clients.

    Generic upper bound of Zhu and Wang 2019 ("Poisson Subsampled Rényi Differential Privacy",
    Theorem 9; the bound the DDG and Skellam papers use for cohort sampling), for integer
    ``α ≥ 2`` and the mechanism's own curve ``ε(·)`` at integer orders:

        ε'(α) ≤ 1/(α−1) · log( (1−q)^(α−1) (αq − q + 1) + C(α,2) q² (1−q)^(α−2) e^(ε(2))
                               + 3 Σ_{l=3}^{α} C(α,l) q^l (1−q)^(α−l) e^((l−1) ε(l)) ).

    Fractional orders are charged at ``ceil(α)``; the result is never above the unamplified
    curve (subsampling cannot hurt).  Log-space throughout, vectorized over ``l``.
    """
    alphas = _orders_array(orders)
    q = positive("sample_rate", sample_rate)
    if q > 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1] (got {sample_rate!r})")
    plain = np.asarray(rdp_fn(alphas), dtype=np.float64)
    if q == 1.0:
        return plain
    ints = np.maximum(np.ceil(alphas).astype(np.int64), 2)
    top = int(ints.max())
    curve = np.asarray(rdp_fn(np.arange(2, top + 1, dtype=np.float64)), dtype=np.float64)  # ε(l), l = 2..top
    log_q, log_1q = math.log(q), math.log1p(-q)
    amplified: dict[int, float] = {}
    for a in np.unique(ints).tolist():
        ls = np.arange(3, a + 1, dtype=np.float64)
        log_comb = special.gammaln(a + 1.0) - special.gammaln(ls + 1.0) - special.gammaln(a - ls + 1.0)
        with np.errstate(invalid="ignore"):
            terms = np.concatenate(
                (
                    [(a - 1) * log_1q + math.log(a * q - q + 1.0)],
                    [math.log(a * (a - 1) / 2.0) + 2.0 * log_q + (a - 2) * log_1q + curve[0]],
                    math.log(3.0)
                    + log_comb
                    + (a - ls) * log_1q
                    + ls * log_q
                    + (ls - 1.0) * curve[ls.astype(np.int64) - 2],
                )
            )
        value = float(special.logsumexp(terms)) / (a - 1)
        amplified[a] = value if math.isfinite(value) else math.inf
    bound = np.array([amplified[a] for a in ints.tolist()], dtype=np.float64)
    return np.minimum(bound, plain)


