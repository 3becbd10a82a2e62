"""Commitments to the shares in each share box: an owner whose shares do not reconstruct is proven at fault.

Shares that do not lie on one polynomial used to leave the server unable to say who was at fault:
the owner may have dealt them, or holders may have returned shares other than the ones they were
dealt. Berlekamp–Welch could locate the odd shares out but not their author, so a malicious owner
could spoil every round it was drawn for (and make honest holders look faulty).

Now every share box carries, next to its ciphertext, two hash commitments by the owner S, one to
the holder H's share of each secret: C = SHA-256(domain ‖ session id ‖ S ‖ H ‖ secret ‖ share ‖ salt),
with a 16-byte salt that travels inside the encrypted box, so C tells the server nothing about the
share (it is a hiding commitment in the random-oracle model). In active mode the owner's signature on
the box covers the commitments too.

- H checks at the masked-input stage that its box opens to shares matching both commitments. If not,
  it complains as about a box that does not open (:mod:`fedveil.secagg.share_complaints`): the server
  opens the box with the proven pair key and sees the mismatch itself.
- At unmasking, H returns the share the server asks for *with its salt*. The server recomputes the
  commitment S uploaded: a share that does not match it was not dealt by S, so H is proven to lie,
  and its answer is refused.
- Every share the server then holds is one S committed to (S's own share of its own secret comes
  from S itself). If they do not lie on one polynomial, or the masking key they give is not the one
  S advertised, **S** dealt them: it is proven at fault, whoever returned them.

This is accountable sharing rather than verifiable secret sharing (Feldman 1987): a holder cannot
check its share against the others before it masks, so a bad dealing still costs the round it is in,
but the dealer is convicted and left out of the job's later rounds. Feldman's or Pedersen's check
would need the shares in the field of a prime-order group (here they are Mersenne-31 limbs) and t
group exponentiations per share. Pure and deterministic given the sharing seed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct

import numpy as np

from fedveil.secagg.keys import hkdf
from fedveil.secagg.messages import SALT_BYTES, SELF_MASK_LIMBS, SHARE_LIMBS
from fedveil.secagg.prg import expand

COMMITMENT_BYTES = 32
COMMITMENTS_BYTES = 2 * COMMITMENT_BYTES
"""Both commitments of a box: the self-mask seed's share, then the masking key's."""
SELF_MASK = 0
MASK_KEY = 1
PLAINTEXT_BYTES = 4 * SHARE_LIMBS + 2 * SALT_BYTES
"""A share box's plaintext: the holder's share of both secrets (uint32 limbs), then the two salts."""

_DOMAIN = b"fedveil/secagg/v1/share-commitment"
_ENDS = struct.Struct("<IIB")


def commitment_salts(sharing_seed: bytes, session_id: bytes, count: int) -> np.ndarray:
    """``(count, 2, SALT_BYTES)`` salts, one pair per holder in the order the owner shares to them:
    from the owner's secret sharing seed (AES-CTR), so sharing stays deterministic given the seed."""
    seed = hkdf(sharing_seed, salt=session_id, info=b"share-commitment-salts")
    return expand(seed, count * 2 * SALT_BYTES, np.uint8).reshape(count, 2, SALT_BYTES)


@functools.lru_cache(maxsize=64)
def _session_prefix(session_id: bytes) -> hashlib._Hash:
    """SHA-256 already fed the domain and the session id (copied for each commitment: a server checks
    one per returned share, about 250 per site at n = 1,000)."""
    return hashlib.sha256(_DOMAIN + struct.pack("<I", len(session_id)) + session_id)


def commit(session_id: bytes, owner: int, holder: int, part: int, limbs: np.ndarray, salt: bytes) -> bytes:
    """The owner's commitment to ``holder``'s share of one secret (``part``: SELF_MASK or MASK_KEY)."""
    digest = _session_prefix(session_id).copy()
    digest.update(_ENDS.pack(owner, holder, part))
    digest.update(np.asarray(limbs).astype("<u4", copy=False).tobytes())
    digest.update(salt)
    return digest.digest()


def commitments(session_id: bytes, owner: int, holder: int, limbs: np.ndarray, salts: np.ndarray) -> bytes:
    """Both commitments of a box (:data:`COMMITMENTS_BYTES`) to the ``SHARE_LIMBS`` limbs of one share."""
    return (commit(session_id, owner, holder, SELF_MASK, limbs[:SELF_MASK_LIMBS], bytes(salts[SELF_MASK]))
            + commit(session_id, owner, holder, MASK_KEY, limbs[SELF_MASK_LIMBS:], bytes(salts[MASK_KEY])))


def plaintext(limbs: np.ndarray, salts: np.ndarray) -> bytes:
    """A share box's plaintext (:data:`PLAINTEXT_BYTES`)."""
    return np.asarray(limbs, dtype="<u4").tobytes() + np.asarray(salts, dtype=np.uint8).tobytes()


def split_plaintext(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(limbs as int64, salts (2, SALT_BYTES))`` of a plaintext of :data:`PLAINTEXT_BYTES` bytes."""
    if len(data) != PLAINTEXT_BYTES:
        raise ValueError(f"a share box's plaintext is {PLAINTEXT_BYTES} bytes (got {len(data)})")
    limbs = np.frombuffer(data[:4 * SHARE_LIMBS], dtype="<u4").astype(np.int64)
    salts = np.frombuffer(data[4 * SHARE_LIMBS:], dtype=np.uint8).reshape(2, SALT_BYTES).copy()
    return limbs, salts


def matches(expected: bytes, session_id: bytes, owner: int, holder: int, part: int, limbs: np.ndarray,
            salt: bytes) -> bool:
    """Whether a returned share and salt open ``expected`` (the owner's commitment for that part)."""
    return hmac.compare_digest(expected, commit(session_id, owner, holder, part, limbs, salt))


def part_of(box_commitments: bytes, part: int) -> bytes:
    """One commitment out of a box's two."""
    return box_commitments[part * COMMITMENT_BYTES:(part + 1) * COMMITMENT_BYTES]
