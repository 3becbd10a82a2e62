"""Central user-level DP (McMahan et al. 2018): the site clips its update; the server adds the noise.

A site can rely on the server's noise only when it trusts the server (``--trust-server``); otherwise
the sum leaves un-noised as far as it can tell, and its ledger records no guarantee. The site's policy
floor on the noise multiplier is checked either way.
"""

from __future__ import annotations

import math

from fedveil.clients.mechanisms.base import ClientMechanism, MechanismTerms
from fedveil.clients.policy import PolicyViolation, SitePolicy
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.protocol import fedveil_pb2 as pb


class CentralDP(ClientMechanism):
    name = "central"
    user_level = True

    def dp_terms(self, policy: SitePolicy, start: pb.RoundStart, honest: int) -> MechanismTerms:
        z = float(start.dp.noise_multiplier)
        if not (math.isfinite(z) and z >= 0):  # a NaN would pass the floor's comparison
            raise PolicyViolation("dp.noise_multiplier", f"must be a finite number >= 0 (got {z!r})")
        floor = policy.min_noise_multiplier
        if floor > 0 and z < floor:
            raise PolicyViolation("dp.noise_multiplier", f"z={z:g} is below this site's floor {floor:g}")
        if policy.trust_server and z > 0:
            clip = float(start.dp.update_clip_norm)
            if not (math.isfinite(clip) and clip > 0):  # no clip: no sensitivity, the Gaussian event would not hold
                raise PolicyViolation("dp.update_clip_norm", f"central DP needs the site to clip its update to a "
                                      f"positive norm (got {clip!r})")
            return MechanismTerms(guaranteed_event=SubsampledGaussianEvent(1.0, z))
        return MechanismTerms()
