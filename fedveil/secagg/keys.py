"""Per-round key material: two X25519 key pairs per client, HKDF-derived seeds, session ids.

Bonawitz et al. (CCS 2017, §4, Fig. 4): each client advertises two Diffie–Hellman public keys
per round, ``c`` (to encrypt the Shamir shares it sends to peers) and ``s`` (to agree on
pairwise masks). Every derived secret is bound with HKDF-SHA256 (RFC 5869) to the **session
id**, a SHA-256 over the round id, the protocol parameters and every advertised public key (as
in Google's fcp/secagg), so no mask, share or signature of one round is valid in another, and a
server that shows different key sets to different clients produces different session ids.

All randomness comes from ``os.urandom`` unless the caller passes a 32-byte ``seed``, in which
case everything is derived from it with HKDF (deterministic tests, reproducible simulations).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedveil.secagg.errors import ConfigError, InvalidSignatureError, ProtocolError
from fedveil.secagg.prg import SEED_BYTES

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
POSSESSION_PROOF_BYTES = 96
"""A proof that a client knows its share key's secret (Edwards key, challenge, response)."""
SESSION_ID_BYTES = 32
CLIENT_SEED_BYTES = 32
_DOMAIN = b"fedveil/secagg/v1/"


def hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int = SEED_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) with a domain-separated ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=_DOMAIN + info).derive(secret)


@dataclass(frozen=True)
class RoundKeys:
    """One client's secrets for one round. Never logged, never serialized in the clear."""

    share_private: X25519PrivateKey
    mask_private: X25519PrivateKey
    self_mask_seed: bytes
    sharing_seed: bytes
    """Seeds the Shamir polynomial coefficients (AES-CTR), so sharing is deterministic per seed."""

    @property
    def share_public(self) -> bytes:
        return self.share_private.public_key().public_bytes_raw()

    @property
    def mask_public(self) -> bytes:
        return self.mask_private.public_key().public_bytes_raw()

    def __repr__(self) -> str:  # never print secrets
        return "RoundKeys(<secret>)"


def generate_round_keys(seed: bytes | None = None, context: bytes = b"") -> RoundKeys:
    """Fresh keys from the OS CSPRNG, or derived from a 32-byte ``seed`` for reproducibility.

    ``context`` (the round id, parameters and client id, see :class:`~fedveil.secagg.client.SecAggClient`)
    is the HKDF salt of a seeded derivation, so a seed passed again for another round or client
    never yields the same self-mask seed or masking key (revealing ``b`` in one round and
    ``s_sk`` in another would unmask an input).
    """
    if seed is None:
        return RoundKeys(X25519PrivateKey.generate(), X25519PrivateKey.generate(),
                         os.urandom(SEED_BYTES), os.urandom(CLIENT_SEED_BYTES))
    if not isinstance(seed, bytes) or len(seed) != CLIENT_SEED_BYTES:
        raise ConfigError(f"seed: expected {CLIENT_SEED_BYTES} bytes or None")

    def derive(label: bytes, length: int = 32) -> bytes:
        return hkdf(seed, salt=context, info=b"client-seed/" + label, length=length)

    return RoundKeys(
        X25519PrivateKey.from_private_bytes(derive(b"share-key")),
        X25519PrivateKey.from_private_bytes(derive(b"mask-key")),
        derive(b"self-mask", SEED_BYTES),
        derive(b"shamir", CLIENT_SEED_BYTES),
    )


def check_public_key(value: bytes, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
        raise ConfigError(f"{name}: expected a {PUBLIC_KEY_BYTES}-byte X25519 public key")
    return value


# u-coordinates of the X25519 points of small order (on the curve and its twist). A Diffie-Hellman
# exchange with any of them gives the all-zero secret, which OpenSSL refuses with a bare
# ValueError; accepting such a key would let one party stop every neighbour's round with an
# unnamed error. RFC 7748 ignores the top bit and reduces mod p, so each point has up to four
# 32-byte encodings (u, u + p when below 2^255, each with or without bit 255): 14 in all, kept
# as a set of byte strings so the check is one hash lookup.
_P25519 = (1 << 255) - 19
_SMALL_ORDER_U = (
    0, 1, _P25519 - 1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
)
_SMALL_ORDER_ENCODINGS = frozenset(
    (v | high).to_bytes(32, "little")
    for u in _SMALL_ORDER_U for v in (u, u + _P25519) if v < 1 << 255 for high in (0, 1 << 255)
)


def is_small_order(public: bytes) -> bool:
    """True for an X25519 public key whose exchange with any private key is all zeros."""
    return public in _SMALL_ORDER_ENCODINGS


# Ed25519 points (RFC 8032 §5.1.3). A public key of small order (its order divides 8) signs
# nothing by itself: with cofactorless verification, as OpenSSL does it, anyone finds a (R, s)
# with sB = R + [k]A for any message in about eight tries (at once for the identity point). A
# credential for such a key would let the server sign as that site, so identity and authority
# keys of small order, and encodings of no point at all, are refused.
_D25519 = (-121665 * pow(121666, _P25519 - 2, _P25519)) % _P25519
_SQRT_M1 = pow(2, (_P25519 - 1) // 4, _P25519)


def _sqrt_mod_p(a: int) -> int | None:
    """A square root of ``a`` modulo p = 2^255 - 19 (p = 5 mod 8: Atkin's formula), or None."""
    a %= _P25519
    x = pow(a, (_P25519 + 3) // 8, _P25519)
    if x * x % _P25519 != a:
        x = x * _SQRT_M1 % _P25519
    return x if x * x % _P25519 == a else None


def _small_order_ys() -> frozenset[int]:
    """The y-coordinates of the eight points of order dividing 8: 1 (the identity), -1 (order 2),
    0 (order 4: x^2 = -1), and ±y8 (order 8: [2]P = (±sqrt(-1), 0), so x^2 = -y^2 and, on the
    curve, d*y^4 + 2*y^2 - 1 = 0). Every point with one of these y has small order, and no other."""
    ys = {1, _P25519 - 1, 0}
    root = _sqrt_mod_p(1 + _D25519)
    assert root is not None
    inverse_d = pow(_D25519, -1, _P25519)
    for z in ((root - 1) * inverse_d, (-root - 1) * inverse_d):
        y = _sqrt_mod_p(z)
        if y is not None:
            ys.update((y, _P25519 - y))
    assert len(ys) == 5
    return frozenset(ys)


_ED25519_SMALL_ORDER_Y = _small_order_ys()


@functools.lru_cache(maxsize=1 << 16)
def ed25519_public_key_problem(public: bytes) -> str | None:
    """Why ``public`` (32 raw bytes) is unfit as an Ed25519 verification key, or None if it is fit.

    Pure; one modular exponentiation in Python (about 0.15 ms, for the square root that decodes x),
    then a set lookup on y, since the small-order points are exactly those with y in
    :data:`_ED25519_SMALL_ORDER_Y`. Memoized: a site sees the same peer keys round after round."""
    point = _ed25519_decode(public)
    if point is None:
        return "does not encode a point of Ed25519"
    if point[1] in _ED25519_SMALL_ORDER_Y:
        return "is a point of small order (anyone could forge signatures under it)"
    return None


def _ed25519_decode(raw: bytes) -> tuple[int, int] | None:
    if len(raw) != PUBLIC_KEY_BYTES:
        return None
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P25519:  # non-canonical
        return None
    u, v = (y * y - 1) % _P25519, (_D25519 * y * y + 1) % _P25519
    x = u * pow(v, 3, _P25519) * pow(u * pow(v, 7, _P25519), (_P25519 - 5) // 8, _P25519) % _P25519
    if (v * x * x - u) % _P25519:
        if (v * x * x + u) % _P25519:
            return None  # x^2 = u/v has no root: not on the curve
        x = x * _SQRT_M1 % _P25519
    if x == 0 and sign:
        return None
    return (_P25519 - x if x & 1 != sign else x), y


def _exchange(own: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # small-order point or wrong length
        raise ProtocolError("X25519 exchange failed: the peer's public key is invalid or of small order") from err


def session_id(round_id: int, parameters: bytes, advertised: Iterable[tuple[int, bytes, bytes]]) -> bytes:
    """SHA-256 over the round id, the protocol parameters and all advertised public keys.

    ``advertised`` yields ``(client_id, share_public, mask_public)``; the order does not matter
    (entries are sorted by client id).
    """
    h = hashlib.sha256()
    h.update(_DOMAIN + b"session")
    h.update(struct.pack("<Q", round_id))
    h.update(struct.pack("<I", len(parameters)) + parameters)
    for cid, c_pk, s_pk in sorted(advertised):
        h.update(struct.pack("<I", cid) + c_pk + s_pk)
    return h.digest()


def _pair_info(label: bytes, a: int, b: int) -> bytes:
    return label + struct.pack("<II", a, b)


def pairwise_mask_seed(own_mask: X25519PrivateKey, peer_mask_public: bytes, own_id: int, peer_id: int,
                       session: bytes) -> bytes:
    """The PRG seed of the mask shared by ``own_id`` and ``peer_id`` (the same on both sides)."""
    shared = _exchange(own_mask, peer_mask_public)
    lo, hi = (own_id, peer_id) if own_id < peer_id else (peer_id, own_id)
    return hkdf(shared, salt=session, info=_pair_info(b"pairwise-mask", lo, hi))


def share_secret(own_share: X25519PrivateKey, peer_share_public: bytes) -> bytes:
    """Raw X25519 secret of the share-encryption key pair (feed it to :func:`share_box_key`)."""
    return _exchange(own_share, peer_share_public)


def share_box_key(shared: bytes, sender: int, recipient: int, session: bytes) -> bytes:
    """AES-128-GCM key for the share box from ``sender`` to ``recipient`` (direction-specific).

    ``shared`` is the X25519 secret of the pair's share keys (:func:`share_secret`); both boxes of
    a pair derive from it, so a client computes it once per peer.
    """
    return hkdf(shared, salt=session, info=_pair_info(b"share-box", sender, recipient))


def self_mask_prg_seed(self_mask_seed: bytes, client_id: int, session: bytes) -> bytes:
    """PRG seed of a client's self mask, derived from its Shamir-shared seed ``b``."""
    return hkdf(self_mask_seed, salt=session, info=b"self-mask" + struct.pack("<I", client_id))


# --- active-adversary mode: Ed25519 identity signatures -------------------------------------------

def advertisement_payload(round_id: int, parameters: bytes, client_id: int, share_public: bytes,
                          mask_public: bytes) -> bytes:
    return (_DOMAIN + b"advertise" + struct.pack("<QI", round_id, len(parameters)) + parameters
            + struct.pack("<I", client_id) + share_public + mask_public)


def survivor_set_payload(session: bytes, survivors: Iterable[int]) -> bytes:
    ids = sorted(survivors)
    return _DOMAIN + b"survivors" + session + struct.pack(f"<I{len(ids)}I", len(ids), *ids)


def share_box_payload(session: bytes, sender: int, holder: int, body: bytes) -> bytes:
    """What the sender of a share box signs in active mode: the box's ciphertext and share commitments
    (``body``), bound to the session id and to both ends, so a signed box is valid for one holder in
    one session only. A holder reveals the pair's secret in a complaint only about a box its sender
    signed (:mod:`fedveil.secagg.share_complaints`)."""
    return (_DOMAIN + b"share-box-signature" + struct.pack("<I", len(session)) + session
            + struct.pack("<II", sender, holder) + body)


def sign(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    return identity.sign(payload)


def verify(identity_public: bytes, signature: bytes, payload: bytes, *, what: str) -> None:
    """Raise :class:`InvalidSignatureError` naming ``what`` unless ``signature`` verifies."""
    if not _valid(identity_public, signature, payload):
        raise InvalidSignatureError(f"invalid Ed25519 signature on {what}")


def _valid(identity_public: bytes, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


SignedItem = tuple[bytes, bytes, bytes]
"""(identity public key, signature, payload)."""

PARALLEL_VERIFY_MIN = 16
"""Below this many signatures a batch is verified on the calling thread (a hand-off costs more)."""

_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _verify_pool() -> tuple[int, ThreadPoolExecutor] | None:
    """One process-wide pool with a thread per core, and its size (none on one core); a forked child
    makes its own (the parent's threads do not exist there)."""
    global _pool
    cores = os.cpu_count() or 1
    if cores < 2:
        return None
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), cores, ThreadPoolExecutor(max_workers=cores, thread_name_prefix="fedveil-verify"))
        return _pool[1], _pool[2]


def valid_signatures(items: Sequence[SignedItem]) -> list[bool]:
    """Whether each ``(identity key, signature, payload)`` verifies, in order.

    Active mode's largest client costs are Ed25519 verifications (a survivor-set check counts a few
    hundred at about 130 µs each on this project's CI machines); OpenSSL verifies without holding
    the GIL, so a large batch is split into one chunk per core. The answer does not depend on the
    split: each item is verified exactly once, on its own.
    """
    sized = _verify_pool() if len(items) >= PARALLEL_VERIFY_MIN else None
    if sized is None:
        return [_valid(*item) for item in items]
    workers, pool = sized
    step = -(-len(items) // workers)
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    futures = [pool.submit(lambda chunk: [_valid(*item) for item in chunk], chunk) for chunk in chunks[1:]]
    out = [_valid(*item) for item in chunks[0]]  # the caller's thread takes the first chunk
    for future in futures:
        out.extend(future.result())
    return out
