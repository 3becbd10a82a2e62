"""``--dp local``: sample-level DP at each site (Opacus DP-SGD); the server aggregates as without DP
and records each site's reported spend in the ledger (:mod:`fedveil.server.coordinator.site_reports`)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedveil.dp.central import DPFedAvg
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.mechanisms.base import DecodedRound, PrivacyMechanism, decode_fixed_point_mean, fixed_point_plan
from fedveil.server.round_plan import RoundPlan


class LocalDP(PrivacyMechanism):
    """DP-SGD at each site with the job's noise multiplier and clip (or a target ε); no user-level noise.

    The sites account their DP-SGD with the job's accountant (``--dp-accountant``), the one the
    ledger composes their steps with: a site that solves for a target ε under PLD trains with
    about 7% less noise than under RDP for the same guarantee (docs/privacy.md)."""

    mode: ClassVar[str] = "local"

    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes,
             state: DPFedAvg | None) -> RoundPlan:
        cfg = self.config
        dp = pb.DpParams(mode=self.mode)
        dp.local.CopyFrom(pb.LocalDpParams(
            noise_multiplier=self.site_noise_multiplier, max_grad_norm=cfg.privacy.local_max_grad_norm,
            target_epsilon=cfg.privacy.local_target_epsilon, delta=cfg.privacy.delta,
            planned_rounds=cfg.schedule.rounds, accountant=cfg.privacy.accountant,
        ))
        return fixed_point_plan(cfg, self.dim, round_number, cohort_size, threshold, dp, clip_norm=0.0,
                                clip_range=cfg.secagg.clip_range, extras=[])

    @property
    def site_noise_multiplier(self) -> float:
        """The DP-SGD noise multiplier sites must use (0: each site solves it for the target ε)."""
        return 0.0 if self.config.privacy.local_target_epsilon else self.config.privacy.local_noise_multiplier

    @property
    def required_site_noise_multiplier(self) -> float | None:
        return None if self.config.privacy.local_target_epsilon else self.config.privacy.local_noise_multiplier

    def evaluation_refusal(self) -> str | None:
        """Off unless the job asks anyway (``--evaluate-under-local-dp``): DP-SGD's ε covers training
        only, so a site with the default policy declines to evaluate on its records
        (:func:`fedveil.clients.admission.evaluation_refusal`), and asking would cost an
        evaluation-only round that every such site declines."""
        if self.config.evaluation.under_local_dp:
            return None
        return ("local DP: the sites' DP-SGD ε covers training only, and by default they decline to evaluate "
                "(--evaluate-under-local-dp asks anyway; a site answers only if its policy opts in too)")

    def decode(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
               state: DPFedAvg | None) -> DecodedRound:
        return decode_fixed_point_mean(plan, ring_sum, survivors, declared_weight, self.dim)
