"""Issue 9.2 at the default f = 1/3 on SMALL Harary cohorts: an exact (ILP) search for the
withheld-shares / split-view attack instead of the previous attacker's greedy choice.

Model (every check the unmodified SecAggClient makes, fedveil/secagg/client.py at HEAD):
 * the server picks the round's cohort size n and any even Harary degree k the site accepts
   (check_threshold: t = min_threshold(h, c) with the site's own c = collusion_bound(n, k, 1/3));
 * C = floor(n/3) colluders, placed uniformly at random before the layout (commit-then-reveal), the
   server then picks the victim v (every node is tried);
 * v receives only the boxes of M_v = (colluding nbrs) + D (honest nbrs); v's live_problem needs
   |M_v| + 1 >= t and |M_v| > c;
 * the server needs b_v (t shares from holders that see v alive) and s_sk_j for every honest j in D
   (t shares from holders of j that see j dropped; colluding holders count);
 * each honest node u is shown at most one survivor set S_i = U minus D_i (D_i subset of D), and
   passes _check_survivors only if u is in S_i and |holders(u) minus D_i| >= t (every other
   holder sent u its box); v itself cannot pass any set (it received only M_v);
 * each view needs t valid signatures from its members: C colluders sign anything, so a view needs
   >= t - C honest nodes shown it.
The ILP uses m views (m = 1: the single-set attack; m = 2, 3: split views). Feasible => the attack
works on that layout; infeasible for every v => it fails there.

Usage: [CHECK=cohort|owner|twohop] [K=10,12] harary_split_ilp.py N [trials] [max_views]
"""
from __future__ import annotations

import os
import sys

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from fedveil.secagg import threshold as T

F = float(os.environ.get("F", 1 / 3))
CHECK = os.environ.get("CHECK", "cohort")
TIME_LIMIT = float(os.environ.get("TIME_LIMIT", 60))  # seconds per integer program


def nbrs(p: int, n: int, half: int) -> list[int]:
    return [(p + d) % n for d in range(-half, half + 1) if d]


CHECKS = ("cohort", "owner", "twohop")


def feasible(n: int, k: int, t: int, Q: set[int], v: int, m: int, check: str = "cohort") -> dict[tuple, int] | None:
    """General model: m views; in view i every node w is either a survivor or dropped (e[i,w]);
    honest u (v included) shown view i (y[i,u]) must be a survivor there, have at most k+1-t of its
    holders dropped, and (v only) have no survivor among its holders that did not send it a box.
    Wanted: b_v from t holders seeing v alive, and for each honest j in M_v either s_sk_j from t
    holders seeing j dropped, or s_sk_v from t holders seeing v dropped (classic split).

    ``check`` is the consistency check the honest nodes run before revealing (z[i,u]: u reveals in
    view i; it signed view i, y[i,u], whatever its check then says):
      cohort: t valid signatures over the whole cohort (the check before ddcd90d);
      owner:  for every owner whose share u reveals, and every live holder of u (all are checked),
              t of that owner's own holders signed view i (qok[i,j]);
      twohop: owner, and for every live holder w of u, every live holder x of w has t signers too."""
    assert check in CHECKS
    half = k // 2
    c_bound = T.collusion_bound(n, k, F)[0]
    Nv = nbrs(v, n, half)
    Dc = [j for j in Nv if j not in Q]
    Qv = sum(1 for j in Nv if j in Q)
    C = len(Q)
    need_M = max(t - 1, c_bound + 1)
    idx: dict[tuple, int] = {}

    def var(*key: object) -> int:
        if key not in idx:
            idx[key] = len(idx)
        return idx[key]

    inf = np.inf
    rows: list[tuple[dict[int, float], float, float]] = []
    Hon = [u for u in range(n) if u not in Q]
    hold = {u: nbrs(u, n, half) + [u] for u in range(n)}
    rows.append(({var("d", j): 1.0 for j in Dc}, need_M - Qv, inf))  # v's live_problem
    for i in range(m):
        for q in Q:
            rows.append(({var("e", i, q): 1.0}, 0.0, 0.0))  # colluders survive (and sign)
        rows.append(({var("y", i, u): 1.0 for u in Hon}, max(0, t - C), inf))  # t signatures
        for u in Hon:
            y = var("y", i, u)
            rows.append(({y: 1.0, var("e", i, u): 1.0}, -inf, 1.0))
            big = k + 1
            row = {var("e", i, w): 1.0 for w in hold[u] if w != u}
            row[y] = float(big)
            rows.append((row, -inf, float(big + k + 1 - t)))
        # v shown view i: its other (honest, non-D) neighbours must be dropped there
        for w in Dc:
            rows.append(({var("e", i, w): 1.0, var("y", i, v): -1.0, var("d", w): 1.0}, 0.0, inf))
    for u in Hon:
        rows.append(({var("y", i, u): 1.0 for i in range(m)}, -inf, 1.0))
    if check != "cohort":
        for i in range(m):
            for j in range(n):  # q[i,j]: t of j's holders (colluders sign every view) signed view i
                qj = sum(1 for w in hold[j] if w in Q)
                row = {var("y", i, x): 1.0 for x in hold[j] if x not in Q}
                row[var("q", i, j)] = -float(max(0, t - qj))
                rows.append((row, 0.0, inf))
            for u in Hon:
                z = var("z", i, u)
                rows.append(({z: 1.0, var("y", i, u): -1.0}, -inf, 0.0))
                for w in hold[u]:  # every live holder of u is an owner u checks
                    rows.append(({z: 1.0, var("q", i, w): -1.0, var("e", i, w): -1.0}, -inf, 0.0))
                    if check == "twohop":
                        for x in hold[w]:
                            if x not in hold[u]:
                                rows.append(({z: 1.0, var("q", i, x): -1.0, var("e", i, w): -1.0,
                                              var("e", i, x): -1.0}, -inf, 0.0))

    def reveal_count(j: int, dropped: bool) -> dict[int, float]:
        row: dict[int, float] = {}
        for i in range(m):
            for u in hold[j]:
                if u in Q or (dropped and u == j):
                    continue
                r = var("r", i, u, j, dropped)
                row[r] = 1.0
                rows.append(({r: 1.0, var("y" if check == "cohort" else "z", i, u): -1.0}, -inf, 0.0))
                if check != "cohort":
                    rows.append(({r: 1.0, var("q", i, j): -1.0}, -inf, 0.0))
                e = var("e", i, j)
                rows.append(({r: 1.0, e: -1.0} if dropped else {r: 1.0, e: 1.0}, -inf, 0.0 if dropped else 1.0))
        return row

    qv = sum(1 for w in hold[v] if w in Q)
    row = reveal_count(v, False)  # b_v
    rows.append((row, t - qv, inf))
    sv = var("sv")  # s_sk_v revealed by t holders (classic split) -> covers every j
    row = reveal_count(v, True)
    row[sv] = -float(t - qv)
    rows.append((row, 0.0, inf))
    for j in Dc:
        qj = sum(1 for w in hold[j] if w in Q)
        row = reveal_count(j, True)
        # d_j = 1 and not sv  =>  colluding holders + reveals >= t
        row[var("d", j)] = -float(t - qj)
        row[sv] = float(t - qj)
        rows.append((row, 0.0, inf))
    nv = len(idx)
    A = lil_matrix((len(rows), nv))
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    for r, (coefs, a, b) in enumerate(rows):
        for c_, val in coefs.items():
            A[r, c_] += val
        lo[r], hi[r] = a, b
    res = milp(c=np.zeros(nv), constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=np.ones(nv),
               bounds=Bounds(0, 1), options={"time_limit": TIME_LIMIT})
    if res.status != 0:
        if res.status == 1:
            print(f"    (ILP time limit hit: n={n} k={k} v={v} views={m}; undecided, counted as no solution)",
                  file=sys.stderr, flush=True)
        return None
    return {key: int(round(res.x[i])) for key, i in idx.items()}


def main() -> None:
    n = int(sys.argv[1])
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    max_views = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    C = T.corrupt_clients(n, F)
    rng = np.random.default_rng(n)
    degrees = [int(x) for x in os.environ["K"].split(",")] if os.environ.get("K") else range(4, n - 2, 2)
    for k in degrees:
        h, c = T.cohort_bound(n, k, F)
        t = T.min_threshold(h, c)
        if t > h or h - 1 <= c:
            continue
        hits = 0
        for _trial in range(trials):
            Q = set(int(x) for x in rng.choice(n, C, replace=False))
            # the server picks the victim with the most colluding neighbours first
            order = sorted((u for u in range(n) if u not in Q),
                           key=lambda u: -sum(1 for w in nbrs(u, n, k // 2) if w in Q))
            for v in order[:6]:
                if any(feasible(n, k, t, Q, v, m, CHECK) is not None for m in range(1, max_views + 1)):
                    hits += 1
                    print(f"  FEASIBLE n={n} k={k} t={t} c={c} C={C} v={v} Q={sorted(Q)}", flush=True)
                    break
        print(f"[{CHECK}] n={n} k={k} h={h} t={t} c={c} C={C}: attack feasible on {hits}/{trials} layouts "
              f"(top-6 victims each, up to {max_views} views)", flush=True)


if __name__ == "__main__":
    main()
