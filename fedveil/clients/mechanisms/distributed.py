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
from fedveil.clients.update import AttemptRandomness, PreparedUpdate
from fedveil.dp.accounting import DpEvent, RdpCurveEvent
from fedveil.dp.distributed import DistributedDPConfig, skellam_rdp
from fedveil.protocol import fedveil_pb2 as pb


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


class DistributedDP(ClientMechanism):
    name = "distributed"
    user_level = True

    def terms(self, policy: SitePolicy, start: pb.RoundStart, honest: int) -> MechanismTerms:
        try:
            announced = DistributedDPConfig(**json.loads(start.dp.distributed.config_json))
        except (ValueError, TypeError) as err:
            raise PolicyViolation("dp.distributed.config_json", str(err)) from None
        floor = policy.min_noise_multiplier
        own = own_noise_stddev(announced, floor, honest)
        if own > announced.local_stddev * 1.0000001:
            # the ring was sized for k standard deviations of signal + noise + rounding (fedveil.dp.distributed)
            n_all = announced.n_clients
            signal = (announced.scale * announced.clip_norm) ** 2 * n_all**2 / announced.padded_dim
            spread = math.sqrt(signal + own**2 + (n_all - 1) * announced.local_stddev**2 + n_all / 4.0)
            if 2.0 * announced.k_stddevs * spread > announced.modulus:
                raise PolicyViolation("dp.distributed", f"this site's noise floor z>={floor:g} needs a noise share "
                                      f"that the round's {announced.bits}-bit ring cannot hold")
        try:
            distributed = dataclasses.replace(announced, local_stddev=own)
        except ValueError as err:
            raise PolicyViolation("dp.distributed", str(err)) from None
        return MechanismTerms(guaranteed_event=guaranteed_distributed_event(announced, own, honest),
                              distributed=distributed)

    def encode(self, delta: np.ndarray, start: pb.RoundStart, terms: MechanismTerms,
               randomness: AttemptRandomness, weight: float) -> PreparedUpdate:
        return prepare_distributed_update(delta, start, rounding_seed=randomness.rounding,
                                          noise_seed=randomness.noise, config=terms.distributed)
