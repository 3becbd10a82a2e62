"""``--dp none``: secure aggregation only; the mean of the survivors' updates, no DP accounting."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedveil.dp.central import DPFedAvg
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.mechanisms.base import DecodedRound, PrivacyMechanism, decode_fixed_point_mean, fixed_point_plan
from fedveil.server.round_plan import RoundPlan


class NoPrivacy(PrivacyMechanism):
    """No differential privacy: the server learns the exact mean of the survivors' updates."""

    mode: ClassVar[str] = "none"
    keeps_ledger: ClassVar[bool] = False

    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes,
             state: DPFedAvg | None) -> RoundPlan:
        return fixed_point_plan(self.config, self.dim, round_number, cohort_size, threshold,
                                pb.DpParams(mode=self.mode), clip_norm=0.0, clip_range=self.config.secagg.clip_range,
                                extras=[])

    def decode(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
               state: DPFedAvg | None) -> DecodedRound:
        return decode_fixed_point_mean(plan, ring_sum, survivors, declared_weight, self.dim)
