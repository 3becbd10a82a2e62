"""A malicious server that asks a site for more rounds or evaluations than it accounted for.

The real coordinator and four real sites run a job behind a
:class:`~tests.attack_helpers.TamperingServer`; the victim (``site-0``) runs the unmodified client
code. Each extra round or evaluation the site answers is one more look at its data (a sum to
difference against another cohort's, or a query the server chose), so the site pins the job's
round count R at its first join and caps evaluation requests per job
(:mod:`fedveil.clients.site_state`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.clients import ClientError, run_client
from fedveil.clients.site_state import SiteState
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, TamperingServer, job_config, run_job, site_federation, turnkey

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
DATA_RPCS = ("advertise_keys", "share_keys", "submit_masked_input", "confirm_survivors", "unmask")


def _declines(server: TamperingServer) -> list[str]:
    return [r.decline_reason for r in server.sent.named("respond_to_round") if not r.accept]


def _sent_data(server: TamperingServer) -> list[str]:
    return [name for name, _ in server.sent.calls if name in DATA_RPCS]


def _attack(tmp_path: Path, tamper: Any = None, *, config: Any = None, before: Any = None,
            coordinator_cls: type[Coordinator] = Coordinator, victim_state: Path | None = None,
            evaluations: list[int] | None = None) -> tuple[Any, TamperingServer, list[Any], list[BaseException]]:
    consortium = Consortium.create(NAMES)
    holder: dict[str, TamperingServer] = {}

    def front(coordinator: Coordinator) -> TamperingServer:
        if before is not None:
            before(coordinator)
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper, rebind=True)  # a careful liar binds what it shows
        return holder["s"]

    def victim(service: Any) -> Any:
        fed = site_federation(service, synthetic, VICTIM, 0, consortium,
                              state_path=victim_state)
        if evaluations is not None:
            inner = fed.options.evaluate
            assert inner is not None

            def counted(model: Any) -> dict[str, float]:
                evaluations.append(1)
                return inner(model)

            fed.options = dataclasses.replace(fed.options, evaluate=counted)
        assert synthetic.synthetic_data is not None
        return fed, run_client(fed, synthetic, synthetic.synthetic_data(0, 4, 3))

    sites = [victim, *(turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES) if n != VICTIM)]
    summary, results, errors = run_job(tmp_path, config or job_config(), synthetic, sites, service=front,
                                       coordinator_cls=coordinator_cls)
    return summary, holder["s"], results, errors


@pytest.mark.slow
@pytest.mark.parametrize("number", [0, 2, 7])
def test_a_training_round_outside_the_jobs_rounds_is_declined(tmp_path: Path, number: int) -> None:
    """The job has one round; the server numbers the victim's round 0, 2 (R + 1) or 7."""
    def renumber(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start":
            resp.round_start.round = number
        return resp

    # the victim's decline names a round the server is not running, so the commit stage waits out its
    # timeout for the victim: 1.5 s instead of the helpers' 5. Only the victim's calls are checked, so an
    # honest site that misses the shorter stage changes nothing here
    _s, server, _r, _e = _attack(tmp_path, renumber, config=job_config(stage_timeout=1.5))
    assert _declines(server) and "outside the job's rounds 1..1" in _declines(server)[0]
    assert _sent_data(server) == []


@pytest.mark.slow
def test_a_server_that_later_announces_more_rounds_is_refused(tmp_path: Path) -> None:
    """The site joined this run for one round (its state file says so); the restarted server now
    announces three."""
    state_path = tmp_path / "victim-state.json"

    def pinned_before(coordinator: Coordinator) -> None:
        state = SiteState.open(state_path)
        assert state.pin_job(coordinator.run_id, 1) is None

    # the victim, once drawn, never answers its round: the commit stage waits out its timeout for it (1.5 s
    # instead of the helpers' 5; only the victim's calls and errors are checked)
    _s, server, _r, errors = _attack(tmp_path, config=job_config(rounds=3, min_clients=3, clients_per_round=3,
                                                                 stage_timeout=1.5),
                                     before=pinned_before, victim_state=state_path)
    assert any(isinstance(e, ClientError) and "joined it for 1" in str(e) for e in errors), errors
    assert server.sent.named("respond_to_round") == [] and _sent_data(server) == []


class EvaluationOracle(Coordinator):
    """Before training, asks the cohort to evaluate in an evaluation-only round at every round
    number the sites would accept (1..R + 1): each is a query on the sites' data."""

    probes = 0

    def _run_round(self, number: int, available: list[str], purpose: int = pb.ROUND_PURPOSE_TRAIN) -> str:
        if purpose == pb.ROUND_PURPOSE_TRAIN and not type(self).probes:
            type(self).probes = 1
            for phase in range(1, self.config.schedule.rounds + 2):
                type(self).probes += 1
                super()._run_round(phase, available, purpose=pb.ROUND_PURPOSE_EVALUATE)
        return super()._run_round(number, available, purpose)


def test_evaluation_requests_are_capped_per_job(tmp_path: Path) -> None:
    EvaluationOracle.probes = 0
    calls: list[int] = []
    _s, server, results, _e = _attack(
        tmp_path, config=job_config(rounds=2, evaluate=False, final_evaluation=False, max_round_attempts=1),
        coordinator_cls=EvaluationOracle, evaluations=calls)
    assert EvaluationOracle.probes == 4  # three evaluation-only rounds were asked for
    assert len(calls) <= 1, calls  # the victim answered at most max_evaluations_per_job = 1 of them
    assert any("max_evaluations_per_job" in d for d in _declines(server)), _declines(server)
    fed = results[0][0]
    assert fed.state.job_evaluations(fed.run_id) == len(calls)


def test_site_state_pins_rounds_and_counts_evaluations_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    state = SiteState.open(path)
    assert state.pin_job("run", 3) is None
    assert state.admission_refusal("run", 3, 2) is None
    assert "outside" in (state.admission_refusal("run", 4, 2) or "")
    assert state.admission_refusal("run", 4, 2, evaluation_only=True, max_evaluations_per_job=1) is None
    assert "outside" in (state.admission_refusal("run", 5, 2, evaluation_only=True) or "")
    assert "outside" in (state.admission_refusal("run", 0, 2) or "")
    assert state.evaluated_for_job("run", 1) is True and state.evaluated_for_job("run", 1) is False
    reopened = SiteState.open(path)
    assert "joined it for 3" in (reopened.pin_job("run", 4) or "")
    assert reopened.pin_job("run", 3) is None and reopened.pin_job("run", 2) is None  # fewer rounds: harmless
    assert "max_evaluations_per_job" in (reopened.admission_refusal("run", 2, 2, evaluation_only=True,
                                                                    max_evaluations_per_job=1) or "")
    assert reopened.job_evaluations("run") == 1


def test_the_servers_evaluation_cap_is_validated_and_names_its_flag() -> None:
    from fedveil.server.config import ServerConfig, ServerConfigError

    assert job_config().evaluation.max_per_job == 1
    with pytest.raises(ServerConfigError) as err:
        ServerConfig.from_flat(task="fedveil.tasks.synthetic", rounds=1, clients_per_round=4, min_clients=4,
                               max_evaluations_per_job=-1)
    assert err.value.flag == "--max-evaluations-per-job"


def test_a_server_that_moves_a_site_to_another_run_on_re_join_is_refused(tmp_path: Path) -> None:
    """Per-run caps (evaluations per job, attempts, the pinned round count) start fresh in a new run,
    so a server that answers a re-join with another run would reset them without the operator (the
    second attacker review). A client session takes part in one run; a re-join into the same run is
    fine."""
    store = RunStore(tmp_path / "run.sqlite")
    coordinator = Coordinator(job_config(rounds=1), synthetic, store, new_run=True)
    other_run = {"id": ""}

    def move(response: pb.JoinResponse) -> pb.JoinResponse:
        if other_run["id"]:
            response.run_id = other_run["id"]
        return response

    server = TamperingServer(coordinator, VICTIM, tamper_join=move)
    fed = site_federation(server, synthetic, VICTIM, 0, Consortium.create(NAMES))
    fed._ensure_joined()
    first = fed.run_id
    fed._rejoin("the test forces a re-join into the same run")
    assert fed.run_id == first
    other_run["id"] = "run-elsewhere"
    with pytest.raises(ClientError, match=f"moved this site from run {first} to run run-elsewhere"):
        fed._rejoin("the test forces a re-join the server answers with another run")
    assert fed.run_id is None  # no session in the other run
    store.close()
