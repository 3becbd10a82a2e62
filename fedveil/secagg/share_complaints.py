"""Verifiable complaints about share boxes that do not open: the server can tell who is at fault.

A malicious sender S can seal random bytes in the share box it owes a holder H. H cannot open it and
must leave the attempt; without evidence the server cannot tell S's garbage from H's lie, so S would
be drawn again and again. Instead H *complains*, and the complaint proves its point:

``"undecryptable"``
    H reveals Z, the X25519 point it shares with S (the pair's Diffie–Hellman value, so the key of
    this pair's two boxes and nothing else), with a Chaum–Pedersen proof (Fiat–Shamir, SHA-512)
    that log_B(PK_H) = log_{P_S}(Z), where PK_H and P_S are the Edwards forms of the two advertised
    share keys. The server derives the box key from u(Z) and opens the box S uploaded: if it opens
    to a well-formed share that matches the box's two commitments
    (:mod:`fedveil.secagg.share_commitments`) H lied (guilty H); otherwise S is at fault. A bad proof
    convicts H.
``"bad_signature"`` (active mode)
    Every box carries S's identity signature over (session id, S, H, ciphertext, commitments). H verifies it only
    when the box fails, and reveals nothing for a box S did not sign: otherwise a malicious server
    could tamper with the boxes of one victim until t holders had revealed its pair keys. The server
    checks the signature of the box it stored: a bad one convicts S; a good one convicts nobody (the
    channel or H; H merely leaves the stage).
``"bad_key"``
    S's advertised share key is not a point of the prime-order subgroup (an honest X25519 key always
    is), or it came without a valid proof that S knows its secret (:func:`prove_key_possession`), so
    H reveals nothing; the server checks the key and the proof itself.

X25519 keys are Montgomery u-coordinates; their Edwards form is y = (u − 1)/(u + 1) mod p with the
sign of x 0, and back u = (1 + y)/(1 − y). With a = clamp(sk) mod L, a·B has u equal to the X25519
public key and a·P (P of order L) has u equal to the X25519 exchange with P's key. The group work
is libsodium's (PyNaCl bindings); any error there (a point off the subgroup, an identity result)
counts as an invalid proof. Pure and deterministic, except the prover's nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl import bindings as _nacl
from nacl.exceptions import CryptoError

from fedveil.secagg.errors import MalformedMessageError, ProtocolError, ShareDecryptionError
from fedveil.secagg.keys import (
    POSSESSION_PROOF_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    share_box_key,
    share_box_payload,
    valid_signatures,
)
from fedveil.secagg.shamir import BOX_OVERHEAD, PRIME, open_share
from fedveil.secagg.share_commitments import COMMITMENTS_BYTES, PLAINTEXT_BYTES, commitments, split_plaintext

UNDECRYPTABLE = "undecryptable"
BAD_SIGNATURE = "bad_signature"
BAD_KEY = "bad_key"
KINDS = (UNDECRYPTABLE, BAD_SIGNATURE, BAD_KEY)

CIPHERTEXT_BYTES = PLAINTEXT_BYTES + BOX_OVERHEAD
"""AES-GCM over the holder's share of the sender's two secrets (uint32 limbs) and their two salts."""
SIGNED_BYTES = CIPHERTEXT_BYTES + COMMITMENTS_BYTES
"""The part of a box its sender signs in active mode: the ciphertext, then the two commitments."""
SHARED_POINT_BYTES = 32
"""Z, the pair's X25519 point in Edwards form."""
PROOF_BYTES = POSSESSION_PROOF_BYTES  # the same shape: Edwards key, challenge, response
"""PK ‖ c ‖ s: the holder's share key in Edwards form, the challenge and the response."""

_P = (1 << 255) - 19
_SCALAR_BYTES = 32
_ZERO = bytes(_SCALAR_BYTES)
_DLEQ_DOMAIN = b"fedveil/secagg/v1/share-complaint/dleq"


def box_bytes(active: bool) -> int:
    """Length of a share box: AES-GCM ciphertext, the two commitments, then in active mode the sender's
    signature over both."""
    return SIGNED_BYTES + (SIGNATURE_BYTES if active else 0)


@dataclass(frozen=True)
class ShareComplaint:
    """A holder's complaint about the box ``sender`` sent it (see the module docstring).

    ``shared_point`` (32 bytes) and ``proof`` (96 bytes) are set for ``"undecryptable"`` only, and
    empty otherwise. ``shared_point`` is the pair's secret: it stays out of ``repr``.
    """

    sender: int
    kind: str
    shared_point: bytes = field(default=b"", repr=False)
    proof: bytes = field(default=b"", repr=False)

    def check(self, name: str = "complaint") -> ShareComplaint:
        """Shape checks for a complaint decoded from the wire; raises :class:`MalformedMessageError`
        naming the field (``name.sender``, ``name.kind``, ...). Returns ``self``."""
        if type(self.sender) is not int or not 0 <= self.sender < 1 << 32:
            raise MalformedMessageError(f"{name}.sender: expected a client id (uint32), got {self.sender!r}")
        if self.kind not in KINDS:
            raise MalformedMessageError(f"{name}.kind: unknown complaint kind {self.kind!r} (expected one of {KINDS})")
        for part, value, size in (("shared_point", self.shared_point, SHARED_POINT_BYTES),
                                  ("proof", self.proof, PROOF_BYTES)):
            if not isinstance(value, bytes):
                raise MalformedMessageError(f"{name}.{part}: expected bytes, got {type(value).__name__}")
            want = size if self.kind == UNDECRYPTABLE else 0
            if len(value) != want:
                detail = f"must be {size} bytes" if want else f"must be empty for a {self.kind!r} complaint"
                raise MalformedMessageError(f"{name}.{part}: {detail} (got {len(value)} bytes)")
        return self


@dataclass(frozen=True)
class ComplaintVerdict:
    """The server's judgement of one complaint: ``guilty`` is the secagg id proven at fault (the
    sender or the complaining holder), or None when the evidence convicts nobody."""

    complaint: ShareComplaint
    upheld: bool
    guilty: int | None
    reason: str


# --- curve -------------------------------------------------------------------------------------------

def prime_order_point(public: bytes) -> bytes | None:
    """The Edwards form (sign 0) of an X25519 public key, if it is a canonical encoding of a point of
    the prime-order subgroup other than the identity; None for anything else (small order, a
    torsion component, the twist, u ≥ p, bit 255 set)."""
    if len(public) != PUBLIC_KEY_BYTES:
        return None
    u = int.from_bytes(public, "little")
    if u >= _P or (u + 1) % _P == 0:
        return None
    y = (u - 1) * pow(u + 1, -1, _P) % _P
    point = y.to_bytes(32, "little")
    return point if _nacl.crypto_core_ed25519_is_valid_point(point) else None


def montgomery_u(point: bytes) -> bytes:
    """u = (1 + y)/(1 − y) of an Edwards point (not the identity), as 32 little-endian bytes."""
    y = int.from_bytes(point, "little") & ((1 << 255) - 1)
    return ((1 + y) * pow((1 - y) % _P, -1, _P) % _P).to_bytes(32, "little")


def _secret_scalar(private: X25519PrivateKey) -> bytes:
    raw = bytearray(private.private_bytes_raw())
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return _nacl.crypto_core_ed25519_scalar_reduce(bytes(raw) + _ZERO)


def _canonical_scalar(value: bytes) -> bool:
    return value != _ZERO and _nacl.crypto_core_ed25519_scalar_reduce(value + _ZERO) == value


def _challenge(session_id: bytes, sender: int, holder: int, pk: bytes, p_s: bytes, z: bytes, r1: bytes,
               r2: bytes) -> bytes:
    digest = hashlib.sha512(_DLEQ_DOMAIN + struct.pack("<I", len(session_id)) + session_id
                            + struct.pack("<II", sender, holder) + pk + p_s + z + r1 + r2).digest()
    return _nacl.crypto_core_ed25519_scalar_reduce(digest)


def _proof_parts(proof: bytes, public: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(PK, c, s)`` of a proof over the X25519 key ``public``: canonical non-zero scalars and a valid
    Edwards point whose u is ``public``; None otherwise."""
    if len(proof) != PROOF_BYTES:
        return None
    pk, c, s = proof[:32], proof[32:64], proof[64:]
    if not (_canonical_scalar(c) and _canonical_scalar(s)) or not _nacl.crypto_core_ed25519_is_valid_point(pk):
        return None
    return (pk, c, s) if hmac.compare_digest(montgomery_u(pk), public) else None


_POSSESSION_DOMAIN = b"fedveil/secagg/v1/share-key-possession"


def _possession_challenge(round_id: int, client_id: int, pk: bytes, r: bytes) -> bytes:
    digest = hashlib.sha512(_POSSESSION_DOMAIN + struct.pack("<QI", round_id, client_id) + pk + r).digest()
    return _nacl.crypto_core_ed25519_scalar_reduce(digest)


def prove_key_possession(private: X25519PrivateKey, round_id: int, client_id: int) -> bytes:
    """``PK ‖ c ‖ s``: a Schnorr proof (Fiat–Shamir, SHA-512) that client ``client_id`` knows the secret of
    its share key, bound to the round attempt and to that client. A holder reveals its pair secret
    with a sender (an ``"undecryptable"`` complaint) only for a sender key that carries one: revealing
    ``DH(c_H, X)`` then tells the sender nothing it could not compute itself. Without it, a colluder
    that advertised another client's key ``X`` (shown to a holder that was not shown the owner) had the
    holder reveal its secret with the owner (the cryptography review of 2026-12-07)."""
    a = _secret_scalar(private)
    pk = _nacl.crypto_scalarmult_ed25519_base_noclamp(a)
    while True:  # a retry has probability about 2^-251
        k = _nacl.crypto_core_ed25519_scalar_reduce(os.urandom(64))
        try:
            r = _nacl.crypto_scalarmult_ed25519_base_noclamp(k)
        except CryptoError:
            continue
        c = _possession_challenge(round_id, client_id, pk, r)
        s = _nacl.crypto_core_ed25519_scalar_add(k, _nacl.crypto_core_ed25519_scalar_mul(c, a))
        if c != _ZERO and s != _ZERO:
            return pk + c + s


def key_possession_valid(public: bytes, proof: bytes, round_id: int, client_id: int) -> bool:
    """Whether ``proof`` shows that client ``client_id`` knows the secret of the X25519 key ``public`` in
    this round attempt (:func:`prove_key_possession`). Never raises on hostile bytes."""
    parts = _proof_parts(proof, public) if prime_order_point(public) is not None else None
    if parts is None:
        return False
    pk, c, s = parts
    try:
        r = _nacl.crypto_core_ed25519_sub(_nacl.crypto_scalarmult_ed25519_base_noclamp(s),
                                          _nacl.crypto_scalarmult_ed25519_noclamp(c, pk))
    except CryptoError:
        return False
    return hmac.compare_digest(c, _possession_challenge(round_id, client_id, pk, r))


def prove_shared_point(private: X25519PrivateKey, sender_public: bytes, sender: int, holder: int,
                       session_id: bytes) -> tuple[bytes, bytes]:
    """The holder's evidence for an ``"undecryptable"`` complaint: ``(Z, PK ‖ c ‖ s)``.

    ``private`` is the holder's share key of the round, ``sender_public`` the sender's advertised
    share key, which must be a prime-order point (:func:`prime_order_point`; else raises
    :class:`ProtocolError`: complain ``"bad_key"`` instead)."""
    p_s = prime_order_point(sender_public)
    if p_s is None:
        raise ProtocolError(f"client {sender}'s share key is not a point of the prime-order subgroup")
    a = _secret_scalar(private)
    pk = _nacl.crypto_scalarmult_ed25519_base_noclamp(a)
    if montgomery_u(pk) != private.public_key().public_bytes_raw():
        raise AssertionError("the Edwards form of the holder's share key does not match its X25519 key")
    z = _nacl.crypto_scalarmult_ed25519_noclamp(a, p_s)
    while True:  # a retry has probability about 2^-251
        k = _nacl.crypto_core_ed25519_scalar_reduce(os.urandom(64))
        try:
            r1 = _nacl.crypto_scalarmult_ed25519_base_noclamp(k)
            r2 = _nacl.crypto_scalarmult_ed25519_noclamp(k, p_s)
        except CryptoError:
            continue
        c = _challenge(session_id, sender, holder, pk, p_s, z, r1, r2)
        s = _nacl.crypto_core_ed25519_scalar_add(k, _nacl.crypto_core_ed25519_scalar_mul(c, a))
        if c != _ZERO and s != _ZERO:
            return z, pk + c + s


def verify_shared_point(holder_public: bytes, sender_public: bytes, sender: int, holder: int, session_id: bytes,
                        shared_point: bytes, proof: bytes) -> bytes | None:
    """The pair's X25519 secret u(Z) (feed it to :func:`~fedveil.secagg.keys.share_box_key`) if the
    proof shows that Z is the holder's secret times the sender's key; None otherwise. Never raises
    on hostile bytes."""
    if len(shared_point) != SHARED_POINT_BYTES or len(proof) != PROOF_BYTES:
        return None
    parts = _proof_parts(proof, holder_public)
    p_s = prime_order_point(sender_public)
    if parts is None or p_s is None or not _nacl.crypto_core_ed25519_is_valid_point(shared_point):
        return None
    pk, c, s = parts
    try:
        r1 = _nacl.crypto_core_ed25519_sub(_nacl.crypto_scalarmult_ed25519_base_noclamp(s),
                                           _nacl.crypto_scalarmult_ed25519_noclamp(c, pk))
        r2 = _nacl.crypto_core_ed25519_sub(_nacl.crypto_scalarmult_ed25519_noclamp(s, p_s),
                                           _nacl.crypto_scalarmult_ed25519_noclamp(c, shared_point))
    except CryptoError:
        return None
    if not hmac.compare_digest(c, _challenge(session_id, sender, holder, pk, p_s, shared_point, r1, r2)):
        return None
    return montgomery_u(shared_point)


# --- boxes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenedShare:
    """What a share box holds: the holder's share of both secrets and the salts of their commitments."""

    limbs: np.ndarray = field(repr=False)
    """``SHARE_LIMBS`` field elements (int64): the self-mask seed's share, then the masking key's."""
    salts: np.ndarray = field(repr=False)
    """``(2, SALT_BYTES)`` uint8: the salt of each commitment."""


def open_share_box(shared: bytes, body: bytes, sender: int, holder: int, session_id: bytes) -> OpenedShare | str:
    """The share in a box, or why the box is no share: the one test the holder and the server apply
    alike. ``body`` is the box without its signature: the ciphertext, then the two commitments."""
    if len(body) != SIGNED_BYTES:
        return "has the wrong length"
    ciphertext, committed = body[:CIPHERTEXT_BYTES], body[CIPHERTEXT_BYTES:]
    key = share_box_key(shared, sender, holder, session_id)
    try:
        plain = open_share(key, ciphertext, sender, holder, session_id)
    except (ShareDecryptionError, ValueError):
        return "failed authentication (tampered, misrouted or from another session)"
    if len(plain) != PLAINTEXT_BYTES:
        return "has the wrong length"
    limbs, salts = split_plaintext(plain)
    if limbs.max() >= PRIME:
        return "holds a limb that is not a field element"
    if not hmac.compare_digest(committed, commitments(session_id, sender, holder, limbs, salts)):
        return "holds a share that does not match its commitments"
    return OpenedShare(limbs, salts)


def box_signature_valid(identity_public: bytes, box: bytes, sender: int, holder: int, session_id: bytes) -> bool:
    """Active mode: whether ``box`` (ciphertext ‖ signature) carries the sender's identity signature."""
    if len(box) != box_bytes(True):
        return False
    body, signature = box[:SIGNED_BYTES], box[SIGNED_BYTES:]
    payload = share_box_payload(session_id, sender, holder, body)
    return valid_signatures([(identity_public, signature, payload)])[0]


def build_complaint(*, private: X25519PrivateKey, sender_public: bytes, sender_possession: bytes,
                    sender_identity: bytes | None, box: bytes, sender: int, holder: int, session_id: bytes,
                    round_id: int) -> ShareComplaint:
    """The holder's complaint about a box that did not open. ``sender_identity``: the sender's
    Ed25519 key in active mode (None in passive mode); ``sender_possession``: the proof that came with
    its share key. No secret is revealed for a box it did not sign, nor for a sender key off the
    prime-order subgroup or without a valid proof that the sender knows its secret."""
    if sender_identity is not None and not box_signature_valid(sender_identity, box, sender, holder, session_id):
        return ShareComplaint(sender, BAD_SIGNATURE)
    if not key_possession_valid(sender_public, sender_possession, round_id, sender):
        return ShareComplaint(sender, BAD_KEY)
    z, proof = prove_shared_point(private, sender_public, sender, holder, session_id)
    return ShareComplaint(sender, UNDECRYPTABLE, z, proof)


def judge(complaint: ShareComplaint, *, holder: int, holder_public: bytes, sender_public: bytes,
          sender_possession: bytes, sender_identity: bytes | None, stored_box: bytes, session_id: bytes,
          round_id: int) -> ComplaintVerdict:
    """The verdict on one well-formed complaint (:meth:`ShareComplaint.check`) about ``stored_box``,
    the box the sender uploaded. ``sender_identity``: its Ed25519 key in active mode, else None.
    Deterministic; never raises on hostile bytes."""
    sender = complaint.sender

    def verdict(upheld: bool, guilty: int | None, reason: str) -> ComplaintVerdict:
        return ComplaintVerdict(complaint, upheld, guilty, reason)

    if complaint.kind == BAD_KEY:
        if prime_order_point(sender_public) is None:
            return verdict(True, sender, f"client {sender}'s share key is not a point of the prime-order subgroup")
        if not key_possession_valid(sender_public, sender_possession, round_id, sender):
            return verdict(True, sender, f"client {sender}'s share key came without a valid proof that it knows "
                                         "its secret")
        return verdict(False, holder, f"client {sender}'s share key is valid: a false complaint")
    if complaint.kind == BAD_SIGNATURE:
        if sender_identity is None:  # the caller rejects it as malformed in passive mode
            return verdict(False, None, "passive mode: share boxes are not signed")
        if box_signature_valid(sender_identity, stored_box, sender, holder, session_id):
            return verdict(False, None, f"the box client {sender} uploaded is signed: altered on its way, or a "
                                        "false complaint (inconclusive)")
        return verdict(True, sender, f"client {sender} uploaded a share box without its valid signature")
    shared = verify_shared_point(holder_public, sender_public, sender, holder, session_id, complaint.shared_point,
                                 complaint.proof)
    if shared is None:
        return verdict(False, holder, f"client {holder}'s proof of the shared point is invalid")
    opened = open_share_box(shared, stored_box[:SIGNED_BYTES], sender, holder, session_id)
    if isinstance(opened, str):
        return verdict(True, sender, f"the share box client {sender} uploaded {opened}")
    return verdict(False, holder, f"the share box client {sender} uploaded opens to a well-formed share that "
                                  "matches its commitments: a false complaint")
