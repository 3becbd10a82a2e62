"""The site's half of a privacy mechanism: what it checks in a round and how it encodes its update.

The server's half (:mod:`fedveil.server.mechanisms`) plans the round; this half decides what a site
can *rely on* from that plan and turns its update into the ring vector it masks. A site takes the
mechanism from the round's ``dp.mode`` after its policy allowed that mode; nothing else in the client
branches on the mode string, and a new mechanism is one new file here plus its server twin.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedveil.clients.policy import PolicyViolation, SitePolicy
from fedveil.clients.update import (
    AttemptRandomness,
    PreparedUpdate,
    RoundConfigError,
    check_fixed_point_round,
    prepare_update,
)
from fedveil.dp.accounting import DpEvent
from fedveil.dp.distributed import DistributedDPConfig
from fedveil.protocol import fedveil_pb2 as pb


@dataclass(frozen=True)
class MechanismTerms:
    """What a site relies on for one release under the round's mechanism."""

    guaranteed_event: DpEvent | None = None
    """The user-level noise the site can rely on per release (None: none it can check)."""
    distributed: DistributedDPConfig | None = None
    """Distributed DP: the round's configuration with this site's own noise share."""


class ClientMechanism(abc.ABC):
    """One privacy mechanism as a site sees it (Bonawitz et al. 2017 for the ring, McMahan et al. 2018
    for user-level clipping, Kairouz et al. 2021 for the distributed discrete noise)."""

    name: ClassVar[str]
    user_level: ClassVar[bool] = False
    """Noise on the sum protects each site: the sum alone (no evaluation in the clear) may leave."""
    fresh_noise_per_release: ClassVar[bool] = False
    """Every release carries fresh noise of the site's own (DP-SGD): a replayed model gives a new answer."""

    def terms(self, policy: SitePolicy, start: pb.RoundStart, honest: int) -> MechanismTerms:
        """Check the round's DP parameters against ``policy``, and every number the site reads when it
        encodes its update (:meth:`check_encoding`), before it trains; raises ``PolicyViolation``
        naming the field. ``start.model`` holds the round's global model (already decoded and checked).

        ``honest`` is the fewest honest inputs (this site's included) any released sum can hold.
        """
        model_size = len(start.model.data) // 4
        try:
            terms = self.dp_terms(policy, start, honest)
            self.check_encoding(start, terms, model_size)
        except RoundConfigError as err:
            raise PolicyViolation(err.field or "encoding", err.detail) from None
        return terms

    def dp_terms(self, policy: SitePolicy, start: pb.RoundStart, honest: int) -> MechanismTerms:
        """The mechanism's own checks of the round's DP parameters (:meth:`terms` runs them first)."""
        return MechanismTerms()

    def check_encoding(self, start: pb.RoundStart, terms: MechanismTerms, model_size: int) -> None:
        """Raise :class:`RoundConfigError` naming the field unless :meth:`encode` can encode an update
        of ``model_size`` values as the round asks (the fixed-point encoder, here)."""
        check_fixed_point_round(start, model_size)

    def encode(self, delta: np.ndarray, start: pb.RoundStart, terms: MechanismTerms,
               randomness: AttemptRandomness, weight: float) -> PreparedUpdate:
        """Clip and encode ``delta`` into the round's ring with this attempt's randomness."""
        return prepare_update(delta, start, rounding_seed=randomness.rounding, weight=weight)

    def protects_replays(self, terms: MechanismTerms) -> bool:
        """A second release over the same global model is protected by noise this site relies on."""
        return self.fresh_noise_per_release or terms.guaranteed_event is not None
