"""Messages of one secure-aggregation round, one dataclass per stage and direction.

Every message has a compact binary form (``to_bytes`` / :func:`decode_message`) so a transport
can send it as raw bytes: vectors are little-endian ring elements (``uint32``/``uint64``), ids
``uint32``, keys and signatures raw bytes — no base64, no pickle. ``wire_size()`` is the exact
length of ``to_bytes()`` without building it.

Every message carries the round id, so one replayed from another round is rejected
(:class:`~fedveil.secagg.errors.WrongRoundError`); ``client_id`` is the sender for client
messages and the recipient for server messages.

Layout: ``b"FVSA"`` ‖ version u8 ‖ type u8 ‖ round_id u64 ‖ client_id u32 ‖ body.

Stage flow (server → client requests, client → server responses)::

    client: AdvertiseKeys ─────────────────────────► server           (R0)
    server: ShareKeysRequest (all advertised keys) ─► client
    client: ShareKeysResponse (encrypted shares) ──► server           (R1)
    server: MaskedInputRequest (shares for you) ───► client
    client: MaskedInputResponse (masked vector) ───► server           (R2)
    server: ConsistencyCheckRequest (survivors) ───► client           (active mode only)
    client: ConsistencyCheckResponse (signature) ──► server
    server: UnmaskingRequest (survivors, dropped) ─► client
    client: UnmaskingResponse (Shamir shares) ─────► server           (R3)
    server: RoundAborted (reason) ─────────────────► client           (any stage)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedveil.secagg.errors import MalformedMessageError
from fedveil.secagg.keys import POSSESSION_PROOF_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES

MAGIC = b"FVSA"
VERSION = 1
_HEADER = struct.Struct("<4sBBQI")
HEADER_BYTES = _HEADER.size
SELF_MASK_LIMBS = 8  # 16-byte self-mask seed as 16-bit limbs
MASK_KEY_LIMBS = 16  # 32-byte X25519 private key as 16-bit limbs
SHARE_LIMBS = SELF_MASK_LIMBS + MASK_KEY_LIMBS
SALT_BYTES = 16  # the salt of a share's commitment (fedveil.secagg.share_commitments)


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.data = memoryview(data)
        self.pos = offset

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedMessageError(f"message truncated: needed {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(s))

    def u32(self) -> int:
        return int(self.unpack("<I")[0])

    def array(self, count: int, dtype: str) -> np.ndarray:
        dt = np.dtype(dtype)
        raw = self.take(count * dt.itemsize)
        return np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="), copy=True)

    def blob(self) -> bytes:
        (n,) = self.unpack("<H")
        return bytes(self.take(n))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MalformedMessageError(f"{len(self.data) - self.pos} trailing bytes after the message")


def _ids(values: np.ndarray | tuple[int, ...] | list[int] | frozenset[int]) -> np.ndarray:
    arr = np.asarray(sorted(values) if isinstance(values, (set, frozenset)) else values, dtype=np.int64)
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= 1 << 32)):
        raise MalformedMessageError("client ids must be a 1-D sequence of uint32 values")
    return arr.astype(np.uint32)


def _blob_map_bytes(boxes: dict[int, bytes]) -> bytes:
    parts = [struct.pack("<I", len(boxes))]
    for cid in sorted(boxes):
        box = boxes[cid]
        parts.append(struct.pack("<IH", cid, len(box)))
        parts.append(box)
    return b"".join(parts)


def _read_blob_map(r: _Reader) -> dict[int, bytes]:
    count = r.u32()
    out: dict[int, bytes] = {}
    for _ in range(count):
        cid = r.u32()
        if cid in out:
            raise MalformedMessageError(f"duplicate client id {cid} in message")
        out[cid] = r.blob()
    return out


@dataclass(frozen=True, eq=False)
class Message:
    """Common header of every message."""

    TYPE: ClassVar[int] = 0
    round_id: int
    client_id: int

    def _body(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.TYPE, self.round_id, self.client_id) + self._body()

    def wire_size(self) -> int:
        """Exact ``len(self.to_bytes())``."""
        return len(self.to_bytes())

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> Message:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        msg = decode_message(data)
        if not isinstance(msg, cls):
            raise MalformedMessageError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg


# --- client → server ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AdvertiseKeys(Message):
    """R0: the client's two X25519 public keys; signed with its identity key in active mode.
    ``share_proof``: its proof that it knows the share key's secret
    (:func:`fedveil.secagg.share_complaints.prove_key_possession`), which holders check before they
    reveal a pair secret in a complaint."""

    TYPE: ClassVar[int] = 1
    share_public: bytes = b""
    mask_public: bytes = b""
    signature: bytes = b""
    share_proof: bytes = b""

    def _body(self) -> bytes:
        return (self.share_public + self.mask_public + struct.pack("<B", len(self.signature)) + self.signature
                + struct.pack("<B", len(self.share_proof)) + self.share_proof)

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> AdvertiseKeys:
        c_pk = bytes(r.take(PUBLIC_KEY_BYTES))
        s_pk = bytes(r.take(PUBLIC_KEY_BYTES))
        (n,) = r.unpack("<B")
        if n not in (0, SIGNATURE_BYTES):
            raise MalformedMessageError(f"signature length must be 0 or {SIGNATURE_BYTES} (got {n})")
        signature = bytes(r.take(n))
        (m,) = r.unpack("<B")
        if m not in (0, POSSESSION_PROOF_BYTES):
            raise MalformedMessageError(f"share_proof length must be 0 or {POSSESSION_PROOF_BYTES} (got {m})")
        return cls(round_id, client_id, c_pk, s_pk, signature, bytes(r.take(m)))


@dataclass(frozen=True, eq=False)
class ShareKeysResponse(Message):
    """R1: the client's Shamir shares, one AES-GCM box per holder (recipient id → box)."""

    TYPE: ClassVar[int] = 2
    boxes: dict[int, bytes] = field(default_factory=dict)

    def _body(self) -> bytes:
        return _blob_map_bytes(self.boxes)

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> ShareKeysResponse:
        return cls(round_id, client_id, _read_blob_map(r))


@dataclass(frozen=True, eq=False)
class MaskedInputResponse(Message):
    """R2: the masked input, raw little-endian ring elements (``uint32`` or ``uint64``)."""

    TYPE: ClassVar[int] = 3
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def _body(self) -> bytes:
        v = self.vector
        if v.dtype not in (np.uint32, np.uint64) or v.ndim != 1:
            raise MalformedMessageError("masked vector must be a 1-D uint32 or uint64 array")
        return struct.pack("<BI", v.dtype.itemsize, v.size) + v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes()

    def wire_size(self) -> int:
        return HEADER_BYTES + 5 + self.vector.size * self.vector.dtype.itemsize

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> MaskedInputResponse:
        itemsize, size = r.unpack("<BI")
        if itemsize not in (4, 8):
            raise MalformedMessageError(f"ring element size must be 4 or 8 bytes (got {itemsize})")
        return cls(round_id, client_id, r.array(size, f"<u{itemsize}"))


@dataclass(frozen=True, eq=False)
class ConsistencyCheckResponse(Message):
    """Active mode: the client's Ed25519 signature over (session id, survivor set)."""

    TYPE: ClassVar[int] = 4
    signature: bytes = b""

    def _body(self) -> bytes:
        if len(self.signature) != SIGNATURE_BYTES:
            raise MalformedMessageError(f"signature must be {SIGNATURE_BYTES} bytes")
        return self.signature

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> ConsistencyCheckResponse:
        return cls(round_id, client_id, bytes(r.take(SIGNATURE_BYTES)))


@dataclass(frozen=True, eq=False)
class UnmaskingResponse(Message):
    """R3: Shamir shares the server asked for, as ``(count, limbs)`` uint32 field elements.

    ``self_mask_shares[i]`` is this client's share of the self-mask seed of survivor
    ``self_mask_owners[i]``; ``mask_key_shares[i]`` its share of the masking key of dropped
    client ``mask_key_owners[i]``. Never both for one owner. Each share comes with the salt that
    opens its owner's commitment to it (``(count, SALT_BYTES)`` uint8;
    :mod:`fedveil.secagg.share_commitments`); a client's share of its own seed has none (zeros). The
    shares are secrets (t of them give a seed or key), so they and their salts are left out of
    ``repr``: a logged message shows owners only.
    """

    TYPE: ClassVar[int] = 5
    self_mask_owners: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    self_mask_shares: np.ndarray = field(default_factory=lambda: np.zeros((0, SELF_MASK_LIMBS), np.uint32),
                                         repr=False)
    mask_key_owners: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    mask_key_shares: np.ndarray = field(default_factory=lambda: np.zeros((0, MASK_KEY_LIMBS), np.uint32),
                                        repr=False)
    self_mask_salts: np.ndarray = field(default_factory=lambda: np.zeros((0, SALT_BYTES), np.uint8), repr=False)
    mask_key_salts: np.ndarray = field(default_factory=lambda: np.zeros((0, SALT_BYTES), np.uint8), repr=False)

    def _groups(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, int, str], ...]:
        return ((self.self_mask_owners, self.self_mask_shares, self.self_mask_salts, SELF_MASK_LIMBS, "self_mask"),
                (self.mask_key_owners, self.mask_key_shares, self.mask_key_salts, MASK_KEY_LIMBS, "mask_key"))

    def _body(self) -> bytes:
        parts = []
        for owners, shares, salts, limbs, what in self._groups():
            ids = _ids(owners)
            sh = np.asarray(shares)
            if sh.shape != (ids.size, limbs):
                raise MalformedMessageError(f"{what}_shares must have shape ({ids.size}, {limbs}) (got {sh.shape})")
            sa = np.asarray(salts)
            if sa.shape != (ids.size, SALT_BYTES):
                raise MalformedMessageError(f"{what}_salts must have shape ({ids.size}, {SALT_BYTES}) (got {sa.shape})")
            parts += [struct.pack("<I", ids.size), ids.astype("<u4").tobytes(), sh.astype("<u4").tobytes(),
                      sa.astype(np.uint8).tobytes()]
        return b"".join(parts)

    def wire_size(self) -> int:
        return HEADER_BYTES + 8 + sum(owners.size * (4 * (1 + limbs) + SALT_BYTES)
                                      for owners, _, _, limbs, _ in self._groups())

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> UnmaskingResponse:
        out = []
        for limbs in (SELF_MASK_LIMBS, MASK_KEY_LIMBS):
            count = r.u32()
            ids = r.array(count, "<u4")
            out += [ids, r.array(count * limbs, "<u4").reshape(count, limbs),
                    r.array(count * SALT_BYTES, "u1").reshape(count, SALT_BYTES)]
        return cls(round_id, client_id, out[0], out[1], out[3], out[4], out[2], out[5])


# --- server → client ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ShareKeysRequest(Message):
    """After R0: every advertisement the server accepted (the client hashes them into the session id)."""

    TYPE: ClassVar[int] = 11
    advertisements: tuple[AdvertiseKeys, ...] = ()

    def wire_size(self) -> int:
        return HEADER_BYTES + 4 + sum(4 + 2 * PUBLIC_KEY_BYTES + 2 + len(a.signature) + len(a.share_proof)
                                      for a in self.advertisements)

    def _body(self) -> bytes:
        parts = [struct.pack("<I", len(self.advertisements))]
        for adv in self.advertisements:
            parts.append(struct.pack("<I", adv.client_id))
            parts.append(adv._body())
        return b"".join(parts)

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> ShareKeysRequest:
        count = r.u32()
        advs = []
        for _ in range(count):
            cid = r.u32()
            advs.append(AdvertiseKeys._parse(round_id, cid, r))
        return cls(round_id, client_id, tuple(advs))


@dataclass(frozen=True, eq=False)
class MaskedInputRequest(Message):
    """After R1: the share boxes addressed to this client (sender id → box)."""

    TYPE: ClassVar[int] = 12
    boxes: dict[int, bytes] = field(default_factory=dict)

    def _body(self) -> bytes:
        return _blob_map_bytes(self.boxes)

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> MaskedInputRequest:
        return cls(round_id, client_id, _read_blob_map(r))


@dataclass(frozen=True, eq=False)
class ConsistencyCheckRequest(Message):
    """Active mode, after R2: the survivor set U3 (clients whose masked input arrived)."""

    TYPE: ClassVar[int] = 13
    survivors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def _body(self) -> bytes:
        ids = _ids(self.survivors)
        return struct.pack("<I", ids.size) + ids.astype("<u4").tobytes()

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> ConsistencyCheckRequest:
        return cls(round_id, client_id, r.array(r.u32(), "<u4"))


@dataclass(frozen=True, eq=False)
class UnmaskingRequest(Message):
    """Before R3: survivors (send self-mask shares) and dropped clients (send masking-key shares).

    In active mode ``signatures`` holds the survivors' signatures over the survivor set.
    """

    TYPE: ClassVar[int] = 14
    survivors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    signatures: dict[int, bytes] = field(default_factory=dict)

    def _body(self) -> bytes:
        parts = []
        for arr in (self.survivors, self.dropped):
            ids = _ids(arr)
            parts += [struct.pack("<I", ids.size), ids.astype("<u4").tobytes()]
        parts.append(_blob_map_bytes(self.signatures))
        return b"".join(parts)

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> UnmaskingRequest:
        survivors = r.array(r.u32(), "<u4")
        dropped = r.array(r.u32(), "<u4")
        return cls(round_id, client_id, survivors, dropped, _read_blob_map(r))


@dataclass(frozen=True, eq=False)
class RoundAborted(Message):
    """The server aborted the round (too few clients); ``reason`` is human-readable."""

    TYPE: ClassVar[int] = 15
    reason: str = ""

    def _body(self) -> bytes:
        raw = self.reason.encode()[:65535]
        return struct.pack("<H", len(raw)) + raw

    @classmethod
    def _parse(cls, round_id: int, client_id: int, r: _Reader) -> RoundAborted:
        return cls(round_id, client_id, r.blob().decode(errors="replace"))


ClientMessage = AdvertiseKeys | ShareKeysResponse | MaskedInputResponse | ConsistencyCheckResponse | UnmaskingResponse
ServerMessage = ShareKeysRequest | MaskedInputRequest | ConsistencyCheckRequest | UnmaskingRequest | RoundAborted

MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (AdvertiseKeys, ShareKeysResponse, MaskedInputResponse, ConsistencyCheckResponse, UnmaskingResponse,
                ShareKeysRequest, MaskedInputRequest, ConsistencyCheckRequest, UnmaskingRequest, RoundAborted)
}


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse any message from its bytes; raises :class:`MalformedMessageError` on bad input."""
    if len(data) < HEADER_BYTES:
        raise MalformedMessageError(f"message shorter than its {HEADER_BYTES}-byte header")
    magic, version, mtype, round_id, client_id = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedMessageError("not a fedveil secagg message (bad magic)")
    if version != VERSION:
        raise MalformedMessageError(f"unsupported message version {version} (expected {VERSION})")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise MalformedMessageError(f"unknown message type {mtype}")
    r = _Reader(data, HEADER_BYTES)
    msg = cls._parse(round_id, client_id, r)
    r.done()
    return msg
