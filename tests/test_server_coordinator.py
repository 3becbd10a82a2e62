"""The coordinator in-process: dropouts, aborts and retries, the budget stop, resume, and the store.

Clients are the scripted protocol clients of ``server_helpers``: known update vectors through the
real secure-aggregation client, and silence at chosen stages.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from fedveil.cli import main
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator, JobError, JobSummary
from fedveil.server.events import RoundCompleted
from fedveil.task import load_task, model_to_vector
from tests.server_helpers import TASK, Scripted, make_job, run_job, vectors

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_dropout_at_masked_input_leaves_the_exact_mean_of_the_survivors(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    vecs = vectors(4)
    weights = [1.0, 2.0, 3.0, 4.0]
    coordinator, store = make_job(tmp_path, names)
    initial = coordinator.model.params.copy()
    clients = [Scripted(coordinator, n, v, w) for n, v, w in zip(names, vecs, weights, strict=True)]
    clients[2].silent_at[(1, 1)] = "masked-input"
    summary = run_job(coordinator, clients)
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


@pytest.mark.slow
def test_too_few_survivors_abort_the_round_which_is_retried(tmp_path: Path) -> None:
    names = ["a", "b", "c"]  # threshold 3: c = 1 colluder of 3, 2t > 3 + 1
    vecs = vectors(3)
    coordinator, store = make_job(tmp_path, names, rounds=2, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[0].silent_at[(1, 1)] = "share-keys"
    clients[1].silent_at[(1, 1)] = "share-keys"
    summary = run_job(coordinator, clients)
    assert summary.status == "completed" and summary.completed_rounds == 2 and summary.aborted_attempts == 1
    rounds = store.rounds(coordinator.run_id)
    assert [(r.round, r.attempt, r.status) for r in rounds] == [(1, 1, "aborted"), (1, 2, "completed"),
                                                                (2, 1, "completed")]
    assert "threshold is 3" in (rounds[0].reason or "")
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
    coordinator, store = make_job(tmp_path, names, rounds=5, dp="central", dp_clip=2.0, dp_noise_multiplier=2.0,
                              dp_epsilon_budget=budget)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vectors(3), strict=True)]
    summary = run_job(coordinator, clients)
    assert summary.status == "budget_exhausted" and summary.completed_rounds == 2
    assert summary.epsilon == pytest.approx(eps[1], rel=1e-6)
    assert "would raise user-level ε" in summary.message
    rounds = store.rounds(coordinator.run_id)
    assert [(r.round, r.status) for r in rounds] == [(1, "completed"), (2, "completed"), (3, "aborted")]
    # round 3 never started for the sites: each learns round 2's own result, never a round-3 abort in its
    # place (review of 2026-12-07: every site recorded the last released round as dropped)
    for client in clients:
        assert client.results == [(1, pb.ROUND_OUTCOME_COMPLETED), (2, pb.ROUND_OUTCOME_COMPLETED)]
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
    vecs = vectors(2)
    coordinator, store = make_job(tmp_path, names, rounds=3, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    # Stop the job as soon as round 1 is in the store (the in-process stand-in for a crash): told
    # in the job's own thread, so a loaded machine cannot let rounds 2 and 3 finish first, as a
    # thread polling the store did once in a gate
    class StopAfterRoundOne:
        def on_event(self, event: object) -> None:
            if isinstance(event, RoundCompleted) and event.round == 1:
                coordinator.stop()

    coordinator.listeners.add(StopAfterRoundOne())
    first = _run_partial(coordinator, clients)
    assert first.status == "stopped" and 1 <= first.completed_rounds < 3
    run_id = coordinator.run_id
    digests = {r.round: r.aggregate_sha256 for r in store.rounds(run_id) if r.status == "completed"}
    store.close()

    with pytest.raises(JobError, match="--rounds: the run was started with 3, now 4"):
        make_job(tmp_path, names, rounds=4, weighted=False)

    coordinator2, store2 = make_job(tmp_path, names, rounds=3, weighted=False)
    assert coordinator2.run_id == run_id and coordinator2.resumed_from == first.completed_rounds
    clients2 = [Scripted(coordinator2, n, v) for n, v in zip(names, vecs, strict=True)]
    second = run_job(coordinator2, clients2)
    assert second.status == "completed" and second.completed_rounds == 3
    after = {r.round: r.aggregate_sha256 for r in store2.rounds(run_id) if r.status == "completed"}
    assert sorted(after) == [1, 2, 3] and {r: after[r] for r in digests} == digests
    model_after = model_to_vector(load_task(TASK).build_model())  # an untouched model differs from the result
    assert not np.allclose(store2.latest_checkpoint(run_id).model, model_after)  # type: ignore[union-attr]
    store2.close()

    coordinator3, store3 = make_job(tmp_path, names, rounds=3, weighted=False, linger=0.0)
    summary = coordinator3.run()
    assert summary.completed_rounds == 3 and "already finished" in summary.message
    assert [r.status for r in store3.runs()] == ["completed"]
    store3.close()


def _run_partial(coordinator: Coordinator, clients: list[Scripted]) -> JobSummary:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for th in threads:
        th.start()
    return coordinator.run()


@pytest.mark.slow
def test_a_round_that_keeps_aborting_fails_the_job_and_a_restart_tries_again(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    vecs = vectors(3)
    coordinator, store = make_job(tmp_path, names, max_round_attempts=2, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    for c in clients[:2]:
        c.silent_at.update({(1, 1): "share-keys", (1, 2): "share-keys"})
    summary = run_job(coordinator, clients[:2] + clients[2:])
    assert summary.status == "failed" and summary.completed_rounds == 0 and summary.aborted_attempts == 2
    assert "aborted 2 times" in summary.message
    assert store.runs()[0].status == "failed"
    store.close()
    coordinator2, store2 = make_job(tmp_path, names, max_round_attempts=2, weighted=False)
    summary2 = run_job(coordinator2, [Scripted(coordinator2, n, v) for n, v in zip(names, vecs, strict=True)])
    assert summary2.status == "completed" and summary2.resumed_from == 0
    assert [(r.attempt, r.status) for r in store2.rounds(coordinator2.run_id)] == [
        (1, "aborted"), (2, "aborted"), (3, "completed")]
    np.testing.assert_allclose(store2.aggregate(coordinator2.run_id, 1), sum(vecs) / 3, atol=1e-4)  # type: ignore[arg-type]
    store2.close()


def test_fedadam_moments_survive_a_restart(tmp_path: Path) -> None:
    names = ["a", "b"]
    vecs = vectors(2)
    # uninterrupted: two rounds
    (tmp_path / "ref").mkdir()
    ref, ref_store = make_job(tmp_path / "ref", names, rounds=2, weighted=False, optimizer="fedadam", server_lr=0.1)
    assert run_job(ref, [Scripted(ref, n, v) for n, v in zip(names, vecs, strict=True)]).completed_rounds == 2
    expected = ref_store.latest_checkpoint(ref.run_id)
    ref_store.close()
    # interrupted after round 1, then resumed for round 2
    (tmp_path / "cut").mkdir()
    first, store1 = make_job(tmp_path / "cut", names, rounds=1, weighted=False, optimizer="fedadam", server_lr=0.1)
    run_job(first, [Scripted(first, n, v) for n, v in zip(names, vecs, strict=True)])
    store1._conn.execute("UPDATE runs SET status='running'")  # as if killed before the job's end
    config = {**store1.runs()[0].config, "rounds": 2}
    store1._conn.execute("UPDATE runs SET config_json=?", (json.dumps(config, sort_keys=True),))
    store1.close()
    second, store2 = make_job(tmp_path / "cut", names, rounds=2, weighted=False, optimizer="fedadam", server_lr=0.1)
    assert second.resumed_from == 1
    run_job(second, [Scripted(second, n, v) for n, v in zip(names, vecs, strict=True)])
    got = store2.latest_checkpoint(second.run_id)
    store2.close()
    assert expected is not None and got is not None and got.version == expected.version == 2
    m_ref, m_got = np.asarray(expected.state["optimizer"]["m"]), np.asarray(got.state["optimizer"]["m"])
    assert m_got.shape == (11,) and np.abs(m_got).max() > 0
    np.testing.assert_allclose(m_got, m_ref, atol=1e-4)
    np.testing.assert_allclose(got.model, expected.model, atol=1e-3)


@pytest.mark.slow
def test_a_site_silent_from_the_round_start_is_one_dropout_at_commit(tmp_path: Path) -> None:
    """Counted once: it is out of the round at commit, not again when later stages close."""
    names = ["a", "b", "c", "d"]
    vecs = vectors(4)
    coordinator, store = make_job(tmp_path, names, weighted=False)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[3].silent_at[(1, 1)] = "training"  # never answers the RoundStart
    summary = run_job(coordinator, clients)
    assert summary.status == "completed" and summary.completed_rounds == 1 and summary.dropouts == 1
    assert store.dropouts(coordinator.run_id) == [(1, 1, "d", "commit", "missed the stage deadline")]
    np.testing.assert_allclose(store.aggregate(coordinator.run_id, 1), sum(vecs[:3]) / 3, atol=1e-4)  # type: ignore[arg-type]
    store.close()


def test_a_site_that_polls_after_the_linger_hears_the_job_is_done_and_a_stopped_job_says_retry(tmp_path: Path) -> None:
    """At scale many sites miss the linger (1,000 site threads on two cores): while the server still
    serves after the job, a poll gets JobDone, not "shutting down, retry" (which made 820 of 1,000
    simulated sites give up after 30 s of retries). A job stopped before it finished still says retry."""
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol.errors import OutOfOrder, Unavailable
    from fedveil.protocol.transport import ClientSession, InProcessTransport

    coordinator, _ = make_job(tmp_path, ["a", "b", "late"], clients_per_round=2, min_clients=2)
    run_job(coordinator, [Scripted(coordinator, name, v) for name, v in zip(["a", "b"], vectors(2), strict=True)])
    late = InProcessTransport(coordinator, "late")
    session = ClientSession.from_join(late.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                                task_name="synthetic-logreg")))
    coordinator.stop()
    answer = late.poll(pb.PollRequest(header=session.header(), max_wait_ms=500))
    assert answer.WhichOneof("instruction") == "job_done"
    assert answer.job_done.completed_rounds == 1
    forged = pb.RequestHeader(protocol_version=PROTOCOL_VERSION, session_id=bytes(len(session.session_id)),
                              run_id=session.run_id, sequence=99)
    with pytest.raises(OutOfOrder, match="unknown or replaced session"):  # a forged session learns nothing, even now
        late.poll(pb.PollRequest(header=forged, max_wait_ms=0))

    (tmp_path / "stopped").mkdir()
    stopped, _ = make_job(tmp_path / "stopped", ["c", "d"])
    early = InProcessTransport(stopped, "c")
    early_session = ClientSession.from_join(early.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                                      task_name="synthetic-logreg")))
    stopped.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        early.poll(pb.PollRequest(header=early_session.header(), max_wait_ms=0))


def test_a_client_of_the_previous_protocol_version_is_refused_at_join_naming_both_versions(tmp_path: Path) -> None:
    """Version 3 changed the share boxes (commitments) and the unmasking shares (salts): a version 2
    client would fail mid-round on a box size, so it is refused at Join with the reason."""
    from fedveil.protocol import PROTOCOL_VERSION
    from fedveil.protocol.errors import Incompatible

    coordinator, store = make_job(tmp_path, ["a", "b"])
    try:
        assert PROTOCOL_VERSION == 3
        with pytest.raises(Incompatible, match="protocol_version: the server speaks version 3, the client 2"):
            coordinator.join("a", pb.JoinRequest(protocol_version=2, task_name="synthetic-logreg"))
    finally:
        store.close()
