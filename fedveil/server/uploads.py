"""The coordinator's book of upload reservations: one upload per site and round stage.

See :mod:`fedveil.protocol.uploads` for the rules and why. This class only keeps the book; the
coordinator calls it with its lock held, after it has checked the session, the sequence number and
the round (so a reservation is made only for a message the coordinator would accept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedveil.protocol.errors import Replayed
from fedveil.protocol.uploads import MAX_UPLOAD_ATTEMPTS, UploadReservation


@dataclass
class _Entry:
    active: UploadReservation | None = None
    attempts: int = 0


class UploadBook:
    """Reservations by (site, round nonce, stage). Not thread-safe: call it under the coordinator's lock."""

    def __init__(self, max_attempts: int = MAX_UPLOAD_ATTEMPTS) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {max_attempts})")
        self.max_attempts = max_attempts
        self._entries: dict[tuple[str, bytes, int], _Entry] = {}

    def active(self, site: str, nonce: bytes, stage: int) -> UploadReservation | None:
        """The site's reservation for this stage whose stream is still open, if any."""
        entry = self._entries.get((site, nonce, stage))
        if entry is None or entry.active is None:
            return None
        if not entry.active.alive():  # its stream died and the transport has not told us yet
            entry.active.state = "released"
            entry.active = None
            return None
        return entry.active

    def reserve(
        self, site: str, round_number: int, nonce: bytes, stage: int, sequence: int, size: int,
        alive: Callable[[], bool],
    ) -> UploadReservation:
        """Reserve the stage's upload for ``site``, or raise :class:`Replayed` (ALREADY_EXISTS)."""
        self._forget_other_rounds(nonce)
        entry = self._entries.setdefault((site, nonce, stage), _Entry())
        if self.active(site, nonce, stage) is not None:
            raise Replayed("UploadMaskedInput: an upload from this site for this stage is already in progress; "
                           "one upload per stage: Poll")
        if entry.attempts >= self.max_attempts:
            raise Replayed(f"UploadMaskedInput: {entry.attempts} uploads for this stage failed already "
                           f"(at most {self.max_attempts}); Poll")
        entry.attempts += 1
        res = UploadReservation(site=site, round=round_number, nonce=nonce, stage=stage, sequence=sequence,
                                size=size, alive=alive)
        entry.active = res
        return res

    def holds(self, res: UploadReservation) -> bool:
        entry = self._entries.get((res.site, res.nonce, res.stage))
        return entry is not None and entry.active is res and res.held

    def complete(self, res: UploadReservation) -> None:
        """The upload's input was accepted: the stage is done for the site (later uploads are replays)."""
        entry = self._entries.get((res.site, res.nonce, res.stage))
        if entry is not None and entry.active is res:
            entry.active = None
        res.state = "completed"

    def release(self, res: UploadReservation, counted: bool) -> None:
        """The upload failed; ``counted`` False gives the attempt back (the server refused it for its own
        reasons, e.g. a full waiting queue)."""
        entry = self._entries.get((res.site, res.nonce, res.stage))
        if entry is None or entry.active is not res:
            return
        entry.active = None
        if not counted:
            entry.attempts = max(0, entry.attempts - 1)

    def _forget_other_rounds(self, nonce: bytes) -> None:
        stale = [key for key in self._entries if key[1] != nonce]
        for key in stale:
            del self._entries[key]
