"""Central Gaussian noise on the sum of clipped updates: the server side of DP-FedAvg.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private
Recurrent Language Models", Algorithm 1) releases, each round,

    Δ̄ = (Σ_i clip(Δ_i, S) + N(0, (z S)^2 I)) / m

where ``m`` is the *expected* cohort size (a fixed denominator keeps the sensitivity of the
mean at ``S / m``; dividing by the realised count would leak it).  One round is a Gaussian
mechanism with noise multiplier ``z`` on a sum of L2 sensitivity ``S``; its Rényi DP curve is
``ε(α) = α / (2 z^2)`` (Mironov 2017).  Cohort sampling may amplify it, only for the sampling
that really happened (``fedveil.dp.sampling.user_level_event``); the accountant
(``fedveil.dp.accounting``) composes the per-round event.

With adaptive clipping (:mod:`fedveil.dp.clipping`) the update sum is noised with ``z_Δ S``
and the round is still accounted as one Gaussian event with multiplier ``z``.

Randomness.  The noise source is explicit, never global.  The server draws its noise from
:class:`SecureNormalSampler` (AES-CTR under a fresh OS key, Box–Muller): an adversary who could
reconstruct a statistical generator's state could subtract the noise.  ``make_generator(seed)``
gives a seeded PCG64 for statistical tests and benchmarks only.
Floating-point Gaussian samples have the usual caveats of floating-point DP (Mironov 2012,
"On Significance of the Least Significant Bits for Differential Privacy"); the distributed
mechanisms in :mod:`fedveil.dp.distributed` work in the integer domain and avoid them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.clipping import (
    AdaptiveClipper,
    AdaptiveClippingConfig,
    ClipResult,
    NormalSource,
    clip_update,
)
from fedveil.dp.secure_random import SecureRandom, Shape

__all__ = [
    "CentralGaussianMechanism",
    "DPFedAvg",
    "DPFedAvgRound",
    "SecureNormalSampler",
    "gaussian_rdp",
    "make_generator",
]


def make_generator(seed: int | None = None) -> np.random.Generator:
    """A PCG64 generator: seeded from ``seed`` (reproducible) or, when ``None``, from ``os.urandom``."""
    if seed is None:
        entropy = int.from_bytes(os.urandom(32), "little")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None (got {seed!r})")
    return np.random.Generator(np.random.PCG64(int(seed)))


class SecureNormalSampler(SecureRandom):
    """Standard normal samples from an AES-CTR keystream under a fresh OS key (a CSPRNG).

    Box–Muller on 53-bit uniforms (:class:`~fedveil.dp.secure_random.SecureRandom`): the stream
    cannot be predicted from earlier output or reproduced without the key, unlike a seeded PCG64.
    It implements ``standard_normal(size)`` like a numpy ``Generator``, so it can be passed
    wherever a :class:`~fedveil.dp.clipping.NormalSource` is expected.

    ``insecure_seed`` (16 bytes) replaces the OS key: only for ``--insecure-deterministic`` jobs
    (tests, bit-for-bit simulations), where anyone who knows the seed can regenerate the noise and
    subtract it.
    """

    def __init__(self, insecure_seed: bytes | None = None) -> None:
        if insecure_seed is not None and len(insecure_seed) != 16:
            raise ValueError(f"insecure_seed: expected 16 bytes (got {len(insecure_seed)})")
        super().__init__(os.urandom(32) if insecure_seed is None else insecure_seed)

    def standard_normal(self, size: Shape | None = None) -> NDArray[np.float64]:
        """N(0, 1) as four Box–Muller draws summed and halved (as DP-SGD's noise, :mod:`.sgd_noise`).

        One draw is bounded at ``sqrt(−2 ln 2⁻⁵³)`` = 8.57 (its ``u1 ≥ 2⁻⁵³``). Outputs within the
        sensitivity of that edge occur under one neighbour and never under the other, an infinite
        privacy loss with probability ``P(N > 8.57 − 1/z)`` per release: past δ at ``z ≤ 0.2`` (the
        privacy review of 2026-12-07). The halved sum of four is exactly N(0, 1) and bounded at 17.1."""
        dims: tuple[int, ...] = () if size is None else (size if isinstance(size, tuple) else (int(size),))
        return np.asarray(super().standard_normal((4, *dims)).sum(axis=0) * 0.5, dtype=np.float64)


def gaussian_rdp(noise_multiplier: float, orders: ArrayLike) -> NDArray[np.float64]:
    """Rényi DP of one Gaussian mechanism with multiplier ``z``: ``ε(α) = α / (2 z^2)`` (Mironov 2017)."""
    z = float(noise_multiplier)
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"noise_multiplier must be a non-negative finite number (got {noise_multiplier!r})")
    alphas = np.asarray(orders, dtype=np.float64)
    if np.any(alphas <= 1.0):
        raise ValueError("orders must all be greater than 1")
    if z == 0.0:
        return np.full(alphas.shape, np.inf)
    return alphas / (2.0 * z * z)


def _as_numpy(values: Any) -> tuple[NDArray[np.float64], Any]:
    """Return ``(float64 numpy copy, torch template or None)``."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        return np.array(values.detach().cpu().double().numpy(), dtype=np.float64), values
    return np.array(values, dtype=np.float64, copy=True), None


def _like(values: NDArray[np.float64], template: Any) -> Any:
    if template is None:
        return values
    import torch

    return torch.from_numpy(values).to(dtype=template.dtype, device=template.device)


@dataclass(frozen=True)
class CentralGaussianMechanism:
    """Gaussian noise ``N(0, (z S)^2 I)`` on a sum of updates clipped to L2 norm ``S``."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        clip = float(self.clip_norm)
        if not math.isfinite(clip) or clip <= 0.0:
            raise ValueError(f"clip_norm must be a positive finite number (got {self.clip_norm!r})")
        z = float(self.noise_multiplier)
        if not math.isfinite(z) or z < 0.0:
            raise ValueError(f"noise_multiplier must be a non-negative finite number (got {self.noise_multiplier!r})")

    @property
    def noise_stddev(self) -> float:
        """Per-coordinate standard deviation ``z · S`` of the noise added to the sum."""
        return float(self.noise_multiplier) * float(self.clip_norm)

    def add_noise(self, update_sum: Any, rng: NormalSource) -> Any:
        """Return ``update_sum + N(0, (z S)^2 I)`` (numpy in, numpy out; torch in, torch out)."""
        values, template = _as_numpy(update_sum)
        if self.noise_stddev > 0.0:
            noise = np.asarray(rng.standard_normal(values.shape), dtype=np.float64)
            values += self.noise_stddev * noise
        return _like(values, template)

    def noised_mean(self, update_sum: Any, expected_clients: float, rng: NormalSource) -> Any:
        """DP-FedAvg's release: ``(sum + noise) / m`` with the *expected* cohort size ``m``."""
        m = float(expected_clients)
        if not math.isfinite(m) or m <= 0.0:
            raise ValueError(f"expected_clients must be a positive number (got {expected_clients!r})")
        return self.add_noise(update_sum, rng) / m

    def rdp(self, orders: ArrayLike) -> NDArray[np.float64]:
        """Per-round RDP curve (before subsampling amplification): ``α / (2 z^2)``."""
        return gaussian_rdp(self.noise_multiplier, orders)


@dataclass(frozen=True)
class DPFedAvgRound:
    """What the server learns and records from one DP-FedAvg round.

    ``noise_multiplier`` is the multiplier to account (``z``); ``noise_stddev`` is the standard
    deviation actually added to the update sum (``z_Δ · S`` under adaptive clipping).
    """

    noised_mean: Any
    clip_norm: float
    next_clip_norm: float
    noise_multiplier: float
    noise_stddev: float
    noised_unclipped_fraction: float | None = None
    """Adaptive clipping: the noised fraction of unclipped clients (never the exact count)."""


class DPFedAvg:
    """User-level DP for FedAvg: per-client clipping plus central Gaussian noise on the sum.

    ``DPFedAvg.fixed(S, z, m)`` clips at a constant ``S``; ``DPFedAvg.adaptive(config)`` follows
    Andrew et al. 2021.  Clients call :meth:`clip` (``S`` is the current clip norm, which the
    server broadcasts each round); the server, holding only the sums, calls :meth:`finish_round`.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        expected_clients_per_round: float,
        clip_norm: float | None = None,
        adaptive: AdaptiveClipper | None = None,
    ) -> None:
        if (clip_norm is None) == (adaptive is None):
            raise ValueError("give exactly one of clip_norm (fixed clipping) or adaptive (adaptive clipping)")
        m = float(expected_clients_per_round)
        if not math.isfinite(m) or m <= 0.0:
            raise ValueError(
                f"expected_clients_per_round must be a positive number (got {expected_clients_per_round!r})"
            )
        # Validates noise_multiplier and the fixed clip norm.
        CentralGaussianMechanism(clip_norm if clip_norm is not None else 1.0, noise_multiplier)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients_per_round = m
        self._fixed_clip = None if clip_norm is None else float(clip_norm)
        self.adaptive = adaptive

    @classmethod
    def fixed(cls, clip_norm: float, noise_multiplier: float, expected_clients_per_round: float) -> DPFedAvg:
        return cls(
            noise_multiplier=noise_multiplier,
            expected_clients_per_round=expected_clients_per_round,
            clip_norm=clip_norm,
        )

    @classmethod
    def with_adaptive_clipping(cls, config: AdaptiveClippingConfig) -> DPFedAvg:
        return cls(
            noise_multiplier=config.noise_multiplier,
            expected_clients_per_round=config.expected_clients_per_round,
            adaptive=AdaptiveClipper(config),
        )

    @property
    def clip_norm(self) -> float:
        """The clip norm of the current round."""
        if self.adaptive is not None:
            return self.adaptive.clip_norm
        assert self._fixed_clip is not None
        return self._fixed_clip

    @property
    def mechanism(self) -> CentralGaussianMechanism:
        """The Gaussian mechanism applied to this round's update sum (multiplier ``z`` or ``z_Δ``)."""
        if self.adaptive is not None:
            return CentralGaussianMechanism(self.clip_norm, self.adaptive.config.update_noise_multiplier)
        return CentralGaussianMechanism(self.clip_norm, self.noise_multiplier)

    def clip(self, update: Any) -> ClipResult:
        """Client side: clip one update with the current clip norm."""
        return clip_update(update, self.clip_norm)

    def finish_round(self, update_sum: Any, rng: NormalSource, unclipped_count: float | None = None,
                     contributors: int | None = None) -> DPFedAvgRound:
        """Server side: noise the sum, divide by ``m`` and (adaptive) move the clip norm.

        ``unclipped_count`` is ``Σ b_i`` over ``contributors`` clients; both are required with adaptive
        clipping.
        """
        mechanism = self.mechanism
        clip_now = self.clip_norm
        mean = mechanism.noised_mean(update_sum, self.expected_clients_per_round, rng)
        if self.adaptive is not None:
            if unclipped_count is None or contributors is None:
                raise ValueError("unclipped_count and contributors are required with adaptive clipping (the sum of "
                                 "the clients' bits, and how many clients it sums)")
            self.adaptive.update(unclipped_count, rng, contributors)
        return DPFedAvgRound(
            noised_mean=mean,
            clip_norm=clip_now,
            next_clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            noise_stddev=mechanism.noise_stddev,
            noised_unclipped_fraction=self.adaptive.last_noised_fraction if self.adaptive is not None else None,
        )

    def rdp(self, orders: ArrayLike) -> NDArray[np.float64]:
        """Per-round RDP curve of the whole round (updates and, if adaptive, the count): ``α / (2 z^2)``."""
        return gaussian_rdp(self.noise_multiplier, orders)

    def dp_event(self, sample_rate: float = 1.0, rounds: int = 1) -> SubsampledGaussianEvent:
        """The accounting event of ``rounds`` rounds with Poisson cohort sampling rate ``sample_rate``
        (1: no amplification; fedveil's server uses ``fedveil.dp.sampling.user_level_event`` instead).

        Under adaptive clipping this is still the Gaussian event with the full ``z``: the update
        and count releases together are exactly that mechanism (Andrew et al. 2021, Thm. 1).
        """
        return SubsampledGaussianEvent(sample_rate=sample_rate, noise_multiplier=self.noise_multiplier, steps=rounds)
