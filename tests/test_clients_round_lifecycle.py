"""How the client library treats a round's life cycle: train mode before (DP-)training, a round the
loop does not submit, and a local privacy budget that cannot afford another round.

Every test runs the real coordinator (``fedveil.server.coordinator.Coordinator`` on a SQLite store)
and real clients (``fedveil.clients.session.Federation``) in this process over
``InProcessTransport``, with one thread per client.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedveil.clients import Federation, run_client
from fedveil.clients.api import evaluator
from fedveil.clients.backoff import BackoffPolicy
from fedveil.protocol.errors import StageClosed
from fedveil.protocol.transport import InProcessTransport
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import Task
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import ALL_JOIN_WAIT
from tests.identity_helpers import secure_job, secure_options, site_policy

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(180)
SEED = 5


def config(**kw: Any) -> ServerConfig:
    base: dict[str, Any] = dict(task="fedveil.tasks.synthetic", rounds=1, clients_per_round=3, min_clients=3,
                                seed=SEED, cohort_wait=0.5, linger=0.5, poll_wait=0.5, round_timeout=20.0,
                                stage_timeout=20.0, final_evaluation=False, max_round_attempts=1)
    base.update(kw)
    return ServerConfig.from_flat(**secure_job(**base))


def data_for(index: int, n: int = 3) -> TensorDataset:
    assert synthetic.synthetic_data is not None
    return synthetic.synthetic_data(index, n, SEED)


def federation(coordinator: Coordinator, task: Task, index: int, model: nn.Module | None = None, n: int = 3,
               **options: Any) -> Federation:
    """Site ``index`` of ``n``, with the secure default: its identity from the test authority, pinned."""
    data = data_for(index, n)
    opts = secure_options(f"site-{index}", seed=100 + index, num_examples=len(data), evaluate=evaluator(task, data),
                          poll_wait_ms=500,
                          backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=0.5, give_up_after_s=30.0),
                          **options)
    return Federation(InProcessTransport(coordinator, f"site-{index}"), task.name,
                      model if model is not None else task.build_model(), opts)


def run_job(tmp_path: Path, cfg: ServerConfig, task: Task,
            clients: list[Callable[[Coordinator], Any]]) -> tuple[JobSummary, list[Any], list[BaseException]]:
    """Run the job with one thread per client function (given the coordinator); returns the
    summary, what each client function returned, and the exceptions the clients raised."""
    store = RunStore(tmp_path / "run.sqlite")
    coordinator = Coordinator(cfg, task, store, new_run=True)
    results: list[Any] = [None] * len(clients)
    errors: list[BaseException] = []

    def main(i: int) -> None:
        try:
            results[i] = clients[i](coordinator)
        except BaseException as err:  # surfaced by the test
            errors.append(err)

    threads = [threading.Thread(target=main, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    try:
        summary = coordinator.run()
    finally:
        coordinator.stop()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client thread is still running after the job"
    store.close()
    return summary, results, errors


@pytest.mark.slow
def test_train_round_puts_a_model_left_in_eval_mode_back_in_train_mode_before_dp_sgd(tmp_path: Path) -> None:
    seen: list[bool] = []

    def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
        """A task whose training function trusts the caller to have set train mode (many do)."""
        seen.append(model.training)
        loss_fn = nn.BCEWithLogitsLoss()
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad()
            loss_fn(model(x).squeeze(-1), y).backward()
            optimizer.step()
        return 0.0

    task = dataclasses.replace(synthetic, train_epoch=train_epoch)

    def client(i: int) -> Callable[[Coordinator], Any]:
        def go(coordinator: Coordinator) -> Any:
            model = task.build_model()
            model.eval()  # e.g. the site evaluated its model before joining
            return run_client(federation(coordinator, task, i, model=model), task, data_for(i))
        return go

    summary, results, errors = run_job(tmp_path, config(dp="local", dp_local_noise_multiplier=1.0), task,
                                       [client(i) for i in range(3)])
    assert errors == [], errors
    assert summary.status == "completed"
    assert [[o.outcome for o in h] for h in results] == [["completed"]] * 3
    assert seen == [True, True, True]


class CountingTransport(InProcessTransport):
    """Counts the client's polls."""

    def __init__(self, coordinator: Coordinator, name: str) -> None:
        super().__init__(coordinator, name)
        self.polls = 0

    def poll(self, request: Any) -> Any:
        self.polls += 1
        return super().poll(request)


def test_a_loop_that_skips_submit_sits_the_round_out_without_spinning_and_gets_the_next_round(
    tmp_path: Path,
) -> None:
    round_timeout = 5.0
    seen: list[int] = []
    polls: dict[str, int] = {}

    def turnkey(i: int) -> Callable[[Coordinator], Any]:
        return lambda coordinator: [o.outcome for o in run_client(federation(coordinator, synthetic, i, n=4),
                                                                  synthetic, data_for(i, 4))]

    def skipper(coordinator: Coordinator) -> Any:
        fed = federation(coordinator, synthetic, 3, n=4)
        counting = CountingTransport(coordinator, "site-3")
        fed.transport = counting
        data = data_for(3, 4)
        with fed:
            for rnd in fed:
                seen.append(rnd.number)
                if rnd.number == 1:
                    polls["at_skip"] = counting.polls
                    continue  # the user's loop skips this round without submitting
                if "after_skip" not in polls:
                    polls["after_skip"] = counting.polls
                optimizer = synthetic.make_optimizer(rnd.model.parameters())
                synthetic.train_epoch(rnd.model, DataLoader(data, batch_size=32), optimizer)
                rnd.submit(rnd.model, num_examples=len(data))
        return [(o.round, o.outcome) for o in fed.history]

    # four sites, threshold 3 of 4 (active mode: 2t > h + c = 4 + 1; a threshold of 2 of 3, as the passive
    # rule t > c allowed, is unsafe against a malicious server): round 1 completes without the skipping site
    cfg = config(rounds=2, clients_per_round=4, min_clients=3, round_timeout=round_timeout, cohort_wait=ALL_JOIN_WAIT)
    summary, results, errors = run_job(tmp_path, cfg, synthetic, [turnkey(0), turnkey(1), turnkey(2), skipper])
    assert errors == [], errors
    assert summary.status == "completed" and summary.completed_rounds == 2
    assert seen == [1, 2]  # round 1 is handed to the loop once, not again and again until its deadline
    assert results[3] == [(1, "dropped"), (2, "completed")]
    assert results[0] == results[1] == results[2] == ["completed", "completed"]
    # sitting out until the training deadline drops the site takes a few relaxed polls (one per
    # poll_wait = 0.5 s), not a tight loop of thousands
    assert polls["after_skip"] - polls["at_skip"] <= 2 * round_timeout / 0.5 + 4


class MaskedInputLostOnce(InProcessTransport):
    """The first masked input never reaches the server (the stage closes without it)."""

    def __init__(self, coordinator: Coordinator, name: str) -> None:
        super().__init__(coordinator, name)
        self.lost = False

    def submit_masked_input(self, request: Any) -> Any:
        if not self.lost:
            self.lost = True
            raise StageClosed("test: the masked input was lost on the way")
        return super().submit_masked_input(request)


@pytest.mark.slow
def test_a_client_whose_local_budget_cannot_afford_a_retried_round_declines_it_and_finishes_cleanly(
    tmp_path: Path,
) -> None:
    # Local DP with a target ε planned for exactly one round. Attempt 1 of round 1: both sites train
    # (spending their whole budget), one masked input is lost, the round aborts (1 survivor <
    # threshold 2). Attempt 2: neither site can afford a second training, so both decline it.
    target = 2.0
    feds: list[Federation] = []

    def site(i: int) -> Callable[[Coordinator], Any]:
        def go(coordinator: Coordinator) -> Any:
            fed = federation(coordinator, synthetic, i, policy=site_policy(min_cohort=2))  # a cohort of two
            if i == 0:
                fed.transport = MaskedInputLostOnce(coordinator, "site-0")
            feds.append(fed)
            return run_client(fed, synthetic, data_for(i))
        return go

    cfg = config(rounds=1, clients_per_round=2, min_clients=2, dp="local", dp_local_target_epsilon=target,
                 round_timeout=6.0, stage_timeout=3.0, max_round_attempts=2)
    summary, results, errors = run_job(tmp_path, cfg, synthetic, [site(0), site(1)])
    assert errors == [], errors  # before: BudgetExceededError escaped run_client and killed the client
    assert summary.status == "failed" and summary.aborted_attempts == 2
    for history in results:
        assert [(o.round, o.outcome) for o in history][-1] == (1, "declined")
        assert len(history) == 2 and history[0].outcome in ("aborted", "dropped")
        assert "local privacy budget exhausted" in history[-1].reason and "would raise" in history[-1].reason
    for fed in feds:
        spend = fed.local_privacy
        assert spend is not None and 0 < spend.epsilon <= target * (1 + 1e-6)  # spent once, never refunded
        assert fed.job_done is not None  # the client stayed until the server ended the job


def _skipping_site(how: str) -> Callable[[Coordinator], Any]:
    """A loop that leaves round 1 without submitting (``continue`` to the next round, or ``break``)."""
    def run(coordinator: Coordinator) -> Any:
        fed = federation(coordinator, synthetic, 3, n=4)
        data = data_for(3, 4)
        with fed:
            for rnd in fed:
                if rnd.number == 1:
                    if how == "break":
                        break
                    continue
                optimizer = synthetic.make_optimizer(rnd.model.parameters())
                synthetic.train_epoch(rnd.model, DataLoader(data, batch_size=32), optimizer)
                rnd.submit(rnd.model, num_examples=len(data))
        return [(o.round, o.outcome) for o in fed.history]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how", ["continue", "break"])
def test_a_loop_that_leaves_a_round_unsubmitted_is_a_dropout_at_once_not_at_the_deadline(
    tmp_path: Path, how: str,
) -> None:
    """Deadlines of an hour: the round can only finish because the site's decline reached the server
    when the loop moved on (``continue``) or left (``break``, the iterator's cleanup sends it)."""
    def turnkey(i: int) -> Callable[[Coordinator], Any]:
        return lambda coordinator: [o.outcome for o in run_client(federation(coordinator, synthetic, i, n=4),
                                                                  synthetic, data_for(i, 4))]

    rounds = 2 if how == "continue" else 1  # a site that left is not there for round 2's cohort
    cfg = config(rounds=rounds, clients_per_round=4, min_clients=3, round_timeout=3600.0, stage_timeout=3600.0,
                 cohort_wait=ALL_JOIN_WAIT)
    summary, results, errors = run_job(tmp_path, cfg, synthetic,
                                       [turnkey(0), turnkey(1), turnkey(2), _skipping_site(how)])
    assert errors == [], errors
    assert summary.status == "completed" and summary.completed_rounds == rounds
    assert results[3] == ([(1, "dropped"), (2, "completed")] if how == "continue" else [(1, "dropped")])


class SlowBusyServer(InProcessTransport):
    """Answers the first polls like an overloaded server: a Wait sending the site away for 1.5 s,
    arriving only after 0.6 s (longer than a quick answer, shorter than the poll the site asked for)."""

    def __init__(self, coordinator: Coordinator, name: str, busy_answers: int) -> None:
        super().__init__(coordinator, name)
        self.busy_answers = busy_answers
        self.poll_times: list[float] = []

    def poll(self, request: Any) -> Any:
        import time

        from fedveil.protocol import fedveil_pb2 as pb

        self.poll_times.append(time.monotonic())
        if len(self.poll_times) <= self.busy_answers:
            time.sleep(0.6)
            return pb.PollResponse(wait=pb.Wait(retry_after_ms=1500, reason="server busy: poll again later"))
        return pb.PollResponse(round_result=pb.RoundResult())


def test_a_busy_answer_that_arrives_slowly_is_honoured_not_taken_for_a_held_poll(tmp_path: Path) -> None:
    """Under load a busy server's Wait can take a while to arrive; the site still waits the retry_after
    it was given before polling again (re-polling at once is what made 1,000 sites poll a server into
    the ground), and only a poll held for about the wait it asked for is re-issued at once."""
    store = RunStore(tmp_path / "run.sqlite")
    coordinator = Coordinator(config(), synthetic, store, new_run=True)
    fed = federation(coordinator, synthetic, 0)
    fed.options = dataclasses.replace(fed.options, poll_wait_ms=2000)  # a held poll would last 2 s
    slow = SlowBusyServer(coordinator, "site-0", busy_answers=2)
    fed.transport = slow
    try:
        fed._ensure_joined()
        assert fed._next_instruction().WhichOneof("instruction") == "round_result"
    finally:
        coordinator.stop()
        store.close()
    gaps = [b - a for a, b in zip(slow.poll_times, slow.poll_times[1:], strict=False)]
    assert len(gaps) == 2 and all(gap >= 0.6 + 1.4 for gap in gaps), gaps
