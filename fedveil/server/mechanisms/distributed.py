"""``--dp distributed``: the distributed discrete mechanism (Kairouz et al., ICML 2021; Agarwal et
al., NeurIPS 2021). Sites clip, rotate, scale and round their update and add their own Skellam or
discrete-Gaussian noise share in the integer domain, so the server only ever sees a noised sum.
Each round is accounted with the mechanism's RDP bound for its threshold of contributors (the
fewest a round can complete with), with no sampling amplification."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedveil.dp.central import DPFedAvg
from fedveil.dp.distributed import decode_sum, derive_parameters, derive_rotation_seed
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server import sanity
from fedveil.server.mechanisms.base import DecodedRound, LedgerEntry, PrivacyMechanism
from fedveil.server.round_plan import RoundPlan

if TYPE_CHECKING:
    from fedveil.server.config import ServerConfig


class DistributedDP(PrivacyMechanism):
    """User-level DP whose noise the sites add inside the secure sum."""

    mode: ClassVar[str] = "distributed"
    user_level: ClassVar[bool] = True

    @classmethod
    def refusal(cls, config: ServerConfig) -> tuple[str, str] | None:
        if config.privacy.accountant != "rdp":
            # the job used to start and fail at its first release (the privacy review of 2026-12-07)
            return ("--dp-accountant", "must be rdp with --dp distributed: its noise (Skellam or discrete Gaussian) "
                    f"is accounted by its RDP curve (got {config.privacy.accountant!r})")
        return super().refusal(config)

    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes,
             state: DPFedAvg | None) -> RoundPlan:
        cfg = self.config
        privacy = cfg.privacy
        try:
            dist = derive_parameters(cohort_size, self.dim, privacy.clip, mechanism=privacy.mechanism,
                                     bits=privacy.bits, noise_multiplier=privacy.noise_multiplier)
        except ValueError as err:  # e.g. a noise share too large to sample exactly at these bits
            from fedveil.server.coordinator.state import JobError  # the coordinator imports this module

            raise JobError(f"{err} (a cohort of {cohort_size}, {self.dim} weights)", field="dp_bits") from None
        rotation = derive_rotation_seed(context + struct.pack("<I", round_number))
        dp = pb.DpParams(mode=self.mode, update_clip_norm=cfg.privacy.clip)
        dp.distributed.CopyFrom(pb.DistributedDpParams(
            mechanism=dist.mechanism, l2_clip=dist.clip_norm, scale=dist.scale, noise_stddev=dist.local_stddev,
            beta=dist.beta, bits=dist.bits, rotation_seed=struct.pack("<Q", rotation),
            padded_dimension=dist.padded_dim, config_json=json.dumps(dataclasses.asdict(dist), sort_keys=True),
        ))
        encoding = pb.EncodingParams(ring_bits=dist.bits, dimension=dist.padded_dim)
        return RoundPlan(round_number, cohort_size, threshold, dist.padded_dim, dist.bits, encoding, dp,
                         distributed=dist, rotation_seed=rotation, clip_norm=cfg.privacy.clip,
                         details={"mechanism": dist.mechanism, "bits": dist.bits, "scale": dist.scale,
                                  "local_stddev": dist.local_stddev})

    def decode(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
               state: DPFedAvg | None) -> DecodedRound:
        dist = plan.distributed
        assert dist is not None
        total = decode_sum(dist, ring_sum, rotation_seed=plan.rotation_seed)
        sanity.check_norm(total, sanity.distributed_bound(survivors, dist.clip_norm, dist.norm_inflation,
                                                          dist.central_stddev(survivors), dist.padded_dim),
                          "noised update sum")
        mean = total / float(self.config.schedule.clients_per_round)
        return DecodedRound(np.asarray(mean, dtype=np.float64),
                            {"noise_stddev_sum": dist.central_stddev(survivors)})

    def privacy_event(self, plan: RoundPlan, available_at_draw: int, amplification: bool,
                      state: DPFedAvg | None) -> LedgerEntry:
        assert plan.distributed is not None
        event = plan.distributed.rdp_event(n_contributors=plan.threshold)
        details = {"cohort": plan.cohort_size, "clip_norm": plan.clip_norm, "min_contributors": plan.threshold,
                   **plan.details, "available": available_at_draw, "sampling": "none", "sample_rate": 1.0,
                   "relation": event.relation, "amplification": False,
                   "amplification_reason": "distributed DP claims no sampling amplification: the round is accounted "
                   "for its threshold of contributors whoever was drawn"}
        return LedgerEntry(event, f"distributed-{plan.distributed.mechanism}", details)
