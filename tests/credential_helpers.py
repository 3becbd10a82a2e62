"""Fixed credentials for the site-identity tests: one pinned authority, reproducible site keys, a
valid credential and revocation list, and :func:`verify` with this consortium's defaults."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.identity import (
    AuthorityPublicKey,
    SiteCredential,
    issue_credential,
    issue_revocations,
    verify_credential,
)

NOW = 1_700_000_000
DAY = 86400
CONSORTIUM = "eu-cardio"
AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PINNED = AuthorityPublicKey.of(AUTHORITY)


def site_key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"site %d" % i).digest())


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def credential(i: int = 0, *, authority: Ed25519PrivateKey = AUTHORITY, consortium: str = CONSORTIUM,
               name: str | None = None, not_before: int = NOW - DAY, not_after: int = NOW + DAY) -> SiteCredential:
    return issue_credential(authority, consortium, name or f"site-{i}", raw(site_key(i)), not_before=not_before,
                            not_after=not_after)


def verify(cred: SiteCredential, **kw: object) -> None:
    args: dict[str, object] = {"consortium": CONSORTIUM, "now": NOW, "revocations": None, **kw}
    verify_credential(PINNED, cred, **args)  # type: ignore[arg-type]


VALID = credential()
VALID_LIST = issue_revocations(AUTHORITY, CONSORTIUM, version=3, issued_at=NOW, revoked=[b"\x01" * 16, b"\x02" * 16])
