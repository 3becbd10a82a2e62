"""The parameters every party of one secure-aggregation round agrees on."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass

from fedveil.secagg.beacon import GRAPH_SEED_BYTES
from fedveil.secagg.encoding import Ring
from fedveil.secagg.errors import ConfigError
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.keys import PUBLIC_KEY_BYTES
from fedveil.secagg.threshold import DEFAULT_MAX_CORRUPT_FRACTION, cohort_bound, live_problem, threshold_problem

MAX_CLIENTS = 1 << 20


@dataclass(frozen=True)
class SecAggConfig:
    """One round's public parameters, identical at the server and every client.

    Args:
        num_clients: n; client ids are ``0 .. n-1`` (a driver maps its own names onto them).
        threshold: t; Shamir threshold over each client's h holders (neighbours + itself) and the
            minimum number of survivors. Below t remaining clients the round aborts. With c a bound
            on the colluders among the holders (:func:`~fedveil.secagg.threshold.collusion_bound`),
            active mode needs 2t > h + c and passive mode t > c, on the layout over the whole
            cohort (:meth:`threshold_problem`); at run time each client also needs enough live
            holders (:meth:`live_problem`). Pick t with
            :func:`~fedveil.secagg.threshold.plan_threshold`.
        vector_length: m, ring elements per input (including a weight coordinate if any).
        round_id: distinct per round; bound into every message, signature and the session id.
        ring_bits: k of Z_2^k (≤ 64).
        graph: masking graph, complete (SecAgg) or Harary (SecAgg+).
        active: active-adversary mode (signed keys, consistency check); needs ``identity_keys``.
        identity_keys: Ed25519 public keys (32 bytes) indexed by client id, from enrolment.
        context: free bytes (federation / task id) bound into the session id.
        max_corrupt_fraction: f; the server may control up to ⌊f·n⌋ of the n clients (in [0, 1/2);
            default 1/3). Every party must agree on it: it enters the session id and signatures.
        graph_seed: 32 bytes fixing the Harary relabelling, agreed by commit-then-reveal
            (:mod:`fedveil.secagg.beacon`) so that the server cannot choose a client's neighbours;
            required in active mode with a Harary graph. Empty: derived from the session id, which
            the clients a server controls can grind (trusted-server setups and tests only).
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
    max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION
    graph_seed: bytes = b""

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
        if not isinstance(self.threshold, int):
            raise ConfigError(f"threshold: must be an integer (got {self.threshold!r})")
        problem = self.threshold_problem()  # also validates max_corrupt_fraction
        if problem is not None:
            raise ConfigError(f"threshold: {problem} (num_clients={n}, graph={self.graph.kind}:{self.graph.degree}, "
                              f"max_corrupt_fraction={self.max_corrupt_fraction:.4g}, "
                              f"{'active' if self.active else 'passive'} mode)")
        if self.active:
            keys = self.identity_keys
            if keys is None or len(keys) != n:
                raise ConfigError(f"identity_keys: active mode needs one Ed25519 public key per client (n={n})")
            for i, key in enumerate(keys):
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise ConfigError(f"identity_keys[{i}]: expected {PUBLIC_KEY_BYTES} bytes")
        if not isinstance(self.context, bytes) or len(self.context) > 1024:
            raise ConfigError("context: expected at most 1024 bytes")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) not in (0, GRAPH_SEED_BYTES):
            raise ConfigError(f"graph_seed: expected {GRAPH_SEED_BYTES} bytes or none")
        if self.active and self.graph.kind == "harary" and not self.graph_seed:
            raise ConfigError("graph_seed: active mode with a Harary graph needs the cohort's commit-then-reveal "
                              "seed (fedveil.secagg.beacon); a seed from the advertised keys can be ground")

    @property
    def holders_and_corrupt(self) -> tuple[int, int]:
        """(h, c) of the layout over the whole cohort (:func:`~fedveil.secagg.threshold.cohort_bound`)."""
        return cohort_bound(self.num_clients, self.graph.degree, self.max_corrupt_fraction)

    def threshold_problem(self) -> str | None:
        """Why t is unsafe on the cohort's layout, or None (the rule:
        :func:`~fedveil.secagg.threshold.threshold_problem`)."""
        holders, corrupt = self.holders_and_corrupt
        return threshold_problem(self.threshold, holders, corrupt, active=self.active)

    def live_problem(self, live_holders: int) -> str | None:
        """Why a client with ``live_holders`` live holders (itself included) must refuse, or None."""
        return live_problem(live_holders, self.threshold, self.holders_and_corrupt[1])

    def box_signer(self, client_id: int) -> bytes | None:
        """The Ed25519 key that signs ``client_id``'s share boxes: its identity key in active mode,
        None in passive mode (boxes are not signed there)."""
        return self.identity_keys[client_id] if self.active and self.identity_keys else None

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    def parameters_bytes(self) -> bytes:
        """Canonical encoding of the parameters, hashed into the session id and signatures.

        The identity roster (every slot's Ed25519 key, in slot order) is part of it: a survivor-set
        signature names no slot, so a server that gave two sites differently ordered rosters could
        otherwise have one site count a signature at a slot where another site placed its signer (an
        independent attacker's finding). Different rosters now give different sessions, and such a
        round cannot complete."""
        cached = self.__dict__.get("_parameters_bytes")  # frozen: computed once, read by every check
        if cached is None:
            cached = self._encode_parameters()
            object.__setattr__(self, "_parameters_bytes", cached)
        return cached

    def _encode_parameters(self) -> bytes:
        graph = self.graph.encode()
        head = struct.pack("<IIIB?H", self.num_clients, self.threshold, self.vector_length, self.ring_bits,
                           self.active, len(graph))
        roster = b"" if self.identity_keys is None else hashlib.sha256(b"".join(self.identity_keys)).digest()
        return (head + graph + struct.pack("<H", len(self.context)) + self.context
                + struct.pack("<d", self.max_corrupt_fraction)
                + struct.pack("<B", len(self.graph_seed)) + self.graph_seed
                + struct.pack("<B", len(roster)) + roster)

    def for_round(self, round_id: int) -> SecAggConfig:
        """The same parameters for another round."""
        return dataclasses.replace(self, round_id=round_id)
