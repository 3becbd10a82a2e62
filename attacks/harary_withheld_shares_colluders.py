"""harary_withheld_shares.py with colluders, at the library's DEFAULT f = 1/3 (within the threat model:
the server controls C = floor(f*n) cohort members, chosen at random before the layout is drawn).

Colluders behave honestly in every protocol stage (their masked inputs are in the sum); the server
reads their secrets white-box (= they hand their keys and received shares to the server) and has
them sign any survivor set.  M_v (whose shares v receives) = v's colluding neighbours + the honest
neighbours farthest from v in the ring (D), until |M_v| = t - 1.  Then as before: v (and D) see S_v,
everyone else sees S = U \\ D; b_v from v's holders, s_sk_j for j in D from j's holders in S.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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


def run(n: int, f: float, m: int = 8, seed: int = 0) -> bool:
    plan = T.plan_threshold(n, "harary", max_corrupt_fraction=f)
    k, t, c = plan.degree, plan.threshold, plan.corrupt
    C = T.corrupt_clients(n, f)
    rng = np.random.default_rng(seed)
    v = 0
    Q = set(int(x) for x in rng.choice(np.arange(1, n), C, replace=False))  # colluders, fixed before the layout
    print(f"n={n} f={f:.3f} -> library plan: k={k} h={plan.holders} t={t} c={c}; colluders in cohort C={C}")
    ids = [Ed25519PrivateKey.generate() for _ in range(n)]
    cfg = SecAggConfig(num_clients=n, threshold=t, vector_length=m, round_id=7, ring_bits=32,
                       graph=GraphSpec("harary", k), active=True,
                       identity_keys=tuple(i.public_key().public_bytes_raw() for i in ids),
                       context=b"attack", max_corrupt_fraction=f, graph_seed=os.urandom(32))
    inputs = {u: rng.integers(0, 2**20, m, dtype=np.uint32) for u in range(n)}
    clients = {u: SecAggClient(u, cfg, identity_key=ids[u]) for u in range(n)}
    for u in range(n):
        clients[u].set_input(inputs[u].copy())
    advs = tuple(clients[u].advertise_keys() for u in range(n))
    session = Session.from_advertisements(cfg, advs)
    graph, sid = session.graph, session.session_id
    layout = graph.layout
    pos = layout._position
    half = k // 2
    def off(u):
        d = (pos[u] - pos[v]) % n
        return d - n if d > n // 2 else d
    Nv = set(graph.neighbors(v))
    Qv = Nv & Q
    need = max(t - 1, c + 1) - len(Qv)
    honest_nb = sorted(Nv - Q, key=lambda u: -abs(off(u)))
    # alternate the two ends of the ring
    plus = [u for u in honest_nb if off(u) > 0]; minus = [u for u in honest_nb if off(u) < 0]
    D: list[int] = []
    while len(D) < need and (plus or minus):
        for side in (plus, minus):
            if side and len(D) < need:
                D.append(side.pop(0))
    D_set = set(D)
    M_v = Qv | D_set
    print(f"victim {v}: colluding neighbours {len(Qv)}, honest D {len(D)}, |M_v|={len(M_v)} (t-1={t-1})")
    boxes_to: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    for u in range(n):
        resp = clients[u].handle(ShareKeysRequest(round_id=cfg.round_id, client_id=u, advertisements=advs))
        for holder, box in resp.boxes.items():
            boxes_to[holder][u] = box
    masked = {}
    for u in range(n):
        boxes = boxes_to[u] if u != v else {j: b for j, b in boxes_to[u].items() if j in M_v}
        try:
            masked[u] = clients[u].handle(MaskedInputRequest(round_id=cfg.round_id, client_id=u, boxes=boxes)).vector.copy()
        except Exception as err:
            print(f"client {u} refused masked input: {type(err).__name__}: {err}"); return False
    U = set(range(n))
    S_v = sorted(U - (Nv - M_v))
    S = sorted(U - D_set)
    shown = {u: (S_v if u in ({v} | D_set) else S) for u in range(n) if u not in Q}
    sigs: dict[tuple, dict[int, bytes]] = {tuple(S_v): {}, tuple(S): {}}
    for q in Q:  # colluders sign both sets
        for s in (S_v, S):
            if q in s:
                sigs[tuple(s)][q] = sign(ids[q], survivor_set_payload(sid, frozenset(s)))
    refused = 0
    for u, s in shown.items():
        try:
            resp = clients[u].handle(ConsistencyCheckRequest(round_id=cfg.round_id, client_id=u,
                                                             survivors=np.array(s, np.uint32)))
            sigs[tuple(s)][u] = resp.signature
        except Exception:
            refused += 1
    print(f"consistency refusals {refused}; signatures: S_v {len(sigs[tuple(S_v)])}, S {len(sigs[tuple(S)])}")
    sm: dict[int, tuple[list, list]] = {}
    mk: dict[int, tuple[list, list]] = {}
    refused = 0
    for u, s in shown.items():
        dropped = [d for d in sorted(U - set(s)) if d != u]
        try:
            resp = clients[u].handle(UnmaskingRequest(round_id=cfg.round_id, client_id=u,
                                                      survivors=np.array(s, np.uint32),
                                                      dropped=np.array(dropped, np.uint32),
                                                      signatures=sigs[tuple(s)]))
        except Exception:
            refused += 1
            continue
        for owner, row in zip(resp.self_mask_owners.tolist(), resp.self_mask_shares):
            sm.setdefault(owner, ([], []))[0].append(u + 1); sm[owner][1].append(row)
        for owner, row in zip(resp.mask_key_owners.tolist(), resp.mask_key_shares):
            mk.setdefault(owner, ([], []))[0].append(u + 1); mk[owner][1].append(row)
    for q in Q:  # colluders hand over the shares they hold
        ctx = clients[q]._ctx
        held = dict(ctx.received)
        if v in held:
            sm.setdefault(v, ([], []))[0].append(q + 1); sm[v][1].append(held[v][:SELF_MASK_LIMBS])
        for j in D:
            if j in held:
                mk.setdefault(j, ([], []))[0].append(q + 1); mk[j][1].append(held[j][SELF_MASK_LIMBS:])
    counts = sorted(len(mk.get(j, ([],))[0]) for j in D)
    print(f"unmask refusals {refused}; self-mask shares of v: {len(sm.get(v, ([],))[0])}; "
          f"mask-key shares of D: min {counts[0] if counts else None} (need {t})")

    def rec(table, owner):
        xs, rows = table[owner]
        order = np.argsort(xs)[:t]
        key = np.asarray([xs[i] for i in order])
        return limbs_to_bytes(shamir_reconstruct(key, np.stack([rows[i] for i in order]), lagrange_at_zero(key)))
    try:
        b_v = rec(sm, v)
        keys = {j: X25519PrivateKey.from_private_bytes(rec(mk, j)) for j in D}
    except Exception as err:
        print("reconstruction failed:", type(err).__name__, err); print("ATTACK FAILED"); return False
    for q in Qv:
        keys[q] = clients[q]._ctx.keys.mask_private
    y = masked[v].copy()
    plus_s, minus_s = [], [self_mask_prg_seed(b_v, v, sid)]
    for j, key in keys.items():
        seed = pairwise_mask_seed(key, session.advertisements[v].mask_public, j, v, sid)
        (minus_s if v < j else plus_s).append(seed)
    MaskExpander(m, cfg.ring.dtype).apply(y, add=plus_s, subtract=minus_s)
    cfg.ring.reduce(y)
    ok = np.array_equal(y, inputs[v])
    print("recovered x_v:", y.tolist()); print("true      x_v:", inputs[v].tolist())
    print("ATTACK", "SUCCEEDED" if ok else "FAILED")
    return ok


if __name__ == "__main__":
    run(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1 / 3)
