"""Job events for listeners (fedveil.server.events): what a dashboard or the demo's live view sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedveil.server.events import (
    EvaluationRecorded,
    JobEvent,
    JobFinished,
    Listeners,
    RoundAborted,
    RoundCompleted,
    RoundStarted,
    StageClosed,
)
from tests.server_helpers import Scripted, make_job, run_job, vectors


class Recorder:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    def on_event(self, event: JobEvent) -> None:
        self.events.append(event)


class Broken:
    def on_event(self, event: JobEvent) -> None:
        raise RuntimeError("a listener with a bug")


def test_listeners_see_each_round_start_and_release_after_the_store_and_then_the_jobs_end(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    coordinator, store = make_job(tmp_path, names, rounds=2, weighted=False)
    recorder = Recorder()
    coordinator.listeners.add(Broken())  # a failing observer is logged and skipped: the job goes on
    coordinator.listeners.add(recorder)
    seen_in_store: list[bool] = []

    class StoreCheck:
        def on_event(self, event: JobEvent) -> None:
            if isinstance(event, RoundCompleted):  # told only after the round is committed
                seen_in_store.append(store.aggregate(event.run_id, event.round) is not None)

    coordinator.listeners.add(StoreCheck())
    summary = run_job(coordinator, [Scripted(coordinator, n, v) for n, v in zip(names, vectors(3), strict=True)])
    assert summary.status == "completed"
    kinds = [type(e).__name__ for e in recorder.events if not isinstance(e, StageClosed)]
    assert kinds == ["RoundStarted", "RoundCompleted", "RoundStarted", "RoundCompleted", "JobFinished"]
    # between a round's start and its release, each stage's close (passive mode: no consistency check)
    stages = ["commit", "reveal", "training", "share-keys", "masked-input", "unmasking"]
    first_round = recorder.events[1 : 1 + len(stages)]
    assert [(type(e).__name__, getattr(e, "stage", "")) for e in first_round] == [("StageClosed", s) for s in stages]
    closed = [e for e in recorder.events if isinstance(e, StageClosed)]
    assert [(e.round, e.stage) for e in closed] == [(r, s) for r in (1, 2) for s in stages]
    assert all(e.answered == 3 and not e.dropped and e.duration_s >= 0 for e in closed)
    started = [e for e in recorder.events if isinstance(e, RoundStarted)]
    assert [(e.round, e.attempt, e.purpose, sorted(e.cohort)) for e in started] == [
        (1, 1, "train", names), (2, 1, "train", names)]
    completed = [e for e in recorder.events if isinstance(e, RoundCompleted)]
    assert [(e.round, e.survivors) for e in completed] == [(1, 3), (2, 3)]
    checkpoint = store.latest_checkpoint(coordinator.run_id)
    assert checkpoint is not None
    np.testing.assert_array_equal(completed[-1].model, checkpoint.model)
    assert seen_in_store == [True, True]
    finished = recorder.events[-1]
    assert isinstance(finished, JobFinished) and finished.summary["status"] == "completed"
    assert finished.summary["run_id"] == coordinator.run_id
    store.close()


@pytest.mark.slow
def test_an_aborted_attempt_reaches_listeners_with_its_stage_and_reason(tmp_path: Path) -> None:
    names = ["a", "b", "c"]  # threshold 3: two silent sites abort the first attempt
    recorder = Recorder()
    coordinator, store = make_job(tmp_path, names, rounds=1, weighted=False)
    coordinator.listeners.add(recorder)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vectors(3), strict=True)]
    clients[0].silent_at[(1, 1)] = "share-keys"
    clients[1].silent_at[(1, 1)] = "share-keys"
    assert run_job(coordinator, clients).status == "completed"
    aborted = [e for e in recorder.events if isinstance(e, RoundAborted)]
    assert len(aborted) == 1 and aborted[0].round == 1 and aborted[0].attempt == 1
    assert "threshold is 3" in aborted[0].reason and aborted[0].stage
    closed = [e for e in recorder.events if isinstance(e, StageClosed) and e.attempt == 1]
    assert closed[-1].stage == aborted[0].stage and closed[-1].dropped == {"a": "share-keys", "b": "share-keys"}
    kinds = [type(e).__name__ for e in recorder.events if not isinstance(e, StageClosed)]
    assert kinds == ["RoundStarted", "RoundAborted", "RoundStarted", "RoundCompleted", "JobFinished"]
    store.close()


def test_secure_final_evaluation_is_an_event_with_the_cohort_sums(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    recorder = Recorder()
    coordinator, store = make_job(tmp_path, names, rounds=1, weighted=False, final_evaluation=True)
    coordinator.listeners.add(recorder)
    run_job(coordinator, [Scripted(coordinator, n, v) for n, v in zip(names, vectors(3), strict=True)])
    evaluations = [e for e in recorder.events if isinstance(e, EvaluationRecorded)]
    starts = [e for e in recorder.events if isinstance(e, RoundStarted)]
    assert [s.purpose for s in starts] == ["train", "evaluate"]
    assert len(evaluations) == 1 and evaluations[0].round == 2 and evaluations[0].model_version == 1
    assert evaluations[0].metrics and evaluations[0].examples > 0
    assert isinstance(recorder.events[-1], JobFinished)
    store.close()


def test_a_listener_without_on_event_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match="listener: object has no on_event"):
        Listeners([object()])  # type: ignore[list-item]
    listeners = Listeners()
    with pytest.raises(TypeError, match="listener: int"):
        listeners.add(3)  # type: ignore[arg-type]
    assert len(listeners) == 0


def test_deferred_events_are_delivered_in_order_at_the_next_flush_or_emit() -> None:
    recorder = Recorder()
    listeners = Listeners([recorder])
    first = RoundAborted("run", 1, 1, "masked-input", "x")
    second = JobFinished("run", {"status": "failed"})
    listeners.defer(first)
    assert recorder.events == []
    listeners.emit(second)
    assert recorder.events == [first, second]
    listeners.flush()
    assert recorder.events == [first, second]
