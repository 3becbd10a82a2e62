"""Completed rounds with their checkpoint and ledger in one transaction; released aggregates; resume state."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedveil.server.store.schema import (
    _UPSERT_LEDGER,
    Checkpoint,
    StoreBase,
    StoreError,
    _float_blob,
)

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


class CheckpointsMixin(StoreBase):
    """Completed rounds with their checkpoint and ledger in one transaction; released aggregates; resume state."""

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

    def ledger_json(self, run_id: str) -> str | None:
        rows = self._query("SELECT ledger_json FROM ledger WHERE run_id=?", (run_id,))
        return str(rows[0][0]) if rows else None
