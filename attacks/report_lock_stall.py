"""Issue 10 attack 3 variant: a ReportMetrics whose claimed spend is slow to verify, sent by one site.

The server range-checks the spend, then recomputes the site's epsilon with the RDP accountant
*inside the coordinator's lock*.  z = 1e6 (the allowed maximum) with q = 0.5 takes seconds per
recomputation.  One evil site (otherwise honest) reports such a spend in each round; we time how
long an honest site's Poll blocks meanwhile and whether rounds complete.
"""
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedveil.protocol import fedveil_pb2 as pb
from tests.server_helpers import Scripted, make_job, run_job, vectors


def main(z: float, q: float, rounds: int = 2, evils: int = 1, stage_timeout: float = 5.0) -> None:
    tmp = Path(tempfile.mkdtemp())
    names = ["a", "b", "c"] + [f"evil{i}" for i in range(evils)]
    coordinator, store = make_job(tmp, names, rounds=rounds, dp="local", dp_local_noise_multiplier=1.0,
                                  stage_timeout=stage_timeout)
    vecs = vectors(3 + evils)
    sites = [Scripted(coordinator, n, v) for n, v in zip(names[:3], vecs[:3])]
    for i in range(evils):  # a distinct z per evil site: no shared curve cache
        spend = pb.LocalPrivacySpend(epsilon=0.0, delta=coordinator.config.dp_delta, noise_multiplier=z - i,
                                     sample_rate=q, steps=1, accountant="rdp")
        sites.append(Scripted(coordinator, f"evil{i}", vecs[3 + i], privacy=spend))
    # probe: how long does a cheap coordinator call under the lock take while the job runs
    worst = [0.0]
    stop = threading.Event()
    def probe():
        while not stop.is_set():
            t0 = time.time()
            with coordinator._cond:
                pass
            worst[0] = max(worst[0], time.time() - t0)
            time.sleep(0.05)
    threading.Thread(target=probe, daemon=True).start()
    t0 = time.time()
    summary = run_job(coordinator, sites)
    stop.set()
    print(f"z={z:g} q={q}: status={summary.status} completed={summary.completed_rounds}/{rounds} "
          f"rejected={summary.rejected_rounds} wall={time.time()-t0:.1f}s; longest wait for the coordinator lock={worst[0]:.2f}s")
    for r in store.rounds(coordinator.run_id):
        print("  round", getattr(r, "round", getattr(r, "round_number", "?")), r.status, r.survivors, (r.reason or "")[:100])
    store.close()

if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2,
         int(sys.argv[4]) if len(sys.argv) > 4 else 1, float(sys.argv[5]) if len(sys.argv) > 5 else 5.0)
