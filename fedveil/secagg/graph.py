"""Masking graphs: complete (SecAgg) and Harary / k-regular (SecAgg+), behind one interface.

In SecAgg (Bonawitz et al., CCS 2017) every pair of clients shares a mask and every client
Shamir-shares its secrets with all others: O(n) work per client, O(n²) in total. SecAgg+ (Bell,
Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) replaces the complete graph by a sparse one of degree k = O(log n): masks
and shares only travel along its edges. They use the Harary graph H(k, n) — node i adjacent to
i ± 1, …, i ± k/2 (mod n) — whose nodes are randomly relabelled so that the server cannot place
corrupt clients around a victim.

**The layout is fixed over the whole cohort, before any key is advertised.** The server decides
whose advertised keys enter the round; a layout computed over that set would let it try subsets
(dropping honest advertisers) until a victim's neighbours are mostly clients it controls. So the
Harary graph is laid out over all n cohort slots from the cohort's commit-then-reveal seed
(:mod:`fedveil.secagg.beacon`), and the clients that advertised are only its **live view**
(:class:`LiveGraph`): a slot whose keys are missing is a dropped node, never a reason to lay the
graph out again. Dropping honest advertisers can then only shrink a victim's live neighbourhood,
and a client refuses a round whose live neighbourhood is too small
(:func:`fedveil.secagg.threshold.live_problem`).

A client's **holders** are its neighbours plus itself: they receive its Shamir shares, and the
threshold t applies to that set (size h = k + 1; n for the complete graph). Against a server
that controls some clients, t must satisfy 2t > h + c for c colluders among the holders; the
bound on c and the choice of k and t live in :mod:`fedveil.secagg.threshold`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedveil.secagg.errors import ConfigError

GRAPH_KINDS = ("complete", "harary")


def is_sparse(degree: int, num_nodes: int) -> bool:
    """Whether a Harary degree gives a sparse graph on ``num_nodes`` nodes (2 ≤ k < n − 2).

    Any other degree (0, or ≥ n − 2) means the complete graph.
    """
    return 2 <= degree < num_nodes - 2


class MaskingGraph(ABC):
    """An undirected graph over client ids; masks and shares follow its edges."""

    def __init__(self, nodes: Sequence[int]) -> None:
        ids = sorted(set(int(v) for v in nodes))
        if len(ids) != len(nodes):
            raise ConfigError("nodes: client ids must be distinct")
        self.nodes: tuple[int, ...] = tuple(ids)
        self._holders: dict[int, tuple[int, ...]] = {}
        self._holder_sets: dict[int, frozenset[int]] = {}
        self._holder_arrays: dict[int, np.ndarray] = {}

    @abstractmethod
    def neighbors(self, node: int) -> tuple[int, ...]:
        """Sorted neighbours of ``node`` (never ``node`` itself)."""

    def holders(self, node: int) -> tuple[int, ...]:
        """Clients that hold ``node``'s Shamir shares: its neighbours and itself, sorted (computed
        once per node: an active client's consistency check asks for nearly every node's, twice)."""
        cached = self._holders.get(node)
        if cached is None:
            cached = self._holders[node] = tuple(sorted((*self.neighbors(node), node)))
        return cached

    def holder_set(self, node: int) -> frozenset[int]:
        """:meth:`holders` as a set, computed once per node."""
        cached = self._holder_sets.get(node)
        if cached is None:
            cached = self._holder_sets[node] = frozenset(self.holders(node))
        return cached

    def holder_array(self, node: int) -> np.ndarray:
        """:meth:`holders` as a read-only int64 array, computed once per node (vector code counts
        quorums over hundreds of holder sets: :mod:`fedveil.secagg.survivor_checks`)."""
        cached = self._holder_arrays.get(node)
        if cached is None:
            cached = np.asarray(self.holders(node), dtype=np.int64)
            cached.flags.writeable = False
            self._holder_arrays[node] = cached
        return cached

    def holders_of_all(self, nodes: Sequence[int]) -> np.ndarray:
        """The holders of each of ``nodes``, concatenated (a node held by several appears once per holder set)."""
        if not nodes:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.holder_array(node) for node in nodes])

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
        self._order = np.asarray(self.nodes, dtype=np.int64)[order]
        self._position = {int(node): p for p, node in enumerate(self._order.tolist())}
        half = degree // 2
        self._offsets = np.array([d for d in range(-half, half + 1) if d], dtype=np.int64)
        self._cache: dict[int, tuple[int, ...]] = {}  # neighbours, computed on demand (O(k) per node)

    @property
    def degree(self) -> int:
        return self._degree

    def neighbors(self, node: int) -> tuple[int, ...]:
        cached = self._cache.get(node)
        if cached is None:
            ring = (self._position[node] + self._offsets) % len(self._order)
            cached = self._cache[node] = tuple(np.sort(self._order[ring]).tolist())
        return cached


@dataclass(frozen=True)
class GraphSpec:
    """Which masking graph to build: ``kind`` is ``"complete"`` or ``"harary"`` with ``degree``.

    A Harary degree of at least n − 2 on the n cohort slots degenerates to the complete graph,
    which :func:`cohort_layout` then uses.
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
        """Size of every client's holder set (neighbours + itself) in the layout over ``num_nodes``."""
        return self.degree + 1 if self.sparse(num_nodes) else num_nodes

    def sparse(self, num_nodes: int) -> bool:
        """Whether the graph on ``num_nodes`` nodes is a sparse Harary graph (else complete)."""
        return self.kind == "harary" and is_sparse(self.degree, num_nodes)


class LiveGraph(MaskingGraph):
    """The live view of a layout fixed over the whole cohort: its edges among the ``live`` nodes.

    A node's neighbours here are its layout neighbours that are live (advertised keys); the
    others count as dropped. ``degree`` is the layout's: a live node may have fewer neighbours.
    """

    def __init__(self, layout: MaskingGraph, live: Sequence[int]) -> None:
        super().__init__(live)
        outside = set(self.nodes).difference(layout.nodes)
        if outside:
            raise ConfigError(f"live: nodes {sorted(outside)[:5]} are not in the cohort's layout")
        self.layout = layout
        self._live = frozenset(self.nodes)
        self._cache: dict[int, tuple[int, ...]] = {}

    def neighbors(self, node: int) -> tuple[int, ...]:
        cached = self._cache.get(node)
        if cached is None:
            if node not in self._live:
                raise ConfigError(f"node: {node} is not live in this round")
            cached = self._cache[node] = tuple(filter(self._live.__contains__, self.layout.neighbors(node)))
        return cached

    @property
    def degree(self) -> int:
        return self.layout.degree


def cohort_layout(spec: GraphSpec, num_clients: int, permutation_seed: bytes) -> MaskingGraph:
    """The graph over all ``num_clients`` cohort slots (ids 0..n-1) under ``spec``."""
    nodes = list(range(num_clients))
    if not spec.sparse(num_clients):
        return CompleteGraph(nodes)
    return HararyGraph(nodes, spec.degree, permutation_seed)


def build_graph(spec: GraphSpec, num_clients: int, live: Sequence[int], permutation_seed: bytes) -> LiveGraph:
    """The live view (``live``: the clients that advertised keys) of the cohort's fixed layout.

    Memoized on its inputs: the graph is a pure function of them, public, and read-only to its
    users (only its own caches fill in), so the sites of one process that see the same round
    (a simulation's pool worker hosts hundreds) share one graph and its neighbour lists instead of
    each laying out the cohort and walking nearly every node's holders again."""
    return _live_graph(spec, int(num_clients), tuple(int(v) for v in live), bytes(permutation_seed))


@functools.lru_cache(maxsize=16)
def _live_graph(spec: GraphSpec, num_clients: int, live: tuple[int, ...], permutation_seed: bytes) -> LiveGraph:
    return LiveGraph(cohort_layout(spec, num_clients, permutation_seed), live)
