"""The run store's schema, records and connection: what every part of the store shares."""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedveil.errors import FedveilError

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
CREATE TABLE IF NOT EXISTS convictions (
    run_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, client_name)
);
CREATE TABLE IF NOT EXISTS credential_bars (
    run_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    entry_digest BLOB NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, client_name)
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


class StoreBase:
    """The SQLite connection, its lock and the transaction helpers every part of the store uses."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} is a directory, not a file")
        if not self.path.parent.exists():
            raise StoreError(f"store {str(self.path)!r}: directory {str(self.path.parent)!r} does not exist")
        if self.path.is_file() and self.path.stat().st_size == 0:  # SQLite would quietly make it a store
            raise StoreError(f"store {str(self.path)!r} is an empty file, not a fedveil run store (give a new path, "
                             "or remove the file)")
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

    def __enter__(self) -> Self:
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
