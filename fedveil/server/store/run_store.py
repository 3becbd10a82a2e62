"""RunStore, the store's one class (its parts are mixins), and reading a ledger from a store file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fedveil.server.store.checkpoints import CheckpointsMixin
from fedveil.server.store.runs import RunsMixin
from fedveil.server.store.schema import (
    StoreError,
)
from fedveil.server.store.sites import SitesMixin


class RunStore(SitesMixin, RunsMixin, CheckpointsMixin):
    """Thread-safe access to a run store (one connection, serialized by a lock)."""




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
