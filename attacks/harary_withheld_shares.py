"""Issue 9 attack 2 variant: split view on SecAgg+ (Harary) WITHOUT colluders, by withholding shares.

A scripted malicious server drives n unmodified fedveil.secagg.client.SecAggClient objects
(active mode, identity keys, commit-then-reveal graph seed, library-derived n/k/t for the site's
f).  Victim v = the client at layout position 0.

 * ShareKeys: everyone gets every advertisement (no one is dropped; live view = full layout).
 * MaskedInput: v gets the share boxes of only a set D of t-1 of its neighbours (so v masks only
   with D); everyone else gets all boxes addressed to it.
 * Consistency check: v and D are shown S_v = U minus (v's neighbours not in D); everyone else
   S = U minus D.  Signatures are checked over the whole cohort, so each set gets >= t signers.
 * Unmask: v and D reveal v's self-mask share (v in S_v) and so do v's other holders (v in S);
   the holders of each j in D other than v and D reveal j's masking-key share (j dropped in S).
 => the server reconstructs b_v and s_sk_j for all j in D and strips every mask off y_v alone.
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
from fedveil.secagg.keys import pairwise_mask_seed, self_mask_prg_seed
from fedveil.secagg.messages import ConsistencyCheckRequest, MaskedInputRequest, ShareKeysRequest, UnmaskingRequest
from fedveil.secagg.prg import MaskExpander
from fedveil.secagg.session import Session
from fedveil.secagg.shamir import lagrange_at_zero, limbs_to_bytes
from fedveil.secagg.shamir import reconstruct as shamir_reconstruct


def run(n: int, f: float, m: int = 8) -> bool:
    plan = T.plan_threshold(n, "harary", max_corrupt_fraction=f)
    k, t, c = plan.degree, plan.threshold, plan.corrupt
    print(f"n={n} f={f} -> library plan: k={k} h={plan.holders} t={t} c={c}")
    ids = [Ed25519PrivateKey.generate() for _ in range(n)]
    cfg = SecAggConfig(num_clients=n, threshold=t, vector_length=m, round_id=7, ring_bits=32,
                       graph=GraphSpec("harary", k), active=True,
                       identity_keys=tuple(i.public_key().public_bytes_raw() for i in ids),
                       context=b"attack", max_corrupt_fraction=f, graph_seed=os.urandom(32))
    rng = np.random.default_rng(1)
    inputs = {u: rng.integers(0, 2**20, m, dtype=np.uint32) for u in range(n)}
    clients = {u: SecAggClient(u, cfg, identity_key=ids[u]) for u in range(n)}
    for u in range(n):
        clients[u].set_input(inputs[u].copy())
    advs = tuple(clients[u].advertise_keys() for u in range(n))
    session = Session.from_advertisements(cfg, advs)
    graph = session.graph
    v = 0
    Nv = sorted(graph.neighbors(v))
    # choose D: t-1 neighbours of v minimising overlap; greedy on the real (relabelled) graph
    D: list[int] = []
    cand = set(Nv)
    while len(D) < max(t - 1, c + 1):
        best = min(cand, key=lambda j: (len(set(graph.neighbors(j)) & set(D)),))
        D.append(best); cand.discard(best)
    D_set = set(D)
    worst = min(len(set(graph.neighbors(j)) - {v} - D_set) for j in D)
    print(f"victim {v}, |D|={len(D)}, min holders of a j in D outside v,D = {worst} (need t={t})")
    # R1: shares
    boxes_to: dict[int, dict[int, bytes]] = {u: {} for u in range(n)}
    req = ShareKeysRequest(cfg.round_id, 0, advs) if False else None
    for u in range(n):
        r = ShareKeysRequest(round_id=cfg.round_id, client_id=u, advertisements=advs)
        resp = clients[u].handle(r)
        for holder, box in resp.boxes.items():
            boxes_to[holder][u] = box
    # R2: masked inputs
    masked = {}
    for u in range(n):
        boxes = boxes_to[u] if u != v else {j: b for j, b in boxes_to[u].items() if j in D_set}
        try:
            resp = clients[u].handle(MaskedInputRequest(round_id=cfg.round_id, client_id=u, boxes=boxes))
        except Exception as err:
            print(f"client {u} refused masked input: {type(err).__name__}: {err}"); return False
        masked[u] = resp.vector.copy()
    U = set(range(n))
    S_v = sorted(U - (set(Nv) - D_set))
    S = sorted(U - D_set)
    world_v = {v} | D_set
    shown = {u: (S_v if u in world_v else S) for u in range(n)}
    sigs: dict[tuple, dict[int, bytes]] = {}
    for u in range(n):
        try:
            resp = clients[u].handle(ConsistencyCheckRequest(round_id=cfg.round_id, client_id=u,
                                                             survivors=np.array(shown[u], np.uint32)))
        except Exception as err:
            print(f"client {u} refused consistency: {type(err).__name__}: {err}"); continue
        sigs.setdefault(tuple(shown[u]), {})[u] = resp.signature
    print(f"signers: S_v {len(sigs.get(tuple(S_v), {}))}, S {len(sigs.get(tuple(S), {}))}")
    sm: dict[int, tuple[list, list]] = {}
    mk: dict[int, tuple[list, list]] = {}
    refused = 0
    for u in range(n):
        surv = shown[u]
        if u in D_set and surv is S:  # not used
            continue
        dropped = sorted(U - set(surv))
        dropped = [d for d in dropped if d != u]
        try:
            resp = clients[u].handle(UnmaskingRequest(round_id=cfg.round_id, client_id=u,
                                                      survivors=np.array(surv, np.uint32),
                                                      dropped=np.array(dropped, np.uint32),
                                                      signatures=sigs[tuple(surv)]))
        except Exception as err:
            refused += 1
            print(f"client {u} refused unmask: {type(err).__name__}: {err}")
            continue
        x = u + 1
        for owner, row in zip(resp.self_mask_owners.tolist(), resp.self_mask_shares):
            sm.setdefault(owner, ([], []))[0].append(x); sm[owner][1].append(row)
        for owner, row in zip(resp.mask_key_owners.tolist(), resp.mask_key_shares):
            mk.setdefault(owner, ([], []))[0].append(x); mk[owner][1].append(row)
    print(f"unmask refusals: {refused}; self-mask shares of v: {len(sm.get(v, ([],))[0])}; "
          f"mask-key shares of D: {sorted(len(mk.get(j, ([],))[0]) for j in D)[:3]}.. (need {t})")

    def rec(table, owner):
        xs, rows = table[owner]
        order = np.argsort(xs)[:t]
        key = np.asarray([xs[i] for i in order])
        return limbs_to_bytes(shamir_reconstruct(key, np.stack([rows[i] for i in order]), lagrange_at_zero(key)))
    try:
        b_v = rec(sm, v)
        keys = {j: X25519PrivateKey.from_private_bytes(rec(mk, j)) for j in D}
    except Exception as err:
        print("reconstruction failed:", type(err).__name__, err); return False
    sid = session.session_id
    y = masked[v].copy()
    plus, minus = [], [self_mask_prg_seed(b_v, v, sid)]
    for j, key in keys.items():
        assert key.public_key().public_bytes_raw() == session.advertisements[j].mask_public
        seed = pairwise_mask_seed(key, session.advertisements[v].mask_public, j, v, sid)
        (minus if v < j else plus).append(seed)  # v added +PRG if v < j
    MaskExpander(m, cfg.ring.dtype).apply(y, add=plus, subtract=minus)
    cfg.ring.reduce(y)
    ok = np.array_equal(y, inputs[v])
    print("recovered x_v:", y.tolist()); print("true      x_v:", inputs[v].tolist())
    print("ATTACK", "SUCCEEDED" if ok else "FAILED")
    return ok

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    f = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    run(n, f)
