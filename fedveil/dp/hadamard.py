"""Randomized Hadamard rotation for distributed DP.

Why rotate before quantizing: the discrete mechanisms (Skellam, distributed discrete
Gaussian) round every coordinate to an integer and clip it modulo ``2^b``.  A client update
often concentrates its energy in a few coordinates; those coordinates would either overflow
the ring or force a coarse scale that wastes most of the bits elsewhere.  A random orthonormal
rotation spreads the vector's norm evenly, so after rotation every coordinate of a vector
``x`` is (sub-)Gaussian with variance about ``||x||^2 / D`` ("flatness", Kairouz, Liu and
Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", Sec. 4.2 and Lemma 29; Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism
for Differentially Private Federated Learning", Sec. 4).

The rotation is ``R x = H S pad(x)`` with ``H`` the orthonormal Walsh–Hadamard matrix of size
``D = 2^ceil(log2 d)``, ``S`` a diagonal of random signs and ``pad`` zero padding from ``d`` to
``D``.  The signs come from a *public* seed shared by every client and the server for one
round: they are not secret (privacy comes from the noise, not from the rotation), so a
seeded numpy generator is the right tool here, never a key.  ``H`` is symmetric and
``H H = I``, so the inverse is ``unpad(S H y)``.

The fast Walsh–Hadamard transform costs ``O(D log D)``: ``log2 D`` vectorized butterfly passes
over the whole array (a Python loop over the levels, never over the elements).  Every
function works on the last axis, so a batch of client vectors of shape ``(n, d)`` is rotated
in one call.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "fwht",
    "inverse_rotate",
    "padded_dim",
    "random_signs",
    "rotate",
]


def padded_dim(dim: int) -> int:
    """The Hadamard size ``D``: the smallest power of two that is at least ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer (got {dim!r})")
    return 1 << (int(dim) - 1).bit_length()


def fwht(x: ArrayLike) -> NDArray[np.float64]:
    """Orthonormal fast Walsh–Hadamard transform along the last axis (Sylvester order).

    The last axis must have a power-of-two length ``D``.  The result is ``x H / sqrt(D)``;
    applying it twice returns ``x`` (up to rounding).
    """
    y = np.array(x, dtype=np.float64, copy=True)
    if y.ndim == 0:
        raise ValueError("x must have at least one axis")
    size = y.shape[-1]
    if size < 1 or size & (size - 1):
        raise ValueError(f"the last axis of x must have a power-of-two length (got {size})")
    lead = y.shape[:-1]
    half = 1
    while half < size:
        # Index i = block * 2h + j * h + r pairs (j=0, r) with (j=1, r): elements i and i + h.
        blocks = y.reshape(*lead, size // (2 * half), 2, half)
        top = blocks[..., 0, :]
        bottom = blocks[..., 1, :]
        y = np.stack((top + bottom, top - bottom), axis=-2).reshape(*lead, size)
        half *= 2
    y /= math.sqrt(size)
    return y


def random_signs(dim: int, seed: int) -> NDArray[np.float64]:
    """The diagonal ``S``: ``D = padded_dim(dim)`` public random signs from ``seed``.

    ``seed`` is public randomness agreed for one round (for example derived from the round
    number and the session id); the same seed must be used to rotate and to invert.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"rotation_seed must be a non-negative integer (got {seed!r})")
    size = padded_dim(dim)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    bits = rng.integers(0, 2, size=size, dtype=np.int8)
    return (2.0 * bits - 1.0).astype(np.float64)


def rotate(x: ArrayLike, seed: int) -> NDArray[np.float64]:
    """Rotate vectors (last axis of length ``d``) to the padded domain of length ``D``.

    Returns ``H S pad(x)``; norms are preserved exactly in exact arithmetic.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError("x must have at least one axis")
    dim = arr.shape[-1]
    signs = random_signs(dim, seed)
    size = signs.shape[0]
    padded = np.zeros((*arr.shape[:-1], size), dtype=np.float64)
    padded[..., :dim] = arr
    padded *= signs
    return fwht(padded)


def inverse_rotate(y: ArrayLike, dim: int, seed: int) -> NDArray[np.float64]:
    """Invert :func:`rotate`: ``unpad(S H y)``, returning the first ``dim`` coordinates."""
    arr = np.asarray(y, dtype=np.float64)
    size = padded_dim(dim)
    if arr.ndim == 0 or arr.shape[-1] != size:
        raise ValueError(f"y must have last axis of length padded_dim({dim}) = {size} (got shape {arr.shape})")
    signs = random_signs(dim, seed)
    restored = fwht(arr) * signs
    return np.ascontiguousarray(restored[..., :dim])
