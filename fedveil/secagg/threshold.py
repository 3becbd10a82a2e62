"""Secure-aggregation thresholds that hold against collusion: the one place the rule lives.

**The rule.** Each client's two secrets (self-mask seed, masking key) are Shamir-shared among
its h *holders* (its neighbours in the masking graph and itself) with threshold t. An honest
holder reveals one kind of share per peer: the self-mask share of a survivor or the
masking-key share of a dropout, never both. To unmask one victim's input, a malicious server
needs t shares of each kind, so it must split the victim's honest holders into two groups
shown different survivor sets (one with the victim, one without), topped up by the c
colluding holders, who reveal both kinds: groups of a and b honest holders with a + b ≤ h − c,
a + c ≥ t and b + c ≥ t. Such a split exists exactly when 2t ≤ h + c, so every threshold must
satisfy **2t > h + c** (Bonawitz et al., CCS 2017, §6: t > 2n/3 for fewer than n/3 corrupt
clients is this rule on the complete graph). A bare majority t > h/2 is the case c = 0 only;
one colluder that signed both survivor sets broke it. Honest-but-curious (passive) mode needs
only t > c: the colluders alone must not reconstruct a secret.

**The model.** The server may control up to a fraction f (``max_corrupt_fraction``, default
1/3) of a round's cohort of n clients, C = ⌊f·n⌋ colluders; f ≥ 1/2 admits no threshold. c bounds
the colluders among one honest client's holders:

- complete graph (SecAgg; h = n): c = C, always;
- Harary graph H(k, n) (SecAgg+; h = k + 1): the n cohort slots are permuted by a permutation
  drawn from the cohort's commit-then-reveal seed, fixed before any key is advertised, so an
  honest victim's k neighbours are a uniformly random k-subset of the other n − 1 slots, and the
  colluders among them follow the hypergeometric law H(N = n − 1, K = C, k). c is the smallest
  value with n · P[H > c] ≤ 2^−σ (σ = ``security_bits``; union bound over the n possible
  victims, as in Bell et al., CCS 2020, §4), computed with exact tails.

**Honest neighbours.** Colluders that may be all of a client's neighbours (c ≥ h − 1) know its
pairwise masks: no threshold helps, so c < h − 1 is required too (:func:`surround_problem`; a
sparse graph needs enough degree). Then the smallest t of the rule is at least c + 2, so every
honest survivor keeps an honest surviving neighbour whichever clients the server declares
dropped.

**Advertisers: a live view, never a new layout.** The server decides whose advertised keys enter
the round. The layout is therefore fixed over all n cohort slots from the cohort's
commit-then-reveal seed before any key is advertised (:mod:`fedveil.secagg.graph`), so c is sized
for the whole cohort; clients that do not advertise are dropped nodes. Dropping honest
advertisers cannot add colluders to a victim's holders, it only shrinks its live holders, and
every client refuses a round in which its live holders are too few (:func:`live_problem`): fewer
than t, or so few that its c colluders could be all of its live neighbours. (With 2t > h + c on
the full layout, 2t > h_live + c holds for any live subset.) An earlier design laid the graph out
over the advertisers; a server that knew the seed could then choose which honest advertisers to
drop until a victim's neighbours held more than c colluders (tests/test_attack_graph_grinding.py).
What grinding power remains: one fresh layout per attempt a site joins (its policy caps
attempts per round, :mod:`fedveil.clients.site_state`), so over R rounds and A attempts the
collusion bound fails with probability at most R · A · 2^−σ.

**Correctness.** With independent dropout δ, a round fails when fewer than t of some client's h
holders survive: P[Bin(h, δ) ≥ h − t + 1], with a union bound over the n clients for Harary
graphs. :func:`plan_threshold` reports it (small cohorts cannot meet 2^−η at once with the rule)
and picks the smallest even Harary degree for which it meets η (``correctness_bits``).

Pure functions of their arguments (no I/O, no global state); ``math`` only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

from fedveil.secagg.errors import ConfigError
from fedveil.secagg.graph import GRAPH_KINDS, GraphSpec, is_sparse

DEFAULT_MAX_CORRUPT_FRACTION = 1.0 / 3.0
DEFAULT_SECURITY_BITS = 40.0
"""σ for the collusion bound; also what configurations and run-time checks enforce."""
DEFAULT_CORRECTNESS_BITS = 20.0
DEFAULT_EXPECTED_DROPOUT = 0.1
MAX_COHORT = 1 << 20
"""The largest cohort n any party plans or accepts (``SecAggConfig`` refuses more clients too).

:func:`collusion_bound` walks the hypergeometric tail one term at a time, so its work grows
linearly with the n and k it is given: about 0.4 s at n = 10^6 and k = n/2 here. A site computes it
from the server's ``cohort_size`` and ``degree`` at admission, before it has checked anything that
costs O(n) (with a trusted server no credential list bounds n), so n is bounded first: at this
bound one distinct (n, k) costs a site under half a second, where a uint32 n cost it about 25
minutes. :func:`cohort_problem` says why a server's (n, k) is refused."""
_LN2 = math.log(2.0)


# --- exact tails in log space --------------------------------------------------------------------

def _ln_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _ln_add(a: float, b: float) -> float:
    """ln(e^a + e^b) without overflow."""
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def log2_binomial_tail(n: int, p: float, t: int) -> float:
    """log2 P[Bin(n, p) ≥ t], exactly (log-sum-exp over the terms).

    Past the mode the terms fall, so the sum stops once one is below e^−60 / n of the total:
    the rest cannot change it beyond that relative amount.
    """
    if t <= 0 or p >= 1.0:
        return 0.0
    if t > n or p <= 0.0:
        return -math.inf
    ln_p, ln_q, mode = math.log(p), math.log1p(-p), (n + 1) * p
    cut = 60.0 + math.log(n)
    total = -math.inf
    for i in range(t, n + 1):
        term = _ln_comb(n, i) + i * ln_p + (n - i) * ln_q
        total = _ln_add(total, term)
        if i > mode and term < total - cut:
            break
    return min(0.0, total / _LN2)


def _ln_hypergeometric_pmf(population: int, successes: int, draws: int, i: int) -> float:
    return (_ln_comb(successes, i) + _ln_comb(population - successes, draws - i)
            - _ln_comb(population, draws))


def log2_hypergeometric_tail(population: int, successes: int, draws: int, c: int) -> float:
    """log2 P[H > c] for H ~ Hypergeometric(N = population, K = successes, draws), exactly."""
    lo, hi = max(0, draws - (population - successes)), min(draws, successes)
    if c < lo:
        return 0.0
    total = -math.inf
    for i in range(c + 1, hi + 1):
        total = _ln_add(total, _ln_hypergeometric_pmf(population, successes, draws, i))
    return min(0.0, total / _LN2)


# --- the rule --------------------------------------------------------------------------------------

def cohort_problem(num_clients: int, degree: int, graph: str = "harary") -> tuple[str, str] | None:
    """Why a cohort of ``num_clients`` laid out as ``graph`` with ``degree`` is refused, as
    ``(parameter, reason)`` with parameter ``"num_clients"`` or ``"degree"``, or None.

    O(1), and what a party checks of the server's numbers before :func:`cohort_bound` runs (its
    work grows with n and k): n must be an integer in 2..:data:`MAX_COHORT`, and a Harary degree
    an integer below n (n − 2 and n − 1 are the complete graph, :func:`is_sparse`; whether it is
    even is :class:`~fedveil.secagg.graph.GraphSpec`'s check). The degree of any other graph is
    not read.
    """
    n, k = num_clients, degree
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_COHORT:
        return "num_clients", f"must be an integer in 2..{MAX_COHORT} (got {n!r})"
    if graph != "harary":
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        return "degree", f"a Harary degree must be an integer in 0..n-1 = {n - 1} (got {k!r})"
    return None


def _check_fraction(f: float) -> None:
    if not (isinstance(f, (int, float)) and 0.0 <= f < 0.5):
        raise ConfigError(f"max_corrupt_fraction: must be in [0, 1/2) (got {f!r}); with half of the clients "
                          "colluding no threshold keeps a client's input private")


def corrupt_clients(num_clients: int, max_corrupt_fraction: float) -> int:
    """C = ⌊f·n⌋ (a 1e-9 tolerance keeps e.g. 1/3 · 9 at 3 despite rounding; it only errs upwards)."""
    _check_fraction(max_corrupt_fraction)
    return math.floor(max_corrupt_fraction * num_clients + 1e-9)


@functools.lru_cache(maxsize=1 << 10)
def collusion_bound(num_clients: int, degree: int, max_corrupt_fraction: float, *,
                    security_bits: float = DEFAULT_SECURITY_BITS) -> tuple[int, float]:
    """``(c, log2_failure)``: a bound c on the colluders among one honest client's holders.

    ``num_clients`` is the cohort (the layout's nodes) and ``degree`` its Harary degree (0, or
    ≥ n − 2: the complete graph). At most ⌊f·n⌋ clients collude. Complete graph: c = that
    count, ``log2_failure`` = −inf. Harary graph: the smallest c with
    n · P[H > c] ≤ 2^−``security_bits``, H ~ Hypergeometric(n − 1, colluders, k), and
    ``log2_failure`` = log2 of that union bound (see the module docstring).
    """
    n = num_clients
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"num_clients: need at least 2 clients (got {n!r})")
    if n > MAX_COHORT:  # the tail walk below is linear in n (see MAX_COHORT)
        raise ConfigError(f"num_clients: at most {MAX_COHORT} clients (got {n})")
    if not isinstance(degree, int) or degree < 0:
        raise ConfigError(f"degree: must be an integer >= 0 (got {degree!r})")
    if not (math.isfinite(security_bits) and security_bits > 0):
        raise ConfigError(f"security_bits: must be a positive number (got {security_bits!r})")
    colluders = min(corrupt_clients(n, max_corrupt_fraction), n - 1)  # an honest victim is not one
    if not is_sparse(degree, n):
        return colluders, -math.inf
    union = math.log2(n)
    c = min(colluders, degree)  # P[H > min(K, k)] = 0
    failure, tail = -math.inf, -math.inf  # tail: ln P[H >= c], summed from the top
    least = max(0, degree - (n - 1 - colluders))  # H cannot be smaller: P[H > least − 1] = 1
    while c > least:  # the tail grows as c falls: stop before it exceeds 2^-σ
        tail = _ln_add(tail, _ln_hypergeometric_pmf(n - 1, colluders, degree, c))
        smaller = union + min(0.0, tail / _LN2)  # log2 of n · P[H > c − 1]
        if smaller > -security_bits:
            break
        c, failure = c - 1, smaller
    return c, failure


def cohort_bound(num_clients: int, degree: int, max_corrupt_fraction: float, *,
                 security_bits: float = DEFAULT_SECURITY_BITS) -> tuple[int, int]:
    """``(h, c)`` for the layout over a cohort of ``num_clients``: the holders of each client's
    shares (k + 1 for a sparse Harary degree k, else n) and the bound on colluders among them.

    The one place every party derives them from the round's (n, k, f): the config checks, the
    client's state machine and its site policy, the planner and the bench.
    """
    k = degree if is_sparse(degree, num_clients) else 0
    c, _failure = collusion_bound(num_clients, k, max_corrupt_fraction, security_bits=security_bits)
    return (k + 1 if k else num_clients), c


def min_threshold(holders: int, corrupt: int) -> int:
    """The smallest t with 2t > h + c: ⌊(h + c)/2⌋ + 1 (at most h, since c < h)."""
    if not isinstance(holders, int) or holders < 1:
        raise ConfigError(f"holders: must be an integer >= 1 (got {holders!r})")
    if not isinstance(corrupt, int) or not 0 <= corrupt < holders:
        raise ConfigError(f"corrupt: must be an integer in 0..holders-1 = {holders - 1} (got {corrupt!r})")
    return (holders + corrupt) // 2 + 1


def surround_problem(holders: int, corrupt: int) -> str | None:
    """Why c colluders could surround a client (c ≥ h − 1: all its neighbours), or None.

    Then they know every pairwise mask of the client, and the self-mask seed it rightly lets the
    server reconstruct as a survivor exposes its input, whatever t. With c < h − 1 and the
    smallest t of the rule, t ≥ c + 2: every honest survivor keeps an honest surviving
    neighbour, so the server only learns sums over several honest inputs.
    """
    if corrupt >= holders - 1:
        return (f"c={corrupt} colluders may be all {holders - 1} neighbours of a client (h={holders} holders): they "
                "know its pairwise masks, so no threshold protects its input; use a larger degree")
    return None


def threshold_problem(threshold: int, holders: int, corrupt: int, *, active: bool = True) -> str | None:
    """Why t is unsafe for h holders with c colluders among them, or None when it is safe.

    Active mode: 2t > h + c. Passive (honest-but-curious) mode: t > c. Both: 2 ≤ t ≤ h, and
    c < h − 1 (:func:`surround_problem`).
    """
    t, h, c = threshold, holders, corrupt
    surrounded = surround_problem(h, c)
    if surrounded is not None:
        return surrounded
    if t > h:
        return f"t={t} exceeds the h={h} holders of each client's shares"
    if t < 2:
        return f"t={t} is below 2"
    if active and 2 * t <= h + c:
        return (f"t={t} does not satisfy 2t > h + c = {h} + {c} (h holders of each client's shares, c colluders "
                f"among them); the smallest safe t is {min_threshold(h, c)}. With 2t <= h + c a server can show two "
                "groups of holders different survivor sets and collect t self-mask shares and t masking-key "
                "shares of one client")
    if not active and t <= c:
        return f"t={t} does not exceed the c={c} colluders among a client's h={h} holders (they could reconstruct)"
    return None


def live_problem(live_holders: int, threshold: int, corrupt: int) -> str | None:
    """Why a client must refuse a round in which ``live_holders`` of its holders (itself included)
    are live, or None.

    Fewer than t live holders cannot reconstruct its secrets (the round would fail anyway); and
    if its live neighbours number at most c, the colluders could be all of them: they would know
    every pairwise mask it adds, and the self-mask seed honest holders rightly reveal for a
    survivor would expose its input (:func:`surround_problem` on the live view).
    """
    if live_holders < threshold:
        return (f"only {live_holders} of its holders are live (advertised keys and kept them), fewer than "
                f"threshold t={threshold}")
    if live_holders - 1 <= corrupt:
        return (f"its {live_holders - 1} live neighbours could all be among the c={corrupt} colluders it must "
                "assume; the server could then learn its input from the masks they know")
    return None


def satisfies(threshold: int, holders: int, corrupt: int, *, active: bool = True) -> bool:
    """Whether t is safe (see :func:`threshold_problem`)."""
    return threshold_problem(threshold, holders, corrupt, active=active) is None


# --- planning ----------------------------------------------------------------------------------------

def _log2_dropout_failure(n: int, degree: int, threshold: int, dropout: float) -> float:
    """log2 of (n ·) P[fewer than t of a client's h holders survive], union over n for Harary."""
    h = n if degree == 0 else degree + 1
    tail = log2_binomial_tail(h, dropout, h - threshold + 1)  # ≥ h − t + 1 of h holders drop
    return tail if degree == 0 else min(0.0, math.log2(n) + tail)


@dataclass(frozen=True)
class ThresholdPlan:
    """A masking graph and a threshold for one cohort, with the bounds they meet."""

    num_clients: int
    """n, the cohort."""
    degree: int
    """Harary degree k; 0 for the complete graph."""
    holders: int
    """h, the holders of each client's shares (k + 1, or n)."""
    corrupt: int
    """c, the bound on colluders among a client's holders."""
    threshold: int
    """t; 2t > h + c unless an explicit passive-mode threshold was accepted with t > c."""
    max_corrupt_fraction: float
    collusion_failure_log2: float
    """log2 of the (union-bound) probability that more than c colluders hold some client's shares."""
    dropout_failure_log2: float
    """log2 of the (union-bound) probability that fewer than t of some client's holders survive."""
    expected_dropout: float
    security_bits: float = DEFAULT_SECURITY_BITS
    correctness_bits: float = DEFAULT_CORRECTNESS_BITS

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec("harary", self.degree) if self.degree else GraphSpec("complete")

    def with_threshold(self, threshold: int, *, active: bool = True) -> ThresholdPlan:
        """The same graph with an explicit t, validated (:class:`ConfigError` naming ``threshold``)."""
        if not isinstance(threshold, int):
            raise ConfigError(f"threshold: must be an integer (got {threshold!r})")
        problem = threshold_problem(threshold, self.holders, self.corrupt, active=active)
        if problem is not None:
            raise ConfigError(f"threshold: {problem} ({self._where()}, "
                              f"{'active' if active else 'passive'} mode)")
        return replace(self, threshold=threshold, dropout_failure_log2=_log2_dropout_failure(
            self.num_clients, self.degree, threshold, self.expected_dropout))

    def _where(self) -> str:
        graph = f"harary k={self.degree}" if self.degree else "complete graph"
        return f"n={self.num_clients}, {graph}, f={self.max_corrupt_fraction:.4g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; an impossible event's log2 probability (−inf) becomes None."""
        out: dict[str, Any] = {
            "num_clients": self.num_clients, "degree": self.degree, "holders": self.holders,
            "corrupt_bound": self.corrupt, "threshold": self.threshold,
            "max_corrupt_fraction": self.max_corrupt_fraction, "expected_dropout": self.expected_dropout,
        }
        for key in ("collusion_failure_log2", "dropout_failure_log2"):
            value = getattr(self, key)
            out[key] = None if value == -math.inf else value
        return out

    def describe(self) -> str:
        """One line for logs: ``n=…, k=…, h=…, t=…, c=…, collusion failure 2^…, dropout failure 2^…``."""
        def p(v: float) -> str:
            return "0" if v == -math.inf else f"2^{v:.1f}"

        k = str(self.degree) if self.degree else "complete"
        return (f"n={self.num_clients}, k={k}, h={self.holders}, t={self.threshold}, c={self.corrupt} "
                f"(f={self.max_corrupt_fraction:.4g}), collusion failure {p(self.collusion_failure_log2)}, "
                f"dropout failure {p(self.dropout_failure_log2)} (dropout {self.expected_dropout:g})")


def plan_threshold(num_clients: int, graph: str = "complete", *, degree: int = 0,
                   expected_dropout: float = DEFAULT_EXPECTED_DROPOUT,
                   max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION,
                   security_bits: float = DEFAULT_SECURITY_BITS, correctness_bits: float = DEFAULT_CORRECTNESS_BITS,
                   threshold: int = 0, active: bool = True) -> ThresholdPlan:
    """Graph and threshold for a cohort of ``num_clients`` under the collusion rule.

    ``graph="complete"``: h = n, c = ⌊f·n⌋. ``graph="harary"``: the given even ``degree`` (a
    degree ≥ n − 2 is the complete graph), or with ``degree=0`` the smallest even k for which
    the collusion bound holds at 2^−``security_bits``, leaves every client an honest neighbour
    (c < k), and every client keeps t holders with probability 1 − 2^−``correctness_bits`` —
    falling back to the complete graph when none does (always for small cohorts).

    ``threshold=0`` takes the smallest safe t (the active-mode rule, also in passive mode:
    secure by default); an explicit t is validated instead — 2t > h + c in active mode, only
    t > c with ``active=False`` — and the graph is chosen as for ``threshold=0``. The dropout
    failure is reported, never enforced, for a given graph; a given degree whose colluders could
    be all of a client's neighbours is refused (``degree``).
    """
    n = num_clients
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"num_clients: need at least 2 clients (got {n!r})")
    if graph not in GRAPH_KINDS:
        raise ConfigError(f"graph: must be one of {GRAPH_KINDS} (got {graph!r})")
    if not isinstance(degree, int) or degree < 0 or degree % 2 or (graph == "complete" and degree):
        raise ConfigError(f"degree: must be 0 (derive) or an even Harary degree >= 2 (got {degree!r} "
                          f"for graph {graph!r})")
    if not (isinstance(expected_dropout, (int, float)) and 0.0 <= expected_dropout < 1.0):
        raise ConfigError(f"expected_dropout: must be in [0, 1) (got {expected_dropout!r})")
    _check_fraction(max_corrupt_fraction)
    for name, bits in (("security_bits", security_bits), ("correctness_bits", correctness_bits)):
        if not (math.isfinite(bits) and bits > 0):
            raise ConfigError(f"{name}: must be a positive number (got {bits!r})")

    def make(k: int) -> ThresholdPlan:
        k = k if is_sparse(k, n) else 0
        # c for the layout over the whole cohort (advertisers are a live view of it); dropouts at
        # any stage, before advertising included, count against the dropout failure.
        c, leak = collusion_bound(n, k, max_corrupt_fraction, security_bits=security_bits)
        h = k + 1 if k else n
        t = min_threshold(h, c)
        fail = _log2_dropout_failure(n, k, t, expected_dropout)
        return ThresholdPlan(n, k, h, c, t, max_corrupt_fraction, leak, fail, expected_dropout,
                             security_bits, correctness_bits)

    if graph == "complete" or degree:
        plan = make(degree)
        surrounded = surround_problem(plan.holders, plan.corrupt)
        if surrounded is not None:
            raise ConfigError(f"degree: {surrounded} (n={n}, k={degree}, f={max_corrupt_fraction:.4g})")
    else:
        plan = next((p for p in map(make, range(2, n - 2, 2))
                     if p.dropout_failure_log2 <= -correctness_bits and surround_problem(p.holders, p.corrupt) is None),
                    None) or make(0)
    return plan.with_threshold(threshold, active=active) if threshold else plan
