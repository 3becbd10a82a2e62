"""Masking graphs: complete (SecAgg) and Harary / k-regular (SecAgg+), behind one interface.

In SecAgg (Bonawitz et al., CCS 2017) every pair of clients shares a mask and every client
Shamir-shares its secrets with all others: O(n) work per client, O(n²) in total. SecAgg+ (Bell,
Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) replaces the complete graph by a sparse one of degree k = O(log n): masks
and shares only travel along its edges. They use the Harary graph H(k, n) — node i adjacent to
i ± 1, …, i ± k/2 (mod n) — whose nodes are randomly relabelled so that the server cannot place
corrupt clients around a victim. Here the relabelling is derived from the session id, which
hashes every advertised key, so it is fixed only once all keys are in and all parties compute
the same graph without another message.

A client's **holders** are its neighbours plus itself: they receive its Shamir shares, and the
threshold t applies to that set (size k + 1; n for the complete graph).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedveil.secagg.errors import ConfigError

GRAPH_KINDS = ("complete", "harary")


class MaskingGraph(ABC):
    """An undirected graph over client ids; masks and shares follow its edges."""

    def __init__(self, nodes: Sequence[int]) -> None:
        ids = sorted(set(int(v) for v in nodes))
        if len(ids) != len(nodes):
            raise ConfigError("nodes: client ids must be distinct")
        self.nodes: tuple[int, ...] = tuple(ids)

    @abstractmethod
    def neighbors(self, node: int) -> tuple[int, ...]:
        """Sorted neighbours of ``node`` (never ``node`` itself)."""

    def holders(self, node: int) -> tuple[int, ...]:
        """Clients that hold ``node``'s Shamir shares: its neighbours and itself, sorted."""
        return tuple(sorted((*self.neighbors(node), node)))

    @property
    @abstractmethod
    def degree(self) -> int:
        """Number of neighbours of every node."""


class CompleteGraph(MaskingGraph):
    """SecAgg: every client is a neighbour of every other."""

    def neighbors(self, node: int) -> tuple[int, ...]:
        return tuple(v for v in self.nodes if v != node)

    @property
    def degree(self) -> int:
        return len(self.nodes) - 1


class HararyGraph(MaskingGraph):
    """SecAgg+: the Harary graph H(k, n) on randomly permuted nodes (k even, k < n − 1)."""

    def __init__(self, nodes: Sequence[int], degree: int, permutation_seed: bytes) -> None:
        super().__init__(nodes)
        n = len(self.nodes)
        if degree % 2 or not 2 <= degree < n - 1:
            raise ConfigError(f"degree: a Harary graph needs an even degree in 2..n-2 (got {degree} for n={n})")
        self._degree = degree
        from fedveil.secagg.prg import expand

        # Random relabelling: position p in the cycle holds node order[p]; argsort of 64-bit
        # AES-CTR words is a uniform permutation up to a negligible collision probability.
        keys = expand(permutation_seed, n, np.uint64)
        order = np.argsort(keys, kind="stable")
        self._order = [self.nodes[int(i)] for i in order]
        self._position = {node: p for p, node in enumerate(self._order)}
        self._cache: dict[int, tuple[int, ...]] = {}  # neighbours, computed on demand (O(k) per node)

    @property
    def degree(self) -> int:
        return self._degree

    def neighbors(self, node: int) -> tuple[int, ...]:
        cached = self._cache.get(node)
        if cached is None:
            p = self._position[node]
            n = len(self._order)
            half = self._degree // 2
            cached = tuple(sorted(self._order[(p + d) % n] for d in range(-half, half + 1) if d))
            self._cache[node] = cached
        return cached


@dataclass(frozen=True)
class GraphSpec:
    """Which masking graph to build: ``kind`` is ``"complete"`` or ``"harary"`` with ``degree``.

    A Harary degree of at least n − 1 (or n − 2 for even k rounding) degenerates to the complete
    graph, which :func:`build_graph` then uses.
    """

    kind: str = "complete"
    degree: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GRAPH_KINDS:
            raise ConfigError(f"graph: kind must be one of {GRAPH_KINDS} (got {self.kind!r})")
        if self.kind == "harary" and (self.degree < 2 or self.degree % 2):
            raise ConfigError(f"graph: harary degree must be even and >= 2 (got {self.degree})")

    def encode(self) -> bytes:
        return f"{self.kind}:{self.degree}".encode()

    def holders_count(self, num_nodes: int) -> int:
        """Size of every client's holder set (neighbours + itself) on ``num_nodes`` nodes."""
        if self.kind == "complete" or self.degree >= num_nodes - 2:
            return num_nodes
        return self.degree + 1


def build_graph(spec: GraphSpec, nodes: Sequence[int], permutation_seed: bytes) -> MaskingGraph:
    """The graph for ``nodes`` (the clients that advertised keys) under ``spec``."""
    if spec.kind == "complete" or spec.degree >= len(nodes) - 2:
        return CompleteGraph(nodes)
    return HararyGraph(nodes, spec.degree, permutation_seed)


# --- choosing k and t ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphParameters:
    """Degree and threshold chosen by :func:`secagg_plus_parameters`, with the bounds they meet."""

    degree: int
    threshold: int
    failure_log2: float
    """log2 of the union bound on the probability that some neighbourhood loses too many holders."""
    leak_log2: float
    """log2 of the union bound on the probability that some neighbourhood has t corrupt holders."""

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec("harary", self.degree) if self.degree > 0 else GraphSpec("complete")


def _log2_binom_tail_ge(n: int, p: float, t: int) -> float:
    """log2 P[Binomial(n, p) ≥ t], exactly (log-sum-exp over the terms)."""
    if t <= 0:
        return 0.0
    if t > n or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(t, n + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(v - top) for v in terms))) / math.log(2)


def secagg_plus_parameters(num_clients: int, dropout_rate: float, corruption_rate: float = 0.05, *,
                           security_bits: float = 40.0, correctness_bits: float = 20.0) -> GraphParameters:
    """Smallest even degree k and a threshold t for SecAgg+ on ``num_clients`` clients.

    Derivation (the conditions of Bell et al., CCS 2020, §3–4, checked here with exact binomial
    tails and a union bound over the n clients instead of their asymptotic constants). Each
    client's secrets are Shamir-shared among its h = k + 1 holders (neighbours and itself);
    holders drop out independently with probability δ = ``dropout_rate`` and are corrupt
    (colluding with the server) independently with probability γ = ``corruption_rate``:

    1. **Correctness** — every needed secret must be recoverable, i.e. at least t of its h
       holders survive: n · P[Bin(h, 1 − δ) < t] ≤ 2^−η (η = ``correctness_bits``).
    2. **Privacy against collusion** — no client's secret may be reconstructible by corrupt
       holders alone: n · P[Bin(h, γ) ≥ t] ≤ 2^−σ (σ = ``security_bits``).
    3. **No double reconstruction** — t > h / 2, so two disjoint sets of honest holders can never
       both reach t; together with the clients' refusal to reveal both kinds of share for one
       peer, the server cannot obtain a survivor's self-mask seed and its masking key.

    The search takes the smallest even k in 2..n−3 for which some t satisfies all three (t is
    then the smallest such t, which maximises the tolerated dropouts). When no sparse graph
    qualifies — always for small n — it falls back to the complete graph (degree reported as
    0, h = n; a single neighbourhood, so no union bound) with the smallest t meeting the same
    conditions. Small cohorts often cannot meet both bounds at once; then t is the majority
    ⌊n/2⌋ + 1 of Bonawitz et al.'s honest-but-curious setting, and ``failure_log2`` /
    ``leak_log2`` report how far the result is from the requested bits. The Harary graph is
    k-connected, so removing fewer than k clients cannot split the survivors into separately
    unmaskable parts.
    """
    n = num_clients
    if n < 2:
        raise ConfigError(f"num_clients: need at least 2 clients (got {n})")
    if not 0.0 <= dropout_rate < 1.0:
        raise ConfigError(f"dropout_rate: must be in [0, 1) (got {dropout_rate})")
    if not 0.0 <= corruption_rate < 1.0:
        raise ConfigError(f"corruption_rate: must be in [0, 1) (got {corruption_rate})")
    log2n = math.log2(n)

    def pick(h: int, union: float) -> tuple[int, float, float] | None:
        for t in range(h // 2 + 1, h + 1):
            leak = union + _log2_binom_tail_ge(h, corruption_rate, t)
            if leak > -security_bits:
                continue
            # P[Bin(h, 1-δ) < t] = P[Bin(h, δ) ≥ h - t + 1]
            fail = union + _log2_binom_tail_ge(h, dropout_rate, h - t + 1)
            if fail <= -correctness_bits:
                return t, fail, leak
            return None  # larger t only makes correctness worse
        return None

    for k in range(2, n - 2, 2):
        found = pick(k + 1, log2n)
        if found is not None:
            t, fail, leak = found
            return GraphParameters(k, t, fail, leak)
    # Complete graph: one neighbourhood shared by all, so no union bound over clients.
    found = pick(n, 0.0)
    if found is None:
        t = n // 2 + 1
        found = (t, _log2_binom_tail_ge(n, dropout_rate, n - t + 1), _log2_binom_tail_ge(n, corruption_rate, t))
    t, fail, leak = found
    return GraphParameters(0, t, fail, leak)
