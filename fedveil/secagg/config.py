"""The parameters every party of one secure-aggregation round agrees on."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from fedveil.secagg.encoding import Ring
from fedveil.secagg.errors import ConfigError
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.keys import PUBLIC_KEY_BYTES

MAX_CLIENTS = 1 << 20


@dataclass(frozen=True)
class SecAggConfig:
    """One round's public parameters, identical at the server and every client.

    Args:
        num_clients: n; client ids are ``0 .. n-1`` (a driver maps its own names onto them).
        threshold: t; Shamir threshold over each client's holders (neighbours + itself) and the
            minimum number of survivors. Below t remaining clients the round aborts. Active mode
            needs a majority, t > holders / 2 (see :func:`~fedveil.secagg.session.check_majority`).
        vector_length: m, ring elements per input (including a weight coordinate if any).
        round_id: distinct per round; bound into every message, signature and the session id.
        ring_bits: k of Z_2^k (≤ 64).
        graph: masking graph, complete (SecAgg) or Harary (SecAgg+).
        active: active-adversary mode (signed keys, consistency check); needs ``identity_keys``.
        identity_keys: Ed25519 public keys (32 bytes) indexed by client id, from enrolment.
        context: free bytes (federation / task id) bound into the session id.
    """

    num_clients: int
    threshold: int
    vector_length: int
    round_id: int = 0
    ring_bits: int = 32
    graph: GraphSpec = dataclasses.field(default_factory=GraphSpec)
    active: bool = False
    identity_keys: tuple[bytes, ...] | None = None
    context: bytes = b""

    def __post_init__(self) -> None:
        n = self.num_clients
        if not isinstance(n, int) or not 2 <= n <= MAX_CLIENTS:
            raise ConfigError(f"num_clients: must be an integer in 2..{MAX_CLIENTS} (got {n!r})")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigError(f"vector_length: must be an integer >= 1 (got {self.vector_length!r})")
        if not isinstance(self.round_id, int) or not 0 <= self.round_id < (1 << 64):
            raise ConfigError(f"round_id: must be an integer in 0..2^64-1 (got {self.round_id!r})")
        Ring(self.ring_bits)
        if not isinstance(self.graph, GraphSpec):
            raise ConfigError(f"graph: expected a GraphSpec (got {type(self.graph).__name__})")
        holders = self.graph.holders_count(n)
        if not isinstance(self.threshold, int) or not 2 <= self.threshold <= holders:
            raise ConfigError(f"threshold: must be an integer in 2..{holders} (the holders of each client's "
                              f"shares for num_clients={n}, graph={self.graph.kind}:{self.graph.degree}) "
                              f"(got {self.threshold!r})")
        if self.active:
            if 2 * self.threshold <= holders:
                raise ConfigError(
                    f"threshold: active mode needs t > holders / 2 = {holders}/2 (got {self.threshold}); with "
                    "2t <= holders a server can show two groups of holders different survivor sets, collect t "
                    "signatures for each, and gather t self-mask shares and t masking-key shares of one client")
            keys = self.identity_keys
            if keys is None or len(keys) != n:
                raise ConfigError(f"identity_keys: active mode needs one Ed25519 public key per client (n={n})")
            for i, key in enumerate(keys):
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise ConfigError(f"identity_keys[{i}]: expected {PUBLIC_KEY_BYTES} bytes")
        if not isinstance(self.context, bytes) or len(self.context) > 1024:
            raise ConfigError("context: expected at most 1024 bytes")

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    def parameters_bytes(self) -> bytes:
        """Canonical encoding of the parameters, hashed into the session id and signatures."""
        graph = self.graph.encode()
        head = struct.pack("<IIIB?H", self.num_clients, self.threshold, self.vector_length, self.ring_bits,
                           self.active, len(graph))
        return head + graph + struct.pack("<H", len(self.context)) + self.context

    def for_round(self, round_id: int) -> SecAggConfig:
        """The same parameters for another round."""
        return dataclasses.replace(self, round_id=round_id)
