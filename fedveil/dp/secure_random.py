"""Random draws for DP noise from a keyed AES-CTR keystream: a cryptographically secure generator.

Why not numpy's generators: the noise a site adds is the secret that hides its update, and PCG64 or
the Mersenne Twister are statistical generators whose state can be recovered from their output.
Here every draw comes from AES-CTR (the ``cryptography`` package), as the masks do: a site keys one
stream per round attempt with fresh OS bits that never leave it, so no one else can predict or
replay its noise; tests and ``--insecure-deterministic`` simulations key it from a seed, so one
seed gives the same noise on every backend.

Samplers, vectorized (loops run over rejection rounds, never over elements):

- ``random``: 53-bit uniforms on [0, 1);
- ``standard_normal``: Box–Muller;
- ``geometric``: inversion, ``ceil(log(1 − U) / log(1 − p))`` (Devroye 1986, "Non-Uniform Random
  Variate Generation", §X.2);
- ``poisson``: inversion of the cumulative table below a mean of 10; above it the transformed
  rejection PTRS (Hörmann 1993, "The transformed rejection method for generating Poisson random
  variables"), the algorithm numpy uses, with the acceptance test in a Stirling form that keeps
  its precision for large means (``k log λ − log k!`` cancels in float64 beyond about 10¹²). Means
  are capped at 2⁴⁰: float64 holds every integer only below 2⁵³, and above the cap the proposal
  loses its fraction (at 2⁵⁵ every draw would be a multiple of 4).

Uniforms of 53 bits cut off tails of probability below 2⁻⁵³, far below any δ a job uses.
Pure module: no I/O; the caller supplies the key.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray
from scipy import special

__all__ = ["KEY_BYTES", "RandomSource", "SecureRandom", "Shape"]

Shape = int | tuple[int, ...]
#: AES-128 or AES-256 keys.
KEY_BYTES: Final[tuple[int, ...]] = (16, 32)
#: Below this mean, Poisson draws invert the cumulative table; at and above it, PTRS.
_PTRS_MIN_MEAN: Final[float] = 10.0
#: The table's length: P(X ≥ 80) < 10⁻⁴⁰ for a mean below 10.
_TABLE_LENGTH: Final[int] = 80
#: Above this k the acceptance test uses Stirling's series for log k! (error below 10⁻¹²).
_STIRLING_MIN_K: Final[float] = 15.0
_HALF_LOG_2PI: Final[float] = 0.5 * math.log(2.0 * math.pi)
#: The largest Poisson mean: its float64 proposals keep 12 fractional bits.
_MAX_MEAN: Final[float] = 2.0**40


def _count(shape: Shape) -> tuple[tuple[int, ...], int]:
    dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"size: dimensions must be non-negative (got {shape!r})")
    return dims, int(np.prod(dims)) if dims else 1


class SecureRandom:
    """Uniform, normal, geometric and Poisson draws from one AES-CTR keystream.

    ``key`` (16 or 32 bytes) selects the stream; the same key gives the same draws in the same order.
    The key is never shown (``repr`` hides it).
    """

    __slots__ = ("_encryptor",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise ValueError(f"key: expected bytes (got {type(key).__name__})")
        if len(key) not in KEY_BYTES:
            raise ValueError(f"key: expected 16 or 32 bytes (got {len(key)})")
        self._encryptor = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(16))).encryptor()

    def __repr__(self) -> str:
        return "SecureRandom(<secret key>)"

    def _words(self, count: int) -> NDArray[np.uint64]:
        """The next ``count`` 64-bit words of the keystream (little-endian)."""
        return np.frombuffer(self._encryptor.update(bytes(8 * count)), dtype="<u8").astype(np.uint64)

    def random(self, size: Shape) -> NDArray[np.float64]:
        """Uniforms on [0, 1) with 53 random bits each."""
        dims, count = _count(size)
        return ((self._words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(dims)

    def standard_normal(self, size: Shape | None = None) -> NDArray[np.float64]:
        """N(0, 1) by Box–Muller: ``sqrt(−2 ln u1) · cos(2π u2)`` with ``u1 ∈ (0, 1]``."""
        dims, count = _count(()) if size is None else _count(size)
        raw = self._words(2 * count).reshape(2, count)
        u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
        u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).reshape(dims)

    def geometric(self, p: float, size: Shape) -> NDArray[np.int64]:
        """Geometric on {1, 2, …}: the number of Bernoulli(``p``) trials up to the first success."""
        prob = float(p)
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"p must lie in (0, 1] (got {p!r})")
        dims, count = _count(size)
        if prob == 1.0:
            return np.ones(dims, dtype=np.int64)
        draws = np.ceil(np.log1p(-self.random(count)) / math.log1p(-prob))
        return np.maximum(draws, 1.0).astype(np.int64).reshape(dims)

    def poisson(self, lam: float, size: Shape) -> NDArray[np.int64]:
        """Poisson with mean ``lam`` (finite, 0 ≤ lam ≤ 2⁴⁰)."""
        mean = float(lam)
        if not math.isfinite(mean) or not 0.0 <= mean <= _MAX_MEAN:
            raise ValueError(f"lam must be a finite number in [0, 2^40] (got {lam!r})")
        dims, count = _count(size)
        if mean == 0.0 or count == 0:
            return np.zeros(dims, dtype=np.int64)
        draws = self._poisson_table(mean, count) if mean < _PTRS_MIN_MEAN else self._poisson_ptrs(mean, count)
        return draws.reshape(dims)

    def _poisson_table(self, mean: float, count: int) -> NDArray[np.int64]:
        ks = np.arange(_TABLE_LENGTH, dtype=np.float64)
        pmf = np.exp(-mean + ks * math.log(mean) - special.gammaln(ks + 1.0))
        cdf = np.cumsum(pmf)
        index = np.searchsorted(cdf, self.random(count), side="right")
        return np.minimum(index, _TABLE_LENGTH - 1).astype(np.int64)

    def _poisson_ptrs(self, mean: float, count: int) -> NDArray[np.int64]:
        slam, loglam = math.sqrt(mean), math.log(mean)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2.0)
        out = np.empty(count, dtype=np.int64)
        pending = np.arange(count)
        while pending.size:
            u = self.random(pending.size) - 0.5
            v = self.random(pending.size)
            us = 0.5 - np.abs(u)
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.floor((2.0 * a / us + b) * u + mean + 0.43)
                k = np.where(np.isfinite(k), k, -1.0)  # us = 0 (u = −0.5): rejected below
                quick = (us >= 0.07) & (v <= vr)
                rejected = (k < 0) | ((us < 0.013) & (v > us))
                lhs = np.log(v) + log_invalpha - np.log(a / (us * us) + b)
            accept = quick | (~rejected & (lhs <= _log_poisson_ratio(k, mean, loglam)))
            out[pending[accept]] = k[accept].astype(np.int64)
            pending = pending[~accept]
        return out


def _log_poisson_ratio(k: NDArray[np.float64], mean: float, loglam: float) -> NDArray[np.float64]:
    """``−λ + k log λ − log k!`` for k ≥ 0, precise for large λ.

    For k ≥ 15 it is ``k (log1p(r) − r) − ½ log(2πk) − S(k)`` with ``r = (λ − k)/k`` and ``S``
    Stirling's correction ``1/(12k) − 1/(360k³) + 1/(1260k⁵)``: no two large terms cancel.
    """
    safe = np.maximum(k, 0.0)
    direct = -mean + safe * loglam - special.gammaln(safe + 1.0)
    big = np.maximum(safe, _STIRLING_MIN_K)
    r = (mean - big) / big
    inv = 1.0 / big
    stirling = inv / 12.0 - inv**3 / 360.0 + inv**5 / 1260.0
    series = big * (np.log1p(r) - r) - _HALF_LOG_2PI - 0.5 * np.log(big) - stirling
    return np.where(safe >= _STIRLING_MIN_K, series, direct)


#: What the DP samplers draw from: this module's generator in production, or a seeded numpy
#: ``Generator`` in statistical tests and benchmarks.
RandomSource = np.random.Generator | SecureRandom
