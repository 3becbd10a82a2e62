"""Issue 10.2 rerun: one site of four lies about its weight (real coordinator, weighted FedAvg).

 neg      : declares weight -5
 huge     : declares weight 1e9
 mismatch : declares weight 1, encodes its update with weight W (env W, default 1000)
 big-vec  : declares weight 1, sends a vector 1000x the honest scale
Prints the round's status/reason and, if released, |agg - honest mean| / |honest mean|.
"""
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.server_helpers as H

flag = threading.local()
real_ring_input = H.ring_input
W = 1000.0


def ring_input(start, update, weight):  # the evil thread encodes with another weight
    return real_ring_input(start, update, W if getattr(flag, "evil", False) else weight)


H.ring_input = ring_input


class Evil(H.Scripted):
    encode_other_weight: bool = False

    def run(self) -> None:
        flag.evil = self.encode_other_weight
        super().run()


def trial(case: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    names = ["a", "b", "c", "evil"]
    coordinator, store = H.make_job(tmp, names, weighted=True)
    vecs = H.vectors(4)
    honest = vecs[:3]
    hmean = sum(honest) / 3
    sites = [H.Scripted(coordinator, n, v) for n, v in zip(names[:3], honest, strict=True)]
    evil_vec, weight, other = -hmean / np.linalg.norm(hmean) * 0.5, 1.0, False
    if case == "neg":
        weight = -5.0
    elif case == "huge":
        weight = 1e9
    elif case == "mismatch":
        other = True
    elif case == "big-vec":
        evil_vec = evil_vec * 1000
    e = Evil(coordinator, "evil", evil_vec, weight=weight)
    e.encode_other_weight = other
    sites.append(e)
    summary = H.run_job(coordinator, sites)
    recs = store.rounds(coordinator.run_id)
    line = "; ".join(f"attempt {r.attempt}: {r.status} ({(r.reason or '')[:110]})" for r in recs)
    print(f"{case}: job {summary.status}; {line}; evil error={str(e.error)[:100] if e.error else None}")
    done = [r for r in recs if r.status == "completed"]
    if done:
        agg = store.aggregate(coordinator.run_id, 1)
        print(f"   released: |agg - honest mean|/|honest mean| = "
              f"{np.linalg.norm(agg - hmean) / np.linalg.norm(hmean):.2f}, |agg|/|honest mean| = "
              f"{np.linalg.norm(agg) / np.linalg.norm(hmean):.2f}")
    store.close()


if __name__ == "__main__":
    for case in sys.argv[1:] or ["neg", "huge", "mismatch", "big-vec"]:
        trial(case)
