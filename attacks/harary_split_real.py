"""Issue 9.2 at the default f = 1/3: play an ILP-found split view (harary_split_ilp.py) against
UNMODIFIED SecAggClient instances (active mode, identity keys, the commit-then-reveal graph seed
stand-in: a random 32-byte seed the server does not choose).

The server: C = floor(n/3) colluders chosen before the layout; after the layout is known it picks a
victim v and an ILP solution: v receives only the boxes of M_v (colluding neighbours + D); honest
nodes are shown the survivor sets the ILP chose (colluders sign every set); then it reconstructs
b_v and the masking keys it needs, and unmasks v's input.

Usage: harary_split_real.py N K [trials] [views]
"""
from __future__ import annotations

import os
import sys

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

sys.path.insert(0, os.path.dirname(__file__))
from harary_split_ilp import feasible, nbrs

from fedveil.secagg import threshold as T
from fedveil.secagg.client import SecAggClient
from fedveil.secagg.config import SecAggConfig
from fedveil.secagg.graph import GraphSpec
from fedveil.secagg.keys import pairwise_mask_seed, self_mask_prg_seed, sign, survivor_set_payload
from fedveil.secagg.messages import (
    SELF_MASK_LIMBS,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    ShareKeysRequest,
    UnmaskingRequest,
)
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.session import Session
from fedveil.secagg.shamir import lagrange_at_zero, limbs_to_bytes
from fedveil.secagg.shamir import reconstruct as shamir_reconstruct

F = 1 / 3


def run(n: int, k: int, views: int, seed: int) -> str:
    h, c = T.cohort_bound(n, k, F)
    t = T.min_threshold(h, c)
    C = T.corrupt_clients(n, F)
    m = 6
    rng = np.random.default_rng(seed)
    ids = [Ed25519PrivateKey.generate() for _ in range(n)]
    cfg = SecAggConfig(num_clients=n, threshold=t, vector_length=m, round_id=7, ring_bits=32,
                       graph=GraphSpec("harary", k), active=True,
                       identity_keys=tuple(i.public_key().public_bytes_raw() for i in ids),
                       context=b"attack", max_corrupt_fraction=F, graph_seed=os.urandom(32))
    Q = set(int(x) for x in rng.choice(n, C, replace=False))  # fixed before the layout
    inputs = {u: rng.integers(0, 2**20, m, dtype=np.uint32) for u in range(n)}
    clients = {u: SecAggClient(u, cfg, identity_key=ids[u]) for u in range(n)}
    for u in range(n):
        clients[u].set_input(inputs[u].copy())
    advs = tuple(clients[u].advertise_keys() for u in range(n))
    session = Session.from_advertisements(cfg, advs)
    graph, sid = session.graph, session.session_id
    pos = graph.layout._position
    node = {p: u for u, p in enumerate(pos)} if not isinstance(pos, dict) else {p: u for u, p in pos.items()}
    # sanity: the ILP's circulant model is the real layout
    for u in range(n):
        assert set(graph.neighbors(u)) == {node[p] for p in nbrs(pos[u], n, k // 2)}
    Qp = {pos[q] for q in Q}
    order = sorted((p for p in range(n) if p not in Qp), key=lambda p: -sum(1 for w in nbrs(p, n, k // 2) if w in Qp))
    sol = None
    for vp in order[:6]:
        for mv in range(1, views + 1):
            sol = feasible(n, k, t, Qp, vp, mv)
            if sol is not None:
                break
        if sol is not None:
            break
    if sol is None:
        return f"n={n} k={k} t={t} c={c} C={C}: no ILP solution on this layout"
    v = node[vp]
    D = {node[key[1]] for key, val in sol.items() if key[0] == "d" and val}
    Qv = set(graph.neighbors(v)) & Q
    M_v = D | Qv
    shown: dict[int, int] = {node[key[2]]: key[1] for key, val in sol.items() if key[0] == "y" and val}
    dropped = {i: {node[key[2]] for key, val in sol.items() if key[0] == "e" and key[1] == i and val}
               for i in range(mv)}
    U = set(range(n))
    S = {i: sorted(U - dropped[i]) for i in range(mv)}
    boxes_to: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    for u in range(n):
        resp = clients[u].handle(ShareKeysRequest(round_id=cfg.round_id, client_id=u, advertisements=advs))
        for holder, box in resp.boxes.items():
            boxes_to[holder][u] = box
    masked = {}
    for u in range(n):
        boxes = boxes_to[u] if u != v else {j: b for j, b in boxes_to[u].items() if j in M_v}
        masked[u] = clients[u].handle(MaskedInputRequest(round_id=cfg.round_id, client_id=u, boxes=boxes)).vector.copy()
    sigs: dict[int, dict[int, bytes]] = {i: {} for i in range(mv)}
    for i in range(mv):
        for q in Q:
            sigs[i][q] = sign(ids[q], survivor_set_payload(sid, frozenset(S[i])))
    refusals = []
    for u, i in shown.items():
        try:
            resp = clients[u].handle(ConsistencyCheckRequest(round_id=cfg.round_id, client_id=u,
                                                             survivors=np.array(S[i], np.uint32)))
            sigs[i][u] = resp.signature
        except Exception as err:
            refusals.append(f"{u}: {err}")
    sm: dict[int, tuple[list, list]] = {}
    mk: dict[int, tuple[list, list]] = {}
    for u, i in shown.items():
        if u not in sigs[i]:
            continue
        drop = sorted(dropped[i])
        try:
            resp = clients[u].handle(UnmaskingRequest(round_id=cfg.round_id, client_id=u,
                                                      survivors=np.array(S[i], np.uint32),
                                                      dropped=np.array(drop, np.uint32), signatures=sigs[i]))
        except Exception as err:
            refusals.append(f"{u}: {err}")
            continue
        for owner, row in zip(resp.self_mask_owners.tolist(), resp.self_mask_shares, strict=True):
            sm.setdefault(owner, ([], []))[0].append(u + 1)
            sm[owner][1].append(row)
        for owner, row in zip(resp.mask_key_owners.tolist(), resp.mask_key_shares, strict=True):
            mk.setdefault(owner, ([], []))[0].append(u + 1)
            mk[owner][1].append(row)
    for q in Q:  # colluders hand over the shares they hold
        ctx = clients[q]._ctx
        held = dict(ctx.received)
        held[q] = ctx.own_share
        for owner, row in held.items():
            sm.setdefault(owner, ([], []))[0].append(q + 1)
            sm[owner][1].append(row[:SELF_MASK_LIMBS])
            mk.setdefault(owner, ([], []))[0].append(q + 1)
            mk[owner][1].append(row[SELF_MASK_LIMBS:])
    head = (f"n={n} k={k} t={t} c={c} C={C} views={mv} victim={v} |D|={len(D)} |Qv|={len(Qv)} "
            f"refusals={len(refusals)}")

    def rec(table: dict, owner: int) -> bytes:
        xs, rows = table[owner]
        if len(xs) < t:
            raise ValueError(f"only {len(xs)} shares of {owner}")
        sel = np.argsort(xs)[:t]
        key = np.asarray([xs[i] for i in sel])
        return limbs_to_bytes(shamir_reconstruct(key, np.stack([rows[i] for i in sel]), lagrange_at_zero(key)))

    try:
        b_v = rec(sm, v)
        sm_v_honest = len([x for x in sm[v][0] if x - 1 not in Q])
        if sol.get(("sv",), 0):
            keys_v = X25519PrivateKey.from_private_bytes(rec(mk, v))
            partners = M_v
            seeds = {j: pairwise_mask_seed(keys_v, session.advertisements[j].mask_public, v, j, sid) for j in partners}
        else:
            keys = {j: X25519PrivateKey.from_private_bytes(rec(mk, j)) for j in D}
            for q in Qv:
                keys[q] = clients[q]._ctx.keys.mask_private
            seeds = {j: pairwise_mask_seed(key, session.advertisements[v].mask_public, j, v, sid)
                     for j, key in keys.items()}
    except Exception as err:
        return head + f" -> reconstruction failed: {err}; first refusals {refusals[:2]}"
    y = masked[v].copy()
    plus_s, minus_s = [], [self_mask_prg_seed(b_v, v, sid)]
    for j, sd in seeds.items():
        (minus_s if v < j else plus_s).append(sd)
    MaskExpander(m, cfg.ring.dtype).apply(y, add=plus_s, subtract=minus_s)
    cfg.ring.reduce(y)
    ok = np.array_equal(y, inputs[v])
    return head + (f" honest b_v shares={sm_v_honest} -> {'LEAKED: exact x_v recovered' if ok else 'wrong x_v'} "
                   f"(recovered {y.tolist()[:3]}.. true {inputs[v].tolist()[:3]}..)")


if __name__ == "__main__":
    n, k = int(sys.argv[1]), int(sys.argv[2])
    trials = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    views = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    for s in range(trials):
        print(run(n, k, views, s), flush=True)
