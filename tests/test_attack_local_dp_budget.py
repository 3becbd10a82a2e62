"""A malicious server against a site's local (sample-level) DP budget (client review, findings 3 and 4).

Finding 3: the site planned DP-SGD and checked each round against the *first* round's
``training.local_epochs``, but trained for the current round's. A server that asked for 1 epoch in
round 1 and 30 in round 2 took a site with target ε = 2 to ε = 7.30, and the site still released
its round-2 update. (``training`` is not in the secagg binding, so a change shown to the victim
alone goes unnoticed by the cohort.) The same number was an unbounded-CPU lever.

Finding 4: δ and the target ε were the server's. A job announcing ε = 1 at δ = 0.5 calibrated
the site's noise to 0.51 and ``federation.privacy`` reported ε ≈ 1 at δ = 0.5, while the site's
own ledger at δ = 1e-5 showed ε = 14.6.

The real coordinator and four real sites run each job; the victim (``site-0``) runs the unmodified
client code behind a :class:`~tests.attack_helpers.TamperingServer`. Each attack test has a control
that runs the same job without the attack, or the same attack on a site that gives the limit up,
so the assertions are shown to be able to fail.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from fedveil.clients.api import run_client, train_round
from fedveil.clients.local_dp import EngineDpClient, LocalDpClient, engine_sampling_problem
from fedveil.clients.policy import (
    PolicyError,
    PolicyViolation,
    SitePolicy,
    TrainingRefused,
    build_policy,
    check_training,
)
from fedveil.clients.policy_settings import POLICY_TABLE, load_policy_file, policy_flag
from fedveil.clients.privacy import SitePrivacy
from fedveil.clients.site_state import SiteState
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import BudgetExceededError
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import (
    ALL_JOIN_WAIT,
    Consortium,
    TamperingServer,
    job_config,
    run_job,
    site_federation,
    turnkey,
)

torch.set_num_threads(1)
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")]
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"
TARGET = 2.0
KEY = bytes(range(32))
Tamper = Callable[[pb.PollResponse], pb.PollResponse | None]


def _job(tmp_path: Path, config: Any, tamper: Tamper | None = None, *,
         victim: Callable[[Any, Consortium], Any] | None = None, victim_policy: dict[str, Any] | None = None,
         others_policy: dict[str, Any] | None = None) -> tuple[Any, TamperingServer, dict[str, Any]]:
    """Run ``config`` with four sites, the victim behind a server that applies ``tamper`` to what it
    receives. Returns the summary, the server (what the victim sent) and each site's (fed, history)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    consortium = Consortium.create(NAMES)
    holder: dict[str, TamperingServer] = {}

    def front(coordinator: Coordinator) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper, rebind=True)  # a careful liar binds what it shows
        return holder["s"]

    def run_victim(service: Any) -> Any:
        if victim is not None:
            return victim(service, consortium)
        return turnkey(synthetic, VICTIM, 0, consortium, policy=consortium.policy(**(victim_policy or {})))(service)

    sites = [run_victim, *(turnkey(synthetic, n, i, consortium, policy=consortium.policy(**(others_policy or {})))
                           for i, n in enumerate(NAMES) if n != VICTIM)]
    summary, results, errors = run_job(tmp_path, config, synthetic, sites, service=front, enrolled=NAMES)
    assert errors == [], errors
    return summary, holder["s"], dict(zip(NAMES, results, strict=True))


def _masked_rounds(server: TamperingServer) -> list[int]:
    return [int(r.header.round) for r in server.sent.named("submit_masked_input")]


def _target_job(rounds: int = 2) -> Any:
    return job_config(rounds=rounds, dp="local", dp_local_target_epsilon=TARGET, min_clients=3, stage_timeout=20.0,
                      round_timeout=60.0, cohort_wait=ALL_JOIN_WAIT)


# -- finding 3: local_epochs raised after round 1 ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("attack", [True, False], ids=["attack", "control"])
def test_a_server_that_raises_local_epochs_after_round_one_gets_a_decline_before_training(
        tmp_path: Path, attack: bool) -> None:
    """Round 2 asks the victim for 30 epochs (the reviewer's script: the site ended at ε = 7.30 and
    released round 2). The site now plans round 2 with its own epochs and declines it before any
    step: nothing is sent for it, and its accountant holds round 1's steps only. Control: the honest
    job completes both rounds at ε just under the target, so the first assertions can fail."""
    def thirty_epochs(resp: pb.PollResponse) -> pb.PollResponse:
        if attack and resp.WhichOneof("instruction") == "round_start" and resp.round_start.round == 2:
            resp.round_start.training.local_epochs = 30
        return resp

    summary, server, results = _job(tmp_path, _target_job(), thirty_epochs)
    fed, history = results[VICTIM]
    spend = fed.local_privacy
    assert spend is not None and spend.delta == 1e-5
    assert summary.completed_rounds == 2  # the other sites go on
    if attack:
        assert [(h.round, h.outcome) for h in history] == [(1, "completed"), (2, "declined")]
        assert "would raise" in history[1].reason and "over the budget ε=2" in history[1].reason
        assert _masked_rounds(server) == [1]  # round 2's update never left
        session = fed._local_dp_session.session
        assert session.rounds_completed == 1 and len(session.round_events) == 1  # round 2 took no step
        assert spend.epsilon < TARGET and fed.state.sample_epsilon() < TARGET
    else:
        assert [(h.round, h.outcome) for h in history] == [(1, "completed"), (2, "completed")]
        assert _masked_rounds(server) == [1, 2]
        assert 0.95 * TARGET <= spend.epsilon <= TARGET * (1 + 1e-6)
        assert fed.state.sample_epsilon() <= TARGET * (1 + 1e-6)


@pytest.mark.slow
def test_a_loop_that_trains_past_what_the_round_asked_is_not_released(tmp_path: Path) -> None:
    """The check before release: a loop trains 30 epochs in round 2 though the round asked for 1.
    The steps are taken and accounted (past the target: the site's ledger says so), but the update
    is not released: the site declines at ``submit``, before any masked input."""
    def overtraining(service: Any, consortium: Consortium) -> Any:
        fed = site_federation(service, synthetic, VICTIM, 0, consortium)
        assert synthetic.synthetic_data is not None
        data = synthetic.synthetic_data(0, 4, 3)
        with fed:
            for rnd in fed:
                loader = DataLoader(data, batch_size=synthetic.batch_size, shuffle=True, generator=rnd.generator)
                model, optimizer, loader = rnd.privatize(rnd.model, synthetic.make_optimizer(rnd.model.parameters()),
                                                         loader)
                for _ in range(30 if rnd.number == 2 else 1):
                    synthetic.train_epoch(model, loader, optimizer)
                rnd.submit(model)
        return fed, fed.history

    summary, server, results = _job(tmp_path, _target_job(), victim=overtraining)
    fed, history = results[VICTIM]
    assert summary.completed_rounds == 2
    assert [(h.round, h.outcome) for h in history] == [(1, "completed"), (2, "declined")]
    assert "past its budget ε = 2" in history[1].reason
    assert _masked_rounds(server) == [1]
    # honest accounting of what the loop really did: the steps stay spent, never refunded
    assert fed.local_privacy.epsilon > TARGET and fed.state.sample_epsilon() > TARGET


@pytest.mark.slow
@pytest.mark.parametrize("dp", ["none", "local"])
def test_a_server_that_asks_for_billions_of_epochs_is_declined_at_once(tmp_path: Path, dp: str) -> None:
    """``training.local_epochs`` is a uint32 the site honoured as given (unbounded CPU). The victim
    now declines a round above its ``max_local_epochs`` (100 by default) before any step, naming the
    field, in every DP mode; the other sites complete the round."""
    def forever(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start":
            resp.round_start.training.local_epochs = 2**32 - 1
        return resp

    extra = {"dp_local_noise_multiplier": 1.0} if dp == "local" else {}
    config = job_config(rounds=1, dp=dp, min_clients=3, stage_timeout=20.0, round_timeout=60.0,
                        cohort_wait=ALL_JOIN_WAIT, **extra)
    summary, server, results = _job(tmp_path, config, forever)
    _, history = results[VICTIM]
    assert summary.completed_rounds == 1
    assert [h.outcome for h in history] == ["declined"]
    assert "training.local_epochs" in history[0].reason and "max_local_epochs" in history[0].reason
    assert _masked_rounds(server) == []
    assert summary.out_of_budget == {}  # refused parameters are not a spent budget: the site may be drawn again


# -- a site restarted in the middle of a job --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("restart", "budget"), [(True, 3.2), (False, 3.2), (True, 4.0)],
                         ids=["restarted", "one-process", "restarted-within-budget"])
def test_a_site_restarted_mid_job_keeps_its_earlier_steps_in_its_budget(
        tmp_path: Path, restart: bool, budget: float) -> None:
    """Fixed noise z = 1.2: one round of DP-SGD costs ε ≈ 2.84, two ≈ 3.56; the victim's own budget is
    ε = 3.2. In one process round 2 is declined before any step. A victim restarted after round 1
    (a new process with the same ``--state`` file) began with an empty accountant before, saw round 2
    alone (2.84) and trained it: ε 3.56 in all, past its budget. Now it resumes the job's earlier
    steps from its saved state. With a budget of 4 both rounds fit, and the restarted site's report
    is the whole job's ε, which the server's recomputation confirms (before: 2.84, "unverified")."""
    state_path = tmp_path / "victim-state.json"

    def victim(service: Any, consortium: Consortium) -> Any:
        assert synthetic.synthetic_data is not None
        data = synthetic.synthetic_data(0, 4, 3)
        options = dict(state_path=state_path, policy=consortium.policy(max_local_epsilon=budget))
        fed = site_federation(service, synthetic, VICTIM, 0, consortium, **options)
        if not restart:
            return fed, run_client(fed, synthetic, data)
        with fed:  # the first process trains round 1 and stops
            for rnd in fed:
                train_round(rnd, synthetic, data)
                break
        first = list(fed.history)
        again = site_federation(service, synthetic, VICTIM, 0, consortium, **options)
        return again, first + run_client(again, synthetic, data)

    config = job_config(rounds=2, dp="local", dp_local_noise_multiplier=1.2, min_clients=3, stage_timeout=20.0,
                        round_timeout=60.0, cohort_wait=ALL_JOIN_WAIT)
    summary, server, results = _job(tmp_path, config, victim=victim)
    fed, history = results[VICTIM]
    assert summary.completed_rounds == 2
    session = fed._local_dp_session.session
    assert session.resumed_events == (1 if restart else 0)
    assert fed.privacy.sample_epsilon == pytest.approx(fed.state.sample_epsilon(), rel=1e-9)
    if budget > 3.6:
        assert [(h.round, h.outcome) for h in history] == [(1, "completed"), (2, "completed")]
        store = RunStore(tmp_path / "run.sqlite")
        try:
            reports = {(r, name): record for r, name, record in store.client_privacy(summary.run_id)}
        finally:
            store.close()
        second = reports[(2, VICTIM)]
        assert second["verified"], second["unverified"]
        assert second["epsilon_reported"] == pytest.approx(3.56, abs=0.01) == fed.state.sample_epsilon()
        return
    assert [(h.round, h.outcome) for h in history] == [(1, "completed"), (2, "declined")]
    assert "over the budget ε=3.2" in history[1].reason
    assert list(summary.out_of_budget) == [VICTIM]  # its budget is spent: the server draws it no more
    assert _masked_rounds(server) == [1]
    assert fed.state.sample_epsilon() < 3.2  # the saved ledger: round 1's steps only
    assert session.rounds_completed == (0 if restart else 1)


# -- finding 4: δ and the target are the site's limits, not the server's -----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("limit", [True, False], ids=["attack", "control"])
def test_a_job_delta_above_the_sites_limit_is_declined_and_epsilon_is_reported_at_the_sites_delta(
        tmp_path: Path, limit: bool) -> None:
    """The job announces target ε = 1 at δ = 1e-3 (under 1/records, so only the site's δ limit
    stands in the way). With the default ``max_local_delta`` (1e-5) the victim declines, naming
    ``dp.local.delta``, and spends nothing. Control: a victim that raises its limit to 1e-2 takes
    part, and its ε at its own δ = 1e-5 is 1.63, past the job's "ε = 1": what the limit prevents.
    ``federation.privacy`` reports that figure at the site's δ, not ε ≈ 1 at the job's δ."""
    config = job_config(rounds=1, dp="local", dp_local_target_epsilon=1.0, dp_delta=1e-3, min_clients=3,
                        cohort_wait=ALL_JOIN_WAIT,
                        stage_timeout=20.0, round_timeout=60.0)
    opted_in = {"max_local_delta": 1e-2}
    summary, server, results = _job(tmp_path, config, victim_policy=None if limit else opted_in,
                                    others_policy=opted_in)
    fed, history = results[VICTIM]
    assert summary.completed_rounds == 1
    privacy = fed.privacy
    if limit:
        assert [h.outcome for h in history] == ["declined"]
        assert "dp.local.delta" in history[0].reason and "max_local_delta" in history[0].reason
        assert _masked_rounds(server) == []
        assert fed.local_privacy is None and fed.state.sample_epsilon() == 0.0 and privacy.epsilon == 0.0
    else:
        assert [h.outcome for h in history] == ["completed"]
        spend = fed.local_privacy
        assert spend is not None and spend.delta == 1e-3 and spend.epsilon <= 1.0 + 1e-6  # the job's claim
        own = fed.state.sample_epsilon()  # the same steps at the site's δ = 1e-5
        assert own > 1.5
        assert privacy.delta == 1e-5 and privacy.epsilon == pytest.approx(own)


@pytest.mark.parametrize(("local", "training", "policy", "field"), [
    (dict(delta=0.5, target_epsilon=1.0, planned_rounds=1), {}, {}, "dp.local.delta"),
    (dict(delta=1e-4, target_epsilon=1.0, planned_rounds=1), {}, {}, "dp.local.delta"),
    (dict(delta=0.01, noise_multiplier=1.0), {}, {"max_local_delta": 0.5}, "dp.local.delta"),  # ≥ 1/200 records
    (dict(delta=1e-5, target_epsilon=50.0, planned_rounds=1), {}, {}, "dp.local.target_epsilon"),
    (dict(delta=1e-5, target_epsilon=math.inf, planned_rounds=1), {}, {}, "dp.local.target_epsilon"),
    (dict(delta=1e-5, noise_multiplier=0.3), {}, {"min_local_noise_multiplier": 0.5}, "dp.local.noise_multiplier"),
    (dict(delta=1e-5, noise_multiplier=1.0), {"local_epochs": 101}, {}, "training.local_epochs"),
])
def test_round_parameters_beyond_the_sites_limits_are_refused_naming_the_field(
        local: dict[str, Any], training: dict[str, Any], policy: dict[str, Any], field: str) -> None:
    start = pb.RoundStart(dp=pb.DpParams(mode="local", local=pb.LocalDpParams(**local)),
                          training=pb.TrainingParams(**training))
    site = SitePolicy(authority_public_key=KEY, **policy)
    with pytest.raises(PolicyViolation) as err:
        check_training(site, start, num_examples=200)
    assert err.value.field == field
    # what the loop sees: a refusal that is also a budget error, so run_client declines it
    refused = TrainingRefused(err.value.field, err.value.detail)
    assert isinstance(refused, BudgetExceededError) and refused.field == field and field in str(refused)
    # the control: within the limits the same round passes
    ok = pb.RoundStart(dp=pb.DpParams(mode="local", local=pb.LocalDpParams(delta=1e-5, target_epsilon=3.0,
                                                                            planned_rounds=1)),
                       training=pb.TrainingParams(local_epochs=100))
    check_training(site, ok, num_examples=200)
    check_training(site, pb.RoundStart(dp=pb.DpParams(mode="none", local=pb.LocalDpParams(**local))),
                   num_examples=200)  # the local-DP limits only bind local DP (the epochs cap binds every mode)


# -- the site's accountant: the round's own steps, the site's own budget ----------------------------

@functools.cache
def _data() -> Any:
    assert synthetic.synthetic_data is not None
    return synthetic.synthetic_data(0, 4, 3)  # one object: Opacus warns about a "new dataset" otherwise


def _loader(batch_size: int) -> DataLoader:
    return DataLoader(_data(), batch_size=batch_size)


def _train(client: LocalDpClient, params: pb.LocalDpParams, *, epochs: int = 1, batch_size: int = 32,
           policy: SitePolicy | None = None) -> None:
    model = synthetic.build_model()
    wrapped, optimizer, loader = client.privatize(params, model, synthetic.make_optimizer(model.parameters()),
                                                  _loader(batch_size), local_epochs=epochs, policy=policy)
    for _ in range(epochs):
        synthetic.train_epoch(wrapped, loader, optimizer)
    client.finish_round()


def _spent(client: LocalDpClient) -> float:
    assert client.session is not None
    return client.session.epsilon()


@pytest.mark.parametrize(("epochs", "batch_size"), [(30, 32), (1, 200), (1, 32)],
                         ids=["more-epochs", "full-batch", "control"])
def test_the_second_round_is_planned_with_its_own_epochs_and_batch_size(epochs: int, batch_size: int) -> None:
    """Round 1: one epoch at batch 32 (q = 1/7) of a 2-round plan for ε = 2. Round 2 with 30 epochs,
    or one full-batch step (q = 1), would take ε past 2: refused before any step. Control: round 2
    as planned is accepted and ends just under the target."""
    client = LocalDpClient(seed=1)
    params = pb.LocalDpParams(target_epsilon=TARGET, planned_rounds=2, max_grad_norm=1.0, delta=1e-5)
    policy = SitePolicy(authority_public_key=KEY)
    _train(client, params, policy=policy)
    before = _spent(client)
    assert client.session is not None
    plan = client.session.plan_round(_loader(batch_size), local_epochs=epochs)
    if (epochs, batch_size) == (1, 32):
        assert plan.epsilon_after <= TARGET * (1 + 1e-9)
        _train(client, params, epochs=epochs, batch_size=batch_size, policy=policy)
        assert 0.95 * TARGET <= _spent(client) <= TARGET * (1 + 1e-9)
        return
    assert plan.epsilon_after > TARGET  # what the round would have spent
    with pytest.raises(BudgetExceededError) as err:
        _train(client, params, epochs=epochs, batch_size=batch_size, policy=policy)
    assert err.value.epsilon_after == pytest.approx(plan.epsilon_after) and err.value.budget == TARGET
    assert _spent(client) == before and client.session.rounds_completed == 1  # no step was taken


def test_a_fixed_noise_job_stops_at_the_sites_own_epsilon_budget() -> None:
    """No job target (a fixed noise multiplier): the site's ``max_local_epsilon`` is its budget, and
    the round that would pass it is refused before training. Control: without a policy the session
    has no budget and keeps spending."""
    params = pb.LocalDpParams(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    policy = SitePolicy(authority_public_key=KEY, max_local_epsilon=5.5)
    client = LocalDpClient(seed=2)
    _train(client, params, policy=policy)
    _train(client, params, policy=policy)
    spent = _spent(client)
    assert spent <= 5.5
    with pytest.raises(BudgetExceededError) as err:
        for _ in range(5):
            _train(client, params, policy=policy)
    assert err.value.budget == 5.5 and _spent(client) <= 5.5
    unlimited = LocalDpClient(seed=2)
    for _ in range(4):
        _train(unlimited, params)
    assert _spent(unlimited) > 5.5


def test_a_target_that_solves_to_noise_below_the_sites_floor_is_refused() -> None:
    params = pb.LocalDpParams(target_epsilon=8.0, planned_rounds=1, max_grad_norm=1.0, delta=1e-5)
    client = LocalDpClient(seed=3)
    with pytest.raises(TrainingRefused) as err:
        _train(client, params, policy=SitePolicy(authority_public_key=KEY, min_local_noise_multiplier=1.5))
    assert err.value.field == "dp.local.target_epsilon" and "min_local_noise_multiplier" in str(err.value)
    assert _spent(client) == 0.0
    _train(client, params, policy=SitePolicy(authority_public_key=KEY, min_local_noise_multiplier=0.5))  # control
    assert 0 < _spent(client) <= 8.0


def test_the_check_before_release_sees_the_steps_actually_taken() -> None:
    client = LocalDpClient(seed=4)
    params = pb.LocalDpParams(target_epsilon=TARGET, planned_rounds=2, max_grad_norm=1.0, delta=1e-5)
    model = synthetic.build_model()
    wrapped, optimizer, loader = client.privatize(params, model, synthetic.make_optimizer(model.parameters()),
                                                  _loader(32), local_epochs=1)
    synthetic.train_epoch(wrapped, loader, optimizer)
    assert client.over_budget() == ""  # one epoch: within the plan
    for _ in range(20):
        synthetic.train_epoch(wrapped, loader, optimizer)
    assert "past its budget ε = 2" in client.over_budget()
    client.finish_round()
    assert _spent(client) > TARGET  # accounted all the same


def test_an_engine_sites_budget_is_its_own_too() -> None:
    """A site with its own Opacus engine: its ``max_local_epsilon`` holds in a job without a target."""
    class Accountant:
        history = ((1.0, 0.1, 100),)

        def get_epsilon(self, delta: float) -> float:
            return 12.0

        def mechanism(self) -> str:
            return "rdp"

    class Engine:
        accountant = Accountant()

    client = EngineDpClient(Engine())
    client.begin_round(pb.LocalDpParams(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    assert client.over_budget() == ""  # the job sets no target: before, nothing bound the site
    assert "ε = 10" in client.over_budget(SitePolicy(authority_public_key=KEY))
    assert client.over_budget(SitePolicy(authority_public_key=KEY, max_local_epsilon=20.0)) == ""


def test_an_engine_sites_round_is_accounted_at_its_worst_steps_not_its_last() -> None:
    """A loop that lowers its noise within a round (or raises its sample rate): every step of the round
    is accounted at the worst (noise, rate) it used. Before, all were taken at the last pair, so a round
    of 60 steps at z = 0.3 that ended with 40 at z = 2.0 counted as 100 steps at z = 2.0."""
    from opacus.accountants import RDPAccountant

    class Engine:
        accountant = RDPAccountant()

    engine = Engine()
    for _ in range(100):  # earlier rounds
        engine.accountant.step(noise_multiplier=2.0, sample_rate=0.05)
    client = EngineDpClient(engine)
    client.begin_round(pb.LocalDpParams(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-5))
    for z, q, steps in ((2.0, 0.05, 30), (0.3, 0.05, 60), (2.0, 0.1, 10)):
        for _ in range(steps):
            engine.accountant.step(noise_multiplier=z, sample_rate=q)
    client.finish_round(torch.nn.Linear(1, 1))
    assert client.last_event == SubsampledGaussianEvent(0.1, 0.3, 100)
    # a round at unchanged settings is exactly that: the steps added to the last entry of the history
    client.begin_round(pb.LocalDpParams(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-5))
    for _ in range(7):
        engine.accountant.step(noise_multiplier=2.0, sample_rate=0.1)
    client.finish_round(torch.nn.Linear(1, 1))
    assert client.last_event == SubsampledGaussianEvent(0.1, 2.0, 7)


@pytest.mark.parametrize(("how", "z", "q", "steps"), [("cleared", 0.3, 0.5, 50), ("replaced", 0.3, 0.5, 50),
                                                      ("cleared", 2.0, 0.05, 100), ("cleared", 2.0, 0.05, 150)])
def test_an_engine_site_that_resets_its_accountant_mid_round_has_every_step_counted(
        how: str, z: float, q: float, steps: int) -> None:
    """The second review of 2026-12-07: a reset (or replaced) accountant that then stepped as often as
    before held as many history entries, and the round's steps were subtracted away (no event); the
    review of that fix: cleared and stepped at the same settings, 100 steps counted as none, 150 as 50.
    The round's steps are now counted as the accountant takes them."""
    from opacus.accountants import RDPAccountant

    class Engine:
        accountant = RDPAccountant()

    engine = Engine()
    for _ in range(100):
        engine.accountant.step(noise_multiplier=2.0, sample_rate=0.05)
    client = EngineDpClient(engine)
    client.begin_round(pb.LocalDpParams(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-5))
    if how == "cleared":
        engine.accountant.history.clear()
    else:
        engine.accountant = RDPAccountant()
    for _ in range(steps):
        engine.accountant.step(noise_multiplier=z, sample_rate=q)
    client.finish_round(torch.nn.Linear(1, 1))
    assert client.last_event == SubsampledGaussianEvent(q, z, steps)
    assert "step" not in vars(engine.accountant)  # the counting wrapper is gone after the round


def test_the_site_never_reports_its_epsilon_at_a_looser_delta_than_its_own(tmp_path: Path) -> None:
    state = SiteState.open(tmp_path / "state.json")
    event = SubsampledGaussianEvent(1 / 7, 0.51, 7)
    state.trained_with_local_dp("run", 1, event)
    at_half = pb.LocalPrivacySpend(epsilon=0.995, delta=0.5, noise_multiplier=0.51, sample_rate=1 / 7, steps=7)
    privacy = SitePrivacy.of(state, at_half, trust_server=False)
    assert privacy.delta == state.delta == 1e-5 and privacy.epsilon == pytest.approx(state.sample_epsilon())
    assert privacy.epsilon > 10  # the reviewer's 14.6, not the server's "ε ≈ 1"
    stricter = pb.LocalPrivacySpend(epsilon=3.0, delta=1e-6, noise_multiplier=1.0, sample_rate=1 / 7, steps=7)
    assert SitePrivacy.of(state, stricter, trust_server=False).epsilon == 3.0  # control: a δ at least as strict


# -- the policy settings -----------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("max_local_epochs", 0), ("max_local_epochs", 10_001), ("max_local_epochs", True),
    ("max_local_delta", 0.0), ("max_local_delta", 1.0), ("max_local_delta", math.nan),
    ("max_local_epsilon", 0.0), ("max_local_epsilon", math.inf), ("min_local_noise_multiplier", -1.0),
])
def test_bad_local_dp_limits_are_refused_naming_the_setting(field: str, value: object) -> None:
    with pytest.raises(PolicyError) as err:
        SitePolicy(**{"authority_public_key": KEY, field: value})  # type: ignore[arg-type]
    assert err.value.field == field


def test_the_limits_come_from_the_policy_file_and_the_client_flags(tmp_path: Path) -> None:
    defaults = SitePolicy(authority_public_key=KEY)
    assert (defaults.max_local_epochs, defaults.max_local_delta, defaults.max_local_epsilon,
            defaults.min_local_noise_multiplier) == (100, 1e-5, 10.0, 0.0)
    path = tmp_path / "site.toml"
    path.write_text("[policy]\nmax_local_epochs = 5\nmax_local_delta = 1e-6\nmax_local_epsilon = 3.0\n"
                    "min_local_noise_multiplier = 0.8\n")
    policy = build_policy(load_policy_file(path), authority=("c", KEY), max_local_epsilon=2.0)
    assert (policy.max_local_epochs, policy.max_local_delta, policy.max_local_epsilon,
            policy.min_local_noise_multiplier) == (5, 1e-6, 2.0, 0.8)
    for field in ("max_local_epochs", "max_local_delta", "max_local_epsilon", "min_local_noise_multiplier"):
        assert policy_flag(field) == "--" + field.replace("_", "-")
    assert POLICY_TABLE.config_fields(policy)["max_local_delta"] == 1e-6
    path.write_text("[policy]\nmax_local_delta = \"big\"\n")
    with pytest.raises(PolicyError, match="max_local_delta"):
        load_policy_file(path)


def test_only_poisson_batches_pass_the_engine_sampling_check() -> None:
    """What Opacus's accountant assumes (a Poisson batch per step) holds for the loader ``make_private``
    returns, also when BatchMemoryManager splits it into physical batches; a shuffled loader fails."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch import nn

    data = synthetic.synthetic_data(0, 3, 1) if synthetic.synthetic_data is not None else None
    assert data is not None
    shuffled = DataLoader(data, batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 1))
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=shuffled,
        noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine_sampling_problem(private, loader) == ""
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=optimizer) as physical:
        assert engine_sampling_problem(private, physical) == ""
    assert engine_sampling_problem(private, shuffled).startswith(
        "loader: its batches are not Poisson-sampled (batch sampler BatchSampler)")
    # the inner module, or a wrapper without the mark (grad_sample_mode "ew", "no_op"): nothing to read it from
    assert engine_sampling_problem(model).startswith("privacy_engine: give federate the module your make_private")
    inner = nn.Sequential(nn.Linear(10, 1))
    ew = PrivacyEngine().make_private(module=inner, optimizer=torch.optim.SGD(inner.parameters(), lr=0.1),
                                      data_loader=shuffled, noise_multiplier=1.0, max_grad_norm=1.0,
                                      grad_sample_mode="ew")[0]
    assert "(got GradSampleModuleExpandedWeights)" in engine_sampling_problem(ew, loader)
    private.allow_grad_accumulation()
    assert "allows gradient accumulation" in engine_sampling_problem(private, loader)
