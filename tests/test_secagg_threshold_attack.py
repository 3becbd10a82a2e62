"""The split-survivor-set attack on one client's input, run against the real client state machines.

A malicious server with c colluding clients among a victim's h share holders splits the victim's
honest holders into group A, shown the survivor set with the victim, and group B, shown it without
(the victim "dropped"). Colluders sign both sets and hand over their shares of both kinds. Group A
reveals self-mask shares, group B masking-key shares; with t of each the server removes every mask
from the victim's masked input. The counts are a + c and b + c with a + b = h − c, so the attack
works exactly when 2t ≤ h + c: the rule of :mod:`fedveil.secagg.threshold` stops it, while the old
majority threshold ⌊h/2⌋ + 1 (the rule with c = 0) falls to one or two colluders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedveil.secagg import (
    ConsistencyCheckError,
    GraphSpec,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    min_threshold,
    plan_threshold,
)
from fedveil.secagg.keys import pairwise_mask_seed, self_mask_prg_seed, sign, survivor_set_payload
from fedveil.secagg.messages import (
    SELF_MASK_LIMBS,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    MaskedInputResponse,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskingRequest,
    UnmaskingResponse,
)
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.session import Session
from fedveil.secagg.shamir import limbs_to_bytes, reconstruct
from tests.secagg_helpers import random_inputs

VICTIM = 0


@dataclass
class Outcome:
    """What the server holds of the victim's secrets after the attack."""

    threshold: int
    holders: int
    colluding_holders: int
    self_mask: dict[int, np.ndarray] = field(default_factory=dict)  # x (holder id + 1) → share row
    mask_key: dict[int, np.ndarray] = field(default_factory=dict)
    refused: dict[int, SecAggError] = field(default_factory=dict)  # honest client → its refusal
    groups: dict[int, str] = field(default_factory=dict)  # honest client → "A" (with victim) or "B"
    recovered: np.ndarray | None = None
    truth: np.ndarray | None = None

    @property
    def succeeded(self) -> bool:
        return len(self.self_mask) >= self.threshold and len(self.mask_key) >= self.threshold


def _secret(shares: dict[int, np.ndarray], t: int) -> bytes:
    xs = np.array(sorted(shares)[:t], dtype=np.int64)
    return limbs_to_bytes(reconstruct(xs, np.stack([shares[int(x)] for x in xs])))


def split_attack(config: SecAggConfig, colluders: int, group_a: int) -> Outcome:
    """Run one round with the malicious server above; ``group_a`` honest holders (victim included)
    see the set with the victim, the other honest holders the set without it.

    ``colluders`` of the victim's neighbours collude (more are not in the cohort's budget when
    ``colluders`` = c); they behave honestly up to the survivor-set check, then sign both sets and
    give the server their decrypted shares of the victim (read from their own state: they are the
    server's). Honest clients outside the victim's holders go to whichever group has fewer
    signatures, so that both sets gather as many as possible.
    """
    n, t = config.num_clients, config.threshold
    signing = {c: Ed25519PrivateKey.generate() for c in range(n)}
    config = SecAggConfig(**{**config.__dict__, "active": True, "graph_seed": os.urandom(32), "identity_keys": tuple(
        signing[c].public_key().public_bytes_raw() for c in range(n))})
    inputs = random_inputs(config, seed=int.from_bytes(os.urandom(4), "little"))
    clients = {c: SecAggClient(c, config, identity_key=signing[c]) for c in range(n)}
    for c, client in clients.items():
        client.set_input(inputs[c])
    advs = {c: client.advertise_keys() for c, client in clients.items()}
    session = Session.from_advertisements(config, advs.values())  # public: the server derives it too
    graph, sid, rid = session.graph, session.session_id, config.round_id
    holders = graph.holders(VICTIM)
    colluding = set([p for p in holders if p != VICTIM][:colluders])
    out = Outcome(t, len(holders), len(colluding), truth=inputs[VICTIM])

    boxes = {}
    for c, client in clients.items():
        reply = client.handle(ShareKeysRequest(rid, c, tuple(advs.values())))
        assert isinstance(reply, ShareKeysResponse)
        boxes[c] = reply.boxes
    masked = {}
    for c, client in clients.items():
        reply = client.handle(MaskedInputRequest(rid, c, {s: boxes[s][c] for s in graph.neighbors(c)}))
        assert isinstance(reply, MaskedInputResponse)
        masked[c] = reply.vector

    honest_holders = [p for p in holders if p not in colluding and p != VICTIM]
    group = {p: "A" for p in [VICTIM, *honest_holders[:group_a - 1]]}
    group.update({p: "B" for p in honest_holders[group_a - 1:]})
    sets = {"A": frozenset(range(n)), "B": frozenset(range(n)) - {VICTIM}}
    signers: dict[str, dict[int, bytes]] = {"A": {}, "B": {}}
    for name, members in sets.items():
        for c in colluding:
            signers[name][c] = sign(signing[c], survivor_set_payload(sid, members))
    others = [c for c in range(n) if c not in holders]
    for c in [*group, *others]:
        name = group.setdefault(c, "A" if len(signers["A"]) <= len(signers["B"]) else "B")
        try:
            reply = clients[c].handle(ConsistencyCheckRequest(rid, c, np.array(sorted(sets[name]), np.uint32)))
        except SecAggError as err:
            out.refused[c] = err
            continue
        signers[name][c] = reply.signature
    out.groups = dict(group)
    for c, name in group.items():
        if c in out.refused:
            continue
        dropped = np.array([] if name == "A" else [VICTIM], np.uint32)
        request = UnmaskingRequest(rid, c, np.array(sorted(sets[name]), np.uint32), dropped, signers[name])
        try:
            reply = clients[c].handle(request)
        except SecAggError as err:
            out.refused[c] = err
            continue
        assert isinstance(reply, UnmaskingResponse)
        for owners, rows, table in ((reply.self_mask_owners, reply.self_mask_shares, out.self_mask),
                                    (reply.mask_key_owners, reply.mask_key_shares, out.mask_key)):
            for owner, row in zip(owners.tolist(), rows, strict=True):
                if owner == VICTIM:
                    table[c + 1] = np.asarray(row, np.int64)
    for c in colluding:  # the colluders' own shares of the victim, both kinds
        row = clients[c]._ctx.received[VICTIM].limbs
        out.self_mask[c + 1], out.mask_key[c + 1] = row[:SELF_MASK_LIMBS], row[SELF_MASK_LIMBS:]

    if out.succeeded:  # the attack math: y_v − PRG(b_v) − Σ_{v<u} PRG(s_vu) + Σ_{v>u} PRG(s_vu) = x_v
        seed = _secret(out.self_mask, t)
        key = X25519PrivateKey.from_private_bytes(_secret(out.mask_key, t))
        added = [self_mask_prg_seed(seed, VICTIM, sid)]
        subtracted = []
        for u in graph.neighbors(VICTIM):
            s = pairwise_mask_seed(key, advs[u].mask_public, VICTIM, u, sid)
            (added if VICTIM < u else subtracted).append(s)
        vec = masked[VICTIM].copy()
        MaskExpander(config.vector_length, config.ring.dtype).apply(vec, add=subtracted, subtract=added)
        config.ring.reduce(vec)
        out.recovered = vec
    return out


def _config(n: int, t: int, graph: GraphSpec, fraction: float) -> SecAggConfig:
    keys = tuple(Ed25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(n))
    return SecAggConfig(n, t, 8, round_id=77, graph=graph, active=True, identity_keys=keys,
                        max_corrupt_fraction=fraction, graph_seed=os.urandom(32))  # the cohort's beacon seed


# The attacker report's cases: complete graphs and SecAgg+ on 50 clients with the degree the old
# helper derived (k = 34, t = 18), plus what plan_threshold derives for 50 clients today.
CASES = [("complete", 5, 0), ("complete", 10, 0), ("complete", 11, 0), ("harary", 50, 34), ("harary", 50, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("graph,n,degree", CASES)
def test_the_rule_stops_the_split_attack_with_the_cohorts_colluders(graph, n, degree):
    plan = plan_threshold(n, graph, degree=degree)
    t, h, c = plan.threshold, plan.holders, plan.corrupt
    assert 2 * t > h + c
    config = _config(n, t, plan.spec, 1 / 3)
    # Every split of the honest holders, for the small cohorts; the attacker's best (a = t − c,
    # enough self-mask shares) and its neighbour for the large ones.
    splits = range(1, h - c + 1) if n <= 11 else (t - c, t - c + 1)
    for colluders in sorted({1, c}):
        for a in splits:
            out = split_attack(config, colluders, a)
            assert out.colluding_holders == colluders
            assert not out.succeeded, (a, colluders, len(out.self_mask), len(out.mask_key))
            assert out.recovered is None
            # Arithmetic of the split: a + c self-mask and h − c − a + c masking-key shares at most.
            assert len(out.self_mask) <= a + colluders and len(out.mask_key) <= h - a
            if plan.degree == 0:  # complete graph: a group with fewer than t signers refuses outright
                for name, size in (("A", a + colluders), ("B", h - a)):
                    if size < t:
                        members = [m for m, g in out.groups.items() if g == name]
                        assert all(isinstance(out.refused.get(m), ConsistencyCheckError)
                                   and "fewer than threshold" in str(out.refused[m]) for m in members)
    if n > 11:  # the best split: at most t self-mask shares, at most h − t + c < t masking-key shares (on a
        # sparse graph the holders of the victim's neighbours also split, and per-owner quorums refuse more)
        best = split_attack(config, c, t - c)
        assert len(best.self_mask) <= t and len(best.mask_key) <= h - t + c < t


@pytest.mark.slow
@pytest.mark.parametrize("graph,n,degree", CASES[:3])
def test_the_old_majority_threshold_falls_to_the_same_attack(graph, n, degree):
    """t = ⌊h/2⌋ + 1 is the rule with c = 0 (max_corrupt_fraction = 0 makes SecAggConfig accept it
    in active mode). The attack needs 2t ≤ h + c colluders' worth of slack: one colluder for odd
    h, two for even h (at n = 10, t = 6 survives one colluder: 12 > 10 + 1)."""
    h = plan_threshold(n, graph, degree=degree).holders
    t = min_threshold(h, 0)  # ⌊h/2⌋ + 1
    config = _config(n, t, GraphSpec(graph, degree) if degree else GraphSpec(), 0.0)
    needed = max(1, 2 * t - h)
    assert needed == (1 if h % 2 else 2)
    out = split_attack(config, needed, t - needed)
    assert out.succeeded and not out.refused
    assert np.array_equal(out.recovered, out.truth)  # the victim's exact input
    if needed > 1:
        fewer = split_attack(config, needed - 1, t - needed + 1)
        assert not fewer.succeeded and fewer.recovered is None


@pytest.mark.slow
def test_on_a_sparse_graph_per_owner_quorums_also_refuse_the_old_thresholds_split():
    """The same split at the old threshold on SecAgg+ (k = 34): it recovered the victim's input while
    the consistency check counted signatures over the whole cohort. Honest holders now also require t
    signatures on their set from the holders of every other owner whose share they reveal, and the
    server had to spread the rest of the cohort over both sets; they refuse, naming the owner."""
    h = plan_threshold(50, "harary", degree=34).holders
    t = min_threshold(h, 0)
    config = _config(50, t, GraphSpec("harary", 34), 0.0)
    needed = max(1, 2 * t - h)
    out = split_attack(config, needed, t - needed)
    assert not out.succeeded and out.recovered is None
    assert any(isinstance(err, ConsistencyCheckError) and "share holders signed" in str(err)
               for err in out.refused.values())
