"""Declines that name cohort members: a member enough sites refuse is barred from the round.

A site declines a round whose roster carries a member's credential or identity key it refuses
(revoked in the list the site holds, signed by another authority, expired by its clock), and
names that member's slot (``RoundResponse.refused_members``, :func:`fedveil.clients.admission.check_identities`).
The server may not be able to tell (it was not given the revocation list the sites hold), and
every roster with that member would be refused by every honest site until the round's attempts
ran out (the attacker review of the sites).

No decliner is trusted on its own: a member is barred only when more decliners name it than the
round's tolerated colluders (c = ⌊f·n⌋, at least one), so colluding sites up to that bound cannot
bar an honest member by naming it. The tally runs when an attempt aborts at COMMIT (too few sites
accepted), and that attempt does not count against ``--max-round-attempts``.

A barred member is left out of every later cohort of the job for as long as it presents the same
roster entry (credential and identity key): at least one honest site refused that entry, for a
reason that does not pass (a revocation, another authority, an expiry), so each later roster with
it would cost another aborted attempt. A site that joins again with a new credential is drawn again.
The bar is on the entry the roster showed (fixed when the round opened), and it is kept in the run
store, so a server restarted on it keeps the bar.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence

from fedveil.protocol.errors import MalformedMessage
from fedveil.secagg.threshold import corrupt_clients
from fedveil.server.coordinator.state import CoordinatorBase, _Round, log


def refused_slots(values: Sequence[int], cohort_size: int, own: int) -> frozenset[int]:
    """``refused_members`` of the decline of slot ``own`` as a set; each must be another member's
    slot, named once (a :class:`MalformedMessage` naming the entry otherwise)."""
    seen: set[int] = set()
    for i, slot in enumerate(values):
        if not 0 <= slot < cohort_size:
            raise MalformedMessage(f"refused_members[{i}]: slot {slot} is outside the cohort 0..{cohort_size - 1}")
        if slot == own:
            raise MalformedMessage(f"refused_members[{i}]: slot {slot} is the decliner's own")
        if slot in seen:
            raise MalformedMessage(f"refused_members[{i}]: slot {slot} appears twice")
        seen.add(slot)
    return frozenset(seen)


def tolerated_refusers(cohort_size: int, max_corrupt_fraction: float) -> int:
    """How many decliners naming one member the round puts down to collusion: ⌊f·n⌋, at least one."""
    return max(1, corrupt_clients(cohort_size, max_corrupt_fraction))


def roster_entry_digest(credential: bytes, identity_key: bytes) -> bytes:
    """What a member is barred by: SHA-256 over its credential and identity key, length-prefixed."""
    return hashlib.sha256(struct.pack("<I", len(credential)) + credential + identity_key).digest()


class RefusalTallyMixin(CoordinatorBase):
    """Bars the members that enough decliners refused (see the module docstring)."""

    def _bar_refused_members(self, rnd: _Round) -> bool:
        """At an attempt that aborted at COMMIT (lock held): bar each member named by more decliners
        than the round tolerates, for the rest of the job while it presents the same roster entry;
        whether any was barred."""
        if not rnd.refusals or not rnd.config.active:  # only an active round shows the sites credentials
            return False
        tolerated = tolerated_refusers(len(rnd.names), self.config.secagg.max_corrupt_fraction)
        counts = Counter(slot for slots in rnd.refusals.values() for slot in slots)
        named = {rnd.names[slot]: count for slot, count in counts.items() if count > tolerated}
        below = {rnd.names[slot]: count for slot, count in counts.items() if count <= tolerated}
        if below:
            log.info("round %d (attempt %d): declines name %s; not barred (at most %d decliners may collude)",
                     rnd.number, rnd.attempt, ", ".join(f"{n} ({c})" for n, c in sorted(below.items())), tolerated)
        if not named:
            return False
        keys = rnd.config.identity_keys or ()
        for name, count in sorted(named.items()):
            slot = rnd.cohort[name]
            why = (f"was declined for its credential or identity key by {count} of {len(rnd.names)} members "
                   f"in round {rnd.number}")
            # the entry the decliners were shown, not the site's session now (it may have joined again since)
            digest = roster_entry_digest(rnd.roster_credentials[slot], keys[slot])
            self._refused_entries[name] = (digest, why)
            self.store.record_credential_bar(self.run_id, name, digest, why)
            log.warning("round %d (attempt %d): %s is barred from the rest of the job until it joins with another "
                        "credential: %d of the cohort's %d members declined it for its credential or identity key "
                        "(more than the %d colluding sites the round tolerates)", rnd.number, rnd.attempt, name,
                        count, len(rnd.names), tolerated)
        return True

    def _refused_now(self) -> dict[str, str]:
        """Barred sites that still present the roster entry they were barred for (lock held): name → why.
        A site with no session cannot be drawn, so it is not looked up."""
        return {name: why for name, (digest, why) in self._refused_entries.items()
                if name in self._clients and self._presented_entry(name) == digest}

    def _lifted_bars(self) -> set[str]:
        """Barred sites whose session now presents another roster entry (lock held): the bar no longer
        applies to them. A barred site with no session keeps its bar."""
        return {name for name, (digest, _why) in self._refused_entries.items()
                if name in self._clients and self._presented_entry(name) != digest}

    def _presented_entry(self, name: str) -> bytes:
        """The digest of the roster entry ``name``'s session would be drawn with (lock held)."""
        return roster_entry_digest(self._credential(name), self._identity_key(name))
