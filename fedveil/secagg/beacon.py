"""The cohort's graph seed by commit-then-reveal, so the server cannot choose a victim's neighbours.

SecAgg+ (Bell et al., CCS 2020, §4) is only private if a client's neighbours in the Harary
graph are a *random* subset of the cohort: a server that can place the clients it controls
around a victim collects the victim's shares. Deriving the relabelling from a hash of the
advertised keys is not enough against a malicious server: the clients it controls choose their
keys after seeing the honest ones and can grind the hash.

Here every cohort member contributes 32 fresh random bytes ``r_i`` in two quick steps before
training (Blum's coin flipping, one commitment per party):

1. **commit**: each member sends ``C_i = H(round id ‖ i ‖ r_i)``; the server forwards the list
   ``U0`` of commitments it received;
2. **reveal**: a member that finds its own commitment unchanged in its list sends ``r_i``; the
   server forwards every revealed value.

A client accepts the seed only if *every* member of the list it was shown revealed a value that
opens its commitment, and computes ``seed = H(round id ‖ sorted (i, r_i))`` itself. Because
every commitment in its list was fixed before it revealed its own ``r``, the seed it uses is
uniform from the server's point of view; the server's only choice is to abort (a withheld
reveal aborts the attempt), so it sees at most one layout per attempt a site joins, and the
site's policy bounds attempts per round. Showing different lists to different clients only
gives them different session ids (the seed is bound into the session id), which aborts the
round instead of leaking.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping

from fedveil.secagg.errors import ProtocolError, RoundAbortedError

CONTRIBUTION_BYTES = 32
COMMITMENT_BYTES = 32
GRAPH_SEED_BYTES = 32
_DOMAIN = b"fedveil/secagg/v1/beacon/"


class BeaconError(ProtocolError):
    """A commitment list or a revealed value breaks the commit-then-reveal rules."""


def new_contribution() -> bytes:
    """32 bytes from the OS CSPRNG: a client's share of the graph seed."""
    return os.urandom(CONTRIBUTION_BYTES)


def commitment(round_id: int, client_id: int, contribution: bytes) -> bytes:
    """``H(domain ‖ round id ‖ client id ‖ r)``: binds ``r`` to one client of one round attempt."""
    if len(contribution) != CONTRIBUTION_BYTES:
        raise BeaconError(f"contribution: expected {CONTRIBUTION_BYTES} bytes (got {len(contribution)})")
    return hashlib.sha256(_DOMAIN + b"commit" + struct.pack("<QI", round_id, client_id) + contribution).digest()


def check_commitments(commitments: Mapping[int, bytes], *, own_id: int, own_commitment: bytes,
                      num_clients: int) -> None:
    """A client's checks on the commitment list ``U0`` it was shown, before it reveals."""
    if own_id not in commitments or not hmac.compare_digest(commitments[own_id], own_commitment):
        raise BeaconError(f"client {own_id}: its own commitment is missing or altered in the commitment list")
    for cid, value in commitments.items():
        if not 0 <= cid < num_clients:
            raise BeaconError(f"commitment list: client id {cid} is outside 0..{num_clients - 1}")
        if len(value) != COMMITMENT_BYTES:
            raise BeaconError(f"commitment list: client {cid}'s commitment is not {COMMITMENT_BYTES} bytes")


def combine(round_id: int, commitments: Mapping[int, bytes], reveals: Mapping[int, bytes]) -> bytes:
    """The graph seed from the reveals of **every** member of ``commitments``.

    Raises :class:`RoundAbortedError` if a member's reveal is missing (the attempt cannot go on
    without letting the server choose among seeds), :class:`BeaconError` if a reveal does not
    open its commitment or comes from outside the list.
    """
    extra = sorted(set(reveals) - set(commitments))
    if extra:
        raise BeaconError(f"reveals from clients {extra[:5]} that are not in the commitment list")
    missing = sorted(set(commitments) - set(reveals))
    if missing:
        raise RoundAbortedError(f"clients {missing[:5]} committed to the graph seed but did not reveal; "
                                "the attempt cannot fix a seed the server did not choose")
    h = hashlib.sha256(_DOMAIN + b"seed" + struct.pack("<QI", round_id, len(commitments)))
    for cid in sorted(commitments):
        value = reveals[cid]
        if len(value) != CONTRIBUTION_BYTES or not hmac.compare_digest(
                commitment(round_id, cid, value), commitments[cid]):
            raise BeaconError(f"client {cid}'s revealed value does not open its commitment")
        h.update(struct.pack("<I", cid) + value)
    return h.digest()


class BeaconCollector:
    """The server's side: collect commitments, then reveals, and forward them.

    It only routes: the seed each client uses is the one it derives itself with :func:`combine`
    from what it was shown. A member that declines or misses the commit stage is left out of
    ``U0``; a member of ``U0`` that withholds its reveal aborts the attempt and is named, so the
    driver can leave it out of the next attempt.
    """

    def __init__(self, round_id: int, members: tuple[int, ...], threshold: int) -> None:
        self.round_id = round_id
        self.members = tuple(sorted(members))
        self.threshold = threshold
        self.stage = "commit"
        self.commitments: dict[int, bytes] = {}
        self.declined: set[int] = set()
        self.reveals: dict[int, bytes] = {}
        self.withheld: tuple[int, ...] = ()
        self.abort_reason: str | None = None

    @property
    def expected(self) -> tuple[int, ...]:
        if self.stage == "commit":
            return tuple(m for m in self.members if m not in self.declined)
        if self.stage == "reveal":
            return tuple(sorted(self.commitments))
        return ()

    @property
    def pending(self) -> tuple[int, ...]:
        done = self.commitments if self.stage == "commit" else self.reveals
        return tuple(m for m in self.expected if m not in done)

    def receive_commitment(self, client_id: int, value: bytes) -> None:
        if self.stage != "commit" or client_id not in self.expected:
            raise BeaconError(f"client {client_id}: no commitment expected now")
        if client_id in self.commitments:
            raise BeaconError(f"client {client_id} already committed")
        if len(value) != COMMITMENT_BYTES:
            raise BeaconError(f"commitment: expected {COMMITMENT_BYTES} bytes (got {len(value)})")
        self.commitments[client_id] = bytes(value)

    def decline(self, client_id: int) -> None:
        """A member declined the round before committing."""
        if self.stage != "commit" or client_id in self.commitments:
            raise BeaconError(f"client {client_id}: cannot decline after committing")
        self.declined.add(client_id)

    def close_commit(self) -> dict[int, bytes] | None:
        """``U0`` (every commitment received), or None when fewer than t committed (aborted)."""
        if len(self.commitments) < self.threshold:
            self.stage = "aborted"
            self.abort_reason = (f"only {len(self.commitments)} clients accepted the round; "
                                 f"threshold is {self.threshold}")
            return None
        self.stage = "reveal"
        return dict(self.commitments)

    def receive_reveal(self, client_id: int, value: bytes) -> None:
        if self.stage != "reveal" or client_id not in self.commitments:
            raise BeaconError(f"client {client_id}: no reveal expected now")
        if client_id in self.reveals:
            raise BeaconError(f"client {client_id} already revealed")
        if len(value) != CONTRIBUTION_BYTES or not hmac.compare_digest(
                commitment(self.round_id, client_id, value), self.commitments[client_id]):
            raise BeaconError(f"client {client_id}'s revealed value does not open its commitment")
        self.reveals[client_id] = bytes(value)

    def close_reveal(self) -> bytes | None:
        """The seed (as every honest client will derive it), or None when a member withheld (aborted)."""
        missing = tuple(sorted(set(self.commitments) - set(self.reveals)))
        if missing:
            self.stage = "aborted"
            self.withheld = missing
            self.abort_reason = f"clients {list(missing)[:5]} committed to the graph seed but withheld their reveal"
            return None
        self.stage = "done"
        return combine(self.round_id, self.commitments, self.reveals)
