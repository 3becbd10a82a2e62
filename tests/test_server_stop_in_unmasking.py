"""A server stopped while a round's unmasking shares are coming in, then resumed with the same command.

Review of 2026-12-07: the stop took the round's reservation out of the server's ledger although the
sites had sent their shares (their own ledgers record the release), and the resumed server redid the
round, which every site that had sent its shares declines: with the cohort all the sites, the job
failed after its attempts. Now a stop during unmasking skips the round like a rejected one (model
unchanged, the release kept), and the resumed job goes on with the next round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.dp.ledger import PrivacyLedger
from fedveil.server.coordinator import Coordinator
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.attack_helpers import Consortium, job_config, run_job, turnkey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NAMES = [f"s{i}" for i in range(4)]


def test_a_stop_during_unmasking_skips_the_round_and_the_resumed_job_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    task = load_task("fedveil.tasks.synthetic")
    consortium = Consortium.create(NAMES)
    config = job_config(rounds=2, dp="distributed", dp_clip=1.0, dp_noise_multiplier=1.0, max_round_attempts=3,
                        stage_timeout=3.0, round_timeout=20.0)

    def sites() -> list[Any]:
        return [turnkey(task, n, i, consortium, give_up_after_s=4.0, state_path=tmp_path / f"{n}.json")
                for i, n in enumerate(NAMES)]

    real_unmask = Coordinator.unmask
    stopped: list[str] = []

    def unmask(self: Coordinator, caller: str, request: Any) -> Any:
        if not stopped:  # the operator's Ctrl+C lands as the first shares come in, before the stage can close
            stopped.append(caller)
            self.stop()
        return real_unmask(self, caller, request)

    monkeypatch.setattr(Coordinator, "unmask", unmask)
    first, _, _ = run_job(tmp_path, config, task, sites())
    assert first.status == "stopped" and stopped
    with RunStore(tmp_path / "run.sqlite") as store:
        ledger = PrivacyLedger.from_json(store.ledger_json(first.run_id) or "")
        assert [e.round_index for e in ledger.entries] == [1]  # the release stays in the server's ledger
    monkeypatch.setattr(Coordinator, "unmask", real_unmask)
    second, _, _ = run_job(tmp_path, config, task, sites(), new_run=False)
    assert second.status == "completed", second.message
    with RunStore(tmp_path / "run.sqlite") as store:
        statuses = [(r.round, r.status) for r in store.rounds(second.run_id)]
        ledger = PrivacyLedger.from_json(store.ledger_json(second.run_id) or "")
    assert statuses[0] == (1, "rejected") and statuses[-1] == (2, "completed")
    assert [e.round_index for e in ledger.entries] == [1, 2]
