"""Shared set-up of the share-complaint tests: a manual round, garbage boxes, torsion keys."""

from __future__ import annotations

import dataclasses
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl import bindings as nb

from fedveil.secagg import (
    GraphSpec,
    SecAggConfig,
    ShareComplaintsError,
)
from fedveil.secagg.keys import (
    _ED25519_SMALL_ORDER_Y,
    share_box_payload,
)
from fedveil.secagg.messages import (
    MaskedInputRequest,
)
from fedveil.secagg.share_complaints import (
    SIGNED_BYTES,
    montgomery_u,
    prime_order_point,
)
from tests.secagg_helpers import ManualRound

N = 5
T = 3
SEED32 = bytes(range(32))
SID = bytes(range(100, 132))
_P = (1 << 255) - 19


# --- helpers ---------------------------------------------------------------------------------------

def _config(active: bool, n: int = N, t: int = T, graph: GraphSpec | None = None):
    """n clients, complete graph unless given, no colluders assumed (so t = 3 of 5 is allowed)."""
    keys = [Ed25519PrivateKey.generate() for _ in range(n)] if active else None
    config = SecAggConfig(n, t, 8, round_id=9, active=active, graph=graph or GraphSpec(), max_corrupt_fraction=0.0,
                          identity_keys=tuple(k.public_key().public_bytes_raw() for k in keys) if keys else None,
                          graph_seed=SEED32 if active else b"")
    return config, keys


def _round(active: bool, **kwargs):
    config, keys = _config(active, **kwargs)
    r = ManualRound(config, **({"identity_key": dict(enumerate(keys))} if keys else {}))
    r.keys = keys
    return r


def _share_keys(r: ManualRound, skip=()) -> dict:
    """Advertise, and collect (not send) the share-keys replies."""
    r.advertise()
    return r.deliver(r.close(), skip=skip)


def _garbage_box(r: ManualRound, sender: int, holder: int, *, signed: bool = True) -> bytes:
    """Random bytes of a ciphertext's and its commitments' size; in active mode signed by the sender
    (valid) or not."""
    box = os.urandom(SIGNED_BYTES)
    if r.config.active:
        sid = r.server.session_id
        box += (r.keys[sender].sign(share_box_payload(sid, sender, holder, box)) if signed else os.urandom(64))
    return box


def _garble(r: ManualRound, replies: dict, sender: int, holders=None, *, signed: bool = True) -> None:
    reply = replies[sender]
    boxes = dict(reply.boxes)
    for holder in boxes if holders is None else holders:
        boxes[holder] = _garbage_box(r, sender, holder, signed=signed)
    replies[sender] = dataclasses.replace(reply, boxes=boxes)


def _masked_stage(r: ManualRound, replies: dict) -> dict:
    r.send(replies)
    out = r.close()
    assert all(isinstance(m, MaskedInputRequest) for m in out.values())
    return out


def _complaints_of(r: ManualRound, out: dict) -> tuple[dict, dict]:
    """Each client handles its masked-input request: (complaints by holder, replies of the others)."""
    complaints, replies = {}, {}
    for c, msg in out.items():
        try:
            replies[c] = r.clients[c].handle(msg)
        except ShareComplaintsError as err:
            assert r.clients[c].aborted
            complaints[c] = err.complaints
    return complaints, replies


def _finish(r: ManualRound, outgoing: dict, skip=()) -> None:
    while outgoing and not (r.server.completed or r.server.aborted):
        outgoing = r.step(outgoing, skip=skip)


def _sid_keys(r: ManualRound, c: int):
    ctx = r.clients[c]._ctx
    return ctx.keys.share_private, ctx.keys.share_public


def _small_order_point() -> bytes:
    """An Edwards point of order 8."""
    for y in sorted(_ED25519_SMALL_ORDER_Y):
        if y not in (0, 1, _P - 1):
            return y.to_bytes(32, "little")
    raise AssertionError


def _torsion_key(public: bytes) -> bytes:
    """An X25519 key on the curve but off the prime-order subgroup: ``public`` plus an order-8 point."""
    point = prime_order_point(public)
    assert point is not None
    return montgomery_u(nb.crypto_core_ed25519_add(point, _small_order_point()))
