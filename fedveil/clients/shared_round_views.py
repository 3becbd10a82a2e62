"""What the sites of one process share of a round: values parsed once from the very bytes a site received.

A simulation worker hosts hundreds of sites, and every site of a round is sent the same n-sized lists
(identity keys, key advertisements, graph-seed commitments and reveals). Converting them once per
process instead of once per site saves most of those stages' interpreter time at n = 1,000. Each
memo is keyed on the exact bytes (or value) a site received, so a server that sends two sites
different views gets two entries: no site ever gets another site's view.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple, TypeVar, cast

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.secagg import beacon
from fedveil.secagg.messages import AdvertiseKeys

T = TypeVar("T", bound=Hashable)


def shared_value(value: T) -> T:
    """The process's one copy of an immutable round-wide ``value``: equal values come back as one object.

    Each site of a round gets the cohort's n identity keys and n committed members; the hundreds
    of sites a simulation worker hosts would each keep their own n-sized copy for the whole round
    (at n = 5,000 that alone is over a megabyte per site). Equal values are interchangeable, so a
    site keeps the first equal copy the process made and lets its own go.
    """
    return cast(T, _shared(value))


@lru_cache(maxsize=8)
def _shared(value: Hashable) -> Hashable:
    return value


@lru_cache(maxsize=4)
def advertisements_of(peer_keys: bytes, round_id: int) -> tuple[AdvertiseKeys, ...]:
    """The cohort's advertisements in a serialized ``PeerKeys``, as immutable secagg messages.

    Memoized on the exact bytes: every site of a round gets the same n advertisements, and the
    sites a simulation worker hosts (hundreds per process) would each convert all n of them, which
    at n = 1,000 was a third of the share-keys stage's interpreter time. A site gets the tuple
    parsed from the very bytes it received, so a server that sends two sites different keys gets
    two entries, never one site's view in another's round.
    """
    return tuple(
        AdvertiseKeys(round_id, int(k.client_id), bytes(k.encryption_public_key), bytes(k.masking_public_key),
                      bytes(k.signature), bytes(k.share_key_proof))
        for k in pb.PeerKeys.FromString(peer_keys).keys
    )


class CommitmentTable(NamedTuple):
    """A serialized ``Commitments`` list as a site reads it."""

    listed: bytes
    commitments: Mapping[int, bytes]
    """By client id; read-only, as the sites of one process share it."""
    members: frozenset[int]
    """``U0``: the members that committed (only they may advertise keys)."""
    listed_twice: bool


@lru_cache(maxsize=4)
def commitment_table(listed: bytes) -> CommitmentTable:
    """The commitment list in ``listed`` (a serialized ``Commitments``).

    Memoized on the exact bytes, like :func:`advertisements_of`:
    every site of a round is shown the same n commitments, and the hundreds of sites a simulation
    worker hosts would each convert all n. A site gets the table parsed from the very bytes it
    received, never another site's view.
    """
    entries = pb.Commitments.FromString(listed).commitments
    table = {int(c.client_id): bytes(c.commitment) for c in entries}
    return CommitmentTable(listed, MappingProxyType(table), frozenset(table), len(table) != len(entries))


@lru_cache(maxsize=4)
def graph_seed_of(round_id: int, listed: bytes, revealed: bytes) -> bytes:
    """:func:`fedveil.secagg.beacon.combine` over a serialized commitment list and reveal list.

    A pure function of its arguments, memoized like :func:`commitment_table`: at n = 1,000 the
    combination (n SHA-256 openings) cost each site about 4 ms. A list that does not combine
    raises each time it is asked, as nothing is cached for it.
    """
    commitments = commitment_table(listed).commitments
    reveals = {int(r.client_id): bytes(r.contribution) for r in pb.Contributions.FromString(revealed).reveals}
    return beacon.combine(round_id, commitments, reveals)
