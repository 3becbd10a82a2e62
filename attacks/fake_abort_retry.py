"""Issue 9.3 rerun: fake abort AFTER unmasking, then retry the same round without the victim.

Real Coordinator, four unmodified Federation sites (secure-default policy).  The override: round 1
attempt 1 decodes the sum (all unmasking shares were sent), records it, then raises, so the job
aborts the attempt and reruns round 1; attempt 2 is offered to the cohort minus the victim.
Success = attempt 2 completes over the other sites, and sum(1) - sum(2) is the victim's update.
Env: DP=distributed|central (Z, CLIP) to run under DP.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, job_config, run_job, turnkey

torch.set_num_threads(1)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
got: dict[int, Any] = {}


class FakeAbort(Coordinator):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        real_apply = self.model.apply

        def apply(plan: Any, ring_sum: Any, survivors: Any, declared: Any = None) -> Any:
            applied = real_apply(plan, ring_sum, survivors, declared)
            attempt = self._attempts.get(plan.round_number if hasattr(plan, "round_number") else 1, 0)
            got[attempt] = (applied, survivors, declared)
            if attempt == 1:
                raise RuntimeError("fake abort after unmasking")
            return applied
        self.model.apply = apply

    def _run_round(self, number: int, available: list[str], purpose: Any = None) -> str:
        from fedveil.protocol import fedveil_pb2 as pb
        if self._attempts.get(number, 0) >= 1:
            available = [a for a in available if a != VICTIM]
        return super()._run_round(number, available, pb.ROUND_PURPOSE_TRAIN if purpose is None else purpose)


def main() -> None:
    dp: dict[str, Any] = {}
    if os.environ.get("DP"):
        dp = dict(dp=os.environ["DP"], dp_clip=float(os.environ.get("CLIP", "1")),
                  dp_noise_multiplier=float(os.environ.get("Z", "1.0")))
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES)]
    cfg = job_config(rounds=1, min_clients=3, clients_per_round=4, batch_size=10_000, local_epochs=1,
                     max_round_attempts=3, round_timeout=20.0, **dp)
    summary, results, errors = run_job(Path(tempfile.mkdtemp()), cfg, synthetic, sites, coordinator_cls=FakeAbort)
    print("job:", summary.status, summary.completed_rounds, "errors", errors)
    for fed_hist in results:
        if fed_hist:
            fed, hist = fed_hist
            print(fed.client_name, [(h.round, h.outcome, h.reason[:90]) for h in hist])
    print("attempts decoded:", sorted(got))
    if 1 in got and 2 in got:
        (a1, n1, w1), (a2, n2, w2) = got[1], got[2]
        s1 = np.asarray(a1.aggregate, np.float64) * (w1 or n1)
        s2 = np.asarray(a2.aggregate, np.float64) * (w2 or n2)
        print("survivors", n1, n2, "difference (victim's weighted update?):", np.round(s1 - s2, 4).tolist())
        print("ATTEMPT 2 COMPLETED OVER A COHORT THAT INCLUDES SITES OF ATTEMPT 1: check the differencing above")
    else:
        print("ATTACK FAILED: no second decoded attempt")


if __name__ == "__main__":
    main()
