"""Issue 9 attacks 3 & 4, variant: differencing across ROUNDS instead of attempts.

Retries of a released round are declined, so the malicious server does not retry: it runs round 1
with the full cohort {victim, a, b, c}, then does NOT apply the result (round 2's "global model"
is round 1's model again, under a new version) and runs round 2 with the cohort {a, b, c}.
Training uses full-batch GD (batch_size = all records, set through the job's own training params),
so an honest site's update is a deterministic function of the global model, and so is its
evaluation.  The victim's update = sum(round 1) - sum(round 2) (up to stochastic rounding);
its evaluation metrics on the server-chosen model = secure-eval sum(1) - sum(2).

Sites: unmodified fedveil Federation clients with the secure-default policy (active mode,
authority-pinned identities).  Server: the real Coordinator with two overrides.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedveil.server.coordinator import Coordinator
from fedveil.task import model_to_vector, vector_to_model
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, job_config, run_job, turnkey

torch.set_num_threads(1)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
captured: dict[str, Any] = {"applied": {}}


class Differencer(Coordinator):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        captured["c"] = self
        real_apply, real_commit = self.model.apply, self.model.commit
        import os
        if os.environ.get("CRAFT"):  # a crafted "global model": predict 1 iff x0 > theta (a counting query)
            theta = float(os.environ["CRAFT"])
            crafted = np.zeros_like(self.model.params)
            crafted[0] = 50.0
            crafted[-1] = -50.0 * theta
            self.model.params = crafted.astype(self.model.params.dtype)
        captured["initial"] = self.model.params.copy()

        def apply(plan, ring_sum, survivors, declared=None):
            applied = real_apply(plan, ring_sum, survivors, declared)
            captured["applied"][self._current] = (applied, survivors, declared)
            return applied

        def commit(applied):
            keep = self.model.params.copy()
            real_commit(applied)
            eps = float(os.environ.get("PERTURB", "0"))
            if eps:  # replay a slightly perturbed model: a new digest, (almost) the same updates
                keep = keep + np.float32(eps) * np.random.default_rng(9).standard_normal(keep.shape).astype(keep.dtype)
            captured["round2_model"] = keep.copy()
            self.model.params = keep  # replay the same global model next round (new version number)
        self.model.apply, self.model.commit = apply, commit

    def _run_round(self, number, available, purpose=None):
        from fedveil.protocol import fedveil_pb2 as pb
        purpose = pb.ROUND_PURPOSE_TRAIN if purpose is None else purpose
        self._current = number
        if number == 2:
            available = [a for a in available if a != VICTIM]
        return super()._run_round(number, available, purpose)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES)]
    import os
    dp = {}
    if os.environ.get("DP"):
        dp = dict(dp=os.environ["DP"], dp_clip=float(os.environ.get("CLIP", "10")),
                  dp_noise_multiplier=float(os.environ.get("Z", "1.0")))
    cfg = job_config(rounds=2, min_clients=3, clients_per_round=4, batch_size=10_000, local_epochs=1,
                     evaluate=(not dp) or bool(os.environ.get("EVAL")), round_timeout=20.0,
                     final_evaluation=bool(os.environ.get("FINAL")), evaluation=os.environ.get("EVALMODE", "secure"),
                     **dp)
    summary, results, errors = run_job(tmp, cfg, synthetic, sites, coordinator_cls=Differencer)
    print("job:", summary.status, "rounds", summary.completed_rounds, "errors", errors)
    if os.environ.get("FINAL"):
        print("summary:", summary)
    for fed_hist in results:
        if fed_hist:
            fed, hist = fed_hist
            print(fed.client_name, [(h.round, h.outcome, h.reason[:60]) for h in hist])
    ap = captured["applied"]
    if 1 not in ap or 2 not in ap:
        print("ATTACK FAILED: rounds not both completed", list(ap)); return
    (a1, n1, w1), (a2, n2, w2) = ap[1], ap[2]
    print("survivors", n1, n2, "declared weights", w1, w2)
    # aggregate is the weighted mean update: sum = mean * total weight
    s1 = np.asarray(a1.aggregate, dtype=np.float64) * (w1 or n1)
    s2 = np.asarray(a2.aggregate, dtype=np.float64) * (w2 or n2)
    stolen = s1 - s2
    wv = (w1 or n1) - (w2 or n2)
    # ground truth: the victim's own full-batch update and evaluation from the same global model
    from torch.utils.data import DataLoader
    data = synthetic.synthetic_data(0, 4, 3)
    model = synthetic.build_model()
    vector_to_model(captured["initial"].astype(np.float32), model)
    with torch.no_grad():
        true_eval = synthetic.evaluate(model, data)
    model.train()
    opt = synthetic.make_optimizer(model.parameters())
    for _ in range(1):
        synthetic.train_epoch(model, DataLoader(data, batch_size=10_000, shuffle=True), opt)
    true_delta = model_to_vector(model).astype(np.float64) - captured["initial"].astype(np.float64)
    print("victim weight recovered:", wv)
    print("stolen victim update (weighted):", np.round(stolen, 5).tolist())
    print("stolen victim update / weight :", np.round(stolen / wv, 5).tolist() if wv else None)
    e1, e2 = a1.evaluation, a2.evaluation
    print("eval round1:", e1); print("eval round2:", e2)
    got = stolen / wv
    print("true   victim update          :", np.round(true_delta, 5).tolist())
    print("max |stolen - true| =", float(np.max(np.abs(got - true_delta))), " |true| max =", float(np.max(np.abs(true_delta))))
    if not e1 or not e2:
        print("no evaluation sums in one of the rounds: nothing to difference"); return
    (m1, x1), (m2, x2) = e1, e2
    if x1 == x2:
        print(f"victim's evaluation examples from differencing: {x1 - x2:g} (it contributed no evaluation sums)")
        return
    acc_v = (m1["accuracy"] * x1 - m2["accuracy"] * x2) / (x1 - x2)
    loss_v = (m1["loss"] * x1 - m2["loss"] * x2) / (x1 - x2)
    print(f"victim eval from differencing: examples={x1 - x2:g} accuracy={acc_v:.6f} loss={loss_v:.6f}")
    print(f"victim eval ground truth     : examples={len(data)} {true_eval}")
    import os
    if os.environ.get("CRAFT"):
        x, y = data.tensors
        theta = float(os.environ["CRAFT"])
        truth = float(((x[:, 0] > theta).float() == y).float().sum())
        print(f"counting query #(y == [x0 > {theta}]) on the victim's records: from attack {acc_v * (x1 - x2):.4f}, truth {truth}")
    captured["stolen"] = got
    np.save(tmp / "stolen.npy", captured["stolen"])
    print("saved", tmp / "stolen.npy", "initial model", captured["initial"].tolist())


if __name__ == "__main__":
    main()
