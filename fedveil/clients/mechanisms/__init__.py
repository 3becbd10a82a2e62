"""The site's half of each privacy mechanism, one class per file (the server's half: ``fedveil.server.mechanisms``)."""

from __future__ import annotations

from fedveil.clients.mechanisms.base import ClientMechanism, MechanismTerms
from fedveil.clients.mechanisms.central import CentralDP
from fedveil.clients.mechanisms.distributed import DistributedDP, guaranteed_distributed_event, own_noise_stddev
from fedveil.clients.mechanisms.local import LocalDP
from fedveil.clients.mechanisms.no_privacy import NoPrivacy
from fedveil.clients.policy import PolicyViolation

CLIENT_MECHANISMS: dict[str, ClientMechanism] = {
    m.name: m for m in (NoPrivacy(), LocalDP(), CentralDP(), DistributedDP())
}


def client_mechanism(mode: str) -> ClientMechanism:
    """The mechanism a round's ``dp.mode`` names; an unknown mode is refused, naming the field."""
    try:
        return CLIENT_MECHANISMS[mode or "none"]
    except KeyError:
        raise PolicyViolation("dp.mode", f"unknown DP mode {mode!r} (this site knows "
                              f"{', '.join(CLIENT_MECHANISMS)})") from None


__all__ = ["CLIENT_MECHANISMS", "CentralDP", "ClientMechanism", "DistributedDP", "LocalDP", "MechanismTerms",
           "NoPrivacy", "client_mechanism", "guaranteed_distributed_event", "own_noise_stddev"]
