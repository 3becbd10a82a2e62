"""A malicious server replays a global model across rounds (issue 9, attack 3 across rounds; found by
the independent attacker): round 1 runs with {victim, a, b, c}; the server does not apply its result,
so round 2 shows the *same* model, and runs with {a, b, c}. With full-batch training an honest site's
update and evaluation are functions of the model, so sum(1) − sum(2) would be the victim's exact
update and metrics. A site refuses to release a second sum over a model it released one over when
no noise it relies on protects the release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedveil.clients.site_state import SiteState
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, job_config, run_job, turnkey

NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


class ReplayingServer(Coordinator):
    """The real coordinator, except that no round's result is ever applied, and round 2 leaves the victim out."""

    applied: dict[int, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied = {}
        self._number = 0
        genuine_apply, genuine_commit = self.model.apply, self.model.commit

        def apply(plan: Any, ring_sum: Any, survivors: int, declared: float | None = None) -> Any:
            result = genuine_apply(plan, ring_sum, survivors, declared)
            self.applied[self._number] = result
            return result

        def commit(applied: Any) -> None:
            keep = self.model.params.copy()
            genuine_commit(applied)
            self.model.params = keep  # the same model again, under the next version number

        self.model.apply, self.model.commit = apply, commit  # type: ignore[method-assign]

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        self._number = number
        if number == 2:
            available = [a for a in available if a != VICTIM]
        return super()._run_round(number, available, purpose)


def test_a_replayed_model_gets_no_second_sum_from_the_sites_that_released_one(tmp_path: Path) -> None:
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, name, i, consortium) for i, name in enumerate(NAMES)]
    config = job_config(rounds=2, min_clients=3, clients_per_round=4, batch_size=10_000, local_epochs=1,
                        max_round_attempts=1)
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, coordinator_cls=ReplayingServer)
    assert not errors, errors
    histories = {fed.client_name: history for fed, history in (r for r in results if r is not None)}
    # round 1 was released with the victim in it ...
    assert all(any(h.round == 1 and h.outcome == "completed" for h in histories[n]) for n in NAMES)
    # ... and every site shown round 1's model again declined round 2 before sending anything
    for name in NAMES[1:]:
        declined = [h for h in histories[name] if h.round == 2 and h.outcome == "declined"]
        assert declined and "already released a sum over" in declined[0].reason, histories[name]
    assert summary.completed_rounds == 1, summary


def test_the_released_models_survive_a_restart_of_the_site(tmp_path: Path) -> None:
    path = tmp_path / "site-state.json"
    state = SiteState.open(path)
    digest = bytes(range(32))
    state.released("run-1", 1, digest)
    reopened = SiteState.open(path)
    assert reopened.released_over("run-1", digest)
    assert not reopened.released_over("run-2", digest) and not reopened.released_over("run-1", bytes(32))
    assert not reopened.released_over("run-1", b"")
    assert np.array_equal(sorted(reopened.released_models["run-1"]), [digest.hex()])
