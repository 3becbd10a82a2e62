"""Files of the consortium authority and of each site's identity (the I/O around :mod:`fedveil.secagg.identity`).

An authority directory (``fedveil authority init --out DIR``) holds:

- ``authority.key``: the authority's Ed25519 private key, PKCS#8 PEM, mode 0600, encrypted with a
  passphrase when one was given. It belongs on an offline machine; the aggregation server never
  sees it.
- ``authority.pub``: JSON, the file every site pins::

      {"format": "fedveil-authority-public-key/v1", "algorithm": "ed25519",
       "consortium": "NAME", "public_key_hex": "<64 hex>", "fingerprint": "xxxx:...:xxxx"}

- ``revocations.bin``: the signed revocation list in its binary encoding (version 0 when empty).

A credential file is the binary encoding in base64 between armour lines (text, so it survives
e-mail and copy-paste; :func:`load_credential` also accepts the raw binary)::

    -----BEGIN FEDVEIL SITE CREDENTIAL-----
    <base64, 64 columns>
    -----END FEDVEIL SITE CREDENTIAL-----

Every loader raises :class:`IdentityFileError` (a ``ValueError``) naming the path and the problem,
and never prints key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedveil.errors import FedveilError
from fedveil.secagg.errors import CredentialError
from fedveil.secagg.identity import (
    CONSORTIUM_PATTERN,
    MAGIC,
    AuthorityPublicKey,
    RevocationList,
    SiteCredential,
)
from fedveil.secagg.keys import ed25519_public_key_problem
from fedveil.secagg.signed_roster import SignedRoster

AUTHORITY_KEY_FILE = "authority.key"
AUTHORITY_PUBLIC_FILE = "authority.pub"
REVOCATIONS_FILE = "revocations.bin"
AUTHORITY_PUBLIC_FORMAT = "fedveil-authority-public-key/v1"
CREDENTIAL_LABEL = "FEDVEIL SITE CREDENTIAL"
REVOCATIONS_LABEL = "FEDVEIL REVOCATION LIST"
SIGNED_ROSTER_LABEL = "FEDVEIL SIGNED ROSTER"
PASSPHRASE_ENV = "FEDVEIL_AUTHORITY_PASSPHRASE"  # noqa: S105 (the variable name, not a secret)
_MAX_SMALL_FILE = 64 * 1024
_MAX_REVOCATIONS_FILE = 64 * 1024 * 1024
HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
T = TypeVar("T")


class IdentityFileError(FedveilError, ValueError):
    """A key, credential or revocation file is missing or invalid; names the path and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{str(path)!r}: {problem}")
        self.path = Path(path)
        self.problem = problem


class PassphraseRequired(IdentityFileError):
    """The authority key is encrypted and no passphrase was given."""


class WrongPassphrase(IdentityFileError):
    """The passphrase does not decrypt the authority key."""


@dataclass(frozen=True)
class PinnedAuthority:
    """What a site pins: the consortium and its authority's public key."""

    consortium: str
    public_key: AuthorityPublicKey


def armor(data: bytes, label: str) -> str:
    """``data`` as base64 between ``-----BEGIN label-----`` and ``-----END label-----`` lines."""
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def dearmor(text: str, label: str) -> bytes:
    """The bytes inside :func:`armor`'s output; ValueError naming what is wrong."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 2 or lines[0] != f"-----BEGIN {label}-----" or lines[-1] != f"-----END {label}-----":
        raise ValueError(f"expected '-----BEGIN {label}-----' ... '-----END {label}-----' armour")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the armoured body is not base64") from None


def authority_public_text(pinned: PinnedAuthority) -> str:
    """The ``authority.pub`` JSON text."""
    return json.dumps({
        "format": AUTHORITY_PUBLIC_FORMAT, "algorithm": "ed25519", "consortium": pinned.consortium,
        "public_key_hex": pinned.public_key.raw.hex(), "fingerprint": pinned.public_key.fingerprint,
    }, indent=2) + "\n"


def load_authority_public(path: Path | str) -> PinnedAuthority:
    """The pinned authority from an ``authority.pub`` file (or a directory that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / AUTHORITY_PUBLIC_FILE
    text = _read_text(path, _MAX_SMALL_FILE)
    if "PRIVATE KEY" in text:
        raise IdentityFileError(path, "holds a private key; give the authority's public file "
                                f"({AUTHORITY_PUBLIC_FILE}) and keep {AUTHORITY_KEY_FILE} offline")
    try:
        doc = json.loads(text)
    except ValueError:
        raise IdentityFileError(path, f"not JSON; expected the {AUTHORITY_PUBLIC_FILE} written by "
                                "'fedveil authority init'") from None
    if not isinstance(doc, dict) or doc.get("format") != AUTHORITY_PUBLIC_FORMAT:
        raise IdentityFileError(path, f"expected \"format\": \"{AUTHORITY_PUBLIC_FORMAT}\"")
    if doc.get("algorithm") != "ed25519":
        raise IdentityFileError(path, f"algorithm: expected 'ed25519' (got {doc.get('algorithm')!r})")
    consortium = doc.get("consortium")
    if not isinstance(consortium, str) or not CONSORTIUM_PATTERN.fullmatch(consortium):
        raise IdentityFileError(path, f"consortium: not a valid consortium id (got {consortium!r})")
    raw_hex = doc.get("public_key_hex")
    if not isinstance(raw_hex, str) or not HEX_KEY.fullmatch(raw_hex):
        raise IdentityFileError(path, "public_key_hex: expected 64 hexadecimal digits")
    try:
        key = AuthorityPublicKey(bytes.fromhex(raw_hex))
    except CredentialError as err:
        raise IdentityFileError(path, f"public_key_hex: {err.detail}") from None
    if doc.get("fingerprint") != key.fingerprint:
        raise IdentityFileError(path, f"fingerprint: {doc.get('fingerprint')!r} does not match the key "
                                f"({key.fingerprint}); the file was altered")
    return PinnedAuthority(consortium, key)


def load_credential(path: Path | str) -> SiteCredential:
    """A site credential from an armoured (or raw binary) credential file."""
    return _load_signed(Path(path), SiteCredential.decode, CREDENTIAL_LABEL, _MAX_SMALL_FILE, "site credential")


def load_revocations(path: Path | str) -> RevocationList:
    """A revocation list from a ``revocations.bin`` file (binary, or armoured)."""
    return _load_signed(Path(path), RevocationList.decode, REVOCATIONS_LABEL, _MAX_REVOCATIONS_FILE, "revocation list")


def load_signed_roster(path: Path | str) -> SignedRoster:
    """A roster the authority signed (``fedveil authority roster``), armoured or binary."""
    return _load_signed(Path(path), SignedRoster.decode, SIGNED_ROSTER_LABEL, _MAX_REVOCATIONS_FILE, "signed roster")


def _load_signed(path: Path, decode: Callable[[bytes], T], label: str, limit: int, what: str) -> T:
    data = _read_bytes(path, limit)
    try:
        return decode(_unwrap(path, data, label))
    except CredentialError as err:
        raise IdentityFileError(path, f"not a valid {what}: {err}") from None


def read_identity_public_key(path: Path | str) -> tuple[bytes, bool]:
    """A site's raw Ed25519 public key from a PEM public key, a PEM private key, or a 64-hex line.

    Returns ``(key, from_private)``; ``from_private`` tells the caller a private key was read, so
    it can warn that a site's private key should never leave the site.
    """
    path = Path(path)
    key, from_private = _read_public_key(path)
    problem = ed25519_public_key_problem(key)
    if problem is not None:
        raise IdentityFileError(path, f"the key {problem}")
    return key, from_private


def _read_public_key(path: Path) -> tuple[bytes, bool]:
    text = _read_text(path, _MAX_SMALL_FILE).strip()
    if HEX_KEY.fullmatch(text):
        return bytes.fromhex(text), False
    data = text.encode("ascii", errors="replace")
    if "PRIVATE KEY" in text:
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise IdentityFileError(path, "is an encrypted private key; give the site's public key instead") from None
        except ValueError as err:
            raise IdentityFileError(path, f"not a readable PEM private key ({err})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise IdentityFileError(path, f"holds a {_key_kind(private)} key, not an Ed25519 key")
        return private.public_key().public_bytes_raw(), True
    if "PUBLIC KEY" in text:
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError as err:
            raise IdentityFileError(path, f"not a readable PEM public key ({err})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise IdentityFileError(path, f"holds a {_key_kind(public)} key, not an Ed25519 key")
        return public.public_bytes_raw(), False
    raise IdentityFileError(path, "expected a PEM Ed25519 public key or the 64-hex-digit line printed by "
                            "'fedveil identity create'")


def private_key_pem(key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM, encrypted with ``passphrase`` when one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_authority_private(path: Path | str, passphrase: bytes | None) -> Ed25519PrivateKey:
    """The authority's private key; :class:`PassphraseRequired` / :class:`WrongPassphrase` when it is
    encrypted and no passphrase, or the wrong one, was given. A passphrase for an unencrypted key is ignored."""
    path = Path(path)
    data = _read_bytes(path, _MAX_SMALL_FILE)
    if b"PRIVATE KEY" not in data:
        raise IdentityFileError(path, "not a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise PassphraseRequired(path, "is encrypted; a passphrase is needed") from None
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as err:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise WrongPassphrase(path, "the passphrase does not decrypt it") from None
        raise IdentityFileError(path, f"not a readable PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityFileError(path, f"holds a {_key_kind(key)} key, not an Ed25519 key")
    return key


def write_new_file(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` with ``mode``; never overwrite (FileExistsError if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def replace_file(path: Path | str, data: bytes) -> None:
    """Replace ``path`` atomically (write a sibling, then rename), e.g. ``revocations.bin``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    write_new_file(tmp, data)
    os.replace(tmp, path)


def _unwrap(path: Path, data: bytes, label: str) -> bytes:
    if data.startswith(MAGIC):
        return data
    try:
        return dearmor(data.decode("ascii"), label)
    except (UnicodeDecodeError, ValueError) as err:
        problem = "not ASCII" if isinstance(err, UnicodeDecodeError) else str(err)
        raise IdentityFileError(path, f"neither the binary encoding nor armoured text: {problem}") from None


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        if path.is_dir():
            raise IdentityFileError(path, "is a directory")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise IdentityFileError(path, f"cannot read: {err.strerror}") from None
    if len(data) > limit:
        raise IdentityFileError(path, f"larger than {limit} bytes; not a fedveil identity file")
    return data


def _read_text(path: Path, limit: int) -> str:
    try:
        return _read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityFileError(path, "not a text file") from None


def _key_kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "non-Ed25519"

