"""Issue 10.5 rerun: with central DP + adaptive clipping, what does the store keep about the count of
unclipped sites?  4 scripted sites, 3 with updates under the clip and 1 over it (exact count 3).
Prints every stats key of every round; an integer-valued 'unclipped' entry would be the raw count."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_helpers import Scripted, make_job, run_job, vectors  # noqa: E402

tmp = Path(tempfile.mkdtemp())
names = ["a", "b", "c", "d"]
coord, store = make_job(tmp, names, dp="central", dp_clip=0.5, dp_noise_multiplier=0.3, dp_adaptive_clipping=True,
                        weighted=False, rounds=2)
vecs = vectors(4)
vecs = [v * (0.3 / np.linalg.norm(v)) for v in vecs[:3]] + [vecs[3] * (0.49 / np.linalg.norm(vecs[3]))]
# the adaptive-clipping input carries a last coordinate: 1 if the site's update was unclipped
vecs = [np.append(v, 1.0) for v in vecs]  # all 4 unclipped: exact count 4 each round
summary = run_job(coord, [Scripted(coord, n, v) for n, v in zip(names, vecs, strict=True)])
print("job", summary.status)
for r in store.rounds(coord.run_id):
    print(r.round, r.status, json.dumps(r.stats if hasattr(r, "stats") else None)[:400])
con = __import__("sqlite3").connect(tmp / "run.db")
for row in con.execute("select round, stats_json from rounds"):
    print("stats_json:", row)
