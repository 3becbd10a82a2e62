"""The client's side of distributed DP: its discrete-noise share, added before masking.

In distributed-DP rounds the server sends the full :class:`fedveil.dp.distributed.DistributedDPConfig`
(``DistributedDpParams.config_json``) and a public per-round rotation seed; the client clips,
rotates, scales, rounds and adds its own Skellam or discrete-Gaussian noise share in the
integer domain (:func:`fedveil.dp.distributed.encode_update`), and the result goes straight
into secure aggregation. The noise seed is private to the client, so the server can neither
predict nor subtract a client's noise: it only ever sees the noised sum. The rounding and the
noise come from an AES-CTR stream under that seed (:class:`fedveil.dp.secure_random.SecureRandom`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from fedveil.clients.update import PreparedUpdate, RoundConfigError
from fedveil.dp.distributed import DistributedDPConfig, encode_update
from fedveil.dp.secure_random import SecureRandom
from fedveil.protocol import fedveil_pb2 as pb


def distributed_config(params: pb.DistributedDpParams) -> DistributedDPConfig:
    """The round's distributed-DP configuration, from its JSON form."""
    try:
        fields = json.loads(params.config_json)
        return DistributedDPConfig(**fields)
    except (ValueError, TypeError) as err:
        raise RoundConfigError(f"dp.distributed.config_json: {err}") from None


def rotation_seed_of(params: pb.DistributedDpParams) -> int:
    """The public rotation seed as the integer :mod:`fedveil.dp.hadamard` takes (first 8 bytes, LE)."""
    seed = bytes(params.rotation_seed)
    if len(seed) < 8:
        raise RoundConfigError(f"dp.distributed.rotation_seed: expected at least 8 bytes (got {len(seed)})")
    return int.from_bytes(seed[:8], "little")


def distributed_noise_source(noise_seed: bytes, rounding_seed: bytes) -> SecureRandom:
    """The AES-CTR stream behind this attempt's rounding and noise share.

    Its key hashes the attempt's seeds: fresh OS bits every attempt (never sent), so the server can
    neither predict nor replay the noise; only ``--insecure-deterministic`` jobs derive them from
    the site's seed.
    """
    return SecureRandom(hashlib.sha256(b"fedveil/dp/distributed/v1\x00" + noise_seed + rounding_seed).digest())


def prepare_distributed_update(
    delta: np.ndarray, start: pb.RoundStart, *, rounding_seed: bytes, noise_seed: bytes,
    config: DistributedDPConfig | None = None,
) -> PreparedUpdate:
    """Clip → rotate → scale → conditional rounding → + noise share → ring, as the round asks.

    ``config`` is the round's configuration with this site's own noise share (its policy's floor,
    :func:`fedveil.clients.admission.own_noise_stddev`); default: the server's, unchanged.
    """
    config = config if config is not None else distributed_config(start.dp.distributed)
    if delta.shape[0] != config.dim:
        raise RoundConfigError(
            f"dp.distributed: the configuration is for updates of dimension {config.dim}, "
            f"this model has {delta.shape[0]}"
        )
    rng = distributed_noise_source(noise_seed, rounding_seed)
    ring = encode_update(config, delta, rotation_seed=rotation_seed_of(start.dp.distributed), rng=rng,
                         ring_bits=int(start.encoding.ring_bits))
    if start.encoding.dimension and ring.shape[0] != start.encoding.dimension:
        raise RoundConfigError(
            f"encoding.dimension: the server expects {start.encoding.dimension} ring elements, "
            f"distributed DP gives {ring.shape[0]}"
        )
    norm = float(np.linalg.norm(delta))
    return PreparedUpdate(ring_vector=ring, norm=norm, clipped=norm > config.clip_norm, dimension=int(ring.shape[0]))
