"""Server side of SecAgg / SecAgg+: one class per stage, each ``close`` returns the next state.

R0AdvertiseKeys → R1ShareKeys → R2MaskedInputCollection → [ConsistencyCheck, active mode] →
R3Unmasking → Completed, or Aborted (Bonawitz et al., CCS 2017, Fig. 4; Google's
fcp/secagg/server). The driver feeds client messages to :meth:`SecAggServer.receive` as they
arrive and calls :meth:`SecAggServer.close_stage` when every expected client has answered or
the stage's deadline passes; clients that did not answer by then are dropouts.

Memory: masked inputs are added into **one** running ring sum on arrival (the server never
holds n vectors) and masks are removed by expanding seeds into **one** reusable buffer, so the
server needs O(m) for vectors plus O(n·k) for keys and shares, independent of n·m.

A message the server rejects (wrong stage, wrong round, bad sender, bad signature, malformed)
raises and changes nothing: one misbehaving client cannot abort the round.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.errors import (
    ConfigError,
    MalformedMessageError,
    ProtocolError,
    RoundAbortedError,
    SecAggError,
    UnexpectedMessageError,
    WrongRoundError,
)
from fedveil.secagg.keys import SIGNATURE_BYTES, pairwise_mask_seed, self_mask_prg_seed, valid_signatures
from fedveil.secagg.messages import (
    MASK_KEY_LIMBS,
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
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.session import (
    Session,
    advertisement_signature,
    bad_advertisement_signature,
    check_advertisement,
    prune_live,
)
from fedveil.secagg.shamir import BOX_OVERHEAD, PRIME, lagrange_at_zero, limbs_to_bytes, random_field_elements
from fedveil.secagg.shamir import reconstruct as shamir_reconstruct
from fedveil.secagg.share_decoding import (
    UndecodableSharesError,
    decode_shares,
    fold_limbs,
    on_one_polynomial,
    parity_weights,
)

_BOX_BYTES = 4 * (SELF_MASK_LIMBS + MASK_KEY_LIMBS) + BOX_OVERHEAD


@dataclass(frozen=True)
class AggregationResult:
    """The outcome of a completed round: the ring sum of the survivors' inputs, and who they are."""

    ring_sum: np.ndarray
    survivors: tuple[int, ...]
    """Clients whose inputs are in the sum (their masked inputs arrived)."""
    dropped: tuple[int, ...]
    """Clients that shared keys but whose masked inputs did not arrive (masks removed)."""
    faulty_holders: tuple[int, ...] = ()
    """Clients whose unmasking shares were wrong and were corrected around (none in an honest round)."""


def default_unmasking_threads() -> int:
    """The threads a server expands its unmasking masks with: the cores this process may run on,
    at most 4.

    Unmasking is the one stage where the server computes while every site waits on it, so it may
    take the machine's cores. Measured on 2 cores (1,000 sites, m = 100,000, 10% leavers): the
    unmasking took 3.1 s with one thread and 2.5 s with two, all of the gain in expanding the
    24,000 masks (recovering the 1,000 secrets in threads gained about 5%, so they are recovered in
    one).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


class _ServerContext:
    def __init__(self, config: SecAggConfig, threads: int) -> None:
        self.config = config
        self.threads = threads
        self.session: Session | None = None
        self.u2: tuple[int, ...] = ()
        self.boxes: dict[int, dict[int, bytes]] = {}
        self.running_sum: np.ndarray | None = None
        self.u3: tuple[int, ...] = ()
        self.dropped: tuple[int, ...] = ()
        self.signatures: dict[int, bytes] = {}
        # Advertisements whose identity signature this server verified ahead of receive().
        self.verified_adverts: set[AdvertiseKeys] = set()


class ServerState:
    """One stage of the server: ``receive`` collects, ``close`` returns ``(next_state, outgoing)``."""

    name: ClassVar[str] = "?"
    message_type: ClassVar[type[Message] | None] = None

    def __init__(self, ctx: _ServerContext, expected: tuple[int, ...]) -> None:
        self.ctx = ctx
        self.expected = expected
        self._expected_set = frozenset(expected)
        self.received: dict[int, None] = {}  # insertion-ordered set of senders

    def receive(self, client_id: int, msg: Message) -> None:
        if self.message_type is None or not isinstance(msg, self.message_type):
            raise UnexpectedMessageError(f"server in state {self.name} cannot accept {type(msg).__name__} "
                                         f"from client {client_id}")
        if client_id not in self._expected_set:
            raise UnexpectedMessageError(f"server in state {self.name} expects no message from client {client_id}")
        if client_id in self.received:
            raise UnexpectedMessageError(f"client {client_id} already sent its {type(msg).__name__}")
        self._accept(client_id, msg)
        self.received[client_id] = None

    def _accept(self, client_id: int, msg: Message) -> None:
        raise NotImplementedError

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        raise UnexpectedMessageError(f"server in state {self.name} has no stage to close")

    def _abort(self, reason: str, notify: tuple[int, ...]) -> tuple[ServerState, dict[int, Message]]:
        rid = self.ctx.config.round_id
        return ServerAborted(self.ctx, reason), {c: RoundAborted(rid, c, reason) for c in notify}

    def _survivors(self, stage: str) -> tuple[int, ...] | str:
        """Senders of this stage in id order, or an abort reason when fewer than t."""
        alive = tuple(sorted(self.received))
        t = self.ctx.config.threshold
        if len(alive) < t:
            return f"only {len(alive)} clients completed the {stage} stage; threshold is {t}"
        return alive


class ServerR0AdvertiseKeys(ServerState):
    """R0: collect each client's two public keys (signatures verified in active mode)."""

    name = "R0AdvertiseKeys"
    message_type = AdvertiseKeys

    def __init__(self, ctx: _ServerContext) -> None:
        super().__init__(ctx, tuple(range(ctx.config.num_clients)))
        self.adverts: dict[int, AdvertiseKeys] = {}

    def _accept(self, client_id: int, msg: Message) -> None:
        assert isinstance(msg, AdvertiseKeys)
        check_advertisement(self.ctx.config, msg, signature=msg not in self.ctx.verified_adverts)
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
        if any(len(box) != _BOX_BYTES for box in msg.boxes.values()):
            raise MalformedMessageError(f"client {client_id}: share boxes must be {_BOX_BYTES} bytes")
        self.ctx.boxes[client_id] = msg.boxes

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        ctx = self.ctx
        alive = self._survivors("share-keys")
        if isinstance(alive, str):
            return self._abort(alive, self.expected)
        assert ctx.session is not None
        graph = ctx.session.graph
        t = ctx.config.threshold
        alive_set = set(alive)
        for c in alive:
            if len(alive_set.intersection(graph.holders(c))) < t:
                return self._abort(f"client {c} has fewer than threshold {t} holders left after share-keys",
                                   self.expected)
        ctx.u2 = alive
        ctx.boxes = {c: ctx.boxes[c] for c in alive}
        rid = ctx.config.round_id
        out: dict[int, Message] = {}
        for c in alive:
            inbox = {s: ctx.boxes[s][c] for s in graph.neighbors(c) if s in alive_set}
            out[c] = MaskedInputRequest(rid, c, inbox)
        ctx.boxes = {}  # routed: the server keeps no ciphertexts
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

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        ctx = self.ctx
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

    def _accept(self, client_id: int, msg: Message) -> None:
        # Not verified here: every survivor verifies the signatures itself and counts only valid
        # ones (fedveil.secagg.survivor_checks.check_consistency), so the server's check would only
        # repeat that work on the round's critical path. Only the shape is checked.
        assert isinstance(msg, ConsistencyCheckResponse)
        if len(msg.signature) != SIGNATURE_BYTES:
            raise MalformedMessageError(f"client {client_id}: a survivor-set signature is {SIGNATURE_BYTES} bytes, "
                                        f"got {len(msg.signature)}")
        self.ctx.signatures[client_id] = msg.signature

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


class _ShareTable:
    """The unmasking shares of one kind as they arrive, grouped by owner only once all are in.

    Each response is kept as its owner ids and its share matrix (O(n·k) in all); :meth:`grouped`
    then sorts every (owner, holder point) row at once, so each owner's shares come out as one
    contiguous block in point order, with no Python work per share.
    """

    def __init__(self, limbs: int) -> None:
        self._limbs = limbs
        self._owners: list[np.ndarray] = []
        self._points: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def add(self, point: int, owners: np.ndarray, rows: np.ndarray) -> None:
        self._owners.append(np.asarray(owners, dtype=np.int64))
        self._points.append(np.full(len(owners), point, dtype=np.int64))
        self._rows.append(np.asarray(rows, dtype=np.int64).reshape(len(owners), self._limbs))

    def grouped(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """owner → (holder points, ascending; their share rows)."""
        if not self._owners:
            return {}
        owners, points = np.concatenate(self._owners), np.concatenate(self._points)
        if not owners.size:
            return {}
        order = np.lexsort((points, owners))
        owners, points, rows = owners[order], points[order], np.concatenate(self._rows)[order]
        firsts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        ends = np.r_[firsts[1:], owners.size]
        return {int(owners[a]): (points[a:b], rows[a:b]) for a, b in zip(firsts, ends, strict=True)}


class ServerR3Unmasking(ServerState):
    """R3: collect shares, reconstruct self-mask seeds of survivors and masking keys of dropped
    clients, and strip every mask from the running sum."""

    name = "R3Unmasking"
    message_type = UnmaskingResponse

    def __init__(self, ctx: _ServerContext, expected: tuple[int, ...]) -> None:
        super().__init__(ctx, expected)
        self.self_mask_shares = _ShareTable(SELF_MASK_LIMBS)
        self.mask_key_shares = _ShareTable(MASK_KEY_LIMBS)

    def _accept(self, client_id: int, msg: Message) -> None:
        assert isinstance(msg, UnmaskingResponse) and self.ctx.session is not None
        graph = self.ctx.session.graph
        holds = set(graph.holders(client_id))
        survivors = set(self.ctx.u3)
        dropped = set(self.ctx.dropped)
        sm_owners = [int(v) for v in msg.self_mask_owners]
        mk_owners = [int(v) for v in msg.mask_key_owners]
        if len(set(sm_owners)) != len(sm_owners) or len(set(mk_owners)) != len(mk_owners):
            raise MalformedMessageError(f"client {client_id} listed a share owner twice")
        if not set(sm_owners) <= survivors & holds or not set(mk_owners) <= dropped & holds:
            raise ProtocolError(f"client {client_id} sent shares that were not requested")
        for owners, shares, limbs in ((sm_owners, msg.self_mask_shares, SELF_MASK_LIMBS),
                                      (mk_owners, msg.mask_key_shares, MASK_KEY_LIMBS)):
            arr = np.asarray(shares)
            if arr.shape != (len(owners), limbs) or (arr.size and int(arr.max()) >= PRIME):
                raise MalformedMessageError(f"client {client_id}: share matrix of shape {arr.shape} is invalid")
        self.self_mask_shares.add(client_id + 1, msg.self_mask_owners, msg.self_mask_shares)
        self.mask_key_shares.add(client_id + 1, msg.mask_key_owners, msg.mask_key_shares)

    def close(self) -> tuple[ServerState, dict[int, Message]]:
        try:
            result = self._unmask()
        except RoundAbortedError as err:
            self.ctx.running_sum = None
            return self._abort(str(err), self.expected)
        return ServerCompleted(self.ctx, result), {}

    def _unmask(self) -> AggregationResult:
        ctx = self.ctx
        cfg = ctx.config
        session = ctx.session
        assert session is not None and ctx.running_sum is not None
        t = cfg.threshold
        sid = session.session_id
        graph = session.graph
        survivors_set = set(ctx.u3)
        coeff_cache: dict[tuple[int, ...], np.ndarray] = {}

        faulty: set[int] = set()
        parity_cache: dict[tuple[int, ...], np.ndarray] = {}
        fold = random_field_elements(SHARE_LIMBS)  # drawn after every share arrived

        def recover(table: dict[int, tuple[np.ndarray, np.ndarray]], owner: int, what: str,
                    matches: Callable[[bytes], bool] = lambda _: True) -> bytes:
            xs, rows = table.get(owner, (np.zeros(0, np.int64), np.zeros((0, SHARE_LIMBS), np.int64)))
            if len(xs) < t:
                raise RoundAbortedError(f"only {len(xs)} shares of the {what} of client {owner} arrived; "
                                        f"threshold is {t}")
            key = tuple(xs[:t].tolist())  # the t lowest holder points (xs is ascending)
            lam = coeff_cache.get(key)
            if lam is None:
                lam = coeff_cache[key] = lagrange_at_zero(xs[:t])
            secret = shamir_reconstruct(xs[:t], rows[:t], lam)
            points = tuple(xs.tolist())
            weights = parity_cache.get(points)
            if weights is None:
                weights = parity_cache[points] = parity_weights(xs)
            if on_one_polynomial(xs, fold_limbs(rows, fold), t, weights):
                try:
                    raw = limbs_to_bytes(secret)
                    if matches(raw):
                        return raw
                except MalformedMessageError:
                    pass
            # A holder sent a wrong share: locate it among all shares and interpolate without it
            # (fedveil.secagg.share_decoding); abort only when more are wrong than can be corrected.
            try:
                decoded = decode_shares(xs, rows, t)
                raw = limbs_to_bytes(decoded.limbs)
            except (UndecodableSharesError, MalformedMessageError) as err:
                raise RoundAbortedError(f"the shares of the {what} of client {owner} are inconsistent "
                                        f"beyond correction ({err})") from err
            if not matches(raw):
                raise RoundAbortedError(f"the shares of the {what} of client {owner} are inconsistent "
                                        "beyond correction (the decoded value is not the advertised one)")
            faulty.update(x - 1 for x in decoded.faulty_points)
            return raw

        def recover_mask_key(d: int) -> X25519PrivateKey:
            advertised = session.advertisements[d].mask_public

            def is_advertised(raw: bytes) -> bool:
                return X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw() == advertised

            return X25519PrivateKey.from_private_bytes(recover(mask_key_shares, d, "masking key", is_advertised))

        # Recover every secret before touching the sum, so an abort reveals nothing.
        self_mask_shares, mask_key_shares = self.self_mask_shares.grouped(), self.mask_key_shares.grouped()
        self_seeds = {u: recover(self_mask_shares, u, "self-mask seed") for u in ctx.u3}
        # a dropped client no survivor masked with leaves nothing in the sum
        mask_keys = {d: recover_mask_key(d) for d in ctx.dropped if survivors_set.intersection(graph.neighbors(d))}
        total = ctx.running_sum
        plus: list[bytes] = []
        minus = [self_mask_prg_seed(seed, u, sid) for u, seed in self_seeds.items()]
        for d, key in mask_keys.items():
            for peer in graph.neighbors(d):
                if peer not in survivors_set:
                    continue
                seed = pairwise_mask_seed(key, session.advertisements[peer].mask_public, d, peer, sid)
                # The survivor added +PRG(seed) if its id is the smaller one, else subtracted it.
                (minus if peer < d else plus).append(seed)
        MaskExpander(cfg.vector_length, cfg.ring.dtype).apply(total, add=plus, subtract=minus, threads=ctx.threads)
        cfg.ring.reduce(total)
        ctx.running_sum = None
        return AggregationResult(total, ctx.u3, ctx.dropped, tuple(sorted(faulty)))


class ServerCompleted(ServerState):
    """The round finished; :attr:`result` holds the sum."""

    name = "Completed"

    def __init__(self, ctx: _ServerContext, result: AggregationResult) -> None:
        super().__init__(ctx, ())
        self.result = result


class ServerAborted(ServerState):
    """The round was aborted; nothing about any input was revealed."""

    name = "Aborted"

    def __init__(self, ctx: _ServerContext, reason: str) -> None:
        super().__init__(ctx, ())
        self.reason = reason


class SecAggServer:
    """The server's side of one round. See :mod:`fedveil.secagg` for the driver loop."""

    def __init__(self, config: SecAggConfig, *, threads: int | None = None) -> None:
        """``threads``: how many threads unmasking expands its masks with (default
        :func:`default_unmasking_threads`); the result does not depend on it."""
        if threads is not None and threads < 1:
            raise ConfigError(f"threads: must be >= 1 (got {threads})")
        self._ctx = _ServerContext(config, default_unmasking_threads() if threads is None else threads)
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
        return tuple(c for c in self._state.expected if c not in self._state.received)

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

    def close_stage(self) -> dict[int, Message]:
        """End the current stage (all expected clients answered, or the deadline passed).

        Returns the messages to deliver, keyed by recipient client id. After the unmasking stage
        the round is complete (:attr:`result`) and nothing is returned; on abort every client
        still in the round gets a :class:`RoundAborted`.
        """
        self._state, outgoing = self._state.close()
        return outgoing
