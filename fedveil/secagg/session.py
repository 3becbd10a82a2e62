"""What client and server derive identically once all public keys are known: the session."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import ConfigError, InvalidSignatureError, ProtocolError
from fedveil.secagg.graph import MaskingGraph, build_graph
from fedveil.secagg.keys import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    SignedItem,
    advertisement_payload,
    hkdf,
    is_small_order,
    session_id,
)
from fedveil.secagg.messages import AdvertiseKeys
from fedveil.secagg.signature_memo import SignatureMemo, verdicts


def check_advertisement(config: SecAggConfig, adv: AdvertiseKeys, *, signature: bool = True) -> None:
    """Shape checks on one advertisement, and (``signature``) its identity signature in active mode."""
    check_advertisements(config, (adv,), signatures=signature)


def check_advertisements(config: SecAggConfig, advertisements: Sequence[AdvertiseKeys], *,
                         signatures: bool = True, memo: SignatureMemo | None = None) -> None:
    """Shape checks on each advertisement, and (``signatures``) in active mode their identity
    signatures, verified as one batch (through ``memo`` when the process's sites share one); the
    first bad one, in the given order, is named.

    No two advertisers may share an X25519 key (compared as points: the u-coordinate with bit 255
    cleared, mod p). A colluder that advertised the victim's share key as its own, signed by its own
    identity, and sent garbage boxes made each honest holder's complaint reveal the holder's pair
    secret with the *victim*: the server opened the victim's boxes and rebuilt both of its secrets
    (the cryptography review of 2026-12-07)."""
    points = [point_bytes(key) for adv in advertisements for key in (adv.share_public, adv.mask_public)]
    if len(set(points)) != len(points):  # one set over the list; the slow walk only names the culprit
        owners: dict[bytes, int] = {}
        for adv in advertisements:
            for key in (adv.share_public, adv.mask_public):
                owner = owners.setdefault(point_bytes(key), adv.client_id)
                if owner == adv.client_id and key is adv.mask_public \
                        and point_bytes(adv.share_public) == point_bytes(key):
                    raise ProtocolError(f"client {adv.client_id}: share and mask public keys must differ")
                if owner != adv.client_id:
                    raise ProtocolError(f"client {adv.client_id} advertised a public key of client {owner}")
    for adv in advertisements:
        if not 0 <= adv.client_id < config.num_clients:
            raise ProtocolError(f"client_id {adv.client_id} is outside 0..{config.num_clients - 1}")
        if len(adv.share_public) != PUBLIC_KEY_BYTES or len(adv.mask_public) != PUBLIC_KEY_BYTES:
            raise ProtocolError(f"client {adv.client_id}: public keys must be {PUBLIC_KEY_BYTES} bytes")
        if is_small_order(adv.share_public) or is_small_order(adv.mask_public):
            raise ProtocolError(f"client {adv.client_id}: a public key is an X25519 point of small order")
        if config.active and signatures and len(adv.signature) != SIGNATURE_BYTES:
            raise InvalidSignatureError(f"client {adv.client_id}: active mode needs a signed advertisement")
    if not (config.active and signatures):
        return
    items = [advertisement_signature(config, adv) for adv in advertisements]
    for adv, ok in zip(advertisements, verdicts(items, memo), strict=True):
        if not ok:
            raise bad_advertisement_signature(adv)


def point_bytes(public: bytes) -> bytes:
    """The point an X25519 public key names, as canonical bytes: its u-coordinate with bit 255 cleared,
    reduced mod 2^255 − 19 (two encodings of one point are one key). Only a top byte of 0x7f can
    encode a value past p; every other key is its bytes, bit 255 cleared (cheap: each site checks
    every advertisement of the cohort)."""
    top = public[31] & 0x7F if len(public) == PUBLIC_KEY_BYTES else -1
    if top == 0x7F or top < 0:
        u = (int.from_bytes(public, "little") & ((1 << 255) - 1)) % ((1 << 255) - 19)
        return u.to_bytes(32, "little") if top >= 0 else bytes(public)
    return public if public[31] == top else public[:31] + bytes([top])


def advertisement_signature(config: SecAggConfig, adv: AdvertiseKeys) -> SignedItem:
    """What an active-mode advertisement's identity signature must verify: key, signature, payload."""
    assert config.identity_keys is not None
    payload = advertisement_payload(config.round_id, config.parameters_bytes(), adv.client_id, adv.share_public,
                                    adv.mask_public)
    return config.identity_keys[adv.client_id], adv.signature, payload


def bad_advertisement_signature(adv: AdvertiseKeys) -> InvalidSignatureError:
    return InvalidSignatureError(f"invalid Ed25519 signature on the key advertisement of client {adv.client_id}")


def prune_live(config: SecAggConfig, graph: MaskingGraph) -> tuple[int, ...]:
    """The advertisers that can take part: repeatedly drop those with too few live holders.

    A client refuses a round whose live holders are too few (:meth:`SecAggConfig.live_problem`);
    an honest server leaves it out (a dropped node to its neighbours), which may leave a
    neighbour short in turn. Pure and deterministic; the clients check their own view anyway.
    """
    live = set(graph.nodes)
    while True:
        short = {c for c in live if config.live_problem(len(live.intersection(graph.holders(c)))) is not None}
        if not short:
            return tuple(sorted(live))
        live -= short


@dataclass(frozen=True)
class Session:
    """The advertised keys of one round, its session id and its masking graph."""

    config: SecAggConfig
    advertisements: dict[int, AdvertiseKeys]

    @classmethod
    def from_advertisements(cls, config: SecAggConfig, advertisements: Iterable[AdvertiseKeys]) -> Session:
        table: dict[int, AdvertiseKeys] = {}
        for adv in advertisements:
            if adv.round_id != config.round_id:
                raise ProtocolError(f"advertisement of client {adv.client_id} is for round {adv.round_id}")
            if adv.client_id in table:
                raise ProtocolError(f"client {adv.client_id} advertised twice")
            table[adv.client_id] = adv
        if len(table) < config.threshold:
            raise ConfigError(f"only {len(table)} clients advertised keys; threshold is {config.threshold}")
        return cls(config, dict(sorted(table.items())))

    @classmethod
    def shared(cls, config: SecAggConfig, advertisements: Sequence[AdvertiseKeys]) -> Session:
        """:meth:`from_advertisements`, memoized on the config and the very advertisement objects.

        A session is a pure, read-only function of both (its id and graph only fill their own
        caches), and :class:`AdvertiseKeys` compare by identity, so the sites of one process that
        received the same parsed advertisements (a simulation worker hosts hundreds of a round's
        sites) share one table of the n advertisements, one session id and one graph instead of
        each building its own. Different objects, even equal ones, get their own session.
        """
        return _shared_session(config, tuple(advertisements))

    @cached_property
    def session_id(self) -> bytes:
        return session_id(self.config.round_id, self.config.parameters_bytes(),
                          ((cid, a.share_public, a.mask_public) for cid, a in self.advertisements.items()))

    @cached_property
    def graph(self) -> MaskingGraph:
        """The live view (the advertisers) of the layout fixed over the whole cohort.

        The layout hangs on the cohort's commit-then-reveal seed, or without one (passive
        mode, a trusted server) on the round's parameters: either way on nothing the server or
        a colluding client chooses once keys are advertised, and never on who advertised.
        """
        source = self.config.graph_seed or hashlib.sha256(
            b"fedveil/secagg/v1/layout" + struct.pack("<Q", self.config.round_id) + self.config.parameters_bytes()
        ).digest()
        seed = hkdf(source, salt=b"", info=b"graph-permutation")
        return build_graph(self.config.graph, self.config.num_clients, list(self.advertisements), seed)

    @property
    def members(self) -> tuple[int, ...]:
        return tuple(self.advertisements)


@lru_cache(maxsize=8)
def _shared_session(config: SecAggConfig, advertisements: tuple[AdvertiseKeys, ...]) -> Session:
    return Session.from_advertisements(config, advertisements)
