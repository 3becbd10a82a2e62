"""Distributed user-level DP (Kairouz, Liu, Steinke 2021; Agarwal, Kairouz, Liu 2021): each site adds
its own share of discrete noise inside the secure sum, so the server never sees an un-noised total.

A site does not take the server's word for how much noise the other sites add. It counts only the
``honest`` contributors any released sum must hold (t − c), tops its own share up until the noise it
can rely on reaches its policy's floor (:func:`own_noise_stddev`), refuses a ring too small to hold
that share, and records the resulting guarantee (:func:`guaranteed_distributed_event`).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from fedveil.clients.distributed import prepare_distributed_update
from fedveil.clients.mechanisms.base import ClientMechanism, MechanismTerms
from fedveil.clients.policy import PolicyViolation, SitePolicy
from fedveil.clients.update import AttemptRandomness, PreparedUpdate, RoundConfigError, check_encoding
from fedveil.dp.accounting import DpEvent, RdpCurveEvent
from fedveil.dp.distributed import DistributedDPConfig, skellam_rdp
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.encoding import MAX_RING_BITS
from fedveil.secagg.threshold import MAX_COHORT


def own_noise_stddev(config: DistributedDPConfig, floor: float, honest: int) -> float:
    """This site's noise share (integer units): the server's, topped up so that the noise it can rely on
    — its own share plus the announced share of the other ``honest − 1`` honest contributors — has
    standard deviation at least ``floor`` × the scaled clip norm."""
    announced = float(config.local_stddev)
    target = float(floor) * float(config.scale) * float(config.clip_norm)
    own_var = max(announced**2, target**2 - (honest - 1) * announced**2)
    return math.sqrt(own_var)


def guaranteed_distributed_event(config: DistributedDPConfig, own_stddev: float, honest: int) -> DpEvent:
    """One release's user-level RDP event from the noise this site can rely on (no sampling credit)."""
    if config.mechanism == "skellam":
        total = own_stddev**2 + (honest - 1) * float(config.local_stddev) ** 2
        l1, l2 = config.l1_sensitivity, config.l2_sensitivity
        return RdpCurveEvent.from_function(
            "distributed_skellam", lambda a: skellam_rdp(a, l1, l2, total),
            params={"honest_contributors": honest, "own_stddev": own_stddev,
                    "announced_stddev": float(config.local_stddev)})
    # discrete Gaussian: counted at the announced share for every honest contributor (own extra ignored)
    return config.rdp_event(n_contributors=honest)


MAX_CONFIG_JSON_CHARS = 4096
"""The longest ``dp.distributed.config_json`` a site parses (the server's is about 250 characters)."""


def announced_config(start: pb.RoundStart) -> DistributedDPConfig:
    """The round's :class:`DistributedDPConfig` as the server announced it, for this site's model (the
    round's ``start.model``). Raises :class:`PolicyViolation` naming the field, never a parser's or
    float's own error: the JSON is bounded in length (so in nesting), a number too large for a float
    is refused as the configuration's, and the contributors and dimension it sizes the ring with
    are bounded by a cohort and this site's model before anything is computed from them."""
    text = start.dp.distributed.config_json
    if len(text) > MAX_CONFIG_JSON_CHARS:
        raise PolicyViolation("dp.distributed.config_json", f"{len(text)} characters, more than the "
                              f"{MAX_CONFIG_JSON_CHARS} this site parses")
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than the parser's stack
        raise PolicyViolation("dp.distributed.config_json", f"not a JSON object ({type(err).__name__})") from None
    if not isinstance(fields, dict):
        raise PolicyViolation("dp.distributed.config_json", "not a JSON object")
    model_size = len(start.model.data) // 4
    for name, value in fields.items():
        if name not in _CONFIG_FIELDS or isinstance(value, bool) or not isinstance(value, int):
            continue  # an unknown field or a wrong type: the configuration's own check names it
        if name == "n_clients" and not 1 <= value <= MAX_COHORT:
            raise PolicyViolation("dp.distributed.config_json.n_clients", f"must be in 1..{MAX_COHORT}, the "
                                  f"largest cohort (got {_short(value)})")
        if name == "dim" and value != model_size:
            raise PolicyViolation("dp.distributed.config_json.dim", f"the configuration is for updates of "
                                  f"dimension {_short(value)}, this site's model has {model_size} values")
        if abs(value) >= 1 << 63:  # float() of it fails or loses the number
            raise PolicyViolation(f"dp.distributed.config_json.{name}", f"{_short(value)} is out of range")
    try:
        return DistributedDPConfig(**fields)
    except (ValueError, TypeError, ArithmeticError) as err:
        raise PolicyViolation("dp.distributed.config_json", str(err)[:200]) from None


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DistributedDPConfig))


def _short(number: int) -> str:
    """An integer for a message: a server's 400-digit number is not printed in full."""
    return str(number) if number.bit_length() < 64 else f"a {number.bit_length()}-bit number"


class DistributedDP(ClientMechanism):
    name = "distributed"
    user_level = True

    def dp_terms(self, policy: SitePolicy, start: pb.RoundStart, honest: int) -> MechanismTerms:
        announced = announced_config(start)
        floor = policy.min_noise_multiplier
        try:
            own = own_noise_stddev(announced, floor, honest)
            if own > announced.local_stddev * 1.0000001:
                # the ring was sized for k standard deviations of signal + noise + rounding (fedveil.dp.distributed)
                n_all = announced.n_clients
                signal = (announced.scale * announced.clip_norm) ** 2 * n_all**2 / announced.padded_dim
                spread = math.sqrt(signal + own**2 + (n_all - 1) * announced.local_stddev**2 + n_all / 4.0)
                if 2.0 * announced.k_stddevs * spread > announced.modulus:
                    raise PolicyViolation("dp.distributed", f"this site's noise floor z>={floor:g} needs a noise "
                                          f"share that the round's {announced.bits}-bit ring cannot hold")
            distributed = dataclasses.replace(announced, local_stddev=own)
            event = guaranteed_distributed_event(announced, own, honest)
        except (ValueError, ArithmeticError) as err:
            raise PolicyViolation("dp.distributed", str(err)[:200]) from None
        return MechanismTerms(guaranteed_event=event, distributed=distributed)

    def check_encoding(self, start: pb.RoundStart, terms: MechanismTerms, model_size: int) -> None:
        """The round's ring must hold the configuration's ``bits``, its rotation seed must be one, and
        the encoding's dimension must be the rotated vector's (:func:`prepare_distributed_update`)."""
        config = terms.distributed
        assert config is not None and config.dim == model_size  # announced_config
        ring_bits = int(start.encoding.ring_bits)
        if not config.bits <= ring_bits <= MAX_RING_BITS:
            raise RoundConfigError(f"encoding.ring_bits: must be in {config.bits}..{MAX_RING_BITS} for a "
                                   f"{config.bits}-bit distributed-DP sum (got {ring_bits})",
                                   field="encoding.ring_bits")
        seed = bytes(start.dp.distributed.rotation_seed)
        if len(seed) < 8:
            raise RoundConfigError(f"dp.distributed.rotation_seed: expected at least 8 bytes (got {len(seed)})",
                                   field="dp.distributed.rotation_seed")
        check_encoding(start, config.padded_dim)

    def encode(self, delta: np.ndarray, start: pb.RoundStart, terms: MechanismTerms,
               randomness: AttemptRandomness, weight: float) -> PreparedUpdate:
        return prepare_distributed_update(delta, start, rounding_seed=randomness.rounding,
                                          noise_seed=randomness.noise, config=terms.distributed)
