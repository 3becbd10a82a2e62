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

Randomness for rounding and noise is explicit: a :class:`fedveil.dp.secure_random.SecureRandom`
(AES-CTR under a key the site draws from the OS every attempt) in production, or a seeded numpy
``Generator`` in statistical tests.  Integer noise avoids
the floating-point attacks on continuous noise; the discrete Gaussian sampler's acceptance test
uses floating point, a documented simplification of the exact-arithmetic sampler of Canonne et
al.  Everything is vectorized: batches of client vectors ``(n, d)`` are encoded in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedveil.dp._checks import non_negative, positive
from fedveil.dp.accounting import DEFAULT_ORDERS, RdpCurveEvent, check_delta, rdp_to_epsilon
from fedveil.dp.discrete_noise import (  # noqa: F401 (re-exported: this module is the distributed-DP API)
    _MAX_ROUNDING_TRIES,
    DEFAULT_BETA,
    MAX_BITS,
    MAX_LOCAL_STDDEV,
    MECHANISMS,
    MIN_BITS,
    Mechanism,
    _check_beta,
    _check_bits,
    _check_mechanism,
    _positive_int,
    ddg_rdp,
    ddg_tau,
    discrete_gaussian_variance,
    poisson_subsampled_rdp,
    rounded_l1_norm_bound,
    rounded_l2_norm_bound,
    sample_discrete_gaussian,
    sample_skellam,
    skellam_rdp,
)
from fedveil.dp.hadamard import padded_dim
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
        if self.local_stddev > MAX_LOCAL_STDDEV:  # float64 samplers stay exact below it (discrete_noise)
            raise ValueError(
                f"local_stddev {self.local_stddev:g} is above 2^20, beyond which the noise cannot be sampled "
                "exactly; use fewer bits"
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



# both ends of the ring codec are part of this module's API
from fedveil.dp.distributed_codec import (  # noqa: E402 (after DistributedDPConfig, which the codec imports)
    centered,
    conditional_randomized_round,
    decode_sum,
    derive_rotation_seed,
    encode_update,
    sum_encoded,
)
