"""A server that shows sites different training settings or models inside one session (Pasquini,
Francati and Ateniese, CCS 2022, "Eluding secure aggregation via model inconsistency").

The attack, found by the adversarial review of 2026-12-07: every site but the victim is shown a
learning rate of 10⁻³⁰, so their float32 weights do not move and their encoded updates are exactly
zero; the one unmasked sum is then the victim's exact update. Before the fix only the round's ``dp``
and ``encoding`` sections were bound into the secure-aggregation context, so the round completed and
the server recovered the victim's update to 7e-9. The context now binds the training section, the
round, its purpose and the model as each site names it (``fedveil/protocol/binding.py``): sites shown
other terms decline (the server did not rebind) or derive another session (it did), and no sum of the
victim's update is released. Real coordinator, unmodified sites, default secure policy, no DP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedveil.clients import run_client
from fedveil.clients.options import ClientError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.binding import BINDING_BYTES, bound_context
from fedveil.protocol.codec import model_digest, model_message, model_vector
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, RecordingCoordinator, job_config, run_job, site_federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


class Inconsistent:
    """Forwards every RPC; rewrites the RoundStart of every site but the victim (``change``), and with
    ``rebind`` binds each rewritten context to what that site is shown."""

    def __init__(self, coordinator: Coordinator, change: str, rebind: bool) -> None:
        self.coordinator, self.change, self.rebind = coordinator, change, rebind

    def __getattr__(self, rpc: str) -> Any:
        return getattr(self.coordinator, rpc)

    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse:
        response = self.coordinator.poll(caller, request)
        if caller == VICTIM or self.change == "none" or response.WhichOneof("instruction") != "round_start":
            return response
        out = pb.PollResponse()
        out.CopyFrom(response)
        start = out.round_start
        if self.change == "learning_rate":
            start.training.learning_rate = 1e-30
        else:  # another global model for the others
            vector = model_vector(start.model).copy()
            vector[-1] += np.float32(1.0)
            start.model.CopyFrom(model_message(vector, start.model.version,
                                               [(t.name, tuple(t.shape)) for t in start.model.tensors]))
        if self.rebind:
            base = bytes(start.secagg.context)[:-BINDING_BYTES]
            start.secagg.context = bound_context(base, start, model_digest(model_vector(start.model)))
        return out


def _site(name: str, index: int, consortium: Consortium, updates: dict[str, np.ndarray]) -> Any:
    def go(service: Any) -> Any:
        fed = site_federation(service, synthetic, name, index, consortium)
        data = synthetic.synthetic_data(index, 4, 3)

        def after(rnd: Any, _outcome: Any) -> None:
            updates[name] = fed.spec.vector(rnd.model).astype(np.float64) - rnd.global_vector.astype(np.float64)

        return fed, run_client(fed, synthetic, data, after_round=after)
    return go


@pytest.mark.parametrize(("change", "rebind"), [
    ("none", False),  # the control: the same job releases its sum
    ("learning_rate", False), ("learning_rate", True), ("model", True),
])
def test_sites_shown_other_terms_never_let_the_victims_update_out_alone(
        tmp_path: Path, change: str, rebind: bool) -> None:
    consortium = Consortium.create(NAMES)
    updates: dict[str, np.ndarray] = {}
    holder: dict[str, RecordingCoordinator] = {}

    def front(coordinator: Coordinator) -> Inconsistent:
        assert isinstance(coordinator, RecordingCoordinator)
        holder["c"] = coordinator
        return Inconsistent(coordinator, change, rebind)

    sites = [_site(n, i, consortium, updates) for i, n in enumerate(NAMES)]
    config = job_config(rounds=1, round_timeout=20.0, stage_timeout=5.0)  # a stopped site costs a stage deadline
    summary, _results, errors = run_job(tmp_path, config, synthetic, sites, service=front,
                                        coordinator_cls=RecordingCoordinator)
    applied = holder["c"].applied
    if change == "none":
        assert not errors and summary.completed_rounds == 1 and len(applied) == 1
        return
    # a rebound site signs its keys for another session, which the real coordinator refuses: that site stops
    assert all(isinstance(err, ClientError) and "signature" in str(err) for err in errors)
    assert summary.completed_rounds == 0 and applied == []
    assert VICTIM not in updates or all(
        not np.allclose(np.asarray(a.aggregate) * 4, updates[VICTIM], atol=1e-4) for a in applied)
