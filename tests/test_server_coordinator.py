"""The coordinator in-process: dropouts, aborts and retries, the budget stop, resume, and the store.

Clients here are scripted protocol clients: each sends a *known* update vector through the real
secure-aggregation client (``fedveil.secagg``, via the clients' protobuf driver), so the server's
released aggregate can be checked against the true mean of the survivors' updates, and each can be
told to go silent at a given stage to create a dropout exactly there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from fedveil.cli import main
from fedveil.clients.secagg_driver import SecAggClientDriver
from fedveil.clients.update import encoder_for
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import ProtocolError
from fedveil.protocol.transport import ClientSession, InProcessTransport
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobError, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import load_task, model_to_vector

pytestmark = pytest.mark.timeout(180)
TASK = "fedveil.tasks.synthetic:task"
DIM = 11  # the synthetic logistic regression: 10 weights + bias


@dataclass
class Scripted:
    """A protocol client sending ``vector`` (scaled by the round number) with weight ``weight``."""

    coordinator: Coordinator
    name: str
    vector: np.ndarray
    weight: float = 1.0
    silent_at: dict[tuple[int, int], str] = field(default_factory=dict)
    """(round, n-th RoundStart of that round) → stage at which to stay silent."""
    results: list[tuple[int, int]] = field(default_factory=list)
    sent: dict[int, np.ndarray] = field(default_factory=dict)
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # surfaced by the test
            self.error = err

    def _run(self) -> None:
        t = InProcessTransport(self.coordinator, self.name)
        s = ClientSession.from_join(t.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                          task_name="synthetic-logreg")))
        driver: SecAggClientDriver | None = None
        rnd, nonce, skip = 0, b"", ""
        starts: dict[int, int] = {}
        while True:
            resp = t.poll(pb.PollRequest(header=s.header(), max_wait_ms=500))
            kind = resp.WhichOneof("instruction")
            try:
                if kind == "round_start":
                    start = resp.round_start
                    rnd, nonce = start.round, start.round_nonce
                    starts[rnd] = starts.get(rnd, 0) + 1
                    skip = self.silent_at.get((rnd, starts[rnd]), "")
                    if skip == "training":
                        continue
                    driver = SecAggClientDriver(start, seed=os.urandom(32))
                    update = self.vector * rnd
                    enc = encoder_for(start.encoding, start.secagg.cohort_size)
                    ring = enc.encode(update, os.urandom(16), weight=self.weight) if enc.weighted else \
                        enc.encode(update, os.urandom(16))
                    driver.set_input(ring)
                    self.sent[rnd] = update
                    t.advertise_keys(pb.AdvertiseKeysRequest(header=s.header(rnd, nonce), **driver.advertise()))
                elif kind == "peer_keys" and driver is not None and skip != "share-keys":
                    t.share_keys(pb.ShareKeysRequest(header=s.header(rnd, nonce),
                                                     shares=driver.share_keys(resp.peer_keys)))
                elif kind == "incoming_shares" and driver is not None and skip != "masked-input":
                    t.submit_masked_input(pb.MaskedInputRequest(
                        header=s.header(rnd, nonce), masked_vector=driver.masked_input(resp.incoming_shares)))
                elif kind == "unmasking" and driver is not None and skip != "unmasking":
                    t.unmask(pb.UnmaskRequest(header=s.header(rnd, nonce), shares=driver.unmask(resp.unmasking)))
                elif kind == "round_result":
                    self.results.append((resp.round_result.round, resp.round_result.outcome))
                    driver = None
                elif kind == "evaluate":
                    ev = resp.evaluate
                    t.report_metrics(pb.MetricsReport(header=s.header(ev.phase, ev.round_nonce),
                                                      model_version=ev.round, num_examples=10,
                                                      metrics=[pb.Metric(name="loss", value=float(self.weight))]))
                elif kind == "job_done":
                    self.done = True
                    return
            except ProtocolError:
                driver = None  # a closed stage: wait for the round result


def _job(tmp_path: Path, names: list[str], **overrides: object) -> tuple[Coordinator, RunStore]:
    torch.set_num_threads(1)
    store = RunStore(tmp_path / "run.db")
    for n in names:
        if not store.client_enrolled(n):
            store.enroll(n)
    settings: dict[str, object] = dict(task=TASK, rounds=1, clients_per_round=len(names), min_clients=len(names),
                                       round_timeout=30.0, stage_timeout=1.5, cohort_wait=0.0, linger=1.0, seed=3,
                                       poll_wait=0.5, evaluate=False)
    settings.update(overrides)
    config = ServerConfig(**settings)  # type: ignore[arg-type]
    return Coordinator(config, load_task(TASK), store), store


def _run(coordinator: Coordinator, clients: list[Scripted]) -> JobSummary:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for th in threads:
        th.start()
    summary = coordinator.run()
    for th in threads:
        th.join(30)
    for c in clients:
        assert c.error is None, f"{c.name}: {c.error!r}"
    return summary


def _vectors(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.5, 0.5, DIM) for _ in range(n)]


def test_dropout_at_masked_input_leaves_the_exact_mean_of_the_survivors(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    vecs = _vectors(4)
    weights = [1.0, 2.0, 3.0, 4.0]
    coordinator, store = _job(tmp_path, names)
    initial = coordinator.model.params.copy()
    clients = [Scripted(coordinator, n, v, w) for n, v, w in zip(names, vecs, weights, strict=True)]
    clients[2].silent_at[(1, 1)] = "masked-input"
    summary = _run(coordinator, clients)
    assert summary.status == "completed" and summary.completed_rounds == 1 and summary.dropouts == 1
    survivors = [0, 1, 3]
    expected = sum(weights[i] * vecs[i] for i in survivors) / sum(weights[i] for i in survivors)
    aggregate = store.aggregate(coordinator.run_id, 1)
    assert aggregate is not None
    np.testing.assert_allclose(aggregate, expected, atol=1e-4)
    ckpt = store.latest_checkpoint(coordinator.run_id)
    assert ckpt is not None and ckpt.version == 1
    np.testing.assert_allclose(ckpt.model, initial + expected, atol=1e-4)
    assert store.dropouts(coordinator.run_id) == [(1, 1, "c", "masked-input", "missed the stage deadline")]
    (rec,) = store.rounds(coordinator.run_id)
    assert rec.status == "completed" and rec.survivors == 3 and rec.stats["dropped"] == ["c"]
    assert dict((c.name, c.results) for c in clients) == {
        "a": [(1, pb.ROUND_OUTCOME_COMPLETED)], "b": [(1, pb.ROUND_OUTCOME_COMPLETED)],
        "c": [(1, pb.ROUND_OUTCOME_DROPPED)], "d": [(1, pb.ROUND_OUTCOME_COMPLETED)]}
    assert all(c.done for c in clients)
    store.close()


def test_too_few_survivors_abort_the_round_which_is_retried(tmp_path: Path) -> None:
    names = ["a", "b", "c"]  # threshold 2
    vecs = _vectors(3)
    coordinator, store = _job(tmp_path, names, rounds=2, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[0].silent_at[(1, 1)] = "share-keys"
    clients[1].silent_at[(1, 1)] = "share-keys"
    summary = _run(coordinator, clients)
    assert summary.status == "completed" and summary.completed_rounds == 2 and summary.aborted_attempts == 1
    rounds = store.rounds(coordinator.run_id)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "aborted"), (1, 2, "completed"),
                                                                (2, 1, "completed")]
    assert "threshold is 2" in (rounds[0].reason or "")
    for number in (1, 2):
        expected = sum(v * number for v in vecs) / 3
        np.testing.assert_allclose(store.aggregate(coordinator.run_id, number), expected, atol=1e-4)  # type: ignore[arg-type]
    assert clients[2].results[0] == (1, pb.ROUND_OUTCOME_ABORTED)
    store.close()


def test_central_dp_stops_before_the_budget_is_exceeded(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    ledger = PrivacyLedger(LedgerConfig(federation_delta=1e-5))
    eps = []
    for r in (1, 2, 3):
        ledger.reserve(r, federation=SubsampledGaussianEvent(1.0, 2.0))
        eps.append(ledger.epsilon())
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, the third would not
    coordinator, store = _job(tmp_path, names, rounds=5, dp="central", dp_clip=2.0, dp_noise_multiplier=2.0,
                              dp_epsilon_budget=budget)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, _vectors(3), strict=True)]
    summary = _run(coordinator, clients)
    assert summary.status == "budget_exhausted" and summary.completed_rounds == 2
    assert summary.epsilon == pytest.approx(eps[1], rel=1e-6)
    assert "would raise user-level ε" in summary.message
    rounds = store.rounds(coordinator.run_id)
    assert [(r.round, r.status) for r in rounds] == [(1, "completed"), (2, "completed"), (3, "aborted")]
    stats = rounds[0].stats
    assert stats["clip_norm"] == 2.0 and stats["noise_stddev_sum"] == pytest.approx(4.0)
    store.close()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["budget", "report", str(tmp_path / "run.db"), "--format", "json"]) == 0
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    assert len(report["rounds"]) == 2


def test_restart_resumes_refuses_other_settings_and_reports_a_finished_job(tmp_path: Path) -> None:
    names = ["a", "b"]
    vecs = _vectors(2)
    coordinator, store = _job(tmp_path, names, rounds=3, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    # Stop the job as soon as round 1 is in the store (the in-process stand-in for a crash).
    def stopper() -> None:
        while store.completed_rounds(coordinator.run_id) < 1:
            time.sleep(0.01)
        coordinator.stop()

    threading.Thread(target=stopper, daemon=True).start()
    first = _run_partial(coordinator, clients)
    assert first.status == "stopped" and 1 <= first.completed_rounds < 3
    run_id = coordinator.run_id
    digests = {r.round: r.aggregate_sha256 for r in store.rounds(run_id) if r.status == "completed"}
    store.close()

    with pytest.raises(JobError, match="--rounds: the run was started with 3, now 4"):
        _job(tmp_path, names, rounds=4, weighted=False)

    coordinator2, store2 = _job(tmp_path, names, rounds=3, weighted=False)
    assert coordinator2.run_id == run_id and coordinator2.resumed_from == first.completed_rounds
    clients2 = [Scripted(coordinator2, n, v) for n, v in zip(names, vecs, strict=True)]
    second = _run(coordinator2, clients2)
    assert second.status == "completed" and second.completed_rounds == 3
    after = {r.round: r.aggregate_sha256 for r in store2.rounds(run_id) if r.status == "completed"}
    assert sorted(after) == [1, 2, 3] and {r: after[r] for r in digests} == digests
    model_after = model_to_vector(load_task(TASK).build_model())  # an untouched model differs from the result
    assert not np.allclose(store2.latest_checkpoint(run_id).model, model_after)  # type: ignore[union-attr]
    store2.close()

    coordinator3, store3 = _job(tmp_path, names, rounds=3, weighted=False, linger=0.0)
    summary = coordinator3.run()
    assert summary.completed_rounds == 3 and "already finished" in summary.message
    assert [r.status for r in store3.runs()] == ["completed"]
    store3.close()


def _run_partial(coordinator: Coordinator, clients: list[Scripted]) -> JobSummary:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for th in threads:
        th.start()
    return coordinator.run()
