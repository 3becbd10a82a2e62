"""Third rerun (against bdc0fc0): an exact search for ANY unmaskable sum with too few honest inputs.

docs/threat-model.md, "What a malicious server can unmask", claims: with at most c colluders among
any client's h holders and 2t > h + c, every sum of masked inputs the server can unmask that holds
an honest input holds at least t - c honest inputs. harary_split_ilp.py only looked for one attack
shape (the victim's partners' keys released). This ILP searches the server's whole strategy space
on one layout, against every check of the unmodified client at bdc0fc0
(fedveil/secagg/client.py, fedveil/secagg/survivor_checks.py):

 * box forwarding per directed edge: B[u,w] = honest w received u's box (u masks... no: w masks
   with u iff B[u,w]); w passes its masked-input live_problem iff sum_u B[u,w] >= max(t-1, c+1);
 * m survivor-set views S_i (e[i,w]); colluders may be in any of them and sign all they are in;
 * each honest u signs at most one view (y[i,u]) after check_survivors: u in S_i, |S_i| >= t,
   every holder of u in S_i sent u its box, >= t of u's holders in S_i;
 * q[i,p]: >= t of p's holders signed view i (honest signers + colluders in S_i);
 * u reveals in view i (z[i,u] <= y[i,u]) only if check_consistency passes: q for every holder of
   u that is in S_i or in the dropped set the server sends u (chosen per client: dr[i,u,j], the
   dropped set is not signed), and q for every live holder x of every live holder o of u (second hop);
 * u then reveals the self-mask share of every holder of u in S_i, the masking-key share of every j
   in its dropped set that sent it a box; colluders give every share they hold;
 * KB[j]/KK[j]: t shares of b_j / s_sk_j reach the server;
 * H (hh[u]) a set of honest masked inputs whose sum the server can unmask: each u in H passed R2
   and has b_u known, and every pairwise mask u added (with honest w, B[w,u]) cancels: w in H and
   w masked with u (B[u,w]), or s_sk_u or s_sk_w known. Colluders' inputs and masks are known.
Objective: 1 <= |H| <= t - c - 1 (the claim broken); with MAX_H=1 the exact-input case.
Colluder placements tried: random (floor(f n), f = 1/3) and a contiguous block on the Harary cycle
clipped so that no honest node's holders hold more than c colluders (the claim's precondition).

Usage: [CHECK=twohop|owner|cohort] [MAX_H=...] [VIEWS=3] unmask_sum_ilp.py N K [trials]   (K=0: complete graph)
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from fedveil.secagg import threshold as T

F = 1 / 3
CHECK = os.environ.get("CHECK", "twohop")
VIEWS = int(os.environ.get("VIEWS", "3"))
LIMIT = float(os.environ.get("LIMIT", "240"))
REL = bool(os.environ.get("REL"))  # per-client rosters: identities permuted per viewer


def neighbours(p: int, n: int, k: int) -> list[int]:
    if k == 0:
        return [w for w in range(n) if w != p]
    half = k // 2
    return sorted({(p + d) % n for d in range(-half, half + 1) if d})


class Model:
    def __init__(self) -> None:
        self.idx: dict[tuple, int] = {}
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def v(self, *key: object) -> int:
        if key not in self.idx:
            self.idx[key] = len(self.idx)
        return self.idx[key]

    def add(self, coefs: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((coefs, lo, hi))

    def solve(self) -> tuple[int, dict[tuple, int] | None]:
        r, c, d = [], [], []
        lo, hi = [], []
        for i, (coefs, a, b) in enumerate(self.rows):
            for col, val in coefs.items():
                r.append(i)
                c.append(col)
                d.append(val)
            lo.append(a)
            hi.append(b)
        nv = len(self.idx)
        A = coo_matrix((d, (r, c)), shape=(len(self.rows), nv)).tocsr()
        res = milp(c=np.zeros(nv), constraints=LinearConstraint(A, np.array(lo), np.array(hi)),
                   integrality=np.ones(nv), bounds=Bounds(0, 1), options={"time_limit": LIMIT})
        if res.status != 0:
            return res.status, None
        return 0, {key: round(res.x[i]) for key, i in self.idx.items()}


def build(n: int, k: int, t: int, c: int, Q: set[int], m: int, max_h: int) -> Model:
    M = Model()
    v = M.v
    inf = np.inf
    hold = {u: [*neighbours(u, n, k), u] for u in range(n)}
    nb = {u: neighbours(u, n, k) for u in range(n)}
    Hon = [u for u in range(n) if u not in Q]
    need = max(t - 1, c + 1)
    C = len(Q)
    col_in = {p: [x for x in hold[p] if x in Q] for p in range(n)}
    for u in Hon:  # R2 live_problem on the boxes that reached u
        row = {v("B", w, u): 1.0 for w in nb[u]}
        row[v("L", u)] = -float(need)
        M.add(row, 0.0, inf)
    for i in range(m):
        M.add({v("e", i, w): 1.0 for w in range(n)}, t, inf)  # |S_i| >= t
        for u in Hon:
            y = v("y", i, u)
            M.add({y: 1.0, v("L", u): -1.0}, -inf, 0.0)
            M.add({y: 1.0, v("e", i, u): -1.0}, -inf, 0.0)
            for w in nb[u]:  # every holder of u in S_i sent u its box
                M.add({y: 1.0, v("e", i, w): 1.0, v("B", w, u): -1.0}, -inf, 1.0)
            row = {v("e", i, w): 1.0 for w in hold[u]}
            row[y] = -float(t)
            M.add(row, 0.0, inf)  # >= t of its holders in S_i
        for p in range(n):  # q[i,p]: t of p's holders signed view i
            row = {v("y", i, x): 1.0 for x in hold[p] if x not in Q}
            for x in col_in[p]:
                row[v("e", i, x)] = 1.0
            row[v("q", i, p)] = -float(t)
            M.add(row, 0.0, inf)
        for u in Hon:
            z = v("z", i, u)
            M.add({z: 1.0, v("y", i, u): -1.0}, -inf, 0.0)
            if REL:  # u's own roster: identities relabelled (see the module docstring)
                pinned = set(hold[u])
                free_col = C - len(col_in[u])
                fc = [v("fc", i, u, s) for s in hold[u] if s != u and s not in Q]
                for s in hold[u]:
                    if s != u and s not in Q:
                        M.add({v("fc", i, u, s): 1.0, v("e", i, s): -1.0}, -inf, 0.0)
                M.add({f: 1.0 for f in fc}, -inf, float(free_col))
                row = {f: 1.0 for f in fc}
                for s in range(n):
                    if s not in pinned:
                        f = v("f", i, u, s)
                        row[f] = 1.0
                        M.add({f: 1.0, v("e", i, s): -1.0}, -inf, 0.0)
                for x in Hon:
                    if x not in pinned:
                        row[v("y", i, x)] = -1.0
                M.add(row, -inf, float(free_col))

            def qv(p: int, u: int = u, i: int = i) -> int:
                if CHECK == "cohort":  # the check before the per-owner count: t signatures in the whole cohort
                    if ("qc", i) not in M.idx:
                        row = {v("y", i, x): 1.0 for x in Hon}
                        row.update({v("e", i, x): 1.0 for x in Q})
                        row[v("qc", i)] = -float(t)
                        M.add(row, 0.0, inf)
                    return M.idx[("qc", i)]
                if not REL:
                    return v("q", i, p)
                key = ("qv", i, u, p)
                if key not in M.idx:
                    row = {}
                    for x in hold[p]:
                        if x in hold[u]:
                            if x in Q:
                                row[v("e", i, x)] = 1.0
                            else:
                                row[v("y", i, x)] = 1.0
                                if x != u:
                                    row[v("fc", i, u, x)] = 1.0
                        else:
                            row[v("f", i, u, x)] = 1.0
                    row[v(*key)] = -float(t)
                    M.add(row, 0.0, inf)
                return M.idx[key]

            for p in hold[u]:
                M.add({z: 1.0, v("e", i, p): 1.0, qv(p): -1.0}, -inf, 1.0)
                if p != u:
                    dr = v("dr", i, u, p)
                    M.add({dr: 1.0, z: -1.0}, -inf, 0.0)
                    M.add({dr: 1.0, v("e", i, p): 1.0}, -inf, 1.0)
                    M.add({dr: 1.0, v("B", p, u): -1.0}, -inf, 0.0)
                    M.add({dr: 1.0, qv(p): -1.0}, -inf, 0.0)
            if CHECK == "twohop":
                for o in hold[u]:
                    for x in hold[o]:
                        if x in hold[u]:
                            continue
                        M.add({z: 1.0, v("e", i, o): 1.0, v("e", i, x): 1.0, qv(x): -1.0}, -inf, 2.0)
    for u in Hon:
        M.add({v("y", i, u): 1.0 for i in range(m)}, -inf, 1.0)
    for j in Hon:
        rowb = {v("KB", j): -float(t - len(col_in[j]))}
        rowk = {v("KK", j): -float(t - len(col_in[j]))}
        for i in range(m):
            for u in hold[j]:
                if u in Q:
                    continue
                rb = v("rb", i, u, j)
                rowb[rb] = 1.0
                M.add({rb: 1.0, v("z", i, u): -1.0}, -inf, 0.0)
                M.add({rb: 1.0, v("e", i, j): -1.0}, -inf, 0.0)
                if u != j:
                    rowk[v("dr", i, u, j)] = 1.0
        M.add(rowb, 0.0, inf)
        M.add(rowk, 0.0, inf)
    for u in Hon:
        h = v("h", u)
        M.add({h: 1.0, v("L", u): -1.0}, -inf, 0.0)
        M.add({h: 1.0, v("KB", u): -1.0}, -inf, 0.0)
        for w in nb[u]:
            if w in Q:
                continue
            g = v("g", u, w)  # w in H and w masked with u
            M.add({g: 1.0, v("h", w): -1.0}, -inf, 0.0)
            M.add({g: 1.0, v("B", u, w): -1.0}, -inf, 0.0)
            M.add({h: 1.0, v("B", w, u): 1.0, g: -1.0, v("KK", u): -1.0, v("KK", w): -1.0}, -inf, 1.0)
    M.add({v("h", u): 1.0 for u in Hon}, 1.0, float(max_h))
    if os.environ.get("FIXV"):  # search only sums holding the honest node with the most colluding neighbours
        victim = max(Hon, key=lambda u: sum(1 for x in nb[u] if x in Q))
        victim = int(os.environ.get("VICTIM", victim))
        M.add({v("h", victim): 1.0}, 1.0, 1.0)
    return M


def placements(n: int, k: int, c: int, trials: int, rng: np.random.Generator) -> list[tuple[str, set[int]]]:
    C = T.corrupt_clients(n, F)
    out: list[tuple[str, set[int]]] = []
    block: set[int] = set()
    for p in range(n):  # contiguous block, kept only while every honest node has <= c colluding holders
        trial = block | {p}
        if len(trial) > C:
            break
        if all(sum(1 for x in neighbours(u, n, k) if x in trial) <= c for u in range(n) if u not in trial):
            block = trial
    if os.environ.get("QSET"):  # a given placement (positions), e.g. one where another model found an attack
        return [("given", {int(x) for x in os.environ["QSET"].split(",")})]
    out.append(("block", block))
    for s in range(trials):
        while True:
            Q = set(int(x) for x in rng.choice(n, C, replace=False))
            if all(sum(1 for x in neighbours(u, n, k) if x in Q) <= c for u in range(n) if u not in Q):
                break
        out.append((f"random{s}", Q))
    return out


def main() -> None:
    n, k = int(sys.argv[1]), int(sys.argv[2])
    trials = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    h, c = T.cohort_bound(n, k, F)
    t = int(os.environ.get("T", T.min_threshold(h, c)))  # T=...: validation with an unsafe threshold
    kk = k if h != n else 0
    max_h = int(os.environ.get("MAX_H", t - c - 1))
    rng = np.random.default_rng(1000 + n + k)
    tag = f"{CHECK}{' REL' if REL else ''}"
    print(f"[{tag}] n={n} k={kk or 'complete'} h={h} c={c} t={t} C={T.corrupt_clients(n, F)}: looking for an "
          f"unmaskable sum with 1..{max_h} honest inputs (claim: >= t-c = {t - c}), views 1..{VIEWS}", flush=True)
    for name, Q in placements(n, kk, c, trials, rng):
        worst = max(sum(1 for x in neighbours(u, n, kk) if x in Q) for u in range(n) if u not in Q)
        for m in range(int(os.environ.get("MINVIEWS", "1")), VIEWS + 1):
            t0 = time.time()
            status, sol = build(n, kk, t, c, Q, m, max_h).solve()
            verdict = {0: "FEASIBLE", 1: "time limit (undecided)", 2: "infeasible"}.get(status, f"status {status}")
            print(f"  {name} |Q|={len(Q)} max colluding nbrs={worst} views={m}: {verdict} ({time.time() - t0:.1f}s)",
                  flush=True)
            if sol is not None:
                H = sorted(key[1] for key, val in sol.items() if key[0] == "h" and val)
                views = {i: sorted(w for w in range(n) if sol.get(("e", i, w))) for i in range(m)}
                print(f"    H={H} Q={sorted(Q)} views={views}", flush=True)
                break


if __name__ == "__main__":
    main()
