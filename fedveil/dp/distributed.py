"""Distributed DP inside the secure sum: Skellam and distributed discrete Gaussian noise in Z_2^b.

Why.  With central DP the server adds the noise, so it must be trusted to do so.  With
distributed DP every client adds a small share of *integer* noise to its own update before
secure aggregation masks it; the shares add up to the full noise in the sum, and the server
only ever sees (through SecAgg) the already-noised sum.  Secure aggregation works in the ring
``Z_2^b``, so the update must first be turned into integers without breaking the privacy
analysis.  This module implements the pipeline of

- Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
  Learning with Secure Aggregation" (ICML; "DDG" below), and
- Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
  Learning" (NeurIPS).

Client (:func:`encode_update`), for an update ``x ∈ R^d``:

1. clip: ``x ← x · min(1, c / ||x||)``;
2. rotate: ``x ← H S pad(x)`` (randomized Hadamard, :mod:`fedveil.dp.hadamard`, public
   per-round seed) so the norm spreads evenly over ``D = 2^ceil(log2 d)`` coordinates;
3. scale: ``x ← s · x`` with ``s = 1/γ`` (``γ`` is the quantization granularity);
4. conditional randomized rounding: round every coordinate up with probability equal to its
   fractional part, and *resample* until ``||x̃||_2 ≤ Δ_2`` (DDG, Sec. 4.1 and Prop. 22), which
   makes the integer sensitivity ``Δ_2`` a hard bound rather than a high-probability one;
5. add the client's noise share: Skellam ``Sk(μ) = Poisson(μ) − Poisson(μ)`` (variance ``2μ``)
   or a discrete Gaussian ``N_Z(0, σ^2)`` (Canonne, Kamath and Steinke 2020 sampler);
6. modular clipping: reduce modulo ``2^b`` into unsigned ring elements, ready to be masked by
   :mod:`fedveil.secagg`.

Server (:func:`decode_sum`), for the unmasked ring sum: reduce modulo ``2^b``, map to the
centered integers ``[−2^(b−1), 2^(b−1))``, divide by ``s``, invert the rotation and drop the
padding.  The result is ``Σ clip(x_i) + (rounding error) + (noise)``.

The ring.  Ring elements use :class:`fedveil.secagg.encoding.Ring`'s representation:
``uint32`` for rings up to 32 bits, ``uint64`` above.  Pass ``ring_bits`` (the secure
aggregation modulus ``2^k``, ``k ≥ b``) to :func:`encode_update` to get that ring's dtype; since
``2^b`` divides ``2^k``, the SecAgg sum modulo ``2^k`` reduced modulo ``2^b`` is the sum modulo
``2^b``.

Sensitivity after rounding (DDG, Theorem 1 / Prop. 22; ``rounded_l2_norm_bound``).  With a
scaled clip norm ``sc`` in dimension ``D`` and bias parameter ``β ∈ [0, 1)``

    Δ_2 = min( sc + sqrt(D),  sqrt( (sc)^2 + D/4 + sqrt(2 ln(1/β)) (sc + sqrt(D)/2) ) ),

(the first term holds for any rounding, the second with probability ``≥ 1 − β`` for one
randomized rounding, which is why rounding is resampled until it holds), and for an integer
vector ``Δ_1 ≤ min(Δ_2^2, sqrt(D) Δ_2)`` (``|v| ≤ v^2`` for integers, Cauchy–Schwarz).

Privacy, each from the mechanism's own bound (never a Gaussian stand-in), in integer units:

- Skellam (Agarwal et al. 2021, RDP of the multi-dimensional Skellam mechanism): the sum of the
  ``n`` shares is exactly Skellam with total variance ``V = n · v_local``, and for integer
  ``α > 1``

      ε(α) = α Δ_2^2 / (2V) + min( ((2α − 1) Δ_2^2 + 6 Δ_1) / (4 V^2),  3 Δ_1 / (2V) ).

  RDP is non-decreasing in ``α``, so a fractional order is charged ``ε(ceil α)``.
- Distributed discrete Gaussian (DDG, Theorem 1 with Prop. 14): with local parameter ``σ``,
  ``τ = 10 Σ_{k=1}^{n−1} exp(−2π^2 σ^2 k/(k+1))`` and scales ``a_2 = Δ_2 / (sqrt(n) σ)``,
  ``a_1 = Δ_1 / (sqrt(n) σ)``,

      ε(α) = min( α a_2^2 / 2 + τ D,  α (a_2^2 + 2 a_1 τ + τ^2 D) / 2,  α (a_2 + τ sqrt(D))^2 / 2 ).

Both are evaluated for the number of clients that actually contributed noise (dropouts lower it).
Poisson cohort sampling (rate ``q``) is credited with the generic subsampled-RDP bound of Zhu
and Wang 2019 (:func:`poisson_subsampled_rdp`) applied to that same curve.
:meth:`DistributedDPConfig.rdp_event` wraps the curve as an
:class:`fedveil.dp.accounting.RdpCurveEvent` for the RDP accountant and the privacy ledger.

Choosing the bit width ``b`` and the scale ``s`` (DDG Sec. 4.2/4.4 and Thm. 34; Skellam Sec. 4;
:func:`derive_parameters`).  After rotation each coordinate of the aggregate is roughly
sub-Gaussian; with the worst case ``||Σ x_i|| ≤ n c`` and flatness ``ρ`` (1 for the randomized
Hadamard in practice), its variance in the scaled domain is at most

    s^2 ρ n^2 c^2 / D  (signal)  +  n s^2 σ_x^2  (noise, σ_x per client in data units)  +  n / 4  (rounding).

Modular clipping is (almost) lossless when ``k`` standard deviations fit on each side of
zero: ``2^b = 2k · sqrt(that variance)``.  Solving for ``s``:

    s = sqrt( (4^b − n k^2) / (4 k^2 (ρ n^2 c^2 / D + n σ_x^2)) ),

which requires ``4^b > n k^2``.  A small ``s`` (few bits for many clients or a large ``D``)
makes the rounding error ``sqrt(D)/2`` comparable to the scaled clip norm ``sc`` and inflates
``Δ_2``; :func:`derive_parameters` refuses a bit width whose inflation ``Δ_2/(sc)`` exceeds
``max_norm_inflation``.  Given a target ε instead of a noise level, ``σ_x`` and ``s`` depend on
each other (more noise needs more range, a coarser grid inflates the sensitivity, which needs
more noise); a fixed-point iteration solves both.

Randomness for rounding and noise is an explicit ``numpy.random.Generator`` (seeded for tests,
``fedveil.dp.central.make_generator()`` from OS entropy in production).  Integer noise avoids
the floating-point attacks on continuous noise; the discrete Gaussian sampler's acceptance test
uses floating point, a documented simplification of the exact-arithmetic sampler of Canonne et
al.  Everything is vectorized: batches of client vectors ``(n, d)`` are encoded in one call.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from fedveil.dp._checks import non_negative, positive
from fedveil.dp.accounting import DEFAULT_ORDERS, RdpCurveEvent, check_delta, rdp_to_epsilon
from fedveil.dp.clipping import clip_updates
from fedveil.dp.hadamard import inverse_rotate, padded_dim, rotate
from fedveil.secagg.encoding import Ring

__all__ = [
    "DEFAULT_BETA",
    "MECHANISMS",
    "DistributedDPConfig",
    "centered",
    "conditional_randomized_round",
    "ddg_rdp",
    "ddg_tau",
    "decode_sum",
    "derive_parameters",
    "derive_rotation_seed",
    "discrete_gaussian_variance",
    "encode_update",
    "poisson_subsampled_rdp",
    "rounded_l1_norm_bound",
    "rounded_l2_norm_bound",
    "sample_discrete_gaussian",
    "sample_skellam",
    "skellam_rdp",
    "sum_encoded",
]

Mechanism = Literal["skellam", "ddg"]
MECHANISMS: Final[tuple[str, ...]] = ("skellam", "ddg")

#: Conditional-rounding bias parameter used in the DDG and Skellam papers' experiments.
DEFAULT_BETA: Final[float] = math.exp(-0.5)
MIN_BITS: Final[int] = 2
#: float64 keeps at least 8 fractional bits below 2^45, so randomized rounding stays unbiased.
MAX_BITS: Final[int] = 48
#: numpy's Poisson sampler is exact up to about this mean; Skellam shares need 2 Poisson draws.
_MAX_POISSON_MEAN: Final[float] = 1e18
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


def sample_skellam(rng: np.random.Generator, variance: float, shape: int | tuple[int, ...]) -> NDArray[np.int64]:
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
        raise ValueError(f"variance {variance!r} is too large for exact Poisson sampling (mean must be ≤ 1e18)")
    return rng.poisson(mean, size=shape).astype(np.int64) - rng.poisson(mean, size=shape).astype(np.int64)


def sample_discrete_gaussian(
    rng: np.random.Generator, sigma: float, shape: int | tuple[int, ...]
) -> NDArray[np.int64]:
    """Discrete Gaussian ``N_Z(0, σ^2)``: ``P(y) ∝ exp(−y^2 / (2σ^2))`` on the integers.

    Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential Privacy",
    Algorithm 3): propose a discrete Laplace ``Y`` with scale ``t = floor(σ) + 1`` (the
    difference of two geometric variables) and accept with probability
    ``exp(−(|Y| − σ^2/t)^2 / (2σ^2))``.  Rejection runs in vectorized rounds.
    """
    s = non_negative("sigma", sigma)
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


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedDPConfig:
    """Parameters of one distributed-DP aggregation (normally from :func:`derive_parameters`).

    - ``mechanism``: ``"skellam"`` or ``"ddg"``.
    - ``n_clients``: clients whose noise shares make up the full noise (the expected cohort).
    - ``dim``: length ``d`` of the flattened update; the rotated vector has ``D = padded_dim(d)``.
    - ``clip_norm``: L2 clip norm ``c`` in data units.
    - ``bits``: ``b``; noisy vectors and their sum live in ``Z_2^b``.
    - ``scale``: ``s = 1/γ``, integer-grid units per data unit.
    - ``local_stddev``: each client's noise in integer units: the Skellam share's standard
      deviation, or the discrete Gaussian's parameter ``σ``.
    - ``beta``: conditional rounding bias parameter (0 disables resampling, with a looser ``Δ_2``).
    - ``k_stddevs``: standard deviations of the aggregate the ring was sized for (information).
    """

    mechanism: str
    n_clients: int
    dim: int
    clip_norm: float
    bits: int
    scale: float
    local_stddev: float
    beta: float = DEFAULT_BETA
    k_stddevs: float = 4.0

    def __post_init__(self) -> None:
        _check_mechanism(self.mechanism)
        _positive_int("n_clients", self.n_clients)
        _positive_int("dim", self.dim)
        positive("clip_norm", self.clip_norm)
        _check_bits(self.bits)
        positive("scale", self.scale)
        non_negative("local_stddev", self.local_stddev)
        _check_beta(self.beta)
        positive("k_stddevs", self.k_stddevs)
        if self.mechanism == "skellam" and self.local_stddev**2 / 2.0 > _MAX_POISSON_MEAN:
            raise ValueError(
                f"local_stddev {self.local_stddev:g} is too large for exact Skellam sampling; use fewer bits"
            )
        if self.scale * self.clip_norm + math.sqrt(self.padded_dim) >= 2.0**MAX_BITS:
            raise ValueError(f"scale {self.scale:g} puts clipped coordinates beyond 2^{MAX_BITS}")

    # -- derived quantities ------------------------------------------------------------------------
    @property
    def padded_dim(self) -> int:
        """``D``: the Hadamard size (next power of two ≥ ``dim``)."""
        return padded_dim(self.dim)

    @property
    def modulus(self) -> int:
        return 1 << int(self.bits)

    @property
    def granularity(self) -> float:
        """``γ = 1/s``: the quantization step in data units."""
        return 1.0 / float(self.scale)

    @property
    def l2_sensitivity(self) -> float:
        """``Δ_2`` in integer units, enforced by conditional rounding."""
        return rounded_l2_norm_bound(float(self.scale) * float(self.clip_norm), self.beta, self.padded_dim)

    @property
    def l1_sensitivity(self) -> float:
        """``Δ_1 ≤ min(Δ_2^2, sqrt(D) Δ_2)`` in integer units."""
        return rounded_l1_norm_bound(self.l2_sensitivity, self.padded_dim)

    @property
    def norm_inflation(self) -> float:
        """``Δ_2 / (s c)``: how much rounding inflates the sensitivity (1 = no loss)."""
        return self.l2_sensitivity / (float(self.scale) * float(self.clip_norm))

    @property
    def local_variance(self) -> float:
        """Variance of one client's noise share per coordinate, integer units."""
        if self.mechanism == "skellam":
            return float(self.local_stddev) ** 2
        return discrete_gaussian_variance(self.local_stddev)

    def _contributors(self, n_contributors: int | None) -> int:
        return int(self.n_clients) if n_contributors is None else _positive_int("n_contributors", n_contributors)

    def central_stddev(self, n_contributors: int | None = None) -> float:
        """Standard deviation of the summed noise per coordinate, in data units."""
        n = self._contributors(n_contributors)
        return math.sqrt(n * self.local_variance) / float(self.scale)

    def effective_noise_multiplier(self, n_contributors: int | None = None) -> float:
        """``central_stddev / c``: the noise-to-clip ratio (for display; accounting uses :meth:`rdp`)."""
        return self.central_stddev(n_contributors) / float(self.clip_norm)

    def expected_squared_error(self, n_contributors: int | None = None) -> float:
        """Upper bound on ``E ||decoded − Σ clipped||^2`` (data units), absent modular wraparound.

        Per padded coordinate and client: noise variance plus at most ``1/4`` for randomized
        rounding; the inverse rotation is orthonormal and dropping the padding can only remove
        error.  (Conditioning the rounding on the norm bound changes this by a negligible amount
        when, as in practice, almost every first rounding is accepted.)
        """
        n = self._contributors(n_contributors)
        per_coordinate = n * (self.local_variance + 0.25)
        return self.padded_dim * per_coordinate / float(self.scale) ** 2

    # -- privacy -----------------------------------------------------------------------------------
    def rdp(
        self, orders: ArrayLike, n_contributors: int | None = None, sample_rate: float = 1.0
    ) -> NDArray[np.float64]:
        """RDP curve ε(α) of ONE round at ``orders``, from the mechanism's own bound.

        ``n_contributors`` is how many clients' noise shares entered the sum (default: all
        ``n_clients``); with dropouts the noise, hence the privacy, is smaller.  ``sample_rate``
        ``q < 1`` credits Poisson cohort sampling with :func:`poisson_subsampled_rdp`.
        """
        n = self._contributors(n_contributors)
        l2 = self.l2_sensitivity
        l1 = self.l1_sensitivity

        def curve(alphas: NDArray[np.float64]) -> NDArray[np.float64]:
            if self.mechanism == "skellam":
                return skellam_rdp(alphas, l1, l2, n * self.local_variance)
            return ddg_rdp(alphas, l1, l2, self.local_stddev, n, self.padded_dim)

        return poisson_subsampled_rdp(curve, sample_rate, orders)

    def rdp_event(
        self,
        *,
        orders: Sequence[float] = DEFAULT_ORDERS,
        rounds: int = 1,
        n_contributors: int | None = None,
        sample_rate: float = 1.0,
    ) -> RdpCurveEvent:
        """The round(s) as an :class:`RdpCurveEvent` for the RDP accountant and the ledger.

        The curve already includes the cohort-sampling amplification when ``sample_rate < 1``
        (the event itself has no sampling rate), so compose it as is.
        """
        n = self._contributors(n_contributors)
        return RdpCurveEvent.from_function(
            f"distributed_{self.mechanism}",
            lambda alphas: self.rdp(alphas, n, sample_rate),
            orders=orders,
            steps=rounds,
            params={
                "mechanism": self.mechanism,
                "n_contributors": n,
                "sample_rate": float(sample_rate),
                "dim": int(self.dim),
                "padded_dim": self.padded_dim,
                "clip_norm": float(self.clip_norm),
                "bits": int(self.bits),
                "scale": float(self.scale),
                "local_stddev": float(self.local_stddev),
                "beta": float(self.beta),
                "l2_sensitivity": self.l2_sensitivity,
            },
        )

    def epsilon(
        self,
        delta: float,
        *,
        rounds: int = 1,
        n_contributors: int | None = None,
        sample_rate: float = 1.0,
        orders: Sequence[float] = DEFAULT_ORDERS,
    ) -> float:
        """ε after ``rounds`` rounds at ``delta`` (cohort sampling rate ``sample_rate``)."""
        check_delta(delta)
        steps = _positive_int("rounds", rounds)
        grid = np.asarray(orders, dtype=np.float64)
        eps, _ = rdp_to_epsilon(grid, steps * self.rdp(grid, n_contributors, sample_rate), delta)
        return eps

    def ring_dtype(self, ring_bits: int | None = None) -> np.dtype:
        """Storage dtype of ring elements, as :class:`fedveil.secagg.encoding.Ring` stores them."""
        k = int(self.bits) if ring_bits is None else int(ring_bits)
        if isinstance(ring_bits, bool) or k < int(self.bits):
            raise ValueError(f"ring_bits must be at least bits={self.bits} (got {ring_bits!r})")
        return Ring(k).dtype


# ----------------------------------------------------------------------------------------------
# Parameter derivation
# ----------------------------------------------------------------------------------------------


def _scale_for(noise_std: float, *, n: int, padded: int, clip: float, bits: int, k: float, rho: float) -> float:
    """Solve ``2^b = 2k sqrt(s^2 ρ n^2 c^2 / D + n (s^2 σ_x^2 + 1/4))`` for the scale ``s``."""
    headroom = 4.0**bits - n * k * k
    if headroom <= 0.0:
        raise ValueError(
            f"bits={bits} is too small for n_clients={n}: the rounding error of the sum alone needs "
            f"4^bits > n_clients * k_stddevs^2 = {n * k * k:g}"
        )
    return math.sqrt(headroom / (4.0 * k * k * (rho * n * n * clip * clip / padded + n * noise_std**2)))


def derive_parameters(
    n_clients: int,
    dim: int,
    clip_norm: float,
    *,
    mechanism: str = "skellam",
    bits: int = 20,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    rounds: int = 1,
    sample_rate: float = 1.0,
    beta: float = DEFAULT_BETA,
    k_stddevs: float = 4.0,
    rho: float = 1.0,
    max_norm_inflation: float = 1.5,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> DistributedDPConfig:
    """Choose the scale ``s`` and the local noise for ``n_clients`` clients, ``dim`` coordinates,
    clip norm ``c`` and a ``bits``-bit ring (derivation in the module docstring).

    Give exactly one of

    - ``noise_multiplier`` ``z``: the summed noise has standard deviation ``z c`` in data units
      (each client adds ``z c / sqrt(n)``), as in central DP-FedAvg; or
    - ``target_epsilon`` with ``delta``: the noise is the smallest that keeps ``rounds`` rounds
      (composed with the mechanism's own RDP bound; cohorts Poisson-sampled at ``sample_rate``,
      amplified with :func:`poisson_subsampled_rdp`) at ``(ε, δ)``.

    Raises ``ValueError`` naming the parameter at fault, in particular ``bits`` when the ring is
    too narrow for ``n_clients`` and ``dim`` (the sum does not fit, or rounding inflates the
    sensitivity by more than ``max_norm_inflation``).
    """
    mech = _check_mechanism(mechanism)
    n = _positive_int("n_clients", n_clients)
    d = _positive_int("dim", dim)
    c = positive("clip_norm", clip_norm)
    b = _check_bits(bits)
    beta_v = _check_beta(beta)
    k = positive("k_stddevs", k_stddevs)
    rho_v = positive("rho", rho)
    inflation_cap = positive("max_norm_inflation", max_norm_inflation)
    if inflation_cap < 1.0:
        raise ValueError(f"max_norm_inflation must be at least 1 (got {max_norm_inflation!r})")
    steps = _positive_int("rounds", rounds)
    q = positive("sample_rate", sample_rate)
    if q > 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1] (got {sample_rate!r})")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier or target_epsilon")
    padded = padded_dim(d)

    def build(local_std_data: float) -> DistributedDPConfig:
        s = _scale_for(local_std_data, n=n, padded=padded, clip=c, bits=b, k=k, rho=rho_v)
        return DistributedDPConfig(
            mechanism=mech,
            n_clients=n,
            dim=d,
            clip_norm=c,
            bits=b,
            scale=s,
            local_stddev=local_std_data * s,
            beta=beta_v,
            k_stddevs=k,
        )

    def check_inflation(config: DistributedDPConfig) -> DistributedDPConfig:
        if config.norm_inflation > inflation_cap:
            raise ValueError(
                f"bits={b} is too small for n_clients={n} and dim={d} (padded {padded}): the scale "
                f"{config.scale:.4g} leaves a scaled clip norm of {config.scale * c:.4g} against a rounding "
                f"error of sqrt(D)/2 = {math.sqrt(padded) / 2:.4g}, inflating the sensitivity by "
                f"{config.norm_inflation:.3f}x (> max_norm_inflation={inflation_cap:g}); raise bits"
            )
        return config

    if noise_multiplier is not None:
        z = non_negative("noise_multiplier", noise_multiplier)
        return check_inflation(build(z * c / math.sqrt(n)))

    eps_target = positive("target_epsilon", target_epsilon)
    if delta is None:
        raise ValueError("delta is required with target_epsilon")
    check_delta(delta)
    grid = np.asarray(orders, dtype=np.float64)

    def epsilon_at(local_std_data: float, scale: float) -> float:
        config = DistributedDPConfig(mech, n, d, c, b, scale, local_std_data * scale, beta_v, k)
        eps, _ = rdp_to_epsilon(grid, steps * config.rdp(grid, sample_rate=sample_rate), delta)
        return eps

    def solve_noise(scale: float) -> float:
        """Smallest local noise (data units) meeting the target at this scale (bisection)."""
        lo, hi = 0.0, c / math.sqrt(n)
        while epsilon_at(hi, scale) > eps_target:
            lo, hi = hi, 2.0 * hi
            if hi > 1e6 * c:
                raise ValueError(f"target_epsilon={eps_target:g} is unreachable with bits={b}")
        for _ in range(200):
            if hi - lo <= 1e-10 * hi:
                break
            mid = 0.5 * (lo + hi)
            if epsilon_at(mid, scale) <= eps_target:
                hi = mid
            else:
                lo = mid
        return hi

    # Fixed point: noise → scale → inflated sensitivity → noise.  Starts from z = 1.
    noise = c / math.sqrt(n)
    scale = _scale_for(noise, n=n, padded=padded, clip=c, bits=b, k=k, rho=rho_v)
    for _ in range(100):
        noise = solve_noise(scale)
        new_scale = _scale_for(noise, n=n, padded=padded, clip=c, bits=b, k=k, rho=rho_v)
        if abs(new_scale - scale) <= 1e-9 * scale:
            scale = new_scale
            break
        scale = new_scale
    else:
        raise ValueError(f"bits={b}: the scale and noise did not converge; raise bits")
    # The target must hold for the final scale exactly: re-solve the noise at it.
    noise = solve_noise(scale)
    config = DistributedDPConfig(mech, n, d, c, b, scale, noise * scale, beta_v, k)
    return check_inflation(config)


# ----------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------


def derive_rotation_seed(context: bytes) -> int:
    """A public 64-bit rotation seed from round context (e.g. session id ‖ round number).

    The seed is public: every client and the server must use the same one in a round.
    """
    if not isinstance(context, (bytes, bytearray)) or not context:
        raise ValueError("context must be non-empty bytes (e.g. session id and round number)")
    digest = hashlib.sha256(b"fedveil.dp.rotation.v1" + bytes(context)).digest()
    return int.from_bytes(digest[:8], "little")


def conditional_randomized_round(
    x: ArrayLike, bound: float, rng: np.random.Generator, *, max_tries: int = _MAX_ROUNDING_TRIES
) -> NDArray[np.int64]:
    """Round each row of ``x`` to integers, unbiasedly, resampling rows whose norm exceeds ``bound``.

    Each coordinate rounds up with probability equal to its fractional part; rows with
    ``||x̃||_2 > bound`` are redrawn (DDG, Sec. 4.1).  Raises ``RuntimeError`` after
    ``max_tries`` rounds (the bound was not derived for these inputs).
    """
    values = np.asarray(x, dtype=np.float64)
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    floor = np.floor(rows)
    frac = rows - floor
    out = floor + (rng.random(rows.shape) < frac)
    limit = float(bound) ** 2
    pending = np.flatnonzero(np.einsum("ij,ij->i", out, out) > limit)
    tries = 1
    while pending.size:
        if tries >= max_tries:
            raise RuntimeError(
                f"conditional rounding failed {max_tries} times for {pending.size} vector(s): their norm exceeds "
                f"the rounding bound {bound:.6g} (were they clipped and scaled with this configuration?)"
            )
        redo = floor[pending] + (rng.random((pending.size, rows.shape[1])) < frac[pending])
        out[pending] = redo
        pending = pending[np.einsum("ij,ij->i", redo, redo) > limit]
        tries += 1
    return out.astype(np.int64).reshape(values.shape)


def encode_update(
    config: DistributedDPConfig,
    update: ArrayLike,
    *,
    rotation_seed: int,
    rng: np.random.Generator,
    ring_bits: int | None = None,
) -> NDArray[np.unsignedinteger[Any]]:
    """Client side: clip → rotate → scale → conditional rounding → + noise share → mod ``2^b``.

    ``update`` is one flattened update of length ``dim`` or a batch ``(clients, dim)``.  Returns
    ring elements in ``[0, 2^b)`` of length ``padded_dim``, stored in the dtype of a
    ``ring_bits``-bit secure-aggregation ring (default ``bits``), ready to be masked.
    """
    values = np.asarray(update, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[-1] != config.dim:
        raise ValueError(f"update must have shape ({config.dim},) or (clients, {config.dim}) (got {values.shape})")
    dtype = config.ring_dtype(ring_bits)
    clipped, _ = clip_updates(values, config.clip_norm)
    scaled = rotate(clipped, rotation_seed) * float(config.scale)
    rounded = conditional_randomized_round(scaled, config.l2_sensitivity, rng)
    if config.mechanism == "skellam":
        noise = sample_skellam(rng, config.local_variance, rounded.shape)
    else:
        noise = sample_discrete_gaussian(rng, config.local_stddev, rounded.shape)
    noisy = rounded + noise
    # Two's complement of int64 then masking with 2^b − 1 is reduction modulo 2^b.
    ring = noisy.view(np.uint64) & np.uint64(config.modulus - 1)
    return ring.astype(dtype)


def sum_encoded(config: DistributedDPConfig, encoded: ArrayLike) -> NDArray[np.uint64]:
    """Sum a batch of encoded vectors ``(clients, D)`` modulo ``2^b`` (what SecAgg reveals).

    For simulations without secure aggregation and for tests; uint64 addition wraps modulo
    ``2^64``, which ``2^b`` divides.
    """
    values = np.asarray(encoded)
    if values.ndim != 2 or values.shape[1] != config.padded_dim:
        raise ValueError(f"encoded must have shape (clients, {config.padded_dim}) (got {values.shape})")
    total = np.sum(values.astype(np.uint64), axis=0, dtype=np.uint64)
    return np.asarray(total & np.uint64(config.modulus - 1), dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# Server side
# ----------------------------------------------------------------------------------------------


def centered(ring_values: ArrayLike, bits: int) -> NDArray[np.int64]:
    """Ring elements (any unsigned/non-negative integer array) modulo ``2^b`` as integers in ``[−2^(b−1), 2^(b−1))``."""
    b = _check_bits(bits)
    values = np.asarray(ring_values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"ring_sum must be an integer array (got dtype {values.dtype})")
    reduced = values.astype(np.uint64) & np.uint64((1 << b) - 1)
    signed = reduced.astype(np.int64)
    signed[signed >= (1 << (b - 1))] -= 1 << b
    return signed


def decode_sum(config: DistributedDPConfig, ring_sum: ArrayLike, *, rotation_seed: int) -> NDArray[np.float64]:
    """Server side: unmasked ring sum → centered integers → unscale → un-rotate → noised float sum (length ``dim``)."""
    values = np.asarray(ring_sum)
    if values.shape != (config.padded_dim,):
        raise ValueError(f"ring_sum must have shape ({config.padded_dim},) (got {values.shape})")
    integers = centered(values, config.bits)
    return inverse_rotate(integers.astype(np.float64) / float(config.scale), config.dim, rotation_seed)
