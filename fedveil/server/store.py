"""The run store: one SQLite file (stdlib ``sqlite3``, WAL mode) holding a federation's history.

Tables: ``clients`` and ``tokens`` (enrolment; token secrets are never stored, only SHA-256
digests), ``runs`` (one per job: its configuration and status), ``rounds`` (one row per round
attempt: cohort size, survivors, outcome, the released aggregate), ``participants`` (who was in
which round, with their secagg id and the last stage they completed), ``dropouts`` (who dropped
at which stage), ``evaluations`` (federated evaluation metrics per client and model version),
``client_privacy`` (clients' reported sample-level spend), ``ledger`` (the privacy ledger JSON of
each run) and ``checkpoints`` (the global model after every completed round, with the server
optimizer and DP state needed to resume).

Durability: every round completes in ONE transaction (round row, checkpoint, ledger, optimizer
state), with ``synchronous=FULL``, so a server killed at any point finds either the round
complete with all its state, or not complete at all, and resumes from the last completed round.
No secret keys or Shamir shares are ever written here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.errors import FedveilError
from fedveil.protocol.auth import Credential, IssuedToken, issue_token

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    identity_public_key BLOB
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    client_name TEXT NOT NULL REFERENCES clients(name),
    digest BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL,
    finished_at REAL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    cohort_size INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    survivors INTEGER,
    reason TEXT,
    aggregate BLOB,
    aggregate_sha256 TEXT,
    stats_json TEXT,
    PRIMARY KEY (run_id, round, attempt)
);
CREATE TABLE IF NOT EXISTS participants (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    client_name TEXT NOT NULL,
    secagg_id INTEGER NOT NULL,
    last_stage TEXT,
    PRIMARY KEY (run_id, round, attempt, client_name)
);
CREATE TABLE IF NOT EXISTS dropouts (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    client_name TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, round, attempt, client_name)
);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    client_name TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, model_version, client_name)
);
CREATE TABLE IF NOT EXISTS client_privacy (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_name TEXT NOT NULL,
    report_json TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, round, client_name)
);
CREATE TABLE IF NOT EXISTS ledger (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    ledger_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    model BLOB NOT NULL,
    model_sha256 TEXT NOT NULL,
    state_json TEXT NOT NULL,
    state_arrays BLOB,
    PRIMARY KEY (run_id, version)
);
"""


_UPSERT_EVALUATION = (
    "INSERT OR REPLACE INTO evaluations (run_id, model_version, client_name, num_examples, metrics_json, at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_CLIENT_PRIVACY = (
    "INSERT OR REPLACE INTO client_privacy (run_id, round, client_name, report_json, at) VALUES (?, ?, ?, ?, ?)"
)
_UPSERT_LEDGER = (
    "INSERT INTO ledger (run_id, ledger_json, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT(run_id) DO UPDATE SET ledger_json=excluded.ledger_json, updated_at=excluded.updated_at"
)


class StoreError(FedveilError, RuntimeError):
    """The store cannot be opened or used; the message names the file and what is wrong."""


class EnrollmentError(FedveilError, ValueError):
    """Bad client name, or the name is already enrolled."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    created_at: float
    config: dict[str, Any]
    status: str
    finished_at: float | None
    summary: dict[str, Any] | None


@dataclass(frozen=True)
class RoundRecord:
    run_id: str
    round: int
    attempt: int
    status: str
    started_at: float
    finished_at: float | None
    cohort_size: int
    threshold: int
    survivors: int | None
    reason: str | None
    aggregate_sha256: str | None
    stats: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    version: int
    model: np.ndarray
    state: dict[str, Any]


def _float_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


@functools.cache
def _expected_columns() -> dict[str, tuple[str, ...]]:
    """Each table's columns as this version's schema declares them (read from a scratch database)."""
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.executescript(_SCHEMA)
        tables = [r[0] for r in scratch.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: tuple(r[1] for r in scratch.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        scratch.close()


class RunStore:
    """Thread-safe access to a run store (one connection, serialized by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} is a directory, not a file")
        if not self.path.parent.exists():
            raise StoreError(f"store {str(self.path)!r}: directory {str(self.path.parent)!r} does not exist")
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._lock = threading.RLock()
            with self._tx():
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise StoreError(
                        f"store {str(self.path)!r} has schema version {row[0]}, this fedveil expects {SCHEMA_VERSION}"
                    )
                self._check_columns()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"store {str(self.path)!r} is not a fedveil run store ({err})") from None

    def _check_columns(self) -> None:
        """Refuse a store whose tables lack columns this version writes (an older development build's).

        ``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it is, so without this check a
        missing column would surface only at the first write, in the middle of a round.
        """
        for table, columns in _expected_columns().items():
            present = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in columns if c not in present]
            if missing:
                raise StoreError(
                    f"store {str(self.path)!r} was written by another fedveil version: table {table!r} lacks "
                    f"column(s) {', '.join(missing)}; use a new store file"
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    # -- enrolment -----------------------------------------------------------------------------
    def enroll(self, name: str, *, rotate: bool = False, identity_public_key: bytes | None = None) -> IssuedToken:
        """Enrol ``name`` and issue its token. With ``rotate`` an enrolled client gets a new token
        and its old tokens are revoked."""
        if not NAME_PATTERN.match(name):
            raise EnrollmentError(
                f"client name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if identity_public_key is not None and len(identity_public_key) != 32:
            raise EnrollmentError(f"identity public key must be 32 bytes (got {len(identity_public_key)})")
        issued = issue_token()
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT revoked FROM clients WHERE name=?", (name,)).fetchone()
            if row is not None and not rotate:
                raise EnrollmentError(f"client {name!r} is already enrolled (use --rotate to issue a new token)")
            if row is None and rotate:  # a typo must not create a new identity and leave the old token valid
                raise EnrollmentError(f"client {name!r} is not enrolled, so it has no token to rotate")
            if row is None:
                c.execute(
                    "INSERT INTO clients (name, created_at, revoked, identity_public_key) VALUES (?, ?, 0, ?)",
                    (name, now, identity_public_key),
                )
            else:
                c.execute("UPDATE tokens SET revoked=1 WHERE client_name=?", (name,))
                c.execute("UPDATE clients SET revoked=0 WHERE name=?", (name,))
                if identity_public_key is not None:
                    c.execute("UPDATE clients SET identity_public_key=? WHERE name=?", (identity_public_key, name))
            c.execute(
                "INSERT INTO tokens (token_id, client_name, digest, created_at, revoked) VALUES (?, ?, ?, ?, 0)",
                (issued.token_id, name, issued.digest, now),
            )
        return issued

    def revoke(self, name: str) -> None:
        with self._tx() as c:
            if c.execute("SELECT 1 FROM clients WHERE name=?", (name,)).fetchone() is None:
                raise EnrollmentError(f"client {name!r} is not enrolled")
            c.execute("UPDATE clients SET revoked=1 WHERE name=?", (name,))
            c.execute("UPDATE tokens SET revoked=1 WHERE client_name=?", (name,))

    def credential(self, token_id: str) -> Credential | None:
        rows = self._query(
            "SELECT t.token_id, t.client_name, t.digest, t.revoked, c.revoked FROM tokens t "
            "JOIN clients c ON c.name = t.client_name WHERE t.token_id=?",
            (token_id,),
        )
        if not rows:
            return None
        tid, name, digest, t_revoked, c_revoked = rows[0]
        return Credential(token_id=tid, client_name=name, digest=bytes(digest), revoked=bool(t_revoked or c_revoked))

    def client_enrolled(self, name: str) -> bool:
        rows = self._query("SELECT revoked FROM clients WHERE name=?", (name,))
        return bool(rows) and not rows[0][0]

    def enrolled_clients(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM clients WHERE revoked=0 ORDER BY name")]

    def identity_key(self, name: str) -> bytes | None:
        rows = self._query("SELECT identity_public_key FROM clients WHERE name=?", (name,))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

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

    def interrupt_unfinished_rounds(self, run_id: str) -> int:
        """Mark rounds left 'running' by a killed server as 'interrupted'. Returns how many."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET status='interrupted', finished_at=?, reason='server stopped during the round' "
                "WHERE run_id=? AND status='running'",
                (time.time(), run_id),
            )
            return int(cur.rowcount)

    def complete_round(
        self,
        run_id: str,
        round_number: int,
        attempt: int,
        *,
        survivors: int,
        aggregate: np.ndarray,
        aggregate_digest: str,
        model: np.ndarray,
        state: Mapping[str, Any],
        ledger_json: str | None,
        stats: Mapping[str, Any],
        status: str = "completed",
        reason: str | None = None,
    ) -> None:
        """Record a completed (or ``status="rejected"``: counted, not applied) round and its checkpoint
        atomically (model version = round_number)."""
        if status not in ("completed", "rejected"):
            raise StoreError(f"status: must be 'completed' or 'rejected' (got {status!r})")
        now = time.time()
        model_blob = _float_blob(model)
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET status=?, finished_at=?, survivors=?, aggregate=?, aggregate_sha256=?, "
                "stats_json=?, reason=? WHERE run_id=? AND round=? AND attempt=? AND status='running'",
                (status, now, survivors, _float_blob(aggregate) if aggregate.size else None, aggregate_digest or None,
                 json.dumps(dict(stats), sort_keys=True), reason, run_id, round_number, attempt),
            )
            if cur.rowcount != 1:
                raise StoreError(f"round {round_number} attempt {attempt} of run {run_id} is not running")
            state_json, arrays = pack_state(state)
            c.execute(
                "INSERT INTO checkpoints (run_id, version, created_at, model, model_sha256, state_json, state_arrays) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, round_number, now, model_blob, hashlib.sha256(model_blob).hexdigest(), state_json, arrays),
            )
            if ledger_json is not None:
                c.execute(_UPSERT_LEDGER, (run_id, ledger_json, now))

    def save_initial_checkpoint(self, run_id: str, model: np.ndarray, state: Mapping[str, Any]) -> None:
        blob = _float_blob(model)
        state_json, arrays = pack_state(state)
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO checkpoints (run_id, version, created_at, model, model_sha256, state_json, "
                "state_arrays) VALUES (?, 0, ?, ?, ?, ?, ?)",
                (run_id, time.time(), blob, hashlib.sha256(blob).hexdigest(), state_json, arrays),
            )

    def save_ledger(self, run_id: str, ledger_json: str) -> None:
        with self._tx() as c:
            c.execute(_UPSERT_LEDGER, (run_id, ledger_json, time.time()))

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

    def aggregate(self, run_id: str, round_number: int) -> np.ndarray | None:
        """The released (decoded) aggregate of a completed round."""
        rows = self._query(
            "SELECT aggregate FROM rounds WHERE run_id=? AND round=? AND status='completed'", (run_id, round_number)
        )
        return np.frombuffer(rows[0][0], dtype="<f4").copy() if rows and rows[0][0] is not None else None

    def latest_checkpoint(self, run_id: str) -> Checkpoint | None:
        return self.checkpoint(run_id)

    def checkpoint(self, run_id: str, version: int | None = None) -> Checkpoint | None:
        """The global model after round ``version`` (0: the initial model), or the latest one."""
        columns = "SELECT version, model, model_sha256, state_json, state_arrays FROM checkpoints WHERE run_id=?"
        rows = (self._query(f"{columns} ORDER BY version DESC LIMIT 1", (run_id,)) if version is None
                else self._query(f"{columns} AND version=?", (run_id, version)))
        if not rows:
            return None
        version, blob, digest, state_json, arrays = rows[0]
        if hashlib.sha256(blob).hexdigest() != digest:
            raise StoreError(f"store {str(self.path)!r}: checkpoint {version} of run {run_id} is corrupt (digest)")
        try:
            state = unpack_state(state_json, arrays)
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(
                f"store {str(self.path)!r}: checkpoint {version} of run {run_id} is corrupt ({err})"
            ) from None
        return Checkpoint(run_id, int(version), np.frombuffer(blob, dtype="<f4").copy(), state)

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

    def record_client_privacy(
        self, run_id: str, round_number: int, client_name: str, report: Mapping[str, Any]
    ) -> None:
        with self._tx() as c:
            c.execute(_UPSERT_CLIENT_PRIVACY, (run_id, round_number, client_name,
                                               json.dumps(dict(report), sort_keys=True), time.time()))

    def record_client_report(
        self, run_id: str, *, model_version: int, round_number: int, client_name: str, num_examples: int,
        metrics: Mapping[str, float] | None, privacy: Mapping[str, Any] | None, ledger_json: str | None,
    ) -> None:
        """One site's ``ReportMetrics`` in ONE transaction: its metrics (if any), its reported privacy
        spend (if any) and the ledger with that spend recorded (if it was). All or nothing, so a report
        that failed to store can be retried without being counted twice."""
        now = time.time()
        with self._tx() as c:
            if metrics:
                c.execute(_UPSERT_EVALUATION, (run_id, model_version, client_name, num_examples,
                                               json.dumps(dict(metrics), sort_keys=True), now))
            if privacy is not None:
                c.execute(_UPSERT_CLIENT_PRIVACY, (run_id, round_number, client_name,
                                                   json.dumps(dict(privacy), sort_keys=True, allow_nan=False), now))
            if ledger_json is not None:
                c.execute(_UPSERT_LEDGER, (run_id, ledger_json, now))

    def client_privacy(self, run_id: str) -> list[tuple[int, str, dict[str, Any]]]:
        return [
            (int(r), str(n), json.loads(j))
            for r, n, j in self._query(
                "SELECT round, client_name, report_json FROM client_privacy WHERE run_id=? ORDER BY round, client_name",
                (run_id,),
            )
        ]

    def ledger_json(self, run_id: str) -> str | None:
        rows = self._query("SELECT ledger_json FROM ledger WHERE run_id=?", (run_id,))
        return str(rows[0][0]) if rows else None


_ARRAY_TAG = "__ndarray__"


def pack_state(state: Mapping[str, Any]) -> tuple[str, bytes | None]:
    """Checkpoint state as JSON, with numpy arrays (e.g. FedAdam's moments) moved into one raw
    little-endian blob instead of JSON number lists (8 bytes per value instead of ~20 and no
    float formatting), referenced from the JSON by offset, dtype and shape. No pickle."""
    parts: list[bytes] = []
    offset = 0

    def walk(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"cannot store an array of dtype {arr.dtype} in a checkpoint")
            dtype = arr.dtype.newbyteorder("<")
            raw = arr.astype(dtype, copy=False).tobytes()
            ref = {_ARRAY_TAG: dtype.str, "offset": offset, "shape": list(arr.shape)}
            parts.append(raw)
            offset += len(raw)
            return ref
        if isinstance(value, Mapping):
            return {str(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    packed = walk(dict(state))
    return json.dumps(packed, sort_keys=True, allow_nan=False), (b"".join(parts) if parts else None)


def unpack_state(state_json: str, arrays: bytes | None) -> dict[str, Any]:
    """Inverse of :func:`pack_state` (arrays come back as numpy arrays)."""
    blob = memoryview(arrays or b"")

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if _ARRAY_TAG in value:
                dtype = np.dtype(value[_ARRAY_TAG])
                shape = tuple(int(n) for n in value["shape"])
                count = int(np.prod(shape, dtype=np.int64))
                start = int(value["offset"])
                end = start + count * dtype.itemsize
                if start < 0 or end > len(blob):
                    raise ValueError("an array reference points outside the checkpoint's array blob")
                return np.frombuffer(blob[start:end], dtype=dtype).reshape(shape).copy()
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    result = walk(json.loads(state_json))
    if not isinstance(result, dict):
        raise ValueError("checkpoint state is not a JSON object")
    return result


def is_run_store(path: str | Path) -> bool:
    """Whether ``path`` looks like an SQLite file (the header), without creating anything."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


class UnknownRunError(StoreError):
    """``--run`` names no run in the store."""


def load_ledger(path: str | Path, run_id: str | None = None) -> Any:
    """The privacy ledger (``fedveil.dp.ledger.PrivacyLedger``) of a run in a run store.

    ``run_id`` defaults to the latest run. Raises :class:`StoreError` when the file is not a run
    store, has no such run, or the run has no ledger (no DP rounds recorded yet).
    """
    from fedveil.dp.ledger import PrivacyLedger

    p = Path(path)
    if not is_run_store(p):
        raise StoreError(f"{str(p)!r} is not a fedveil run store (not an SQLite file)")
    uri = f"file:{p.resolve()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            if run_id is None:
                row = conn.execute("SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
                if row is None:
                    raise StoreError(f"run store {str(p)!r} has no runs")
                run_id = str(row[0])
            elif conn.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is None:
                raise UnknownRunError(f"run store {str(p)!r} has no run {run_id!r}")
            row = conn.execute("SELECT ledger_json FROM ledger WHERE run_id=?", (run_id,)).fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{str(p)!r} is not a fedveil run store ({err})") from None
    if row is None:
        raise StoreError(f"run {run_id!r} in {str(p)!r} has no privacy ledger (no DP rounds recorded)")
    return PrivacyLedger.from_json(str(row[0]))
