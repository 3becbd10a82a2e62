"""Fixed-point encoding of float updates into the ring Z_2^k, and decoding of their sum.

Pipeline (Bonawitz et al., CCS 2017, §3; Kairouz et al., "The Distributed Discrete Gaussian",
ICML 2021, §4 for the unbiased rounding): clip every coordinate to ``[-clip, clip]`` →
multiply by ``scale = 2**frac_bits`` → **stochastic rounding** (round up with probability equal
to the fractional part, so the encoding is unbiased and the error of one coordinate is below
``1/scale``) → two's complement into Z_2^k. Sums then wrap around modulo 2^k exactly like the
masks, and the decoded sum is exact as long as ``|sum| < 2**(k-1)``; :class:`FixedPointEncoder`
refuses any configuration where the sum of ``max_clients`` inputs could break that bound.

Rounding randomness comes from a caller-supplied seed expanded with AES-CTR (the same values
as :func:`fedveil.secagg.prg.uniform01`), never from global random state, so encoding is
deterministic given the seed.

Weighted aggregation (FedAvg with example counts) sends ``weight * x`` and the weight itself as
one extra coordinate; the decoded weighted mean is ``Σ w_i x_i / Σ w_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedveil.secagg.errors import ConfigError, EncodingOverflowError
from fedveil.secagg.prg import SEED_BYTES, KeyStream

MAX_RING_BITS = 64
# float64 keeps >= 12 fractional bits below this magnitude, enough for unbiased rounding.
MAX_ENCODED_MAGNITUDE = 1 << 40
ENCODE_CHUNK = 1 << 15  # elements per chunk: 4 buffers of 8 bytes each stay in L2


@dataclass(frozen=True)
class Ring:
    """Z_2^k stored in ``uint32`` (k ≤ 32) or ``uint64`` (k ≤ 64).

    numpy's unsigned arithmetic wraps modulo 2^32 / 2^64, and 2^k divides both, so any chain of
    additions and subtractions may run in the storage dtype and be reduced with one
    :meth:`reduce` at the end. For k = 32 and k = 64 the reduction is a no-op.
    """

    bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_RING_BITS:
            raise ConfigError(f"ring_bits: must be an integer in 1..{MAX_RING_BITS} (got {self.bits!r})")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def is_native(self) -> bool:
        """True when the storage dtype wraps exactly at 2^k (the uint32 / uint64 fast paths)."""
        return self.bits in (32, 64)

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """Reduce in place modulo 2^k; returns ``values``."""
        if not self.is_native:
            np.bitwise_and(values, self.dtype.type(self.modulus - 1), out=values)
        return values

    def add(self, acc: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``acc += values`` modulo 2^k, in place."""
        np.add(acc, values, out=acc)
        return self.reduce(acc)

    def subtract(self, acc: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``acc -= values`` modulo 2^k, in place."""
        np.subtract(acc, values, out=acc)
        return self.reduce(acc)

    def check(self, values: np.ndarray, *, name: str = "vector", length: int | None = None) -> np.ndarray:
        """Validate that ``values`` is a 1-D array of ring elements (right dtype, all < 2^k)."""
        if not isinstance(values, np.ndarray) or values.ndim != 1:
            raise ConfigError(f"{name}: expected a 1-D numpy array of {self.dtype} ring elements")
        if values.dtype != self.dtype:
            raise ConfigError(f"{name}: expected dtype {self.dtype} for a {self.bits}-bit ring (got {values.dtype})")
        if length is not None and values.shape[0] != length:
            raise ConfigError(f"{name}: expected length {length} (got {values.shape[0]})")
        if not self.is_native and values.size and int(values.max()) >= self.modulus:
            raise ConfigError(f"{name}: element {int(values.max())} is not below 2^{self.bits}")
        return values

    def to_signed(self, values: np.ndarray) -> np.ndarray:
        """Interpret ring elements as two's complement integers in [-2^(k-1), 2^(k-1))."""
        shift = 64 - self.bits
        wide = values.astype(np.uint64)  # a copy: the caller's array is left alone
        wide <<= np.uint64(shift)  # bit k-1 becomes the int64 sign bit ...
        signed = wide.view(np.int64)
        signed >>= np.int64(shift)  # ... and the arithmetic shift extends it
        return signed


@dataclass(frozen=True)
class FixedPointEncoder:
    """Clip → fixed point with stochastic rounding → Z_2^k, for up to ``max_clients`` summands.

    Args:
        clip: every coordinate is clipped to ``[-clip, clip]`` before encoding.
        frac_bits: fixed-point precision; one coordinate's rounding error is below ``2**-frac_bits``.
        ring_bits: k of Z_2^k (≤ 64).
        max_clients: how many encoded vectors may be summed; the constructor rejects any
            configuration in which that sum could wrap.
        weighted: append the client weight as one extra coordinate (weighted mean decoding).
        max_weight: largest accepted weight when ``weighted``.
    """

    clip: float
    frac_bits: int
    ring_bits: int
    max_clients: int
    weighted: bool = False
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip: must be a finite number > 0 (got {self.clip!r})")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 40:
            raise ConfigError(f"frac_bits: must be an integer in 0..40 (got {self.frac_bits!r})")
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise ConfigError(f"max_clients: must be an integer >= 1 (got {self.max_clients!r})")
        if self.weighted and not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight: must be a finite number > 0 (got {self.max_weight!r})")
        ring = Ring(self.ring_bits)
        if self.max_abs_encoded > MAX_ENCODED_MAGNITUDE:
            raise ConfigError(
                f"frac_bits: clip={self.clip} * max_weight={self.weight_factor} * 2**frac_bits={self.frac_bits} "
                f"exceeds 2**40, where float64 stochastic rounding loses its fractional resolution"
            )
        bound = self.max_clients * self.max_abs_encoded
        if bound >= (1 << (ring.bits - 1)):
            raise EncodingOverflowError(
                f"the sum of max_clients={self.max_clients} inputs could wrap the ring: "
                f"max_clients * ceil(clip={self.clip} * max_weight={self.weight_factor} "
                f"* 2**frac_bits={self.frac_bits}) = {bound} >= 2**(ring_bits-1) = 2**{ring.bits - 1}; "
                f"lower clip, frac_bits or max_clients, or raise ring_bits"
            )

    @classmethod
    def for_clients(cls, max_clients: int, clip: float, ring_bits: int = 32, *, weighted: bool = False,
                    max_weight: float = 1.0) -> FixedPointEncoder:
        """The most precise encoder (largest ``frac_bits``) whose sum of ``max_clients`` cannot wrap."""
        for frac_bits in range(40, -1, -1):
            try:
                return cls(clip, frac_bits, ring_bits, max_clients, weighted, max_weight)
            except ConfigError:
                continue
        # frac_bits=0 overflowing too: re-raise the error that names the parameters.
        return cls(clip, 0, ring_bits, max_clients, weighted, max_weight)

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    @property
    def scale(self) -> float:
        return float(1 << self.frac_bits)

    @property
    def weight_factor(self) -> float:
        return float(self.max_weight) if self.weighted else 1.0

    @property
    def max_abs_encoded(self) -> int:
        """Largest |integer| one client's coordinate (or weight) can encode to."""
        value = math.ceil(self.clip * self.weight_factor * self.scale)
        if self.weighted:
            value = max(value, math.ceil(self.max_weight * self.scale))
        return value

    def encoded_length(self, dim: int) -> int:
        return dim + 1 if self.weighted else dim

    def encode(self, values: np.ndarray, seed: bytes, *, weight: float | None = None) -> np.ndarray:
        """Encode one client's float vector into ring elements.

        ``seed`` (16 bytes) drives the stochastic rounding through the AES-CTR PRG; derive a fresh
        one per client and round. ``weight`` is required iff the encoder is ``weighted``.
        """
        x = np.asarray(values)
        if x.ndim != 1:
            raise ConfigError(f"values: expected a 1-D vector (got shape {x.shape})")
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"values: expected floating point values (got {x.dtype})")
        if len(seed) != SEED_BYTES:
            raise ConfigError(f"seed: expected {SEED_BYTES} bytes (got {len(seed)})")
        factor = 1.0
        if self.weighted:
            if weight is None or not math.isfinite(weight) or not 0 <= weight <= self.max_weight:
                raise ConfigError(f"weight: must be in [0, max_weight={self.max_weight}] (got {weight!r})")
            factor = float(weight)
        elif weight is not None:
            raise ConfigError("weight: this encoder is not weighted (construct it with weighted=True)")
        n = self.encoded_length(x.shape[0])
        d = x.shape[0]
        ring = self.ring
        out = np.empty(n, dtype=ring.dtype)
        # Work in cache-sized chunks with buffers reused across chunks: a handful of passes over
        # L2-resident data instead of several full-size temporaries.
        chunk = max(1, min(n, ENCODE_CHUNK))
        stream = KeyStream(seed)
        raw = np.empty(4 * chunk + 16, dtype=np.uint8)
        words = raw[: 4 * chunk].view("<u4")
        y = np.empty(chunk, dtype=np.float64)
        u = np.empty(chunk, dtype=np.float64)
        ints = np.empty(chunk, dtype=np.int64)
        mult = factor * self.scale
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            size = stop - start
            xs = x[start : min(stop, d)]
            k = xs.shape[0]
            yv = y[:size]
            if not np.isfinite(xs).all():
                raise ConfigError("values: contains NaN or infinity")
            np.clip(xs, -self.clip, self.clip, out=yv[:k])
            yv[:k] *= mult
            if k < size:  # the weight coordinate (weighted encoders only)
                yv[k:] = mult
            # floor(y + u) with u ~ U[0, 1) rounds up with probability frac(y): unbiased stochastic rounding.
            stream.fill(raw, 4 * size)
            np.multiply(words[:size], 2.0**-32, out=u[:size])
            yv += u[:size]
            np.floor(yv, out=ints[:size], casting="unsafe")
            if ring.bits <= 32:
                out[start:stop] = ints[:size]  # int64 → uint32 keeps the low 32 bits (mod 2^32)
            else:
                out[start:stop] = ints[:size].view(np.uint64)
        return ring.reduce(out)

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """Decode a ring sum to the float64 sum of the (clipped, weighted) inputs."""
        ring = self.ring
        ring.check(ring_sum, name="ring_sum")
        return ring.to_signed(ring_sum).astype(np.float64) / self.scale

    def decode_mean(self, ring_sum: np.ndarray, count: int) -> np.ndarray:
        """Mean of ``count`` unweighted inputs (for a weighted encoder use :meth:`decode_weighted_mean`)."""
        if self.weighted:
            raise ConfigError("decode_mean: this encoder is weighted; use decode_weighted_mean")
        if count < 1:
            raise ConfigError(f"count: must be >= 1 (got {count})")
        return self.decode_sum(ring_sum) / count

    def decode_weighted_mean(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """``(Σ w_i x_i / Σ w_i, Σ w_i)`` from a weighted ring sum."""
        if not self.weighted:
            raise ConfigError("decode_weighted_mean: this encoder is not weighted")
        total = self.decode_sum(ring_sum)
        weight = float(total[-1])
        if weight <= 0:
            raise ConfigError(f"total weight: must be > 0 to form a weighted mean (got {weight})")
        return total[:-1] / weight, weight

    def error_bound(self, count: int) -> float:
        """Bound on |decoded mean − mean of clipped inputs| for ``count`` unweighted inputs.

        Each coordinate's stochastic rounding error lies in (-1/scale, 1/scale), so the error of
        the mean is strictly below ``1/scale`` (the count cancels).
        """
        del count
        return 1.0 / self.scale
