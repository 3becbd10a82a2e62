"""What one round asks of its cohort, and how the server decodes the sum: :class:`RoundPlan`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedveil.dp.distributed import DistributedDPConfig
from fedveil.metrics import EvaluationLayout
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg.encoding import FixedPointEncoder


@dataclass
class RoundPlan:
    """What one round asks of its cohort, and how the server decodes the sum."""

    round_number: int
    cohort_size: int
    threshold: int
    dimension: int
    ring_bits: int
    encoding: pb.EncodingParams
    dp: pb.DpParams
    encoder: FixedPointEncoder | None = None
    distributed: DistributedDPConfig | None = None
    rotation_seed: int = 0
    clip_norm: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    evaluation: EvaluationLayout | None = None
    """Secure evaluation sums after the update (``dimension`` counts them)."""
    evaluation_only: bool = False
