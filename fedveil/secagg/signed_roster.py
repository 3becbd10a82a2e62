"""A roster signed by the consortium authority: one signature that vouches for many credentials.

Why: in active mode a site accepts a peer's identity key only with the authority's proof
(:mod:`fedveil.secagg.identity`). Checking each peer's credential signature and key in the round
makes a site's first round of a job pay for its whole cohort at once (about a quarter of a
100-site SecAgg+ round, ``docs/benchmarks.md``). Bonawitz et al. (CCS 2017, §6.1) assume the PKI
is in place before the protocol runs; a roster the authority signs offline is that PKI's
directory. A site loads it once, before any round, and checks one signature and every listed key
there; in a round, a credential the roster lists costs a lookup. Validity windows, the consortium
and revocation are still checked every round, and a cohort member the roster does not list is
still accepted on its own credential's signature, so a roster only moves work, never trust.

The server cannot add to a roster (it does not hold the authority key), and relaying a stale
one gains it nothing: every entry is itself an authority-issued credential, and revocations
apply to it as to any other. Pure: no I/O (files live in :mod:`fedveil.protocol.identity_files`).

Encoding (conventions of :mod:`fedveil.secagg.identity`)::

    signed roster: b"FVID" ‖ 1 ‖ 3 ‖ str consortium ‖ version u64 ‖ issued_at u64 ‖ count u32
                   ‖ (length u16 ‖ credential encoding) × count ‖ signature (64)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.errors import InvalidSignedRoster, MalformedCredentialError, WrongConsortium
from fedveil.secagg.identity import AuthorityKey, AuthorityPublicKey, SiteCredential, decode_credential, verified_mark
from fedveil.secagg.identity_encoding import (
    _LEN,
    _LIST_HEAD,
    KIND_SIGNED_ROSTER,
    Bytes,
    _check_bytes,
    _check_list_head,
    _check_private,
    _Reader,
    _Signed,
)
from fedveil.secagg.keys import SIGNATURE_BYTES, ed25519_public_key_problem

SIGNED_ROSTER_TAG = b"fedveil/identity/v1/signed-roster"
MAX_ROSTER_ENTRIES = 1 << 20
"""Most credentials one roster lists (a million sites; about 150 MB)."""


@dataclass(frozen=True)
class SignedRoster(_Signed):
    """The authority's statement that it issued each of ``credentials`` (their exact encodings)."""

    TAG: ClassVar[bytes] = SIGNED_ROSTER_TAG
    KIND: ClassVar[int] = KIND_SIGNED_ROSTER

    consortium: str
    version: int
    issued_at: int
    credentials: tuple[bytes, ...]
    signature: bytes

    def __post_init__(self) -> None:
        _check_list_head(self.consortium, self.version, self.issued_at)
        if not isinstance(self.credentials, tuple):
            raise MalformedCredentialError("credentials", f"expected a tuple of credential encodings "
                                           f"(got {type(self.credentials).__name__})")
        if len(self.credentials) > MAX_ROSTER_ENTRIES:
            raise MalformedCredentialError("credentials", f"{len(self.credentials)} entries, more than "
                                           f"{MAX_ROSTER_ENTRIES}")
        for i, entry in enumerate(self.credentials):
            if not isinstance(entry, bytes) or not 0 < len(entry) <= 0xFFFF:
                raise MalformedCredentialError(f"credentials[{i}]", "expected a credential's encoding (1..65535 bytes)")
        _check_bytes("signature", self.signature, SIGNATURE_BYTES)

    def _fields(self) -> bytes:
        return _LIST_HEAD.pack(self.version, self.issued_at, len(self.credentials)) + b"".join(
            _LEN.pack(len(entry)) + entry for entry in self.credentials)

    @classmethod
    def decode(cls, data: Bytes) -> SignedRoster:
        """Parse :meth:`encode`'s output; anything else raises :class:`MalformedCredentialError`."""
        r = _Reader(data, KIND_SIGNED_ROSTER)
        consortium = r.text("consortium")
        version, issued_at, count = r.unpack("version", _LIST_HEAD)
        # each entry takes at least its length prefix: a count the bytes cannot hold is refused before any loop
        if count > MAX_ROSTER_ENTRIES or count * _LEN.size + SIGNATURE_BYTES > r.remaining:
            raise MalformedCredentialError("count", f"{count} entries do not fit the {r.remaining} bytes left")
        entries = []
        for i in range(count):
            (length,) = r.unpack(f"credentials[{i}]", _LEN)
            entries.append(r.take(f"credentials[{i}]", length))
        signature = r.take("signature", SIGNATURE_BYTES)
        r.done()
        return cls(consortium, version, issued_at, tuple(entries), signature)


def issue_signed_roster(authority_key: Ed25519PrivateKey, consortium: str, credentials: Iterable[SiteCredential], *,
                        version: int, issued_at: int) -> SignedRoster:
    """Sign a roster of credentials this authority issued (each one's signature is checked first,
    so a roster never vouches for a credential the authority did not sign)."""
    _check_private(authority_key)
    authority = AuthorityPublicKey.of(authority_key)
    entries: list[bytes] = []
    seen: set[bytes] = set()
    for i, credential in enumerate(credentials):
        if not isinstance(credential, SiteCredential):
            raise MalformedCredentialError(f"credentials[{i}]", f"expected a SiteCredential "
                                           f"(got {type(credential).__name__})")
        if credential.consortium != consortium:
            raise WrongConsortium(f"credentials[{i}].consortium", f"credential of consortium "
                                  f"{credential.consortium!r}, expected {consortium!r}", index=i)
        if not authority.verifies(credential.signature, credential.signed_payload()):
            raise InvalidSignedRoster(f"credentials[{i}].signature", f"credential for {credential.site_name!r} was "
                                      f"not issued by this authority ({authority.fingerprint})", index=i)
        encoding = credential.encode()
        if encoding not in seen:
            seen.add(encoding)
            entries.append(encoding)
    unsigned = SignedRoster(consortium, version, issued_at, tuple(entries), bytes(SIGNATURE_BYTES))
    return dataclasses.replace(unsigned, signature=authority_key.sign(unsigned.signed_payload()))


def verify_signed_roster(authority_public: AuthorityKey, roster: SignedRoster, *, consortium: str) -> frozenset[bytes]:
    """Check ``roster`` against the pinned authority and return its entries as marks for a site's
    cache of vouched credentials (:func:`fedveil.secagg.identity.verify_roster`'s ``verified``).

    Checks the one signature, the consortium, and that every entry decodes as a credential of
    that consortium with a key of large order (so those checks are not repeated in a round).
    Memoized on the exact bytes: every policy that holds the same roster shares one check."""
    if not isinstance(roster, SignedRoster):
        raise MalformedCredentialError("roster", f"expected a SignedRoster (got {type(roster).__name__})")
    return _verified_entries(AuthorityPublicKey.of(authority_public).raw, roster.encode(), consortium)


def forget_checks() -> None:
    """Forget this process's memos of decoded credentials, checked keys and checked rosters, so the next
    check is paid in full: a benchmark times each site's own checks, as a site in its own process pays them."""
    for memo in (decode_credential, ed25519_public_key_problem, _verified_entries):
        memo.cache_clear()


@functools.lru_cache(maxsize=8)
def _verified_entries(authority_raw: bytes, encoding: bytes, consortium: str) -> frozenset[bytes]:
    authority = AuthorityPublicKey(authority_raw)
    roster = SignedRoster.decode(encoding)
    if not authority.verifies(roster.signature, roster.signed_payload()):
        raise InvalidSignedRoster("roster.signature", f"does not verify under the pinned authority key "
                                  f"{authority.fingerprint}")
    if roster.consortium != consortium:
        raise WrongConsortium("roster.consortium", f"roster of consortium {roster.consortium!r}, expected "
                              f"{consortium!r}")
    marks = set()
    for i, entry in enumerate(roster.credentials):
        try:
            credential = decode_credential(entry)
        except MalformedCredentialError as err:
            raise MalformedCredentialError(f"roster.credentials[{i}].{err.field}", err.detail, index=i) from None
        if credential.consortium != consortium:
            raise WrongConsortium(f"roster.credentials[{i}].consortium", f"credential of consortium "
                                  f"{credential.consortium!r}, expected {consortium!r}", index=i)
        marks.add(verified_mark(authority, entry))
    return frozenset(marks)
