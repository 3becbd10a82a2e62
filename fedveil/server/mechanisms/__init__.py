"""The privacy mechanisms a job can run (``--dp``), one class per mechanism, one module each:
:class:`NoPrivacy`, :class:`LocalDP`, :class:`CentralDP` and :class:`DistributedDP`, all
:class:`PrivacyMechanism` (see :mod:`.base` for what a mechanism owns). A new mechanism is one
new module and one entry in :data:`MECHANISMS`."""

from __future__ import annotations

from fedveil.server.mechanisms.base import DecodedRound, LedgerEntry, PrivacyMechanism
from fedveil.server.mechanisms.central import CentralDP
from fedveil.server.mechanisms.distributed import DistributedDP
from fedveil.server.mechanisms.local import LocalDP
from fedveil.server.mechanisms.no_privacy import NoPrivacy

MECHANISMS: dict[str, type[PrivacyMechanism]] = {m.mode: m for m in (NoPrivacy, LocalDP, CentralDP, DistributedDP)}
"""``--dp`` mode → mechanism class."""

__all__ = ["MECHANISMS", "CentralDP", "DecodedRound", "DistributedDP", "LedgerEntry", "LocalDP", "NoPrivacy",
           "PrivacyMechanism", "mechanism_class"]


def mechanism_class(mode: str) -> type[PrivacyMechanism]:
    """The mechanism of ``--dp mode`` (KeyError for an unknown mode: the config validates it first)."""
    return MECHANISMS[mode]
