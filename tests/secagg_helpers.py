"""Shared helpers for the secagg tests: configs, random ring inputs, a manual round driver."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from fedveil.secagg import SecAggClient, SecAggConfig, SecAggServer
from fedveil.secagg.client import seal_share_box
from fedveil.secagg.keys import share_secret
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    Message,
    ShareKeysRequest,
    ShareKeysResponse,
)
from fedveil.secagg.shamir import PRIME, bytes_to_limbs, share
from fedveil.secagg.share_commitments import commitment_salts


def random_inputs(config: SecAggConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    ring = config.ring
    return {c: rng.integers(0, ring.modulus, config.vector_length, dtype=np.uint64).astype(ring.dtype)
            for c in range(config.num_clients)}


def run_to_signatures(clients: dict[int, SecAggClient], advertisements: tuple[AdvertiseKeys, ...], round_id: int,
                      signers: set[int] | None = None) -> dict[int, bytes]:
    """Active clients driven honestly up to the consistency check: every share box delivered, every
    masked input sent, the whole cohort announced as survivors; returns the survivor-set signatures
    of ``signers`` (default: every client)."""
    boxes: dict[int, dict[int, bytes]] = {u: {} for u in clients}
    for u, client in clients.items():
        reply = client.handle(ShareKeysRequest(round_id, u, advertisements))
        for holder, box in reply.boxes.items():  # type: ignore[union-attr]
            boxes[holder][u] = box
    for u, client in clients.items():
        client.handle(MaskedInputRequest(round_id, u, boxes[u]))
    everyone = np.arange(len(clients), dtype=np.uint32)
    return {u: client.handle(ConsistencyCheckRequest(round_id, u, everyone)).signature  # type: ignore[union-attr]
            for u, client in clients.items() if signers is None or u in signers}


def ring_sum(config: SecAggConfig, inputs: dict[int, np.ndarray], ids) -> np.ndarray:
    total = config.ring.zeros(config.vector_length)
    for c in ids:
        config.ring.add(total, inputs[c])
    return total


class ManualRound:
    """Drives clients and server stage by stage so a test can intercept and alter messages."""

    def __init__(self, config: SecAggConfig, inputs: dict[int, np.ndarray] | None = None, *,
                 server_threads: int | None = None, **client_kwargs) -> None:
        self.config = config
        self.inputs = inputs if inputs is not None else random_inputs(config)
        self.server = SecAggServer(config, threads=server_threads)
        self.clients = {}
        for c in range(config.num_clients):
            kwargs = {k: v[c] for k, v in client_kwargs.items()}
            self.clients[c] = SecAggClient(c, config, **kwargs)
            self.clients[c].set_input(self.inputs[c])

    def advertise(self, skip=()) -> None:
        for c, client in self.clients.items():
            if c not in skip:
                self.server.receive(c, client.advertise_keys())

    def close(self) -> dict[int, Message]:
        return self.server.close_stage()

    def deliver(self, outgoing: dict[int, Message], skip=()) -> dict[int, Message]:
        """Hand each server message to its client; return the replies (not yet sent)."""
        replies = {}
        for c, msg in outgoing.items():
            if c in skip:
                continue
            reply = self.clients[c].handle(msg)
            if reply is not None:
                replies[c] = reply
        return replies

    def send(self, replies: dict[int, Message]) -> None:
        for c, msg in replies.items():
            self.server.receive(c, msg)

    def step(self, outgoing: dict[int, Message], skip=()) -> dict[int, Message]:
        self.send(self.deliver(outgoing, skip))
        return self.close()


def redeal(r: ManualRound, replies: dict[int, Message], owner: int, *,
           tamper: Callable[[list[int], np.ndarray], np.ndarray] | None = None,
           secrets: np.ndarray | None = None) -> None:
    """A malicious owner deals its shares again before they are sent: a sharing of ``secrets`` (its real
    self-mask seed and masking key by default), with ``tamper(holders, shares)`` applied to the
    ``(holders, SHARE_LIMBS)`` share matrix. Each box is then sealed, committed to and (in active mode)
    signed exactly as an honest owner does, so every holder's box opens and matches its commitments;
    its own share is replaced too. ``replies`` are the share-keys replies, not yet sent."""
    ctx = r.clients[owner]._ctx
    session = ctx.session
    assert session is not None
    sid = session.session_id
    holders = list(session.graph.holders(owner))
    if secrets is None:
        secrets = np.concatenate([bytes_to_limbs(ctx.keys.self_mask_seed),
                                  bytes_to_limbs(ctx.keys.mask_private.private_bytes_raw())])
    shares = share(secrets, np.asarray(holders, dtype=np.int64) + 1, r.config.threshold)
    if tamper is not None:
        shares = np.asarray(tamper(holders, shares.copy()), dtype=np.int64) % PRIME
    salts = commitment_salts(os.urandom(32), sid, len(holders))
    boxes: dict[int, bytes] = {}
    for row, holder in enumerate(holders):
        if holder == owner:
            ctx.own_share = shares[row].copy()
            continue
        shared = share_secret(ctx.keys.share_private, session.advertisements[holder].share_public)
        boxes[holder] = seal_share_box(shared, owner, holder, sid, shares[row], salts[row],
                                       ctx.identity_key if r.config.active else None)
    reply = replies[owner]
    assert isinstance(reply, ShareKeysResponse)
    replies[owner] = dataclasses.replace(reply, boxes=boxes)
