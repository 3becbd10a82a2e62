"""A server stopped, or killed, while a round's unmasking shares are coming in, then resumed with the
same command.

Review of 2026-12-07: the stop took the round's reservation out of the server's ledger although the
sites had sent their shares (their own ledgers record the release), and the resumed server redid the
round, which every site that had sent its shares declines: with the cohort all the sites, the job
failed after its attempts. Now a stop during unmasking skips the round like a rejected one (model
unchanged, the release kept), and the resumed job goes on with the next round.

A ``kill -9`` did the same, and the stop path could not catch it: the ledger held the reservation
in memory only. Now the store marks the attempt, with the ledger keeping its entry, once the masked
inputs are in and before any unmasking share is asked for, and the resumed server skips the round.
The kill is taken as a consistent copy of the store at the moment the first share arrives (SQLite's
backup API: the committed transactions a killed process leaves behind); the first server then stops,
and its later writes are thrown away with the file. (Without DP the next round's model is the one
the cohort's sites already released a sum over: they decline the replay and say so, and the resumed
server draws the next cohorts from the other sites; with the cohort all the sites, the job stops.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.dp.ledger import RELEASED, PrivacyLedger
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.attack_helpers import Consortium, job_config, run_job, turnkey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NAMES = [f"s{i}" for i in range(4)]


class Job:
    """The two-round distributed-DP job both tests run, its sites keeping their state files in ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        torch.set_num_threads(1)
        self.tmp_path = tmp_path
        self.task = load_task("fedveil.tasks.synthetic")
        self.consortium = Consortium.create(NAMES)
        self.config = job_config(rounds=2, dp="distributed", dp_clip=1.0, dp_noise_multiplier=1.0,
                                 max_round_attempts=3, stage_timeout=3.0, round_timeout=20.0)

    def run(self, *, new_run: bool = True) -> JobSummary:
        sites = [turnkey(self.task, n, i, self.consortium, give_up_after_s=4.0,
                         state_path=self.tmp_path / f"{n}.json") for i, n in enumerate(NAMES)]
        return run_job(self.tmp_path, self.config, self.task, sites, new_run=new_run)[0]


def _round_one_releases(ledger: PrivacyLedger) -> list[bool]:
    return [dict(e.details).get(RELEASED, False) for e in ledger.entries if e.round_index == 1]


def test_a_stop_during_unmasking_skips_the_round_and_the_resumed_job_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job(tmp_path)
    real_unmask = Coordinator.unmask
    stopped: list[str] = []

    def unmask(self: Coordinator, caller: str, request: Any) -> Any:
        if not stopped:  # the operator's Ctrl+C lands as the first shares come in, before the stage can close
            stopped.append(caller)
            self.stop()
        return real_unmask(self, caller, request)

    monkeypatch.setattr(Coordinator, "unmask", unmask)
    first = job.run()
    assert first.status == "stopped" and stopped
    with RunStore(tmp_path / "run.sqlite") as store:
        ledger = PrivacyLedger.from_json(store.ledger_json(first.run_id) or "")
        assert [e.round_index for e in ledger.entries] == [1]  # the release stays in the server's ledger
    monkeypatch.setattr(Coordinator, "unmask", real_unmask)
    second = job.run(new_run=False)
    assert second.status == "completed", second.message
    with RunStore(tmp_path / "run.sqlite") as store:
        statuses = [(r.round, r.status) for r in store.rounds(second.run_id)]
        ledger = PrivacyLedger.from_json(store.ledger_json(second.run_id) or "")
    assert statuses[0] == (1, "rejected") and statuses[-1] == (2, "completed")
    assert [e.round_index for e in ledger.entries] == [1, 2]


def test_a_server_killed_during_unmasking_resumes_by_skipping_the_released_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server killed (``kill -9``) while a round's unmasking shares are coming in, then restarted."""
    job = Job(tmp_path)
    store_path, killed_at = tmp_path / "run.sqlite", tmp_path / "killed.sqlite"
    real_unmask = Coordinator.unmask

    def unmask(self: Coordinator, caller: str, request: Any) -> Any:
        if not killed_at.exists():  # the kill lands as the first shares come in
            live, copy = sqlite3.connect(store_path), sqlite3.connect(killed_at)
            try:
                live.backup(copy)
            finally:
                live.close()
                copy.close()
            answer = real_unmask(self, caller, request)
            self.stop()
            return answer
        return real_unmask(self, caller, request)

    monkeypatch.setattr(Coordinator, "unmask", unmask)
    first = job.run()
    assert first.status == "stopped" and killed_at.exists()
    for leftover in tmp_path.glob("run.sqlite*"):
        leftover.unlink()
    killed_at.rename(store_path)
    with RunStore(store_path) as store:
        assert [(r.round, r.status) for r in store.rounds(first.run_id)] == [(1, "running")]
        # the release was counted in the store before the first share could leave
        assert _round_one_releases(PrivacyLedger.from_json(store.ledger_json(first.run_id) or "")) == [True]

    monkeypatch.setattr(Coordinator, "unmask", real_unmask)
    second = job.run(new_run=False)
    assert second.status == "completed", second.message
    assert second.rejected_rounds == 1
    with RunStore(store_path) as store:
        statuses = [(r.round, r.status) for r in store.rounds(second.run_id)]
        ledger_json = store.ledger_json(second.run_id)
    assert statuses == [(1, "rejected"), (2, "completed")]
    ledger = PrivacyLedger.from_json(ledger_json or "")
    assert _round_one_releases(ledger) == [True]  # one sum of round 1 left, and it is counted
    assert [e.round_index for e in ledger.entries] == [1, 2]


def test_a_server_resumed_after_a_rejected_round_asks_no_evaluation_of_the_unchanged_model(tmp_path: Path) -> None:
    """The model a server resumes with after a rejected round is one the sites released a sum over: the
    resumed server, like the one before it, asks for no evaluation of it (the review of 2026-12-07: it did,
    and the sites that evaluate declined every attempt)."""
    from tests.server_helpers import make_job

    coordinator, store = make_job(tmp_path, ["a", "b", "c"], rounds=2)
    store.start_round(coordinator.run_id, 1, 1, {"a": 0, "b": 1, "c": 2}, 2)
    coordinator._record_rejected(1, 1, "the sum failed the sanity checks", 3, 2)
    assert coordinator._model_released_unchanged
    resumed = Coordinator(coordinator.config, load_task("fedveil.tasks.synthetic"), store, new_run=False)
    assert resumed.model.version == 1 and resumed._model_released_unchanged
    store.close()
