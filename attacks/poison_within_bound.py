"""Issue 10 attack 2 variant: skip the clip under central DP, but stay just inside the server's
aggregate check (sum L2 norm <= n*S).  3 honest sites + 1 evil; the evil update points along -mean
of the honest ones with norm r*S.  Is the round accepted, and how far does the evil site pull the
(un-noised) aggregate compared with the honest mean?
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_helpers import Scripted, make_job, run_job, vectors


def trial(r: float, clip: float = 0.5) -> None:
    tmp = Path(tempfile.mkdtemp())
    names = ["a", "b", "c", "evil"]
    coordinator, store = make_job(tmp, names, dp="central", dp_clip=clip, dp_noise_multiplier=0.01, weighted=False)
    vecs = vectors(4)
    honest = [v * min(1.0, clip / np.linalg.norm(v)) for v in vecs[:3]]
    hmean = sum(honest) / 3
    evil = -hmean / np.linalg.norm(hmean) * r * clip
    sites = [Scripted(coordinator, n, v) for n, v in zip(names[:3], honest)]
    sites.append(Scripted(coordinator, "evil", evil))
    summary = run_job(coordinator, sites)
    (rec,) = store.rounds(coordinator.run_id)
    agg = store.aggregate(coordinator.run_id, 1) if rec.status == "completed" else None
    honest_mean_4 = sum(honest) / 4
    if agg is not None:
        ratio = np.linalg.norm(agg - honest_mean_4) / np.linalg.norm(honest_mean_4)
        cos = float(agg @ hmean / (np.linalg.norm(agg) * np.linalg.norm(hmean)))
        eff = 4 * agg - sum(honest)  # what the evil site really added (plus the small central noise)
        print(f"evil norm {r:.2f}*S: round {rec.status}; |agg - honest-only| / |honest-only| = {ratio:.2f}; "
              f"cos(agg, honest mean) = {cos:+.2f}; evil's effective contribution |.| = "
              f"{np.linalg.norm(eff) / clip:.2f}*S; |sum| = {np.linalg.norm(4 * agg) / clip:.2f}*S (n*S = 4*S)")
    else:
        print(f"evil norm {r:.2f}*S: round {rec.status} ({(rec.reason or '')[:120]})")
    store.close()

if __name__ == "__main__":
    for r in map(float, sys.argv[1:]):
        trial(r)
