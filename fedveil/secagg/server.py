"""Server side of SecAgg / SecAgg+: one class per stage, each ``close`` returns the next state.

R0AdvertiseKeys → R1ShareKeys → R2MaskedInputCollection → [ConsistencyCheck, active mode] →
R3Unmasking → Completed, or Aborted (Bonawitz et al., CCS 2017, Fig. 4; Google's
fcp/secagg/server). The driver feeds client messages to :meth:`SecAggServer.receive` as they
arrive and calls :meth:`SecAggServer.close_stage` when every expected client has answered or
the stage's deadline passes; clients that did not answer by then are dropouts. The stages that
collect and route live here; the unmasking stage is :mod:`fedveil.secagg.unmasking`, and the stage
base class, the end states and :class:`AggregationResult` are :mod:`fedveil.secagg.server_states`.

Memory: masked inputs are added into **one** running ring sum on arrival (the server never
holds n vectors) and masks are removed by expanding seeds into **one** reusable buffer, so the
server needs O(m) for vectors plus O(n·k) for keys and shares, independent of n·m.

A message the server rejects (wrong stage, wrong round, bad sender, bad signature, malformed)
raises and changes nothing: one misbehaving client cannot abort the round.

Share boxes are kept from the share-keys stage until the masked-input stage closes: a holder that
cannot open one complains instead of sending its masked input (:meth:`SecAggServer.judge_complaints`,
:mod:`fedveil.secagg.share_complaints`), and the box its sender uploaded is the evidence. The holder
leaves the stage; the verdicts name the sender or the holder proven at fault (:attr:`SecAggServer.blamed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import (
    ConfigError,
    InvalidSignatureError,
    MalformedMessageError,
    ProtocolError,
    RoundAbortedError,
    SecAggError,
    UnexpectedMessageError,
    WrongRoundError,
)
from fedveil.secagg.keys import SIGNATURE_BYTES, survivor_set_payload, valid_signatures
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    ConsistencyCheckResponse,
    MaskedInputRequest,
    MaskedInputResponse,
    Message,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
    decode_message,
)
from fedveil.secagg.server_states import (
    AggregationResult,
    BoxCommitments,
    ServerAborted,
    ServerCompleted,
    ServerContext,
    ServerState,
)
from fedveil.secagg.session import (
    Session,
    advertisement_signature,
    bad_advertisement_signature,
    check_advertisement,
    point_bytes,
    prune_live,
)
from fedveil.secagg.share_complaints import BAD_SIGNATURE, ComplaintVerdict, ShareComplaint, box_bytes, judge
from fedveil.secagg.unmasking import ServerR3Unmasking, default_unmasking_threads


class ServerR0AdvertiseKeys(ServerState):
    """R0: collect each client's two public keys (signatures verified in active mode)."""

    name = "R0AdvertiseKeys"
    message_type = AdvertiseKeys

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx, tuple(range(ctx.config.num_clients)))
        self.adverts: dict[int, AdvertiseKeys] = {}
        self._key_owners: dict[bytes, int] = {}
        """Each advertised key (as :func:`point_bytes`) → its advertiser: no two may share one."""

    def _accept(self, client_id: int, msg: Message) -> None:
        assert isinstance(msg, AdvertiseKeys)
        check_advertisement(self.ctx.config, msg, signature=msg not in self.ctx.verified_adverts)
        points = [point_bytes(msg.share_public), point_bytes(msg.mask_public)]
        for point in points:
            owner = self._key_owners.get(point)
            if owner is not None and owner != client_id:  # each site refuses such a list too (session.py)
                raise ProtocolError(f"client {client_id} advertised a public key of client {owner}")
        self._key_owners.update(dict.fromkeys(points, client_id))
        self.adverts[client_id] = msg

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        alive = self._survivors("advertise-keys")
        if isinstance(alive, str):
            return self._abort(alive, tuple(sorted(self.received)))
        session = Session.from_advertisements(self.ctx.config, (self.adverts[c] for c in alive))
        usable = prune_live(self.ctx.config, session.graph)  # too few live holders: a client would refuse
        if len(usable) < len(alive):
            if len(usable) < self.ctx.config.threshold:
                return self._abort(f"only {len(usable)} of the {len(alive)} advertisers have enough live holders "
                                   f"(threshold {self.ctx.config.threshold})", alive)
            alive = usable
            session = Session.from_advertisements(self.ctx.config, (self.adverts[c] for c in alive))
        self.ctx.session = session
        rid = self.ctx.config.round_id
        advs = tuple(session.advertisements.values())
        return ServerR1ShareKeys(self.ctx, alive), {c: ShareKeysRequest(rid, c, advs) for c in alive}


class ServerR1ShareKeys(ServerState):
    """R1: collect every client's encrypted shares, one box per holder; route them."""

    name = "R1ShareKeys"
    message_type = ShareKeysResponse

    def _accept(self, client_id: int, msg: Message) -> None:
        assert isinstance(msg, ShareKeysResponse) and self.ctx.session is not None
        graph = self.ctx.session.graph
        want = set(graph.neighbors(client_id))
        if set(msg.boxes) != want:
            raise ProtocolError(f"client {client_id} must send one share box to each of its {len(want)} "
                                f"neighbours (got {len(msg.boxes)} boxes)")
        size = box_bytes(self.ctx.config.active)
        if any(len(box) != size for box in msg.boxes.values()):
            raise MalformedMessageError(f"client {client_id}: share boxes must be {size} bytes")
        self.ctx.boxes[client_id] = msg.boxes

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        ctx = self.ctx
        alive = self._survivors("share-keys")
        if isinstance(alive, str):
            ctx.boxes = {}
            return self._abort(alive, self.expected)
        assert ctx.session is not None
        graph = ctx.session.graph
        t = ctx.config.threshold
        alive_set = set(alive)
        for c in alive:
            if len(alive_set.intersection(graph.holders(c))) < t:
                ctx.boxes = {}
                return self._abort(f"client {c} has fewer than threshold {t} holders left after share-keys",
                                   self.expected)
        ctx.u2 = alive
        ctx.boxes = {c: ctx.boxes[c] for c in alive}
        rid = ctx.config.round_id
        out: dict[int, Message] = {}
        for c in alive:
            inbox = {s: ctx.boxes[s][c] for s in graph.neighbors(c) if s in alive_set}
            out[c] = MaskedInputRequest(rid, c, inbox)
        # Routed, and kept until the masked-input stage closes: the evidence a complaint is judged on.
        ctx.running_sum = ctx.config.ring.zeros(ctx.config.vector_length)
        return ServerR2MaskedInputCollection(ctx, alive), out


class ServerR2MaskedInputCollection(ServerState):
    """R2: add each masked input into the running ring sum as it arrives."""

    name = "R2MaskedInputCollection"
    message_type = MaskedInputResponse

    def _accept(self, client_id: int, msg: Message) -> None:
        assert isinstance(msg, MaskedInputResponse) and self.ctx.running_sum is not None
        cfg = self.ctx.config
        try:
            vec = cfg.ring.check(msg.vector, name=f"masked input of client {client_id}", length=cfg.vector_length)
        except ConfigError as err:
            raise MalformedMessageError(str(err)) from err
        cfg.ring.add(self.ctx.running_sum, vec)

    def judge(self, holder: int, complaints: Sequence[ShareComplaint]) -> list[ComplaintVerdict]:
        """Judge a holder's complaints about its share boxes; it leaves the stage (a dropout)."""
        ctx = self.ctx
        cfg = ctx.config
        if holder not in self._expected_set or holder in self.received or holder in self.withdrawn:
            raise UnexpectedMessageError(f"server in state {self.name} takes no complaint from client {holder} "
                                         "(not in the stage, or it already sent its masked input or complaints)")
        assert ctx.session is not None
        routed = {s for s in ctx.session.graph.neighbors(holder) if s in ctx.boxes and holder in ctx.boxes[s]}
        items = list(complaints)
        if not items:
            raise MalformedMessageError(f"client {holder}: a complaint names at least one share box")
        if len(items) > len(routed):
            raise ProtocolError(f"client {holder}: {len(items)} complaints about the {len(routed)} share boxes "
                                "it was sent")
        seen: set[int] = set()
        for i, complaint in enumerate(items):
            name = f"complaints[{i}]"
            if not isinstance(complaint, ShareComplaint):
                raise MalformedMessageError(f"{name}: expected a ShareComplaint, got {type(complaint).__name__}")
            complaint.check(name)
            if complaint.sender in seen:
                raise MalformedMessageError(f"{name}.sender: client {complaint.sender} is named twice")
            seen.add(complaint.sender)
            if complaint.sender not in routed:
                raise ProtocolError(f"{name}.sender: client {holder} was sent no share box by client "
                                    f"{complaint.sender}")
            if complaint.kind == BAD_SIGNATURE and not cfg.active:
                raise MalformedMessageError(f"{name}.kind: share boxes are signed in active mode only")
        session = ctx.session
        verdicts = [judge(c, holder=holder, holder_public=session.advertisements[holder].share_public,
                          sender_public=session.advertisements[c.sender].share_public,
                          sender_possession=session.advertisements[c.sender].share_proof,
                          sender_identity=cfg.box_signer(c.sender), stored_box=ctx.boxes[c.sender][holder],
                          session_id=session.session_id, round_id=cfg.round_id)
                    for c in items]
        self.withdrawn.add(holder)
        ctx.verdicts[holder] = tuple(verdicts)
        return verdicts

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        ctx = self.ctx
        # the stage's complaints are judged: the server keeps no ciphertexts, only each box's commitments,
        # which the shares returned at unmasking must open
        ctx.commitments = {owner: BoxCommitments.of(boxes) for owner, boxes in ctx.boxes.items()}
        ctx.boxes = {}
        alive = self._survivors("masked-input")
        if isinstance(alive, str):
            ctx.running_sum = None
            return self._abort(alive, self.expected)
        assert ctx.session is not None
        graph = ctx.session.graph
        t = ctx.config.threshold
        alive_set = set(alive)
        ctx.u3 = alive
        ctx.dropped = tuple(c for c in ctx.u2 if c not in alive_set)
        for c in ctx.u2:
            if c in alive_set or any(n in alive_set for n in graph.neighbors(c)):
                if len(alive_set.intersection(graph.holders(c))) < t:
                    ctx.running_sum = None
                    return self._abort(f"fewer than threshold {t} holders of client {c} survived masked-input",
                                       self.expected)
        rid = ctx.config.round_id
        survivors = np.asarray(alive, dtype=np.uint32)
        if ctx.config.active:
            return (ServerConsistencyCheck(ctx, alive),
                    {c: ConsistencyCheckRequest(rid, c, survivors) for c in alive})
        dropped = np.asarray(ctx.dropped, dtype=np.uint32)
        return ServerR3Unmasking(ctx, alive), {c: UnmaskingRequest(rid, c, survivors, dropped) for c in alive}


class ServerConsistencyCheck(ServerState):
    """Active mode: collect survivors' signatures over the survivor set and forward them."""

    name = "ConsistencyCheck"
    message_type = ConsistencyCheckResponse

    _payload: bytes | None = None

    def _accept(self, client_id: int, msg: Message) -> None:
        # Every survivor verifies the signatures itself and counts only valid ones
        # (fedveil.secagg.survivor_checks.check_consistency). The server verifies too (one Ed25519
        # check per survivor), so that an invalid one never counts towards its threshold: with fewer
        # than t valid signers the attempt aborts before any share is asked for, and is retried, where
        # a garbage signature used to carry it into an unmasking the honest sites refused, a rejected
        # round after release (review of 2026-12-07).
        assert isinstance(msg, ConsistencyCheckResponse)
        ctx = self.ctx
        if len(msg.signature) != SIGNATURE_BYTES:
            raise MalformedMessageError(f"client {client_id}: a survivor-set signature is {SIGNATURE_BYTES} bytes, "
                                        f"got {len(msg.signature)}")
        if ctx.config.identity_keys is not None and ctx.session is not None:
            if self._payload is None:
                self._payload = survivor_set_payload(ctx.session.session_id, ctx.u3)
            if not valid_signatures([(ctx.config.identity_keys[client_id], msg.signature, self._payload)])[0]:
                raise InvalidSignatureError(f"client {client_id}: its survivor-set signature does not verify")
        ctx.signatures[client_id] = msg.signature

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        ctx = self.ctx
        alive = self._survivors("consistency-check")
        if isinstance(alive, str):
            ctx.running_sum = None
            return self._abort(alive, self.expected)
        rid = ctx.config.round_id
        survivors = np.asarray(ctx.u3, dtype=np.uint32)
        dropped = np.asarray(ctx.dropped, dtype=np.uint32)
        sigs = {c: ctx.signatures[c] for c in alive}
        return ServerR3Unmasking(ctx, alive), {c: UnmaskingRequest(rid, c, survivors, dropped, sigs) for c in alive}


class SecAggServer:
    """The server's side of one round. See :mod:`fedveil.secagg` for the driver loop."""

    def __init__(self, config: SecAggConfig, *, threads: int | None = None) -> None:
        """``threads``: how many threads unmasking expands its masks with (default
        :func:`default_unmasking_threads`); the result does not depend on it."""
        if threads is not None and threads < 1:
            raise ConfigError(f"threads: must be >= 1 (got {threads})")
        self._ctx = ServerContext(config, default_unmasking_threads() if threads is None else threads)
        self._state: ServerState = ServerR0AdvertiseKeys(self._ctx)

    @property
    def config(self) -> SecAggConfig:
        return self._ctx.config

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def stage(self) -> str:
        return self._state.name

    @property
    def expected(self) -> tuple[int, ...]:
        """Clients from which a message is awaited in the current stage."""
        return self._state.expected

    @property
    def pending(self) -> tuple[int, ...]:
        """Expected clients that have not sent their message yet (close early when empty)."""
        state = self._state
        return tuple(c for c in state.expected if c not in state.received and c not in state.withdrawn)

    @property
    def completed(self) -> bool:
        return isinstance(self._state, ServerCompleted)

    @property
    def aborted(self) -> bool:
        return isinstance(self._state, ServerAborted)

    @property
    def abort_reason(self) -> str | None:
        return self._state.reason if isinstance(self._state, ServerAborted) else None

    @property
    def session_id(self) -> bytes | None:
        return self._ctx.session.session_id if self._ctx.session is not None else None

    @property
    def result(self) -> AggregationResult:
        """The aggregation result; raises :class:`RoundAbortedError` if the round aborted."""
        if isinstance(self._state, ServerCompleted):
            return self._state.result
        if isinstance(self._state, ServerAborted):
            raise RoundAbortedError(self._state.reason)
        raise UnexpectedMessageError(f"the round is still in stage {self.stage}")

    @property
    def verdicts(self) -> dict[int, tuple[ComplaintVerdict, ...]]:
        """The judged complaints of this attempt, by complaining holder (:meth:`judge_complaints`)."""
        return dict(self._ctx.verdicts)

    @property
    def misconduct(self) -> dict[int, str]:
        """Clients proven at unmasking to deviate, and how: holders that returned shares their owners had
        not committed to, and owners whose committed shares do not give the secret they stand for
        (:mod:`fedveil.secagg.share_commitments`). Filled whether the round completes or aborts."""
        return dict(self._ctx.misconduct)

    @property
    def blamed(self) -> frozenset[int]:
        """Clients proven at fault in this attempt: senders of share boxes that do not open (or with
        bad signatures or keys) and holders whose complaints were false."""
        return frozenset(v.guilty for vs in self._ctx.verdicts.values() for v in vs if v.guilty is not None)

    def judge_complaints(self, holder: int, complaints: Sequence[ShareComplaint]) -> list[ComplaintVerdict]:
        """Judge the complaints of ``holder`` (as authenticated by the transport) about the share boxes it
        was sent, from a :class:`~fedveil.secagg.errors.ShareComplaintsError` (its ``complaints``).

        Valid only while the masked-input stage collects (else :class:`UnexpectedMessageError`), once
        per holder and only before it sent a masked input. A malformed list (a kind unknown or unfit
        for the mode, wrong lengths, a sender named twice) raises :class:`MalformedMessageError`, a
        sender that sent the holder no box or more complaints than boxes :class:`ProtocolError`; either
        changes nothing. Otherwise the holder leaves the stage (it can send no masked input and is a
        dropout at close), and each verdict names the client proven at fault (:attr:`blamed`), if any.
        Deterministic given the inputs (:mod:`fedveil.secagg.share_complaints`)."""
        state = self._state
        if not isinstance(state, ServerR2MaskedInputCollection):
            raise UnexpectedMessageError(f"complaints about share boxes are judged in the masked-input stage "
                                         f"(the server is in {self.stage})")
        return state.judge(holder, complaints)

    def receive(self, client_id: int, message: Message | bytes) -> None:
        """Accept one client message (``client_id`` is the sender as authenticated by the transport)."""
        msg = decode_message(message) if isinstance(message, (bytes, bytearray, memoryview)) else message
        if msg.round_id != self._ctx.config.round_id:
            raise WrongRoundError(f"message from client {client_id} is for round {msg.round_id}, "
                                  f"this is round {self._ctx.config.round_id}")
        if msg.client_id != client_id:
            raise ProtocolError(f"message from client {client_id} claims to come from client {msg.client_id}")
        self._state.receive(client_id, msg)

    def verify_advertisements(self, messages: Sequence[AdvertiseKeys]) -> dict[int, SecAggError]:
        """Check key advertisements' identity signatures ahead of :meth:`receive`, as one batch.

        Signature checks are active mode's largest server cost; this lets a driver run them outside
        its own lock (one call per request thread) or spread a stage's batch over the cores
        (:func:`fedveil.secagg.keys.valid_signatures`). It changes no state but a record of the
        advertisements found valid, which :meth:`receive` then does not verify again; anything not
        recorded is verified there as before. Returns the error each bad one would raise, by sender.
        """
        errors: dict[int, SecAggError] = {}
        good: list[AdvertiseKeys] = []
        for adv in messages:
            try:
                check_advertisement(self._ctx.config, adv, signature=False)
            except SecAggError as err:
                errors[adv.client_id] = err
                continue
            good.append(adv)
        if not self._ctx.config.active:
            return errors
        checks = valid_signatures([advertisement_signature(self._ctx.config, adv) for adv in good])
        for adv, ok in zip(good, checks, strict=True):
            if ok:
                self._ctx.verified_adverts.add(adv)
            else:
                errors[adv.client_id] = bad_advertisement_signature(adv)
        return errors

    def verify_unmasking(self, client_id: int, message: UnmaskingResponse) -> None:
        """Check an unmasking answer's shares against their owners' commitments ahead of :meth:`receive`.

        One hash per share, about 250 per site at n = 1,000: this lets a driver run it outside its own
        lock, on the request's thread. It changes no state but a record of an answer found sound, which
        :meth:`receive` then does not check again; an answer at fault, or one that does not fit the
        stage, is left for :meth:`receive` to judge (and refuse) as before.
        """
        state = self._state
        if not isinstance(state, ServerR3Unmasking) or message.client_id != client_id:
            return
        try:
            fault = state.commitment_fault(client_id, message)
        except (ValueError, TypeError, IndexError):  # a malformed answer: receive() names the field
            return
        if fault is None:
            self._ctx.verified_unmasking[client_id] = message

    def close_stage(self) -> dict[int, Message]:
        """End the current stage (all expected clients answered, or the deadline passed).

        Returns the messages to deliver, keyed by recipient client id. After the unmasking stage
        the round is complete (:attr:`result`) and nothing is returned; on abort every client
        still in the round gets a :class:`RoundAborted`.
        """
        self._state, outgoing = self._state.close()
        return outgoing
