"""The canonical binary encoding of the consortium authority's signed objects, and the checks of
their fields.

Shared by the credentials and revocation lists (:mod:`fedveil.secagg.identity`) and the signed
rosters (:mod:`fedveil.secagg.signed_roster`), so that every object is written and parsed the same
way: ``b"FVID" ‖ version ‖ kind ‖ str consortium ‖ fields ‖ signature``, little-endian,
length-prefixed (the layouts are in :mod:`fedveil.secagg.identity`). Every parse or field check
that fails raises :class:`MalformedCredentialError` naming the field.
"""

from __future__ import annotations

import re
import struct
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.errors import MalformedCredentialError
from fedveil.secagg.keys import PUBLIC_KEY_BYTES, ed25519_public_key_problem

MAGIC = b"FVID"
FORMAT_VERSION = 1
KIND_CREDENTIAL = 1
KIND_REVOCATIONS = 2
KIND_SIGNED_ROSTER = 3
MAX_TIME = 2**63 - 1
#: A site name: the enrolled client name the server knows the site by.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A consortium id: names the federation, so a credential of one consortium is useless in another.
CONSORTIUM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEAD = struct.Struct("<4sBB")
_LIST_HEAD = struct.Struct("<QQI")
"""version ‖ issued_at ‖ entry count: the head of the authority's versioned lists (revocations, rosters)."""
_LEN = struct.Struct("<H")

Bytes = bytes | bytearray | memoryview


class _Signed:
    """What both signed objects share: ``header ‖ consortium ‖ fields``, signed under a domain tag."""

    TAG: ClassVar[bytes]
    KIND: ClassVar[int]
    consortium: str
    signature: bytes

    def _fields(self) -> bytes:
        raise NotImplementedError

    def _body(self) -> bytes:
        return _HEAD.pack(MAGIC, FORMAT_VERSION, self.KIND) + _pack_str(self.consortium) + self._fields()

    def signed_payload(self) -> bytes:
        """The exact bytes the authority signs: the domain tag, NUL, the encoding without its signature."""
        return self.TAG + b"\x00" + self._body()

    def encode(self) -> bytes:
        return self._body() + self.signature


class _Reader:
    """Reads one encoding; every failure is a :class:`MalformedCredentialError` naming the field."""

    def __init__(self, data: Bytes, kind: int) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedCredentialError("encoding", f"expected bytes (got {type(data).__name__})")
        self.data = bytes(data)
        self.pos = 0
        magic, version, found = self.unpack("header", _HEAD)
        if magic != MAGIC:
            raise MalformedCredentialError("magic", f"expected {MAGIC!r} (got {magic!r})")
        if version != FORMAT_VERSION:
            raise MalformedCredentialError(
                "version", f"format version {version} is not supported (this is {FORMAT_VERSION})"
            )
        if found != kind:
            names = {KIND_CREDENTIAL: "a credential", KIND_REVOCATIONS: "a revocation list",
                     KIND_SIGNED_ROSTER: "a signed roster"}
            raise MalformedCredentialError("kind", f"expected {names[kind]} (got kind {found})")

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, field: str, n: int) -> bytes:
        if n > self.remaining:
            raise MalformedCredentialError(field, f"truncated: needs {n} bytes, {self.remaining} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, field: str, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(field, fmt.size))

    def text(self, field: str) -> str:
        (n,) = self.unpack(field, _LEN)
        raw = self.take(field, n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedCredentialError(field, "not ASCII") from None

    def done(self) -> None:
        if self.remaining:
            raise MalformedCredentialError("encoding", f"{self.remaining} trailing bytes")


def _pack_str(value: str) -> bytes:
    raw = value.encode("ascii")
    return _LEN.pack(len(raw)) + raw


def _check_name(field: str, value: object, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise MalformedCredentialError(
            field, f"expected letters, digits, '.', '_', '-' (starting with a letter or digit), got {shown[:80]}"
        )


def _check_bytes(field: str, value: object, length: int) -> None:
    if not isinstance(value, bytes):
        raise MalformedCredentialError(field, f"expected {length} bytes (got {type(value).__name__})")
    if len(value) != length:
        raise MalformedCredentialError(field, f"expected {length} bytes (got {len(value)})")


def _check_point(field: str, value: object) -> None:
    """32 bytes that encode an Ed25519 point not of small order (:func:`~.keys.ed25519_public_key_problem`)."""
    _check_bytes(field, value, PUBLIC_KEY_BYTES)
    assert isinstance(value, bytes)
    problem = ed25519_public_key_problem(value)
    if problem is not None:
        raise MalformedCredentialError(field, problem)


def _check_time(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME:
        raise MalformedCredentialError(field, f"expected an integer in 0..2**63-1 (got {value!r})")


def _check_list_head(consortium: str, version: int, issued_at: int) -> None:
    """The fields every versioned list of the authority starts with (revocations, signed rosters)."""
    _check_name("consortium", consortium, CONSORTIUM_PATTERN)
    _check_time("version", version)
    _check_time("issued_at", issued_at)


def _check_private(key: object) -> None:
    if not isinstance(key, Ed25519PrivateKey):
        raise MalformedCredentialError("authority_key", f"expected an Ed25519 private key (got {type(key).__name__})")
