"""A ``--revocations`` file, read again whenever it changes on disk: the server's and each site's.

An operator revokes a site mid-job by replacing the file with the authority's newer list
(``fedveil authority revoke``): the coordinator asks :meth:`RevocationFile.refresh` at every cohort
draw, and a running site before it checks a round's cohort, which costs one ``stat`` while the file
is unchanged (a site used to keep the list it started with until it restarted: review of 2026-12-07).
A changed file is verified as at start-up (the pinned authority's signature, the consortium). A
file that no longer verifies, a list older than the one held (a roll-back) or a second list with
the same version is logged and the last good list is kept: revocations are never silently dropped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedveil.protocol.identity_files import IdentityFileError, load_revocations
from fedveil.secagg.errors import IdentityError
from fedveil.secagg.identity import RevocationList, verify_revocations

_Stamp = tuple[int, int, int] | None


class RevocationFile:
    """``path``, checked against the authority key ``authority`` for ``consortium``.

    The constructor reads the file and raises :class:`IdentityFileError` or
    :class:`~fedveil.secagg.errors.IdentityError` if it does not verify (the start-up check)."""

    def __init__(self, path: Path | str, authority: bytes, consortium: str, *,
                 log: logging.Logger | None = None) -> None:
        self.path = Path(path)
        self._log = log or logging.getLogger("fedveil.server")
        self._authority = authority
        self._consortium = consortium
        self._seen = self._stamp()  # before reading: a change while it is read is read again
        self.current: RevocationList = self._load()
        """The last good list."""

    def refresh(self) -> RevocationList:
        """The list in the file now, or the last good one if the file changed and does not verify
        (logged once per change)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return self.current
        self._seen = stamp
        try:
            loaded = self._load()
        except (IdentityFileError, IdentityError) as err:
            self._log.error("--revocations %s: the file changed and does not verify (%s); keeping revocation list "
                      "version %d", self.path, err, self.current.version)
            return self.current
        held = self.current
        if loaded.version < held.version:
            self._log.error("--revocations %s: the file now holds version %d, older than version %d already in force; "
                      "keeping version %d", self.path, loaded.version, held.version, held.version)
        elif loaded.version == held.version and loaded.encode() != held.encode():
            self._log.error("--revocations %s: a different list with the same version %d (the authority key may be "
                      "misused); keeping the first", self.path, loaded.version)
        elif loaded.version > held.version:
            self._log.warning("--revocations %s: revocation list version %d in force (%d serials revoked, %d newly)",
                        self.path, loaded.version, len(loaded.revoked), len(loaded.revoked - held.revoked))
            self.current = loaded
        return self.current

    def _stamp(self) -> _Stamp:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> RevocationList:
        revocations = load_revocations(self.path)  # an unreadable file: IdentityFileError
        verify_revocations(self._authority, revocations, consortium=self._consortium)
        return revocations
