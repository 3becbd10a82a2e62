"""Both ends of distributed DP in the ring: the client's rotate → scale → round → + noise share →
ring encoding, and the server's decoding of the noised sum (see :mod:`fedveil.dp.distributed`).
Pure module: no I/O."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedveil.dp.clipping import clip_updates
from fedveil.dp.discrete_noise import _MAX_ROUNDING_TRIES, _check_bits, sample_discrete_gaussian, sample_skellam
from fedveil.dp.hadamard import inverse_rotate, rotate
from fedveil.dp.secure_random import RandomSource

if TYPE_CHECKING:  # the config module re-exports this one
    from fedveil.dp.distributed import DistributedDPConfig

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
    x: ArrayLike, bound: float, rng: RandomSource, *, max_tries: int = _MAX_ROUNDING_TRIES
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
    rng: RandomSource,
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

