"""``--dp central``: DP-FedAvg (McMahan et al., ICLR 2018). Sites clip their update to S; the server
adds N(0, (zS)²) to the securely summed updates with noise from the OS CSPRNG and divides by the
expected cohort size. Optional adaptive clipping (Andrew et al., NeurIPS 2021) moves S with a
noised count of unclipped sites. Each round is one Gaussian event for the sampling that really
happened (:func:`fedveil.dp.sampling.user_level_event`)."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedveil.dp.central import DPFedAvg, SecureNormalSampler
from fedveil.dp.clipping import AdaptiveClippingConfig
from fedveil.dp.sampling import user_level_event
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server import sanity
from fedveil.server.mechanisms.base import DecodedRound, LedgerEntry, PrivacyMechanism, fixed_point_plan
from fedveil.server.round_plan import RoundPlan

if TYPE_CHECKING:
    from fedveil.server.config import ServerConfig


class CentralDP(PrivacyMechanism):
    """User-level DP with noise added by the server to the secure sum (it sees the un-noised sum)."""

    mode: ClassVar[str] = "central"
    user_level: ClassVar[bool] = True

    @classmethod
    def refusal(cls, config: ServerConfig) -> tuple[str, str] | None:
        if config.privacy.sampling_amplification and config.privacy.accountant != "rdp":
            # A fixed-size cohort is sampling without replacement; of fedveil's accountants only RDP
            # (dp-accounting's bound) can account it. PRV and PLD would refuse the first sampled round.
            return ("--dp-accountant",
                    "must be rdp with --dp-sampling-amplification: only the RDP accountant can account a "
                    f"fixed-size cohort (sampling without replacement) (got {config.privacy.accountant!r})")
        return None

    def new_state(self) -> DPFedAvg:
        cfg = self.config
        k = float(cfg.schedule.clients_per_round)
        if cfg.privacy.adaptive_clipping:
            return DPFedAvg.with_adaptive_clipping(AdaptiveClippingConfig(
                initial_clip_norm=cfg.privacy.clip, noise_multiplier=cfg.privacy.noise_multiplier,
                expected_clients_per_round=k, target_quantile=cfg.privacy.target_quantile,
                learning_rate=cfg.privacy.clip_learning_rate,
            ))
        return DPFedAvg.fixed(cfg.privacy.clip, cfg.privacy.noise_multiplier, k)

    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes,
             state: DPFedAvg | None) -> RoundPlan:
        assert state is not None
        dp = pb.DpParams(mode=self.mode)
        clip_norm = state.clip_norm
        dp.update_clip_norm = clip_norm
        clip_range = clip_norm  # |coordinate| <= ||Δ|| <= S: no extra clipping
        extras: list[str] = []
        if state.adaptive is not None:
            dp.adaptive_clipping = True
            extras.append("unclipped")
            clip_range = max(clip_norm, 1.0)  # the indicator must encode exactly
        dp.noise_multiplier = self.config.privacy.noise_multiplier
        return fixed_point_plan(self.config, self.dim, round_number, cohort_size, threshold, dp,
                                clip_norm=clip_norm, clip_range=clip_range, extras=extras)

    def decode(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
               state: DPFedAvg | None) -> DecodedRound:
        assert state is not None and plan.encoder is not None
        enc, dim = plan.encoder, self.dim
        total = enc.decode_sum(ring_sum)
        slack = survivors / enc.scale
        sanity.check_norm(total[:dim], survivors * state.clip_norm * (1 + 1e-9) + math.sqrt(dim) * slack,
                          "update sum")
        if state.adaptive is not None:
            sanity.check_count(float(total[dim]), survivors, slack=slack)
        # The OS CSPRNG, never the job seed: the seed is stored with the run, and anyone who could
        # regenerate the noise could subtract it from the released aggregate. Only an
        # --insecure-deterministic job (tests, bit-for-bit simulations) draws it from the seed.
        # within the check's rounding slack a sum may land just outside [0, survivors]: clamp it there
        unclipped = min(max(float(total[dim]), 0.0), float(survivors)) if state.adaptive is not None else None
        insecure_seed = hashlib.sha256(f"fedveil/central-noise/{self.config.seed}/{plan.round_number}/".encode()
                                       + ring_sum.tobytes()).digest()[:16] \
            if self.config.insecure_deterministic else None
        result = state.finish_round(total[:dim], SecureNormalSampler(insecure_seed), unclipped, survivors)
        stats: dict[str, Any] = {"clip_norm": result.clip_norm, "next_clip_norm": result.next_clip_norm,
                                 "noise_stddev_sum": result.noise_stddev}
        if result.noised_unclipped_fraction is not None:
            # only the noised fraction: the exact count of unclipped sites is not a released value
            stats["unclipped_fraction_noised"] = result.noised_unclipped_fraction
        return DecodedRound(np.asarray(result.noised_mean, dtype=np.float64), stats)

    def privacy_event(self, plan: RoundPlan, available_at_draw: int, amplification: bool,
                      state: DPFedAvg | None) -> LedgerEntry:
        assert state is not None
        z = self.config.privacy.noise_multiplier
        event, sampling = user_level_event(z, plan.cohort_size, available_at_draw, "fixed", amplification)
        details = {"cohort": plan.cohort_size, "clip_norm": plan.clip_norm, "noise_multiplier": z, **sampling}
        return LedgerEntry(event, "dp-fedavg" + ("-adaptive" if state.adaptive is not None else ""), details)
