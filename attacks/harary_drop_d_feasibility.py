"""Combinatorial feasibility of the 'withheld shares + drop D' split on the library's Harary parameters.

Attack idea (no colluders needed in the best case): the server forwards to victim v only the share
boxes of a set D of t-1 of its neighbours (v masks only with D), shows v (and D) a survivor set S_v
in which v's other neighbours are dropped, and shows everyone else S = U \\ D. Then the holders of
each j in D (other than v and D) reveal j's masking-key share, while v, D and v's other holders
reveal v's self-mask share.  Succeeds iff every j in D has >= t holders outside {j, v} U D
(plus colluders), because signatures are counted over the whole cohort (Harary) and all local
checks pass.  This script checks that combinatorial condition on a circulant H(k, n) (the
relabelling is a permutation, so structure is the same).
"""
from fedveil.secagg import threshold as T


def neigh(j, n, half):
    return {(j + o) % n for o in range(-half, half + 1) if o}

def best_D(n, k, t, c):
    half = k // 2
    d = max(t - 1, c + 1)
    best = None
    for d1 in range(0, d + 1):
        d2 = d - d1
        if d1 > half or d2 > half:
            continue
        D = {x % n for x in range(half - d1 + 1, half + 1)} | {(-x) % n for x in range(half - d2 + 1, half + 1)}
        worst = min(len(neigh(j, n, half) - {0} - D) for j in D)
        if best is None or worst > best[0]:
            best = (worst, d1, d2)
    return d, best

for n in (50, 100, 200, 500):
    for f in (1/3, 0.2, 0.1, 0.0):
        p = T.plan_threshold(n, 'harary', max_corrupt_fraction=f)
        k, t, c = p.degree, p.threshold, p.corrupt
        if not k:
            print(f"n={n} f={f:.3f}: complete graph"); continue
        d, (worst, d1, d2) = best_D(n, k, t, c)
        print(f"n={n} f={f:.3f} k={k} h={p.holders} t={t} c={c}: |D|={d} ({d1}+{d2}); min holders outside v,D of a j in D = {worst}; need t={t} -> {'FEASIBLE' if worst >= t else 'infeasible'} (gap {worst - t})")
