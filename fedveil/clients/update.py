"""What a client sends: its model update, clipped, encoded into the ring (and noised in
distributed-DP mode), ready for the secure-aggregation masks. Pure functions, no I/O.

The update is ``Δ = w_local − w_global`` over the model's floating-point state (the layout of
:func:`fedveil.task.model_to_vector`). Raw data never leaves the client; only Δ does, and only
masked. Order of operations (McMahan et al. 2018; Kairouz et al. 2021):

1. user-level clipping: ``Δ ← Δ · min(1, S/‖Δ‖)`` when the round has a clip norm ``S``;
2. extra coordinates the server asked for, appended after Δ (``weight``: the client's weight in
   the weighted mean; ``unclipped``: Andrew et al.'s adaptive-clipping bit ``1[‖Δ‖ ≤ S]``);
3. either fixed-point encoding with stochastic rounding (``fedveil.secagg.encoding``) or, in
   distributed-DP mode, the client side of the distributed discrete mechanism
   (``fedveil.dp.distributed``): rotation, scaling, conditional rounding and this client's
   share of the discrete noise, all in the integer domain.

Seeds: everything random here derives from the client's private seed and the round, with
SHA-256 domain separation, so a client run twice with the same seed sends the same encoded
vector, while the server, which does not know the private seed, cannot predict the noise.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from fedveil.dp.clipping import clip_update
from fedveil.errors import FedveilError
from fedveil.metrics import EvaluationLayout, EvaluationLayoutError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.encoding import MAX_ENCODED_MAGNITUDE, MAX_RING_BITS, FixedPointEncoder

KNOWN_EXTRA_COORDINATES = ("weight", "unclipped")
"""``weight`` is appended by the secagg encoder itself (``EncodingParams.weighted``); the client appends the others."""


class RoundConfigError(FedveilError, ValueError):
    """The server's round parameters cannot be honoured by this client; the message names the field
    (and ``field`` does, where it was raised with one)."""

    @property
    def detail(self) -> str:
        """The message without its leading ``field:``."""
        text = str(self)
        prefix = f"{self.field}: " if self.field else ""
        return text[len(prefix):] if prefix and text.startswith(prefix) else text


def derive_seed(private_seed: bytes, purpose: str, round_number: int, round_seed: int, length: int = 16) -> bytes:
    """A per-round, per-purpose seed: SHA-256(domain ‖ purpose ‖ round ‖ round seed ‖ private seed)."""
    if length > 32:
        raise ValueError(f"length must be at most 32 (got {length})")
    header = b"fedveil/client/v1/" + purpose.encode() + b"\x00" + struct.pack("<IQ", round_number, round_seed)
    return hashlib.sha256(header + private_seed).digest()[:length]


@dataclass(frozen=True)
class AttemptRandomness:
    """Everything random one round attempt needs (Bonawitz et al.: fresh randomness every attempt).

    ``shuffle`` (data order) always derives from the private seed, the round and this site's own
    count of attempts, so a seed reproduces a site's data order. Rounding, noise, secagg keys and
    the graph-seed contribution come from the OS CSPRNG, fresh for every attempt — a retried
    attempt then never repeats an earlier one, and the server, which may know the seed, cannot
    predict them. Only ``insecure_deterministic`` (tests, bit-for-bit simulations) derives them
    from the seed too.
    """

    shuffle: int
    rounding: bytes
    noise: bytes
    secagg: bytes | None
    """32 bytes for the secagg client's keys, or None: the client draws them from os.urandom."""
    beacon: bytes

    def __repr__(self) -> str:
        return "AttemptRandomness(<secret>)"


def attempt_randomness(private_seed: bytes, round_number: int, attempt: int, *,
                       deterministic: bool) -> AttemptRandomness:
    """Seeds for attempt ``attempt`` (this site's count, 1-based) of round ``round_number``."""
    shuffle = seed_int(derive_seed(private_seed, "shuffle", round_number, attempt))
    if not deterministic:
        return AttemptRandomness(shuffle, os.urandom(16), os.urandom(32), None, os.urandom(32))
    return AttemptRandomness(
        shuffle,
        derive_seed(private_seed, "rounding", round_number, attempt),
        derive_seed(private_seed, "dp-noise", round_number, attempt, 32),
        derive_seed(private_seed, "secagg", round_number, attempt, 32),
        derive_seed(private_seed, "beacon", round_number, attempt, 32),
    )


def seed_int(seed: bytes) -> int:
    """A non-negative 63-bit integer from a seed (for ``torch.Generator.manual_seed``)."""
    return int.from_bytes(seed[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class PreparedUpdate:
    """An encoded update ready for masking, plus what the client may keep for its own records."""

    ring_vector: np.ndarray
    norm: float
    clipped: bool
    dimension: int


def model_delta(local: np.ndarray, global_: np.ndarray) -> np.ndarray:
    """``w_local − w_global`` in float64, after checking the two layouts agree."""
    if local.shape != global_.shape:
        raise RoundConfigError(f"model: the trained model has {local.size} values, the global model {global_.size}")
    delta = local.astype(np.float64) - global_.astype(np.float64)
    if not np.all(np.isfinite(delta)):
        raise RoundConfigError("model: the trained model contains NaN or infinite values (training diverged?)")
    return delta


def encoder_for(encoding: pb.EncodingParams, cohort_size: int) -> FixedPointEncoder:
    """The fixed-point encoder the server configured for this round.

    Raises :class:`RoundConfigError` naming the field; a number the encoder could not even
    multiply out (a ``max_weight`` of 1e308 makes ``clip · max_weight · 2^f`` infinite) is refused
    as such before the encoder sees it."""
    weighted = bool(encoding.weighted)
    max_weight = float(encoding.max_weight) if weighted else 1.0
    clip = float(encoding.clip_range)
    for field, value in (("encoding.clip_range", clip), ("encoding.max_weight", max_weight)):
        if not (math.isfinite(value) and 0 < value <= MAX_ENCODED_MAGNITUDE):
            raise RoundConfigError(f"{field}: must be a finite number in (0, 2^40] (got {value!r})", field=field)
    try:
        return FixedPointEncoder(
            clip=clip,
            frac_bits=int(encoding.fractional_bits),
            ring_bits=int(encoding.ring_bits),
            max_clients=max(int(cohort_size), 1),
            weighted=weighted,
            max_weight=max_weight,
        )
    except (ValueError, ArithmeticError) as err:
        raise RoundConfigError(f"encoding: {err}", field="encoding") from err


def extra_coordinates(encoding: pb.EncodingParams) -> list[str]:
    """The round's extra coordinates, each one this site knows; raises :class:`RoundConfigError` naming
    the field otherwise."""
    extras = list(encoding.extra_coordinates)
    unknown = [e for e in extras if e not in KNOWN_EXTRA_COORDINATES]
    if unknown:
        raise RoundConfigError(f"encoding.extra_coordinates: unknown coordinate(s) {unknown[:5]}",
                               field="encoding.extra_coordinates")
    return extras


def update_length(encoding: pb.EncodingParams, model_size: int, cohort_size: int) -> int:
    """Ring elements :func:`prepare_update` makes of a model of ``model_size`` values: the values, the
    ``unclipped`` bit if asked for, and the weight of a weighted round."""
    extras = extra_coordinates(encoding)
    return encoder_for(encoding, cohort_size).encoded_length(model_size + int("unclipped" in extras))


def evaluation_layout(encoding: pb.EncodingParams) -> EvaluationLayout | None:
    """The round's secure evaluation section (None: it has none); raises :class:`RoundConfigError`
    naming the field when the layout is unusable or its dimension is not the layout's."""
    ev = encoding.evaluation
    if not ev.dimension:
        return None
    try:
        layout = EvaluationLayout(tuple(ev.metrics), float(ev.clip), int(ev.fractional_bits), int(ev.limb_bits),
                                  int(ev.limbs), int(ev.max_examples), int(encoding.ring_bits))
    except (EvaluationLayoutError, ArithmeticError) as err:
        raise RoundConfigError(f"encoding.evaluation: {err}", field="encoding.evaluation") from None
    if layout.dimension != ev.dimension:
        raise RoundConfigError(f"encoding.evaluation.dimension: {ev.dimension} does not match its layout "
                               f"({layout.dimension})", field="encoding.evaluation.dimension")
    return layout


def check_ring_bits(encoding: pb.EncodingParams) -> None:
    """``encoding.ring_bits`` must be a ring's (1..64); raises :class:`RoundConfigError` naming it."""
    ring_bits = int(encoding.ring_bits)
    if not 1 <= ring_bits <= MAX_RING_BITS:
        raise RoundConfigError(f"encoding.ring_bits: must be in 1..{MAX_RING_BITS} (got {ring_bits})",
                               field="encoding.ring_bits")


def check_encoding(start: pb.RoundStart, update_dimension: int | None) -> None:
    """Every number of the round's encoding that this site reads once it has trained, checked before
    it trains: the ring, the evaluation section's layout, and ``encoding.dimension`` against the
    ``update_dimension`` ring elements this site's update will take (None: the mechanism encodes no
    update here; an evaluation-only round has none). Raises :class:`RoundConfigError` naming the field.

    Without this a server could let a site train and then make it fail on a number it only reads
    when it encodes its update (an infinite ``max_weight``, a dimension one off, an evaluation
    clip of 0): the site left the round by raising out of the user's loop instead of declining it.
    """
    enc = start.encoding
    check_ring_bits(enc)
    layout = evaluation_layout(enc)
    if start.purpose == pb.ROUND_PURPOSE_EVALUATE:
        update_dimension = 0
    if update_dimension is None:
        return
    expected = update_dimension + (layout.dimension if layout is not None else 0)
    if int(enc.dimension) != expected:
        raise RoundConfigError(
            f"encoding.dimension: the server expects {enc.dimension} ring elements, this site's model gives "
            f"{update_dimension} for the update" + (f" and the evaluation section {layout.dimension}" if layout else "")
            + " (is it the same task and model?)", field="encoding.dimension")


def check_fixed_point_round(start: pb.RoundStart, model_size: int) -> None:
    """:func:`check_encoding` for a round encoded with the fixed-point encoder (every mechanism but
    distributed DP), and the clip norm it applies to the update; raises :class:`RoundConfigError`."""
    if start.purpose == pb.ROUND_PURPOSE_EVALUATE:
        check_encoding(start, 0)  # no update: the dimension is the evaluation section's alone
        return
    clip_norm = float(start.dp.update_clip_norm)
    if not (math.isfinite(clip_norm) and clip_norm >= 0):
        raise RoundConfigError(f"dp.update_clip_norm: must be a finite number >= 0 (got {clip_norm!r})",
                               field="dp.update_clip_norm")
    check_ring_bits(start.encoding)
    check_encoding(start, update_length(start.encoding, model_size, int(start.secagg.cohort_size)))


def prepare_update(
    delta: np.ndarray,
    start: pb.RoundStart,
    *,
    rounding_seed: bytes,
    weight: float = 1.0,
) -> PreparedUpdate:
    """Clip, append extra coordinates and encode Δ as ``start`` (the round's RoundStart) asks.

    Distributed-DP rounds go through :func:`prepare_distributed_update` instead.
    """
    enc = start.encoding
    extras = extra_coordinates(enc)
    clip_norm = float(start.dp.update_clip_norm)
    norm = float(np.linalg.norm(delta))
    unclipped = 1.0
    if clip_norm > 0:
        result = clip_update(delta, clip_norm)
        delta, unclipped = result.clipped, result.unclipped
    values = delta
    if "unclipped" in extras:
        values = np.concatenate([values, [unclipped]])
    encoder = encoder_for(enc, start.secagg.cohort_size)
    if encoder.weighted:
        ring = encoder.encode(values, rounding_seed, weight=min(weight, encoder.max_weight))
    else:
        ring = encoder.encode(values, rounding_seed)
    update_dimension = int(enc.dimension) - int(enc.evaluation.dimension)
    if enc.dimension and ring.shape[0] != update_dimension:
        raise RoundConfigError(
            f"encoding.dimension: the server expects {update_dimension} ring elements, this client's model "
            f"and extra coordinates {extras} give {ring.shape[0]} (is it the same task and model?)"
        )
    return PreparedUpdate(ring_vector=ring, norm=norm, clipped=unclipped < 1.0, dimension=int(ring.shape[0]))
