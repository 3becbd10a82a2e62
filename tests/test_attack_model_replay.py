"""A malicious server replays a global model across rounds (issue 9, attack 3 across rounds; found by
the independent attacker): round 1 runs with {victim, a, b, c}; the server does not apply its result,
so round 2 shows the *same* model, and runs with {a, b, c}. With full-batch training an honest site's
update and evaluation are functions of the model, so sum(1) − sum(2) would be the victim's exact
update and metrics. A site refuses to release a second sum over a model it released one over when
no noise it relies on protects the release."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedveil.clients.site_state import SiteState
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.codec import model_digest
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, Consortium, job_config, run_job, turnkey

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


class DisguisingServer(ReplayingServer):
    """The replaying server, which also disguises the replayed model in round 2 so that its ``sha256``
    field differs from round 1's: sent empty, or the same values re-encoded with a zero as -0.0 (and
    the field recomputed to match). Found by the second attacker review: the site used to take the
    server's field as the model's name, and skipped the check of an empty one."""

    disguise = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model.params[0] = 0.0  # a zero to re-encode as -0.0 (round 1's model holds it too)

    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse:
        response = super().poll(caller, request)
        if response.WhichOneof("instruction") != "round_start" or response.round_start.round != 2:
            return response
        disguised = pb.PollResponse()
        disguised.CopyFrom(response)
        model = disguised.round_start.model
        if self.disguise == "empty-sha256":
            model.sha256 = b""
        else:
            values = np.frombuffer(model.data, dtype="<f4").copy()
            assert np.count_nonzero(values == 0.0)
            values[values == 0.0] = np.float32(-0.0)
            model.data = values.tobytes()
            model.sha256 = hashlib.sha256(model.data).digest()
        return disguised


@pytest.mark.parametrize("disguise", ["", "empty-sha256", "negative-zero"])
def test_a_replayed_model_gets_no_second_sum_from_the_sites_that_released_one(tmp_path: Path, disguise: str) -> None:
    consortium = Consortium.create(NAMES)
    sites = [turnkey(synthetic, name, i, consortium) for i, name in enumerate(NAMES)]
    config = job_config(rounds=2, min_clients=3, clients_per_round=4, batch_size=10_000, local_epochs=1,
                        max_round_attempts=1, cohort_wait=ALL_JOIN_WAIT)

    class Server(DisguisingServer):
        pass

    Server.disguise = disguise
    summary, results, errors = run_job(tmp_path, config, synthetic, sites,
                                       coordinator_cls=Server if disguise else ReplayingServer, enrolled=NAMES)
    assert not errors, errors
    histories = {fed.client_name: history for fed, history in (r for r in results if r is not None)}
    # round 1 was released with the victim in it ...
    assert all(any(h.round == 1 and h.outcome == "completed" for h in histories[n]) for n in NAMES)
    # ... and every site shown round 1's model again declined round 2 before sending anything
    for name in NAMES[1:]:
        declined = [h for h in histories[name] if h.round == 2 and h.outcome == "declined"]
        assert declined and "already released a sum over" in declined[0].reason, histories[name]
    assert summary.completed_rounds == 1, summary


def test_a_new_run_from_a_model_a_site_released_over_gets_no_second_sum(tmp_path: Path) -> None:
    """The replay across runs (second attacker review): run A trains round 1 with every site; the
    server starts run B from the same initial model (same seed) without the victim. The sites keep
    their state files, so they know the model, and decline."""
    consortium = Consortium.create(NAMES)
    config = job_config(rounds=1, min_clients=3, clients_per_round=4, batch_size=10_000, local_epochs=1,
                        max_round_attempts=1, cohort_wait=ALL_JOIN_WAIT)

    def sites(names: list[str]) -> list[Any]:
        return [turnkey(synthetic, name, NAMES.index(name), consortium, state_path=tmp_path / f"{name}.json")
                for name in names]

    (tmp_path / "a").mkdir()
    summary_a, _results, errors = run_job(tmp_path / "a", config, synthetic, sites(NAMES))
    assert not errors and summary_a.completed_rounds == 1, (errors, summary_a)
    (tmp_path / "b").mkdir()
    servers: list[Coordinator] = []
    summary_b, results, errors = run_job(tmp_path / "b", config.replace(clients_per_round=3), synthetic,
                                         sites(NAMES[1:]), service=lambda c: servers.append(c) or c)
    assert not errors, errors
    assert summary_b.run_id != summary_a.run_id and summary_b.completed_rounds == 0, summary_b
    for fed, history in results:
        assert [h.outcome for h in history] == ["declined"], (fed.client_name, history)
        assert "in this run or an earlier one" in history[0].reason
    # each decline said why (RoundResponse.released_over_model): an honest server draws none of them again
    # until its model changes
    assert set(servers[0]._released_unchanged) == set(NAMES[1:])


def test_a_site_names_a_model_by_its_values() -> None:
    values = np.array([0.0, 1.5, -2.0, 0.0], dtype=np.float32)
    flipped = values.copy()
    flipped[values == 0.0] = np.float32(-0.0)
    assert flipped.tobytes() != values.tobytes()  # the server's field would differ ...
    assert model_digest(flipped) == model_digest(values)  # ... the site's name does not
    assert model_digest(values) == hashlib.sha256(values.astype("<f4").tobytes()).digest()  # as before, for +0.0
    assert model_digest(values + np.float32(1e-7)) != model_digest(values)


def test_the_released_models_survive_a_restart_of_the_site(tmp_path: Path) -> None:
    path = tmp_path / "site-state.json"
    state = SiteState.open(path)
    digest = bytes(range(32))
    state.released("run-1", 1, digest)
    reopened = SiteState.open(path)
    assert reopened.released_over(digest)  # in any run: a new run from the same model is a replay too
    assert not reopened.released_over(bytes(32))
    with pytest.raises(ValueError, match="model_digest"):
        reopened.released_over(b"")  # never silently "not released"
    with pytest.raises(ValueError, match="model_digest"):
        reopened.released("run-1", 2, b"")
    assert np.array_equal(sorted(reopened.released_models["run-1"]), [digest.hex()])
