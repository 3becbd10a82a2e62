"""Shared helpers for the secagg tests: configs, random ring inputs, a manual round driver."""

from __future__ import annotations

import numpy as np

from fedveil.secagg import SecAggClient, SecAggConfig, SecAggServer
from fedveil.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    Message,
    ShareKeysRequest,
)


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
