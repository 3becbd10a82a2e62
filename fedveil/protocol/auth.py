"""Client authentication: per-client bearer tokens, stored hashed, compared in constant time.

``fedveil enroll`` issues a token ``fvt1.<token id>.<secret>``: the id (8 random bytes, hex) names
the credential, the secret is 32 random bytes (``secrets.token_bytes``, URL-safe base64). The
store keeps only the id, the client name and SHA-256(secret); the secret itself is printed once
and never persisted or logged. A request carries ``authorization: Bearer <token>`` in its gRPC
metadata; the server looks the id up and compares digests with :func:`hmac.compare_digest`.

Alternatively (or in addition) a client presents a TLS client certificate signed by the CA
given to the server; its common name must be an enrolled client name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedveil.protocol import AUTH_METADATA_KEY
from fedveil.protocol.errors import Unauthenticated

TOKEN_PREFIX = "fvt1"  # noqa: S105 (a format tag, not a secret)
TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 32
_MAX_TOKEN_CHARS = 128


@dataclass(frozen=True)
class IssuedToken:
    """A new credential. ``token`` is shown to the operator once; store only ``token_id`` and
    ``digest``."""

    token: str
    token_id: str
    digest: bytes

    def __repr__(self) -> str:  # never print the secret by accident
        return f"IssuedToken(token_id={self.token_id!r}, token=<redacted>)"


@dataclass(frozen=True)
class Credential:
    """What the store keeps about a token."""

    token_id: str
    client_name: str
    digest: bytes
    revoked: bool = False


def secret_digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def issue_token() -> IssuedToken:
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_bytes(TOKEN_SECRET_BYTES)
    encoded = base64.urlsafe_b64encode(secret).decode().rstrip("=")
    return IssuedToken(token=f"{TOKEN_PREFIX}.{token_id}.{encoded}", token_id=token_id, digest=secret_digest(secret))


def parse_token(token: str) -> tuple[str, bytes]:
    """Split a token into (token id, secret). Raises :class:`Unauthenticated` if malformed."""
    if len(token) > _MAX_TOKEN_CHARS:
        raise Unauthenticated("malformed token (too long)")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise Unauthenticated(f"malformed token (expected '{TOKEN_PREFIX}.<id>.<secret>' as printed by fedveil enroll)")
    token_id, encoded = parts[1], parts[2]
    if len(token_id) != 2 * TOKEN_ID_BYTES or any(c not in "0123456789abcdef" for c in token_id):
        raise Unauthenticated("malformed token (bad id part)")
    try:
        secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed token (bad secret part)") from None
    if len(secret) != TOKEN_SECRET_BYTES:
        raise Unauthenticated("malformed token (bad secret length)")
    return token_id, secret


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in gRPC invocation metadata, or None when absent."""
    for key, value in metadata or ():
        if key.lower() == AUTH_METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


CredentialLookup = Callable[[str], "Credential | None"]
"""Returns the stored credential for a token id, or None."""

ClientLookup = Callable[[str], bool]
"""Whether a client name (a TLS certificate's common name) is enrolled and not revoked."""


class Authenticator:
    """Maps request credentials to an enrolled client name, or raises :class:`Unauthenticated`."""

    def __init__(self, lookup: CredentialLookup, *, client_exists: ClientLookup | None = None) -> None:
        self._lookup = lookup
        self._client_exists = client_exists

    def authenticate(self, token: str | None, certificate_name: str | None = None) -> str:
        if token is not None:
            token_id, secret = parse_token(token)
            cred = self._lookup(token_id)
            # Compare against a dummy digest when the id is unknown so both paths cost the same.
            stored = cred.digest if cred is not None else b"\x00" * 32
            if not hmac.compare_digest(secret_digest(secret), stored) or cred is None:
                raise Unauthenticated("unknown or wrong token")
            if cred.revoked:
                raise Unauthenticated(f"the token of client {cred.client_name!r} was revoked")
            if certificate_name is not None and certificate_name != cred.client_name:
                raise Unauthenticated(
                    f"the TLS client certificate ({certificate_name!r}) and the token ({cred.client_name!r}) "
                    "name different clients"
                )
            return cred.client_name
        if certificate_name is not None:
            if self._client_exists is None or not self._client_exists(certificate_name):
                raise Unauthenticated(f"the TLS client certificate names {certificate_name!r}, which is not enrolled")
            return certificate_name
        raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' or a TLS client certificate")
