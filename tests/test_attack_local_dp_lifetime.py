"""A server that starts job after job: ``max_local_epsilon`` bounds one job, ``max_lifetime_local_epsilon`` all.

Every job is a new run, and a site's per-job DP-SGD budget starts again at ε = 0 in each: a server
(or a consortium that keeps asking) can spend that budget on the same records again and again. A
site with a lifetime cap composes the DP-SGD steps its ``--state`` file holds from every job with
the round it is asked for, and declines before any step (and again before release) when the sum
would pass the cap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from fedveil.clients.local_dp import LocalDpClient
from fedveil.clients.policy import PolicyError, SitePolicy
from fedveil.clients.site_state import SiteState
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import BudgetExceededError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT, Consortium, job_config, run_job, turnkey

torch.set_num_threads(1)
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")]
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
ONE_JOB = 2.84  # ε of one round at z = 1.2, q = 1/7, 7 steps (δ = 1e-5, RDP)


def _two_jobs(tmp_path: Path, cap: float) -> tuple[list[Any], SiteState]:
    """Two one-round local-DP jobs (fixed noise z = 1.2, new run and new model each) against the same
    victim state file; the victim's per-job budget (10) allows each, its lifetime ``cap`` may not."""
    consortium = Consortium.create(NAMES)
    state_path = tmp_path / "victim-state.json"
    histories = []
    for job in range(2):
        victim = turnkey(synthetic, VICTIM, 0, consortium, state_path=state_path,
                         policy=consortium.policy(max_lifetime_local_epsilon=cap))
        sites = [victim, *(turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES) if n != VICTIM)]
        config = job_config(rounds=1, dp="local", dp_local_noise_multiplier=1.2, min_clients=3, seed=3 + job,
                            stage_timeout=20.0, round_timeout=60.0, cohort_wait=ALL_JOIN_WAIT)
        (tmp_path / f"job-{job}").mkdir()
        summary, results, errors = run_job(tmp_path / f"job-{job}", config, synthetic, sites, enrolled=NAMES)
        assert errors == [], errors
        assert summary.completed_rounds == 1  # the others go on either way
        histories.append(results[0][1])
    return histories, SiteState.open(state_path)


@pytest.mark.slow
@pytest.mark.parametrize("cap", [3.2, 0.0], ids=["capped", "no-cap"])
def test_a_second_job_on_the_same_records_is_declined_past_the_lifetime_cap(tmp_path: Path, cap: float) -> None:
    """Each job's round costs ε ≈ 2.84, well inside the per-job budget; composed, two cost 3.56. With a
    lifetime cap of 3.2 the second job is declined before any step. Control: no cap, both train."""
    histories, state = _two_jobs(tmp_path, cap)
    first, second = histories
    assert [h.outcome for h in first] == ["completed"]
    if cap:
        assert [h.outcome for h in second] == ["declined"]
        assert "max_lifetime_local_epsilon" in second[0].reason and "over the budget ε=3.2" in second[0].reason
        assert state.lifetime_local_epsilon() == pytest.approx(ONE_JOB, abs=0.01)  # no step of job 2 was taken
    else:
        assert [h.outcome for h in second] == ["completed"]
        assert state.lifetime_local_epsilon() > 3.5  # what the cap prevents: ε 3.56 over the two jobs


def _train(client: LocalDpClient, policy: SitePolicy, trained_epochs: int) -> None:
    """Privatize for one planned epoch, then train ``trained_epochs`` (a loop may train more than asked)."""
    assert synthetic.synthetic_data is not None
    model = synthetic.build_model()
    params = pb.LocalDpParams(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)
    wrapped, optimizer, loader = client.privatize(params, model, synthetic.make_optimizer(model.parameters()),
                                                  DataLoader(synthetic.synthetic_data(0, 4, 3), batch_size=32),
                                                  local_epochs=1, policy=policy)
    for _ in range(trained_epochs):
        synthetic.train_epoch(wrapped, loader, optimizer)


@pytest.mark.parametrize("trained_epochs", [1, 3], ids=["as-planned", "overtrained"])
def test_the_lifetime_cap_is_checked_before_training_and_before_release(trained_epochs: int) -> None:
    """An earlier job's 2.84 is in the state; the cap is 3.6. A round planned at one epoch (3.56 over
    both) may train; a loop that trains three epochs took more steps than planned, and the check
    before release refuses it. Once this round is saved, another round is refused before any step."""
    state = SiteState.open(None)
    state.trained_with_local_dp("earlier-run", 1, SubsampledGaussianEvent(1 / 7, 1.2, 7))
    policy = SitePolicy(authority_public_key=bytes(32), max_lifetime_local_epsilon=3.6)
    client = LocalDpClient(seed=1, lifetime=state.lifetime_local_epsilon, lifetime_delta=state.delta)
    _train(client, policy, trained_epochs)
    reason = client.over_budget(policy)
    if trained_epochs == 1:
        assert reason == ""
    else:
        assert "max_lifetime_local_epsilon = 3.6" in reason
    client.finish_round()
    state.trained_with_local_dp("this-run", 1, client.last_event)
    again = LocalDpClient(seed=2, lifetime=state.lifetime_local_epsilon, lifetime_delta=state.delta)
    with pytest.raises(BudgetExceededError, match="max_lifetime_local_epsilon"):
        _train(again, policy, 1)
    assert again.session is not None and again.session.rounds_completed == 0 and not again.active


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, True])
def test_a_bad_lifetime_cap_is_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(PolicyError) as err:
        SitePolicy(authority_public_key=bytes(32), max_lifetime_local_epsilon=value)  # type: ignore[arg-type]
    assert err.value.field == "max_lifetime_local_epsilon"



def test_an_engine_sites_round_is_not_released_past_its_lifetime_cap() -> None:
    """A site with its own Opacus engine plans its own steps, so its lifetime cap is checked before
    release: the round's steps (the engine's history since the round began) with every saved job's."""
    from fedveil.clients.local_dp import EngineDpClient

    class Accountant:
        def __init__(self) -> None:
            self.history: list[tuple[float, float, int]] = []

        def get_epsilon(self, delta: float) -> float:
            return 2.84

        def mechanism(self) -> str:
            return "rdp"

    class Engine:
        def __init__(self) -> None:
            self.accountant = Accountant()

    state = SiteState.open(None)
    engine = Engine()
    state.trained_with_local_dp("earlier-run", 1, SubsampledGaussianEvent(1 / 7, 1.2, 7))
    client = EngineDpClient(engine, lifetime=state.lifetime_local_epsilon, lifetime_delta=state.delta)
    client.begin_round(pb.LocalDpParams(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5))
    engine.accountant.history.append((1.2, 1 / 7, 7))  # the site's loop took one epoch of steps
    capped = SitePolicy(authority_public_key=bytes(32), max_lifetime_local_epsilon=3.2)
    assert "max_lifetime_local_epsilon = 3.2" in client.over_budget(capped)  # 3.56 over both jobs
    assert client.over_budget(SitePolicy(authority_public_key=bytes(32), max_lifetime_local_epsilon=3.6)) == ""
    assert client.over_budget(SitePolicy(authority_public_key=bytes(32))) == ""  # control: no cap
