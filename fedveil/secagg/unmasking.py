"""The server's unmasking stage (R3): collect the survivors' shares, recover every secret the round
needs, and strip every mask from the running sum.

A module of its own because, unlike the stages of :mod:`fedveil.secagg.server`, which collect and
route, this one computes: Shamir recovery, correction around wrong shares
(:mod:`fedveil.secagg.share_decoding`) and mask expansion in threads. Every secret is recovered
before the sum is touched, so an abort reveals nothing.

Each returned share must open its owner's commitment (:mod:`fedveil.secagg.share_commitments`):
an answer with one that does not is refused and its holder recorded as proven to lie. The shares
kept are then all the owner's own dealing, so when they do not give one secret (or not the masking
key it advertised) the owner is recorded as proven at fault, and the round still completes if
Berlekamp–Welch recovers the secret around the bad shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedveil.secagg.errors import MalformedMessageError, ProtocolError, RoundAbortedError
from fedveil.secagg.keys import pairwise_mask_seed, self_mask_prg_seed
from fedveil.secagg.messages import (
    MASK_KEY_LIMBS,
    SALT_BYTES,
    SELF_MASK_LIMBS,
    SHARE_LIMBS,
    Message,
    UnmaskingResponse,
)
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.server_states import AggregationResult, ServerCompleted, ServerContext, ServerState
from fedveil.secagg.shamir import PRIME, lagrange_at_zero, limbs_to_bytes, random_field_elements
from fedveil.secagg.shamir import reconstruct as shamir_reconstruct
from fedveil.secagg.share_commitments import MASK_KEY, SELF_MASK, matches, part_of
from fedveil.secagg.share_decoding import (
    UndecodableSharesError,
    decode_shares,
    fold_limbs,
    on_one_polynomial,
    parity_weights,
)


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

    def __init__(self, ctx: ServerContext, expected: tuple[int, ...]) -> None:
        super().__init__(ctx, expected)
        self.self_mask_shares = _ShareTable(SELF_MASK_LIMBS)
        self.mask_key_shares = _ShareTable(MASK_KEY_LIMBS)
        self.refused: set[int] = set()  # holders whose answers held shares their owners never committed to

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
        for owners, shares, salts, limbs in ((sm_owners, msg.self_mask_shares, msg.self_mask_salts, SELF_MASK_LIMBS),
                                             (mk_owners, msg.mask_key_shares, msg.mask_key_salts, MASK_KEY_LIMBS)):
            arr = np.asarray(shares)
            if arr.shape != (len(owners), limbs) or (arr.size and int(arr.max()) >= PRIME):
                raise MalformedMessageError(f"client {client_id}: share matrix of shape {arr.shape} is invalid")
            if np.asarray(salts).shape != (len(owners), SALT_BYTES):
                raise MalformedMessageError(f"client {client_id}: salt matrix of shape {np.asarray(salts).shape} "
                                            f"is invalid (expected ({len(owners)}, {SALT_BYTES}))")
        if self.ctx.verified_unmasking.get(client_id) is not msg:
            fault = self.commitment_fault(client_id, msg)
            if fault is not None:
                self.ctx.misconduct.setdefault(client_id, fault)
                self.refused.add(client_id)
                raise ProtocolError(f"client {client_id} {fault}")
        self.self_mask_shares.add(client_id + 1, msg.self_mask_owners, msg.self_mask_shares)
        self.mask_key_shares.add(client_id + 1, msg.mask_key_owners, msg.mask_key_shares)

    def commitment_fault(self, holder: int, msg: UnmaskingResponse) -> str | None:
        """Why ``holder``'s answer is refused, or None: every share but its own must open the
        commitment its owner put in the box; one that does not was not dealt by its owner, so the
        holder lies. Pure (it reads the commitments, fixed since the masked-input stage), so a driver
        may call it outside its lock (:meth:`~fedveil.secagg.server.SecAggServer.verify_unmasking`)."""
        assert self.ctx.session is not None
        sid = self.ctx.session.session_id
        for part, owners, shares, salts in ((SELF_MASK, msg.self_mask_owners, msg.self_mask_shares,
                                             msg.self_mask_salts),
                                            (MASK_KEY, msg.mask_key_owners, msg.mask_key_shares, msg.mask_key_salts)):
            what = "self-mask seed" if part == SELF_MASK else "masking key"
            for owner, row, salt in zip(np.asarray(owners).tolist(), np.asarray(shares),
                                        np.asarray(salts, dtype=np.uint8), strict=True):
                if owner == holder:
                    continue  # its own share: the owner's word, as its dealing is
                box = self.ctx.commitments.get(owner)
                committed = box.get(holder) if box is not None else None
                if committed is None or not matches(part_of(committed, part), sid, owner, holder, part, row,
                                                    salt.tobytes()):
                    return (f"returned a share of the {what} of client {owner} that client {owner} did not "
                            "commit to (its answer was refused)")
        return None

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

        parity_cache: dict[tuple[int, ...], np.ndarray] = {}
        fold = random_field_elements(SHARE_LIMBS)  # drawn after every share arrived

        def recover(table: dict[int, tuple[np.ndarray, np.ndarray]], owner: int, what: str,
                    matches_public: Callable[[bytes], bool] = lambda _: True) -> bytes:
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
                    if matches_public(raw):
                        return raw
                except MalformedMessageError:
                    pass
            # Every share here is one the owner committed to (or its own): it dealt shares that give no
            # single secret, or not the key it advertised. Try to recover it around the odd shares out
            # (fedveil.secagg.share_decoding); abort only when that fails too.
            ctx.misconduct.setdefault(owner, f"dealt shares of its {what} that do not give one secret "
                                             "(or not the one it advertised)")
            try:
                decoded = decode_shares(xs, rows, t)
                raw = limbs_to_bytes(decoded.limbs)
            except (UndecodableSharesError, MalformedMessageError) as err:
                raise RoundAbortedError(f"the shares of the {what} of client {owner} are inconsistent "
                                        f"beyond correction ({err})") from err
            if not matches_public(raw):
                raise RoundAbortedError(f"the shares of the {what} of client {owner} are inconsistent "
                                        "beyond correction (the decoded value is not the advertised one)")
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
        return AggregationResult(total, ctx.u3, ctx.dropped, tuple(sorted(self.refused)))
