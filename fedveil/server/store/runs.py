"""Runs and their round attempts: cohorts, stages, dropouts, outcomes and evaluations."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fedveil.server.store.schema import (
    _UPSERT_EVALUATION,
    _UPSERT_LEDGER,
    RoundRecord,
    RunRecord,
    StoreBase,
    StoreError,
)

RELEASED_FROM = "released_from"
"""The key a running attempt's stats hold once its sum can be released (:meth:`RunsMixin.mark_release`)."""


class RunsMixin(StoreBase):
    """Runs and their round attempts: cohorts, stages, dropouts, outcomes and evaluations."""

    # -- runs ----------------------------------------------------------------------------------
    def create_run(self, run_id: str, config: Mapping[str, Any]) -> RunRecord:
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO runs (run_id, created_at, config_json, status) VALUES (?, ?, ?, 'running')",
                (run_id, now, json.dumps(dict(config), sort_keys=True)),
            )
        return RunRecord(run_id, now, dict(config), "running", None, None)

    def _run_from_row(self, row: tuple[Any, ...]) -> RunRecord:
        run_id, created, config_json, status, finished, summary_json = row
        return RunRecord(
            run_id, created, json.loads(config_json), status, finished,
            json.loads(summary_json) if summary_json else None,
        )

    def runs(self) -> list[RunRecord]:
        rows = self._query(
            "SELECT run_id, created_at, config_json, status, finished_at, summary_json FROM runs ORDER BY created_at"
        )
        return [self._run_from_row(r) for r in rows]

    def run(self, run_id: str) -> RunRecord | None:
        rows = self._query(
            "SELECT run_id, created_at, config_json, status, finished_at, summary_json FROM runs WHERE run_id=?",
            (run_id,),
        )
        return self._run_from_row(rows[0]) if rows else None

    def latest_run(self) -> RunRecord | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def finish_run(self, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE runs SET status=?, finished_at=?, summary_json=? WHERE run_id=?",
                (status, time.time(), json.dumps(dict(summary), sort_keys=True), run_id),
            )

    # -- rounds --------------------------------------------------------------------------------
    def start_round(
        self, run_id: str, round_number: int, attempt: int, cohort: Mapping[str, int], threshold: int
    ) -> None:
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT INTO rounds (run_id, round, attempt, status, started_at, cohort_size, threshold) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (run_id, round_number, attempt, now, len(cohort), threshold),
            )
            c.executemany(
                "INSERT INTO participants (run_id, round, attempt, client_name, secagg_id, last_stage) "
                "VALUES (?, ?, ?, ?, ?, NULL)",
                [(run_id, round_number, attempt, name, sid) for name, sid in cohort.items()],
            )

    def record_stage(self, run_id: str, round_number: int, attempt: int, names: Sequence[str], stage: str) -> None:
        with self._tx() as c:
            c.executemany(
                "UPDATE participants SET last_stage=? WHERE run_id=? AND round=? AND attempt=? AND client_name=?",
                [(stage, run_id, round_number, attempt, n) for n in names],
            )

    def record_dropouts(
        self, run_id: str, round_number: int, attempt: int, dropped: Mapping[str, tuple[str, str]]
    ) -> None:
        """``dropped`` maps client name → (stage, reason)."""
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT OR IGNORE INTO dropouts (run_id, round, attempt, client_name, stage, reason, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, round_number, attempt, n, s, r, now) for n, (s, r) in dropped.items()],
            )

    def abort_round(self, run_id: str, round_number: int, attempt: int, reason: str, survivors: int | None) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE rounds SET status='aborted', finished_at=?, reason=?, survivors=? "
                "WHERE run_id=? AND round=? AND attempt=?",
                (time.time(), reason, survivors, run_id, round_number, attempt),
            )

    def finish_evaluation_round(self, run_id: str, round_number: int, attempt: int, survivors: int) -> None:
        """An evaluation-only round (secure final evaluation) finished: no model, no aggregate kept."""
        with self._tx() as c:
            c.execute(
                "UPDATE rounds SET status='evaluated', finished_at=?, survivors=? "
                "WHERE run_id=? AND round=? AND attempt=? AND status='running'",
                (time.time(), survivors, run_id, round_number, attempt),
            )

    def mark_release(self, run_id: str, round_number: int, attempt: int, stage: str, ledger_json: str | None) -> None:
        """The running attempt's masked inputs are in (``stage`` closed): from here its sum can be released.
        Written with the ledger that keeps the round's entry, in one transaction, before any unmasking share
        is asked for, so a server killed after this point resumes knowing (:meth:`released_unfinished_rounds`)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET stats_json=? WHERE run_id=? AND round=? AND attempt=? AND status='running'",
                (json.dumps({RELEASED_FROM: stage}), run_id, round_number, attempt),
            )
            if cur.rowcount != 1:
                raise StoreError(f"round {round_number} attempt {attempt} of run {run_id} is not running")
            if ledger_json is not None:
                c.execute(_UPSERT_LEDGER, (run_id, ledger_json, time.time()))

    def released_unfinished_rounds(self, run_id: str) -> list[tuple[int, int, int]]:
        """(round, attempt, threshold) of each attempt still 'running' (the server was killed) that
        :meth:`mark_release` marked: its sites may have sent their unmasking shares."""
        rows = self._query("SELECT round, attempt, threshold, stats_json FROM rounds WHERE run_id=? AND "
                           "status='running' ORDER BY round, attempt", (run_id,))
        return [(int(r), int(a), int(t)) for r, a, t, stats in rows if stats and RELEASED_FROM in json.loads(stats)]

    def interrupt_unfinished_rounds(self, run_id: str) -> int:
        """Mark rounds left 'running' by a killed server as 'interrupted'. Returns how many."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET status='interrupted', finished_at=?, reason='server stopped during the round' "
                "WHERE run_id=? AND status='running'",
                (time.time(), run_id),
            )
            return int(cur.rowcount)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        rows = self._query(
            "SELECT run_id, round, attempt, status, started_at, finished_at, cohort_size, threshold, survivors, "
            "reason, aggregate_sha256, stats_json FROM rounds WHERE run_id=? ORDER BY round, attempt",
            (run_id,),
        )
        return [
            RoundRecord(*r[:11], stats=json.loads(r[11]) if r[11] else {})  # type: ignore[misc]
            for r in rows
        ]

    def completed_rounds(self, run_id: str) -> int:
        rows = self._query("SELECT MAX(version) FROM checkpoints WHERE run_id=?", (run_id,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def participants(self, run_id: str, round_number: int) -> list[tuple[int, str, int, str | None]]:
        """(attempt, client name, secagg id, last stage completed) for every participant of a round."""
        return [
            (int(a), str(n), int(s), st)
            for a, n, s, st in self._query(
                "SELECT attempt, client_name, secagg_id, last_stage FROM participants WHERE run_id=? AND round=? "
                "ORDER BY attempt, secagg_id",
                (run_id, round_number),
            )
        ]

    def dropouts(self, run_id: str) -> list[tuple[int, int, str, str, str]]:
        """(round, attempt, client name, stage, reason) for every dropout of a run."""
        return [
            (int(r), int(a), str(n), str(s), str(why))
            for r, a, n, s, why in self._query(
                "SELECT round, attempt, client_name, stage, reason FROM dropouts WHERE run_id=? "
                "ORDER BY round, attempt, client_name",
                (run_id,),
            )
        ]

    # -- convictions ---------------------------------------------------------------------------
    def record_conviction(self, run_id: str, client_name: str, reason: str) -> None:
        """A site a share-box complaint proved at fault: kept so a restarted server still leaves it
        out of the run's cohorts. The first conviction's reason stands."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO convictions (run_id, client_name, reason, at) VALUES (?, ?, ?, ?)",
                      (run_id, client_name, reason, time.time()))

    def convictions(self, run_id: str) -> dict[str, str]:
        """Client name → why, for every site convicted in the run."""
        return {str(n): str(why) for n, why in self._query(
            "SELECT client_name, reason FROM convictions WHERE run_id=? ORDER BY at, client_name", (run_id,))}

    # -- bars on a refused roster entry -----------------------------------------------------------
    def record_credential_bar(self, run_id: str, client_name: str, entry_digest: bytes, reason: str) -> None:
        """A site enough members declined for its credential or identity key: kept so a restarted
        server does not draw it with that entry again. A later bar (on a newer entry) replaces it."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO credential_bars (run_id, client_name, entry_digest, reason, at) "
                      "VALUES (?, ?, ?, ?, ?)", (run_id, client_name, entry_digest, reason, time.time()))

    def credential_bars(self, run_id: str) -> dict[str, tuple[bytes, str]]:
        """Client name → (the digest of the roster entry it is barred with, why), for the run."""
        return {str(n): (bytes(digest), str(why)) for n, digest, why in self._query(
            "SELECT client_name, entry_digest, reason FROM credential_bars WHERE run_id=? ORDER BY at, client_name",
            (run_id,))}

    # -- evaluation and client privacy ----------------------------------------------------------
    def record_evaluation(
        self, run_id: str, model_version: int, client_name: str, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        with self._tx() as c:
            c.execute(_UPSERT_EVALUATION, (run_id, model_version, client_name, num_examples,
                                           json.dumps(dict(metrics), sort_keys=True), time.time()))

    def evaluations(self, run_id: str, model_version: int) -> list[tuple[str, int, dict[str, float]]]:
        return [
            (str(n), int(k), json.loads(m))
            for n, k, m in self._query(
                "SELECT client_name, num_examples, metrics_json FROM evaluations WHERE run_id=? AND model_version=? "
                "ORDER BY client_name",
                (run_id, model_version),
            )
        ]
