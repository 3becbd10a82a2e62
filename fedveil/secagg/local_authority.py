"""An in-memory consortium authority for simulations, the demo and tests.

It does what ``fedveil authority`` does with an offline key, in memory: makes the authority key,
a fresh identity key per site, and the credentials (:mod:`fedveil.secagg.identity`), so that
``fedveil simulate`` and the demo can run active-adversary secure aggregation with identities the
aggregation server cannot forge.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.errors import ConfigError
from fedveil.secagg.identity import (
    CONSORTIUM_PATTERN,
    SERIAL_BYTES,
    AuthorityPublicKey,
    RevocationList,
    SiteCredential,
    issue_credential,
    issue_revocations,
)
from fedveil.secagg.keys import hkdf
from fedveil.secagg.signed_roster import SignedRoster, issue_signed_roster

#: Default credential lifetime in simulations: a week.
DEFAULT_LIFETIME_SECONDS = 7 * 86400


class LocalAuthority:
    """A consortium authority held in memory, for simulations, the demo and tests.

    Real deployments keep the authority key offline (``fedveil authority``). With ``seed`` (32
    bytes) every key and serial is derived by HKDF, so a simulation is reproducible; without it
    everything comes from ``os.urandom``.
    """

    def __init__(self, consortium: str, *, key: Ed25519PrivateKey | None = None, seed: bytes | None = None) -> None:
        if not isinstance(consortium, str) or not CONSORTIUM_PATTERN.fullmatch(consortium):
            raise ConfigError(f"consortium: not a valid consortium id (got {consortium!r})")
        if seed is not None and (not isinstance(seed, bytes) or len(seed) != 32):
            raise ConfigError("seed: expected 32 bytes")
        self.consortium = consortium
        self._seed = seed
        self._counter = 0
        if key is not None and not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"key: expected an Ed25519 private key (got {type(key).__name__})")
        self._key = key if key is not None else Ed25519PrivateKey.from_private_bytes(self._random(b"authority", 32))
        self._revoked: frozenset[bytes] = frozenset()
        self._version = 0
        self._identities: dict[str, tuple[Ed25519PrivateKey, SiteCredential]] = {}

    @property
    def public_key(self) -> AuthorityPublicKey:
        return AuthorityPublicKey.of(self._key)

    def _random(self, label: bytes, length: int) -> bytes:
        if self._seed is None:
            return os.urandom(length)
        self._counter += 1
        return hkdf(self._seed, salt=b"", info=b"identity/" + label + struct.pack("<Q", self._counter), length=length)

    def issue(self, site_name: str, identity_public_key: bytes, *, not_before: int, not_after: int) -> SiteCredential:
        return issue_credential(self._key, self.consortium, site_name, identity_public_key, not_before=not_before,
                                not_after=not_after, serial=self._random(b"serial", SERIAL_BYTES))

    def enrol(
        self, site_names: Iterable[str], *, now: int, lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS,
    ) -> dict[str, tuple[Ed25519PrivateKey, SiteCredential]]:
        """A fresh identity key and a credential valid from ``now`` for each name."""
        out: dict[str, tuple[Ed25519PrivateKey, SiteCredential]] = {}
        for name in site_names:
            if name in out:
                raise ConfigError(f"site_names: {name!r} appears twice")
            identity = Ed25519PrivateKey.from_private_bytes(self._random(b"site", 32))
            out[name] = (identity, self.issue(name, identity.public_key().public_bytes_raw(), not_before=now,
                                              not_after=now + lifetime_seconds))
        return out

    def identity(self, site_name: str, *, now: int,
                 lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS) -> tuple[Ed25519PrivateKey, SiteCredential]:
        """Site ``site_name``'s identity key and credential: made on first use, the same afterwards."""
        if site_name not in self._identities:
            self._identities.update(self.enrol([site_name], now=now, lifetime_seconds=lifetime_seconds))
        return self._identities[site_name]

    def signed_roster(self, *, issued_at: int, version: int = 1) -> SignedRoster:
        """A roster, signed, of the credentials of every site :meth:`identity` made so far."""
        return issue_signed_roster(self._key, self.consortium, (cred for _, cred in self._identities.values()),
                                   version=version, issued_at=issued_at)

    def revocations(self, *, issued_at: int) -> RevocationList:
        """The current list, signed (version 0 and empty until :meth:`revoke` is called)."""
        return issue_revocations(self._key, self.consortium, version=self._version, issued_at=issued_at,
                                 revoked=self._revoked)

    def revoke(self, serials: Iterable[bytes], *, issued_at: int) -> RevocationList:
        """Add ``serials`` to the list, bump its version and return it signed."""
        self._revoked = self._revoked | frozenset(bytes(s) for s in serials)
        self._version += 1
        return self.revocations(issued_at=issued_at)


def local_consortium(
    consortium: str, site_names: Iterable[str], *, now: int, lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS,
    seed: bytes | None = None,
) -> tuple[AuthorityPublicKey, dict[str, tuple[Ed25519PrivateKey, SiteCredential]]]:
    """An in-memory authority that vouches for a fresh identity key per site: ``(authority key, sites)``."""
    authority = LocalAuthority(consortium, seed=seed)
    return authority.public_key, authority.enrol(site_names, now=now, lifetime_seconds=lifetime_seconds)
