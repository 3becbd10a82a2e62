"""Site credentials: an authority that is not the aggregation server vouches for each identity key.

Why: in active-adversary mode (Bonawitz et al., CCS 2017, §4 and §6.1) every client signs its
advertised keys with a long-term identity key, and the paper *assumes a PKI* that binds those
keys to real clients. If the server itself hands out the peers' identity keys, a malicious
server can invent the whole cohort around one victim, sign for the invented members with keys
it made, decrypt the victim's Shamir shares and remove every mask. So a site accepts a peer's
identity key only inside a :class:`SiteCredential` signed by the consortium's authority, whose
public key each site pins out of band and whose private key the server never holds.

This module is pure (no I/O): encodings, signing and verification. The in-memory authority for
simulations is :mod:`fedveil.secagg.local_authority`; files and the ``fedveil authority`` command
live in :mod:`fedveil.protocol.identity_files` and :mod:`fedveil.commands.authority`.

Encodings are canonical, little-endian, length-prefixed; every signature covers a domain tag,
``NUL``, then the encoding without its signature, so a signature over one kind of object is
never valid for another, nor for another format version (the header, strings, parser and field
checks every encoding shares are :mod:`fedveil.secagg.identity_encoding`)::

    credential:   b"FVID" ‖ 1 ‖ 1 ‖ str consortium ‖ str site_name ‖ identity key (32)
                  ‖ serial (16) ‖ not_before u64 ‖ not_after u64 ‖ signature (64)
    revocations:  b"FVID" ‖ 1 ‖ 2 ‖ str consortium ‖ version u64 ‖ issued_at u64
                  ‖ count u32 ‖ serials (16 each, strictly increasing) ‖ signature (64)
    str:          length u16 ‖ ASCII bytes (names match :data:`NAME_PATTERN` / :data:`CONSORTIUM_PATTERN`)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedveil.secagg.errors import (
    ConfigError,
    CredentialError,
    CredentialExpired,
    CredentialMismatch,
    CredentialNotYetValid,
    CredentialRevoked,
    DuplicateRosterEntry,
    InvalidCredentialSignature,
    InvalidRevocationList,
    MalformedCredentialError,
    RevocationListConflict,
    WrongConsortium,
)
from fedveil.secagg.identity_encoding import (  # noqa: F401 (re-exported: the format's public constants)
    _LIST_HEAD,
    CONSORTIUM_PATTERN,
    FORMAT_VERSION,
    KIND_CREDENTIAL,
    KIND_REVOCATIONS,
    KIND_SIGNED_ROSTER,
    MAGIC,
    MAX_TIME,
    NAME_PATTERN,
    Bytes,
    _check_bytes,
    _check_list_head,
    _check_name,
    _check_point,
    _check_private,
    _check_time,
    _pack_str,
    _Reader,
    _Signed,
)
from fedveil.secagg.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, valid_signatures

CREDENTIAL_TAG = b"fedveil/identity/v1/credential"
REVOCATIONS_TAG = b"fedveil/identity/v1/revocations"
SERIAL_BYTES = 16
_TIMES = struct.Struct("<QQ")


def fingerprint(public_key_bytes: bytes) -> str:
    """A human-comparable fingerprint of a raw 32-byte Ed25519 public key.

    The first 128 bits of SHA-256 over the raw key, as eight colon-separated groups of four hex
    digits. 64 bits would be short enough for a second-preimage search by a well-funded attacker.
    Same digest as ``sha256sum`` over the raw key, so any tool can recompute it.
    """
    _check_bytes("public_key", public_key_bytes, PUBLIC_KEY_BYTES)
    digest = hashlib.sha256(bytes(public_key_bytes)).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class AuthorityPublicKey:
    """The consortium authority's raw Ed25519 public key, pinned by every site."""

    raw: bytes

    def __post_init__(self) -> None:
        _check_point("authority_public_key", self.raw)

    @classmethod
    def of(cls, key: AuthorityPublicKey | Ed25519PublicKey | Ed25519PrivateKey | bytes) -> AuthorityPublicKey:
        """Wrap a raw key, a ``cryptography`` public key, or the public half of a private key."""
        if isinstance(key, AuthorityPublicKey):
            return key
        if isinstance(key, Ed25519PrivateKey):
            key = key.public_key()
        if isinstance(key, Ed25519PublicKey):
            return cls(key.public_bytes_raw())
        return cls(key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def verifies(self, signature: bytes, payload: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature over ``payload``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True


#: What the verifiers accept as the pinned authority key.
AuthorityKey = AuthorityPublicKey | Ed25519PublicKey | bytes



@dataclass(frozen=True)
class SiteCredential(_Signed):
    """The authority's statement: in ``consortium``, ``site_name`` signs with ``identity_public_key``
    from ``not_before`` to ``not_after`` (unix seconds, half-open), unless ``serial`` is revoked."""

    TAG: ClassVar[bytes] = CREDENTIAL_TAG
    KIND: ClassVar[int] = KIND_CREDENTIAL

    consortium: str
    site_name: str
    identity_public_key: bytes
    serial: bytes
    not_before: int
    not_after: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_name("consortium", self.consortium, CONSORTIUM_PATTERN)
        _check_name("site_name", self.site_name, NAME_PATTERN)
        _check_point("identity_public_key", self.identity_public_key)
        _check_bytes("serial", self.serial, SERIAL_BYTES)
        _check_time("not_before", self.not_before)
        _check_time("not_after", self.not_after)
        if self.not_after <= self.not_before:
            raise MalformedCredentialError(
                "not_after", f"must be later than not_before (got {self.not_after} <= {self.not_before})"
            )
        _check_bytes("signature", self.signature, SIGNATURE_BYTES)

    @property
    def serial_hex(self) -> str:
        return self.serial.hex()

    def _fields(self) -> bytes:
        return b"".join((_pack_str(self.site_name), self.identity_public_key, self.serial,
                         _TIMES.pack(self.not_before, self.not_after)))

    @classmethod
    def decode(cls, data: Bytes) -> SiteCredential:
        """Parse :meth:`encode`'s output; anything else raises :class:`MalformedCredentialError`."""
        r = _Reader(data, KIND_CREDENTIAL)
        consortium = r.text("consortium")
        site_name = r.text("site_name")
        key = r.take("identity_public_key", PUBLIC_KEY_BYTES)
        serial = r.take("serial", SERIAL_BYTES)
        not_before, not_after = r.unpack("not_before", _TIMES)
        signature = r.take("signature", SIGNATURE_BYTES)
        r.done()
        return cls(consortium, site_name, key, serial, not_before, not_after, signature)


@functools.lru_cache(maxsize=1 << 12)
def decode_credential(data: bytes) -> SiteCredential:
    """:meth:`SiteCredential.decode`, memoised: a site decodes the same roster every round, and a
    credential is immutable, so a repeated roster costs a lookup instead of a parse."""
    return SiteCredential.decode(data)


@dataclass(frozen=True)
class RevocationList(_Signed):
    """The authority's list of revoked credential serials; a higher ``version`` supersedes a lower."""

    TAG: ClassVar[bytes] = REVOCATIONS_TAG
    KIND: ClassVar[int] = KIND_REVOCATIONS

    consortium: str
    version: int
    issued_at: int
    revoked: frozenset[bytes]
    signature: bytes

    def __post_init__(self) -> None:
        _check_list_head(self.consortium, self.version, self.issued_at)
        if not isinstance(self.revoked, frozenset):
            raise MalformedCredentialError(
                "revoked", f"expected a frozenset of serials (got {type(self.revoked).__name__})"
            )
        for serial in self.revoked:
            _check_bytes("revoked", serial, SERIAL_BYTES)
        _check_bytes("signature", self.signature, SIGNATURE_BYTES)

    def _fields(self) -> bytes:
        return _LIST_HEAD.pack(self.version, self.issued_at, len(self.revoked)) + b"".join(sorted(self.revoked))

    @classmethod
    def decode(cls, data: Bytes) -> RevocationList:
        r = _Reader(data, KIND_REVOCATIONS)
        consortium = r.text("consortium")
        version, issued_at, count = r.unpack("version", _LIST_HEAD)
        if count * SERIAL_BYTES + SIGNATURE_BYTES != r.remaining:
            raise MalformedCredentialError("revoked", f"count {count} does not match the {r.remaining} bytes left")
        serials = [r.take("revoked", SERIAL_BYTES) for _ in range(count)]
        if any(a >= b for a, b in itertools.pairwise(serials)):
            raise MalformedCredentialError("revoked", "serials must be strictly increasing (canonical encoding)")
        signature = r.take("signature", SIGNATURE_BYTES)
        r.done()
        return cls(consortium, version, issued_at, frozenset(serials), signature)


def issue_credential(
    authority_key: Ed25519PrivateKey, consortium: str, site_name: str, identity_public_key: bytes, *,
    not_before: int, not_after: int, serial: bytes | None = None,
) -> SiteCredential:
    """Sign a credential for one site (the authority's job; never the aggregation server's)."""
    _check_private(authority_key)
    unsigned = SiteCredential(
        consortium, site_name, identity_public_key, os.urandom(SERIAL_BYTES) if serial is None else serial,
        not_before, not_after, bytes(SIGNATURE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=authority_key.sign(unsigned.signed_payload()))


def issue_revocations(
    authority_key: Ed25519PrivateKey, consortium: str, *, version: int, issued_at: int, revoked: Iterable[bytes],
) -> RevocationList:
    """Sign a revocation list. Each new list should carry a higher ``version`` than the last."""
    _check_private(authority_key)
    unsigned = RevocationList(consortium, version, issued_at, frozenset(bytes(s) for s in revoked),
                              bytes(SIGNATURE_BYTES))
    return dataclasses.replace(unsigned, signature=authority_key.sign(unsigned.signed_payload()))


def verify_revocations(
    authority_public: AuthorityKey, revocations: RevocationList, *, consortium: str,
) -> None:
    """Accept a revocation list only if the pinned authority signed it for this consortium."""
    authority = AuthorityPublicKey.of(authority_public)
    if not authority.verifies(revocations.signature, revocations.signed_payload()):
        raise InvalidRevocationList(
            "revocations.signature", f"does not verify under the pinned authority key {authority.fingerprint}"
        )
    if revocations.consortium != consortium:
        raise WrongConsortium(
            "revocations.consortium", f"list of consortium {revocations.consortium!r}, expected {consortium!r}"
        )


def latest_revocations(
    authority_public: AuthorityKey, lists: Iterable[RevocationList | None], *,
    consortium: str,
) -> RevocationList | None:
    """The authentic list with the highest version among ``lists`` (latest wins), or None if all are None.

    A site holds one list from the authority (out of band) and may be shown another by the
    server; taking the higher version means a server can never roll a site back to an older
    list. Every list must verify; two authentic lists with one version and different contents
    mean the authority key is misused, and raise :class:`RevocationListConflict`.
    """
    best: RevocationList | None = None
    for rl in lists:
        if rl is None:
            continue
        verify_revocations(authority_public, rl, consortium=consortium)
        if best is not None and rl.version == best.version and rl.encode() != best.encode():
            raise RevocationListConflict("revocations.version", f"two different lists carry version {rl.version}")
        if best is None or rl.version > best.version:
            best = rl
    return best


def verify_credential(
    authority_public: AuthorityKey, credential: SiteCredential, *, consortium: str,
    now: int, revocations: RevocationList | None, expected_name: str | None = None,
    expected_key: bytes | None = None,
) -> None:
    """Raise unless the pinned authority vouches for ``credential`` in ``consortium`` at time ``now``.

    Checks, in order: the signature, the consortium, the validity window, the revocation list
    (itself verified first), then ``expected_name`` / ``expected_key`` when given (e.g. the name
    and key the server claims for a cohort slot).
    """
    authority = AuthorityPublicKey.of(authority_public)
    if revocations is not None:
        verify_revocations(authority, revocations, consortium=consortium)
    _verify_one(authority, credential, consortium=consortium, now=now, revocations=revocations)
    if expected_name is not None and credential.site_name != expected_name:
        raise CredentialMismatch("site_name", f"credential is for {credential.site_name!r}, expected {expected_name!r}")
    if expected_key is not None and credential.identity_public_key != bytes(expected_key):
        raise CredentialMismatch(
            "identity_public_key",
            f"credential vouches for key {fingerprint(credential.identity_public_key)}, expected "
            f"{_fingerprint_or_length(expected_key)}",
        )


def verify_roster(
    authority_public: AuthorityKey, credentials: Sequence[SiteCredential], *,
    consortium: str, now: int, revocations: RevocationList | None, verified: set[bytes] | None = None,
) -> None:
    """Verify every credential of a cohort, and that no name and no key appears twice.

    A server must not give one site two cohort slots (its shares would count twice towards the
    threshold) nor put one key under two names. Errors name the index: ``credentials[3].serial``.
    ``verified`` is the caller's cache of credential encodings whose authority signature already
    verified (a site checks each peer's signature once per job; validity, consortium and revocation
    are checked every time).
    """
    authority = AuthorityPublicKey.of(authority_public)
    if revocations is not None:
        verify_revocations(authority, revocations, consortium=consortium)
    checked = verified if verified is not None else set()
    _check_signatures_ahead(authority, credentials, checked)
    names: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    for i, credential in enumerate(credentials):
        try:
            _verify_one(authority, credential, consortium=consortium, now=now, revocations=revocations,
                        verified=checked)
        except CredentialError as err:
            raise type(err)(f"credentials[{i}].{err.field}", err.detail, index=i) from None
        if credential.site_name in names:
            raise DuplicateRosterEntry(
                f"credentials[{i}].site_name",
                f"site {credential.site_name!r} already holds slot {names[credential.site_name]}", index=i,
            )
        if credential.identity_public_key in keys:
            j = keys[credential.identity_public_key]
            raise DuplicateRosterEntry(
                f"credentials[{i}].identity_public_key",
                f"key {fingerprint(credential.identity_public_key)} is already vouched for "
                f"{credentials[j].site_name!r} at slot {j}", index=i,
            )
        names[credential.site_name] = i
        keys[credential.identity_public_key] = i


def verified_mark(authority: AuthorityPublicKey, credential_encoding: bytes) -> bytes:
    """The entry of a ``verified`` cache (:func:`verify_roster`) saying this authority vouched for
    exactly these credential bytes (by its signature on them, or on a signed roster that lists them)."""
    return credential_encoding + authority.raw


def _check_signatures_ahead(authority: AuthorityPublicKey, credentials: Sequence[SiteCredential],
                            verified: set[bytes]) -> None:
    """The authority's signatures on a roster's credentials not in ``verified``, as one batch over
    the cores (:func:`fedveil.secagg.keys.valid_signatures`: a site's first round checks the whole
    cohort's). The valid ones join ``verified``; :func:`_verify_one` reports any other, in order."""
    keyed = [(c, verified_mark(authority, c.encode())) for c in credentials if isinstance(c, SiteCredential)]
    pending = [(c, key) for c, key in keyed if key not in verified]
    checks = valid_signatures([(authority.raw, c.signature, c.signed_payload()) for c, _ in pending])
    verified.update(key for (_, key), ok in zip(pending, checks, strict=True) if ok)


def _verify_one(
    authority: AuthorityPublicKey, credential: SiteCredential, *, consortium: str, now: int,
    revocations: RevocationList | None, verified: set[bytes] | None = None,
) -> None:
    """The checks of one credential; ``revocations`` must already be verified."""
    if not isinstance(credential, SiteCredential):
        raise MalformedCredentialError("credential", f"expected a SiteCredential (got {type(credential).__name__})")
    if isinstance(now, bool) or not isinstance(now, int):
        raise ConfigError(f"now: expected int unix seconds (got {type(now).__name__})")
    cached = verified_mark(authority, credential.encode())
    if verified is not None and cached in verified:
        pass  # this authority's signature on exactly these bytes verified before
    elif not authority.verifies(credential.signature, credential.signed_payload()):
        raise InvalidCredentialSignature(
            "signature",
            f"does not verify under the pinned authority key {authority.fingerprint} (credential claims site "
            f"{credential.site_name!r} in consortium {credential.consortium!r})",
        )
    if credential.consortium != consortium:
        raise WrongConsortium(
            "consortium", f"credential of consortium {credential.consortium!r}, expected {consortium!r}"
        )
    if now < credential.not_before:
        raise CredentialNotYetValid("not_before", f"valid from {credential.not_before}, now is {now}")
    if now >= credential.not_after:
        raise CredentialExpired("not_after", f"expired at {credential.not_after}, now is {now}")
    if revocations is not None and credential.serial in revocations.revoked:
        raise CredentialRevoked(
            "serial", f"{credential.serial_hex} is revoked (revocation list version {revocations.version})"
        )
    if verified is not None:
        verified.add(cached)



def _fingerprint_or_length(key: bytes) -> str:
    return fingerprint(bytes(key)) if len(key) == PUBLIC_KEY_BYTES else f"a {len(key)}-byte value"

