"""Ed25519 verdicts shared by the simulated sites of one process.

In active mode each site verifies its holders' signed key advertisements and, before it reveals a
share, the survivor-set signatures of t holders of every owner and of every owner's live neighbours
(:func:`fedveil.secagg.survivor_checks.quorum_plan`): about 250 + 590 verifications per site and round
at n = 1,000, k = 252. Real sites each run on their own machine and must do this work. A simulation
that hosts hundreds of a round's sites in one process makes every one of them verify the same
public signatures on the same public payloads, which made the active round twice the passive one.

A verdict is a pure function of (public key, signature, payload), all public, so sites that share a
:class:`SignatureMemo` reach exactly the decisions they would alone: a signature is verified with
``cryptography`` the first time any of them meets it and its verdict (valid or not) is reused after
that. The key is a SHA-256 digest of all three (the key and the signature length-prefixed, then the
payload's own SHA-256, computed once per call since a check's items share one payload): a
different signature, key or payload is a different entry, and a forged signature never inherits
a valid one's verdict. The memo keeps the most recent ``max_entries`` verdicts. It holds no
secret. Only simulation hosts create one (``ClientOptions.signature_memo``); a deployed site
verifies every signature itself.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

from fedveil.secagg.errors import ConfigError
from fedveil.secagg.keys import SignedItem, valid_signatures

DEFAULT_MAX_ENTRIES = 1 << 18
"""About 45 MiB of verdicts: a worker meets about 9,500 distinct signatures in a round of 5,000 sites
(advertisements and survivor-set signatures), so this holds about 25 such rounds."""


class SignatureMemo:
    """Verdicts of Ed25519 verifications, keyed by a digest of (public key, signature, payload)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ConfigError(f"max_entries: must be at least 1 (got {max_entries})")
        self.max_entries = max_entries
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()
        self.verified = 0
        """Signatures verified with ``cryptography`` (the memo's misses)."""
        self.reused = 0
        """Verdicts answered from the memo."""

    def __len__(self) -> int:
        return len(self._verdicts)

    def valid_signatures(self, items: Sequence[SignedItem]) -> list[bool]:
        """Whether each ``(identity key, signature, payload)`` verifies, in order, as
        :func:`fedveil.secagg.keys.valid_signatures` answers; only items no site of this memo
        verified before are verified (as one batch)."""
        payload_digests: dict[int, bytes] = {}  # a check's items share one payload: hashed once per call
        keys = [_entry_key(item, payload_digests) for item in items]
        with self._lock:
            known = [self._verdicts.get(key) for key in keys]
        first: dict[bytes, int] = {}  # each unknown entry once, at its first position
        for i, verdict in enumerate(known):
            if verdict is None:
                first.setdefault(keys[i], i)
        fresh = valid_signatures([items[i] for i in first.values()]) if first else []
        found = dict(zip(first, fresh, strict=True))
        with self._lock:
            for key, verdict in found.items():
                self._remember(key, verdict)
            for key in keys:
                if key in self._verdicts:
                    self._verdicts.move_to_end(key)
            self.verified += len(found)
            self.reused += len(items) - len(found)
        return [found[key] if verdict is None else verdict for key, verdict in zip(keys, known, strict=True)]

    def _remember(self, key: bytes, verdict: bool) -> None:
        self._verdicts[key] = verdict
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self.max_entries:
            self._verdicts.popitem(last=False)


def _entry_key(item: SignedItem, payload_digests: dict[int, bytes]) -> bytes:
    """SHA-256 of the length-prefixed key and signature and the payload's own SHA-256; the payload
    digest is looked up by the payload object's identity (``items`` holds it for the whole call)."""
    public, signature, payload = item
    digest = payload_digests.get(id(payload))
    if digest is None:
        digest = payload_digests[id(payload)] = hashlib.sha256(payload).digest()
    return hashlib.sha256(len(public).to_bytes(2, "little") + public + len(signature).to_bytes(2, "little")
                          + signature + digest).digest()


def verdicts(items: Sequence[SignedItem], memo: SignatureMemo | None) -> list[bool]:
    """:meth:`SignatureMemo.valid_signatures` when a memo is given, else
    :func:`fedveil.secagg.keys.valid_signatures`."""
    return memo.valid_signatures(items) if memo is not None else valid_signatures(items)
