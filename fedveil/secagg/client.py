"""Client side of SecAgg / SecAgg+: one class per stage, each handler returns the next state.

R0AdvertiseKeys → R1ShareKeys → R2MaskedInput → [ConsistencyCheck, active mode] → R3Unmasking
→ Completed, or Aborted from any stage (Bonawitz et al., CCS 2017, Fig. 4; the state classes
follow Google's fcp/secagg/client). :class:`SecAggClient` is the facade a driver uses; it holds
the current state object and swaps it for whatever the state's handler returns.

Errors: a message that does not belong to the current state raises
:class:`UnexpectedMessageError`, one from another round :class:`WrongRoundError`, undecodable
bytes :class:`MalformedMessageError`; these leave the state unchanged (the message is
ignored). Any other :class:`SecAggError` — a tampered share, a bad signature, a refused
unmasking request — moves the client to :class:`ClientAborted` before it propagates. A share box
that does not open raises :class:`ShareComplaintsError` once every box was examined, carrying one
verifiable complaint per failing sender for the server to judge (:mod:`fedveil.secagg.share_complaints`);
in active mode each box carries its sender's signature, checked only when the box fails.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import (
    ConfigError,
    DoubleShareRequestError,
    MalformedMessageError,
    ProtocolError,
    RoundAbortedError,
    SecAggError,
    ShareComplaintsError,
    UnexpectedMessageError,
    WrongRoundError,
)
from fedveil.secagg.keys import (
    RoundKeys,
    advertisement_payload,
    generate_round_keys,
    pairwise_mask_seed,
    self_mask_prg_seed,
    share_box_key,
    share_box_payload,
    share_secret,
    sign,
    survivor_set_payload,
)
from fedveil.secagg.messages import (
    SALT_BYTES,
    SELF_MASK_LIMBS,
    SHARE_LIMBS,
    AdvertiseKeys,
    ConsistencyCheckRequest,
    ConsistencyCheckResponse,
    MaskedInputRequest,
    MaskedInputResponse,
    Message,
    RoundAborted,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
    decode_message,
)
from fedveil.secagg.prg import SEED_BYTES, MaskExpander
from fedveil.secagg.session import Session, check_advertisements
from fedveil.secagg.shamir import bytes_to_limbs, seal_share, share
from fedveil.secagg.share_commitments import MASK_KEY, SELF_MASK, commitment_salts, commitments
from fedveil.secagg.share_commitments import plaintext as share_plaintext
from fedveil.secagg.share_complaints import (
    SIGNED_BYTES,
    OpenedShare,
    box_bytes,
    build_complaint,
    open_share_box,
    prove_key_possession,
)
from fedveil.secagg.signature_memo import SignatureMemo
from fedveil.secagg.survivor_checks import check_consistency, check_dropped, check_survivors

_NON_FATAL = (UnexpectedMessageError, WrongRoundError, MalformedMessageError)


class _ClientContext:
    """State shared by one client's stage objects (secrets included: never log it)."""

    def __init__(self, client_id: int, config: SecAggConfig, identity_key: Ed25519PrivateKey | None,
                 seed: bytes | None, signature_memo: SignatureMemo | None = None) -> None:
        self.client_id = client_id
        self.config = config
        self.identity_key = identity_key
        self.signature_memo = signature_memo
        binding = struct.pack("<QI", config.round_id, client_id) + config.parameters_bytes()
        self.keys: RoundKeys = generate_round_keys(seed, binding)
        self.input: np.ndarray | None = None
        self.advertisement: AdvertiseKeys | None = None
        self.session: Session | None = None
        self.own_share: np.ndarray | None = None
        self.received: dict[int, OpenedShare] = {}  # peer id → this client's share of the peer's secrets
        self.share_secrets: dict[int, bytes] = {}  # peer id → X25519 secret of the share keys (R1 → R2)
        self.signed_survivors: frozenset[int] | None = None
        self.revealed: dict[int, str] = {}  # peer id → "self_mask" | "mask_key"

    def __repr__(self) -> str:
        return f"_ClientContext(client_id={self.client_id}, <secrets>)"


class ClientState:
    """One stage of the client. ``handle`` returns ``(next_state, reply or None)``."""

    name: ClassVar[str] = "?"

    def __init__(self, ctx: _ClientContext) -> None:
        self.ctx = ctx

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if isinstance(msg, RoundAborted):
            return ClientAborted(self.ctx, f"server aborted the round: {msg.reason}"), None
        raise UnexpectedMessageError(f"client {self.ctx.client_id} in state {self.name} cannot handle "
                                     f"{type(msg).__name__}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class ClientR0AdvertiseKeys(ClientState):
    """R0: generate and advertise the round's two X25519 public keys."""

    name = "R0AdvertiseKeys"

    def advertise(self) -> tuple[ClientState, AdvertiseKeys]:
        ctx = self.ctx
        cfg = ctx.config
        c_pk, s_pk = ctx.keys.share_public, ctx.keys.mask_public
        signature = b""
        if cfg.active:
            assert ctx.identity_key is not None
            signature = sign(ctx.identity_key,
                             advertisement_payload(cfg.round_id, cfg.parameters_bytes(), ctx.client_id, c_pk, s_pk))
        adv = AdvertiseKeys(cfg.round_id, ctx.client_id, c_pk, s_pk, signature,
                            prove_key_possession(ctx.keys.share_private, cfg.round_id, ctx.client_id))
        ctx.advertisement = adv
        return ClientR1ShareKeys(ctx), adv


class ClientR1ShareKeys(ClientState):
    """R1: check every advertised key, fix the session, Shamir-share b and s_sk to the holders."""

    name = "R1ShareKeys"

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if not isinstance(msg, ShareKeysRequest):
            return super().handle(msg)
        ctx = self.ctx
        cfg = ctx.config
        me = ctx.client_id
        # Active mode: the identity signatures of this client's holders are verified (the keys it
        # exchanges masks and shares with). Others' keys only enter the session id: a substituted one
        # gives honest clients different session ids, an abort, not a leak. Without the cohort's
        # commit-then-reveal graph seed the layout hangs on every advertised key, so all are verified.
        sparse_seeded = bool(cfg.graph_seed)
        check_advertisements(cfg, msg.advertisements, signatures=not sparse_seeded, memo=ctx.signature_memo)
        try:
            session = Session.shared(cfg, msg.advertisements)
        except ConfigError as err:
            raise RoundAbortedError(str(err)) from err
        if sparse_seeded and cfg.active:
            check_advertisements(cfg, [session.advertisements[holder] for holder in session.graph.holders(me)
                                       if holder != me], memo=ctx.signature_memo)
        mine = session.advertisements.get(me)
        assert ctx.advertisement is not None
        if mine is None or (mine.share_public, mine.mask_public) != (ctx.advertisement.share_public,
                                                                     ctx.advertisement.mask_public):
            raise ProtocolError(f"client {me}: the server did not forward this client's own keys unchanged")
        # The graph is this client's live view of the layout it derives itself from the cohort's
        # seed; the advertisers the server chose only decide who is live (fedveil.secagg.graph).
        holders = session.graph.holders(me)
        problem = cfg.live_problem(len(holders))
        if problem is not None:
            raise RoundAbortedError(f"client {me}: {problem}")
        ctx.session = session
        sid = session.session_id
        secrets = np.concatenate([bytes_to_limbs(ctx.keys.self_mask_seed),
                                  bytes_to_limbs(ctx.keys.mask_private.private_bytes_raw())])
        xs = np.asarray(holders, dtype=np.int64) + 1
        shares = share(secrets, xs, cfg.threshold, seed=ctx.keys.sharing_seed[:SEED_BYTES])
        # each box commits to its shares, so that shares that do not reconstruct convict their dealer
        # (fedveil.secagg.share_commitments)
        salts = commitment_salts(ctx.keys.sharing_seed, sid, len(holders))
        signer = ctx.identity_key if cfg.active else None
        assert signer is not None or not cfg.active
        boxes: dict[int, bytes] = {}
        for row, holder in enumerate(holders):
            if holder == me:
                ctx.own_share = shares[row].copy()
                continue
            shared = share_secret(ctx.keys.share_private, session.advertisements[holder].share_public)
            ctx.share_secrets[holder] = shared
            boxes[holder] = seal_share_box(shared, me, holder, sid, shares[row], salts[row], signer)
        return ClientR2MaskedInput(ctx), ShareKeysResponse(cfg.round_id, me, boxes)


def seal_share_box(shared: bytes, owner: int, holder: int, session_id: bytes, limbs: np.ndarray, salts: np.ndarray,
                   signer: Ed25519PrivateKey | None) -> bytes:
    """One share box: AES-GCM over the holder's share and its two salts, the owner's two commitments to
    the share, and in active mode (``signer``, the owner's identity key) its signature over both, so
    that a holder can prove the box and its commitments came from the owner."""
    box = (seal_share(share_box_key(shared, owner, holder, session_id), share_plaintext(limbs, salts), owner, holder,
                      session_id)
           + commitments(session_id, owner, holder, limbs, salts))
    if signer is not None:
        box += sign(signer, share_box_payload(session_id, owner, holder, box))
    return box


class ClientR2MaskedInput(ClientState):
    """R2: open the shares addressed to this client, then send x + self mask ± pairwise masks."""

    name = "R2MaskedInput"

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if not isinstance(msg, MaskedInputRequest):
            return super().handle(msg)
        ctx = self.ctx
        cfg = ctx.config
        me = ctx.client_id
        if ctx.input is None:
            raise UnexpectedMessageError(f"client {me}: set_input() must be called before the masked-input stage")
        session = ctx.session
        assert session is not None
        sid = session.session_id
        neighbours = set(session.graph.neighbors(me))
        senders = sorted(msg.boxes)
        strays = [sender for sender in senders if sender not in neighbours]
        if strays:
            raise ProtocolError(f"client {me} received a share box from non-neighbour {strays[0]}")
        received: dict[int, OpenedShare] = {}
        failures: dict[int, str] = {}
        for sender in senders:
            box = msg.boxes[sender]
            opened: OpenedShare | str = "has the wrong length"
            if len(box) == box_bytes(cfg.active):  # in active mode the signature is checked only if it fails
                shared = ctx.share_secrets.get(sender)
                if shared is None:
                    shared = share_secret(ctx.keys.share_private, session.advertisements[sender].share_public)
                opened = open_share_box(shared, box[:SIGNED_BYTES], sender, me, sid)
            if isinstance(opened, str):
                failures[sender] = opened
            else:
                received[sender] = opened
        if failures:
            raise _complaints(ctx, msg.boxes, failures)
        problem = cfg.live_problem(len(received) + 1)  # the holders whose shares reached it
        if problem is not None:
            raise RoundAbortedError(f"client {me}, masked-input stage: {problem}")
        ctx.received = received
        ctx.share_secrets = {}
        ring = cfg.ring
        vec = ctx.input  # this client's own copy (set_input copied it): masked in place
        plus = [self_mask_prg_seed(ctx.keys.self_mask_seed, me, sid)]
        minus: list[bytes] = []
        for peer in sorted(received):
            seed = pairwise_mask_seed(ctx.keys.mask_private, session.advertisements[peer].mask_public, me, peer, sid)
            (plus if me < peer else minus).append(seed)
        MaskExpander(cfg.vector_length, ring.dtype).apply(vec, add=plus, subtract=minus)
        ring.reduce(vec)
        ctx.input = None  # the plaintext is not needed any more
        nxt: ClientState = ClientConsistencyCheck(ctx) if cfg.active else ClientR3Unmasking(ctx)
        return nxt, MaskedInputResponse(cfg.round_id, me, vec)


def _complaints(ctx: _ClientContext, boxes: dict[int, bytes], failures: dict[int, str]) -> ShareComplaintsError:
    """One complaint per box that failed, with the evidence the server needs to blame its sender."""
    cfg, me, session = ctx.config, ctx.client_id, ctx.session
    assert session is not None
    complaints = tuple(
        build_complaint(private=ctx.keys.share_private, sender_public=session.advertisements[sender].share_public,
                        sender_possession=session.advertisements[sender].share_proof,
                        sender_identity=cfg.box_signer(sender), box=boxes[sender], sender=sender, holder=me,
                        session_id=session.session_id, round_id=cfg.round_id)
        for sender in sorted(failures))
    detail = "; ".join(f"share box from client {c.sender} {failures[c.sender]} (complaint: {c.kind})"
                       for c in complaints)
    return ShareComplaintsError(f"client {me} could not open {len(complaints)} share box(es): {detail}", complaints)


def _id_set(values: np.ndarray, what: str) -> frozenset[int]:
    ids = [int(v) for v in np.asarray(values).tolist()]
    out = frozenset(ids)
    if len(out) != len(ids):
        raise MalformedMessageError(f"{what} lists a client twice")
    return out


class ClientConsistencyCheck(ClientState):
    """Active mode: sign the survivor set the server announced (Bonawitz et al., Round 3)."""

    name = "ConsistencyCheck"

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if not isinstance(msg, ConsistencyCheckRequest):
            return super().handle(msg)
        ctx = self.ctx
        cfg = ctx.config
        survivors = _id_set(msg.survivors, "survivor set")
        check_survivors(ctx, survivors)
        assert ctx.session is not None and ctx.identity_key is not None
        ctx.signed_survivors = survivors
        signature = sign(ctx.identity_key, survivor_set_payload(ctx.session.session_id, survivors))
        return ClientR3Unmasking(ctx), ConsistencyCheckResponse(cfg.round_id, ctx.client_id, signature)


class ClientR3Unmasking(ClientState):
    """R3: reveal one share per peer — the self-mask share of a survivor or the masking-key share
    of a dropped client, never both (that would unmask the peer's input)."""

    name = "R3Unmasking"

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if not isinstance(msg, UnmaskingRequest):
            return super().handle(msg)
        ctx = self.ctx
        cfg = ctx.config
        me = ctx.client_id
        session = ctx.session
        assert session is not None
        check_dropped(ctx, msg.dropped)
        survivors = _id_set(msg.survivors, "survivor set")
        dropped = _id_set(msg.dropped, "dropped set")
        both = survivors & dropped
        if both:
            raise DoubleShareRequestError(f"client {me} refuses: clients {sorted(both)} are listed both as survivors "
                                          "and as dropped (answering would reveal both shares of each)")
        if me in dropped:
            raise DoubleShareRequestError(f"client {me} refuses: it is listed as dropped although it sent its "
                                          "masked input (its masking key would be reconstructed)")
        check_survivors(ctx, survivors)
        if cfg.active:
            check_consistency(ctx, survivors, dropped, msg.signatures)
        for peer in survivors:
            if ctx.revealed.get(peer, "self_mask") != "self_mask":
                raise DoubleShareRequestError(f"client {me} already revealed the masking-key share of {peer}")
        for peer in dropped:
            if ctx.revealed.get(peer, "mask_key") != "mask_key":
                raise DoubleShareRequestError(f"client {me} already revealed the self-mask share of {peer}")
        assert ctx.own_share is not None
        held = dict(ctx.received)
        # its own share needs no salt: the server takes it from the owner itself
        held[me] = OpenedShare(ctx.own_share, np.zeros((2, SALT_BYTES), np.uint8))
        sm_owners = sorted(p for p in survivors if p in held)
        mk_owners = sorted(p for p in dropped if p in ctx.received)
        for p in sm_owners:
            ctx.revealed[p] = "self_mask"
        for p in mk_owners:
            ctx.revealed[p] = "mask_key"
        sm = np.array([held[p].limbs[:SELF_MASK_LIMBS] for p in sm_owners], dtype=np.uint32).reshape(
            -1, SELF_MASK_LIMBS)
        mk = np.array([held[p].limbs[SELF_MASK_LIMBS:] for p in mk_owners], dtype=np.uint32).reshape(
            -1, SHARE_LIMBS - SELF_MASK_LIMBS)
        sm_salts = np.array([held[p].salts[SELF_MASK] for p in sm_owners], dtype=np.uint8).reshape(-1, SALT_BYTES)
        mk_salts = np.array([held[p].salts[MASK_KEY] for p in mk_owners], dtype=np.uint8).reshape(-1, SALT_BYTES)
        reply = UnmaskingResponse(cfg.round_id, me, np.array(sm_owners, dtype=np.uint32), sm,
                                  np.array(mk_owners, dtype=np.uint32), mk, sm_salts, mk_salts)
        return ClientCompleted(ctx), reply


class ClientCompleted(ClientState):
    """The client answered the unmasking request; its part of the round is done."""

    name = "Completed"


class ClientAborted(ClientState):
    """The round ended without a result for this client (server abort or client refusal)."""

    name = "Aborted"

    def __init__(self, ctx: _ClientContext, reason: str) -> None:
        super().__init__(ctx)
        self.reason = reason

    def handle(self, msg: Message) -> tuple[ClientState, Message | None]:
        if isinstance(msg, RoundAborted):
            return self, None
        raise UnexpectedMessageError(f"client {self.ctx.client_id} has aborted ({self.reason}); "
                                     f"cannot handle {type(msg).__name__}")


class SecAggClient:
    """One client's side of one round. See :mod:`fedveil.secagg` for the driver loop.

    Args:
        client_id: this client's id in ``0 .. config.num_clients - 1``.
        config: the round's parameters (identical at every party).
        identity_key: Ed25519 identity key, required in active mode.
        seed: 32 bytes from which all of this client's randomness for the round is derived
            (reproducible simulations), bound to the round id, parameters and client id so a
            reused seed still gives fresh secrets; ``None`` draws from ``os.urandom``.
    """

    def __init__(self, client_id: int, config: SecAggConfig, *, identity_key: Ed25519PrivateKey | None = None,
                 seed: bytes | None = None, signature_memo: SignatureMemo | None = None) -> None:
        if not isinstance(client_id, int) or not 0 <= client_id < config.num_clients:
            raise ConfigError(f"client_id: must be in 0..{config.num_clients - 1} (got {client_id!r})")
        if config.active:
            if identity_key is None:
                raise ConfigError("identity_key: active mode needs this client's Ed25519 identity key")
            assert config.identity_keys is not None
            pub = identity_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if pub != config.identity_keys[client_id]:
                raise ConfigError(f"identity_key: does not match identity_keys[{client_id}] in the config")
        self._ctx = _ClientContext(client_id, config, identity_key, seed, signature_memo)
        self._state: ClientState = ClientR0AdvertiseKeys(self._ctx)

    @property
    def client_id(self) -> int:
        return self._ctx.client_id

    @property
    def config(self) -> SecAggConfig:
        return self._ctx.config

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def stage(self) -> str:
        return self._state.name

    @property
    def completed(self) -> bool:
        return isinstance(self._state, ClientCompleted)

    @property
    def aborted(self) -> bool:
        return isinstance(self._state, ClientAborted)

    @property
    def abort_reason(self) -> str | None:
        return self._state.reason if isinstance(self._state, ClientAborted) else None

    def set_input(self, vector: np.ndarray) -> None:
        """This round's input: ``vector_length`` ring elements (e.g. from
        :meth:`FixedPointEncoder.encode`, or a distributed-DP noised integer vector)."""
        cfg = self._ctx.config
        if isinstance(self._state, (ClientR3Unmasking, ClientConsistencyCheck, ClientCompleted, ClientAborted)):
            raise UnexpectedMessageError(f"client {self.client_id}: input can no longer be set in state {self.stage}")
        self._ctx.input = cfg.ring.check(vector, name="input", length=cfg.vector_length).copy()

    def advertise_keys(self) -> AdvertiseKeys:
        """Start the round: returns the R0 message for the server."""
        if not isinstance(self._state, ClientR0AdvertiseKeys):
            raise UnexpectedMessageError(f"client {self.client_id}: keys are advertised only in R0 "
                                         f"(state is {self.stage})")
        self._state, msg = self._state.advertise()
        return msg

    def handle(self, message: Message | bytes) -> Message | None:
        """Process one server message; returns the reply for the server, or ``None``."""
        msg = decode_message(message) if isinstance(message, (bytes, bytearray, memoryview)) else message
        if msg.round_id != self._ctx.config.round_id:
            raise WrongRoundError(f"client {self.client_id}: message for round {msg.round_id}, "
                                  f"this is round {self._ctx.config.round_id}")
        if msg.client_id != self.client_id:
            raise UnexpectedMessageError(f"client {self.client_id}: message addressed to client {msg.client_id}")
        try:
            self._state, reply = self._state.handle(msg)
        except _NON_FATAL:
            raise
        except SecAggError as err:
            self._state = ClientAborted(self._ctx, str(err))
            raise
        return reply

