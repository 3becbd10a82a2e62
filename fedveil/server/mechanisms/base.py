"""What every privacy mechanism of a job provides, and the fixed-point encoding most of them share.

A mechanism (:class:`PrivacyMechanism`) owns, for one job: its round plan (the encoding and DP
parameters sent in ``RoundStart``), the server-side decode of the released sum (with the sanity
checks of :mod:`fedveil.server.sanity`), the privacy event it adds to the ledger, and its checks
on the job configuration. The global model (:mod:`fedveil.server.training`) calls them and never
branches on the mode; a new mechanism is one new module registered in
:mod:`fedveil.server.mechanisms`. The client half (clip, encode, noise share) answers the plan's
``DpParams`` (:mod:`fedveil.clients.participation`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedveil.dp.central import DPFedAvg
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.encoding import FixedPointEncoder
from fedveil.server import sanity
from fedveil.server.round_plan import RoundPlan

if TYPE_CHECKING:
    from fedveil.server.config import ServerConfig


@dataclass(frozen=True)
class LedgerEntry:
    """The user-level privacy event of one round, as the ledger records it."""

    event: Any
    mechanism: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodedRound:
    """The released mean update (float64, before the server optimizer) and the round's statistics."""

    mean: np.ndarray
    stats: dict[str, Any]


class PrivacyMechanism(ABC):
    """One privacy mechanism of a job (``--dp MODE``); see the module docstring."""

    mode: ClassVar[str]
    user_level: ClassVar[bool] = False
    """Whether the server's ledger accounts user-level ε for every released round."""
    keeps_ledger: ClassVar[bool] = True
    """Whether the job keeps a privacy ledger at all (sites' reported spend included)."""

    def __init__(self, config: ServerConfig, dim: int) -> None:
        self.config = config
        self.dim = dim

    @classmethod
    def refusal(cls, config: ServerConfig) -> tuple[str, str] | None:
        """Why ``config`` cannot run with this mechanism, as (flag, message), or None."""
        if config.privacy.adaptive_clipping:
            return "--dp-adaptive-clipping", f"only with --dp central (got --dp {cls.mode})"
        if config.privacy.sampling_amplification:
            return ("--dp-sampling-amplification",
                    f"only with --dp central (got --dp {cls.mode}); distributed DP claims no sampling amplification")
        return None

    @property
    def required_site_noise_multiplier(self) -> float | None:
        """The DP-SGD noise multiplier the job fixes for every site (to check their reports), or None."""
        return None

    def evaluation_refusal(self) -> str | None:
        """Why the job runs no federated evaluation under this mechanism (None: it runs as configured)."""
        if self.user_level:
            return "user-level DP: evaluation sums would be released without the round's noise"
        return None

    def new_state(self) -> DPFedAvg | None:
        """The mechanism's server state that evolves over rounds (checkpointed), if any."""
        return None

    @abstractmethod
    def plan(self, round_number: int, cohort_size: int, threshold: int, context: bytes,
             state: DPFedAvg | None) -> RoundPlan:
        """The update part of the round's plan."""

    @abstractmethod
    def decode(self, plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
               state: DPFedAvg | None) -> DecodedRound:
        """The released mean from the unmasked ring sum, after the sanity checks; ``state`` is a
        copy the caller installs only when the round commits."""

    def privacy_event(self, plan: RoundPlan, available_at_draw: int, amplification: bool,
                      state: DPFedAvg | None) -> LedgerEntry | None:
        """The user-level event a released round adds to the ledger (None: none)."""
        return None


def fixed_point_plan(config: ServerConfig, dim: int, round_number: int, cohort_size: int, threshold: int,
                     dp: pb.DpParams, *, clip_norm: float, clip_range: float, extras: list[str]) -> RoundPlan:
    """A round encoded with the secagg fixed-point encoder (every mechanism but distributed DP)."""
    weighted = config.uses_weights
    encoder = FixedPointEncoder.for_clients(
        cohort_size, clip_range, config.secagg.ring_bits, weighted=weighted,
        max_weight=config.secagg.max_weight if weighted else 1.0,
    )
    dimension = encoder.encoded_length(dim + len(extras))
    encoding = pb.EncodingParams(
        ring_bits=config.secagg.ring_bits, clip_range=clip_range, fractional_bits=encoder.frac_bits,
        dimension=dimension,
        extra_coordinates=extras + (["weight"] if weighted else []), weighted=weighted,
        max_weight=encoder.max_weight,
    )
    return RoundPlan(round_number, cohort_size, threshold, dimension, config.secagg.ring_bits, encoding, dp,
                     encoder=encoder, clip_norm=clip_norm, details={"frac_bits": encoder.frac_bits,
                                                                    "clip_range": clip_range})


def decode_fixed_point_mean(plan: RoundPlan, ring_sum: np.ndarray, survivors: int, declared_weight: float | None,
                            dim: int) -> DecodedRound:
    """The plain (weighted or uniform) mean of a fixed-point round, checked against what honest sites
    can produce: declared and encoded weights agree, every coordinate within the clip range."""
    assert plan.encoder is not None
    enc = plan.encoder
    stats: dict[str, Any] = {}
    if enc.weighted:
        slack = survivors / enc.scale
        total = enc.decode_sum(ring_sum)
        weight = float(total[-1])
        sanity.check_weight(weight, declared_weight if declared_weight is not None else weight,
                            slack=slack + 1e-9 * weight)
        if weight <= 0:
            raise sanity.AggregateRejected(f"the survivors' total weight is {weight:g}")
        mean = total[:-1] / weight
        sanity.check_coordinates(mean[:dim], enc.clip, slack=slack / weight + 1e-9)
        stats["total_weight"] = weight
    else:
        mean = enc.decode_mean(ring_sum, survivors)
        sanity.check_coordinates(mean[:dim], enc.clip, slack=1.0 / enc.scale + 1e-9)
    return DecodedRound(np.asarray(mean, dtype=np.float64), stats)
