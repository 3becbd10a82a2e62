"""Where the dashboard reads runs: the demo's in-memory record or a server's SQLite run store."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from fedveil.dp.ledger import FEDERATION
from fedveil.metrics import weighted_metrics
from fedveil.server.dashboard.settings import DashboardError, RunSettings
from fedveil.server.privacy_view import LedgerViews
from fedveil.task import Task

T = TypeVar("T")

log = logging.getLogger("fedveil.dashboard")


@runtime_checkable
class RunSource(Protocol):
    """Where the dashboard reads runs, rounds and the current global model."""

    def list_runs(self) -> list[dict[str, Any]]: ...

    def get_run(self, run_id: str) -> dict[str, Any] | None: ...

    def latest_model(self) -> Mapping[str, torch.Tensor] | None: ...


def store_model_file(store_path: Path | None, run_id: str, round_number: int | None) -> tuple[str, bytes]:
    """A run's global model as a safetensors download (name, bytes), with the metadata of
    ``fedveil export`` (run, round, user-level ε at that round, task)."""
    from fedveil.server.model_export import (
        ExportError,
        ExportRequest,
        download_name,
        load_exported_model,
        safetensors_bytes,
    )

    if store_path is None:
        raise DashboardError("this dashboard has no run store to export a model from", HTTPStatus.CONFLICT)
    try:
        exported = load_exported_model(ExportRequest(store_path, Path(store_path.name), run_id=run_id,
                                                     round=round_number))
    except ExportError as err:  # never a filesystem path in a response
        if err.field == "run":
            raise DashboardError(f"run: no run {run_id!r}", HTTPStatus.NOT_FOUND) from None
        if err.field == "round":
            raise DashboardError(f"round: {err}", HTTPStatus.NOT_FOUND) from None
        log.warning("dashboard: model export of run %s failed: %s", run_id, err)
        raise DashboardError("the run's model cannot be exported here (see the server log)",
                             HTTPStatus.CONFLICT) from None
    return download_name(exported), safetensors_bytes(exported)


@runtime_checkable
class RunStarter(Protocol):
    """Starts a run from the browser's settings; returns its id."""

    def start(self, settings: RunSettings) -> str: ...

    def busy(self) -> bool: ...


class MemoryRunSource:
    """Runs recorded in memory by whoever drives them (the demo). Thread-safe.

    A run is ``{"id", "status" ("running"|"completed"|"failed"), "settings", "started_at",
    "finished_at", "sites", "epsilon_budget", "delta", "error", "rounds": [...]}``; a round is
    ``{"round", "accuracy", "auc", "loss", "participants", "dropped", "epsilon_sample"
    ({site: ε}), "epsilon_sample_max", "epsilon_user" (or None), "budget_remaining"}``.
    """

    def __init__(self, store_path: Path | None = None) -> None:
        self.store_path = store_path
        """The run store the runs are written to (the model download reads it), if any."""
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._model: dict[str, torch.Tensor] | None = None

    def begin_run(
        self,
        settings: Mapping[str, Any],
        sites: Sequence[str],
        *,
        epsilon_budget: float | None,
        delta: float,
        run_id: str | None = None,
    ) -> str:
        rid = run_id or time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._lock:
            if rid in self._runs:
                raise ValueError(f"run {rid!r} already exists")
            self._runs[rid] = {
                "id": rid,
                "status": "running",
                "settings": dict(settings),
                "started_at": time.time(),
                "finished_at": None,
                "sites": list(sites),
                "epsilon_budget": epsilon_budget,
                "delta": delta,
                "error": None,
                "rounds": [],
            }
            self._order.append(rid)
        return rid

    def add_round(self, run_id: str, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._runs[run_id]["rounds"].append(jsonable(dict(record)))

    def set_model(self, state: Mapping[str, torch.Tensor]) -> None:
        with self._lock:
            self._model = {k: v.detach().clone() for k, v in state.items()}

    def finish_run(self, run_id: str, *, error: str | None = None, summary: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            run = self._runs[run_id]
            run["status"] = "failed" if error else "completed"
            run["error"] = error
            run["finished_at"] = time.time()
            if summary is not None:
                run["summary"] = jsonable(dict(summary))

    def list_runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_summary(self._runs[rid]) for rid in reversed(self._order)]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            run = self._runs.get(run_id)
            return json.loads(json.dumps(run)) if run is not None else None

    def latest_model(self) -> Mapping[str, torch.Tensor] | None:
        with self._lock:
            return None if self._model is None else dict(self._model)


class StoreRunSource:
    """Runs, rounds and the latest model read from a server's SQLite run store (read only).

    Per round: the cohort's federated evaluation of the global model after that round
    (examples-weighted means of the clients' reported metrics), the participants and dropouts,
    each client's sample-level ε as the server computes it from the parameters the client
    reported (``epsilon_sample``; ``None`` where the server could not verify them, with the reason
    in ``epsilon_sample_unverified``), the ε each client itself claimed
    (``epsilon_sample_reported``: reported by the site, not a fact), the parties whose figure is
    RDP's bound because the ledger's accountant was over the work bound (``epsilon_rdp_bound``),
    and the federation's user-level ε from the ledger. Opens its own connection, so it can run
    beside the coordinator in the same process.
    """

    def __init__(self, store_path: Path, task: Task) -> None:
        from fedveil.server.store import RunStore

        self.task = task
        self.store_path: Path | None = store_path
        self._store = RunStore(store_path)
        self.ledger_views = LedgerViews()
        """ε figures per run, computed once per ledger version within a work bound."""

    def close(self) -> None:
        self._store.close()

    def _settings(self, config: Mapping[str, Any]) -> dict[str, Any]:
        dp = str(config.get("dp", "none"))
        if dp == "local":
            budget = config.get("dp_client_epsilon_budget") or config.get("dp_local_target_epsilon") or None
        else:
            budget = config.get("dp_epsilon_budget")
        return {"rounds": config.get("rounds"), "sites_per_round": config.get("clients_per_round"), "dp": dp,
                "epsilon_budget": budget}

    def _rounds(self, run_id: str, config: Mapping[str, Any]) -> list[dict[str, Any]]:
        store = self._store
        figures = self.ledger_views.figures(run_id, store.ledger_json(run_id))
        client_figs = {p: f for p, f in figures.items() if p != FEDERATION}
        claims: dict[str, dict[int, float | None]] = {}
        for r, name, row in store.client_privacy(run_id):  # what each site said (its claim, not a fact)
            claim = row.get("epsilon_reported", row.get("epsilon"))
            claims.setdefault(name, {})[r] = float(claim) if isinstance(claim, int | float) else None
        dropouts = store.dropouts(run_id)
        settings = self._settings(config)
        budget = settings["epsilon_budget"]
        # amplification by sampling rests on who took part staying secret: no participant lists then
        hidden = bool(config.get("dp_sampling_amplification"))
        out: list[dict[str, Any]] = []
        for rec in store.rounds(run_id):
            if rec.status != "completed":
                continue
            r = rec.round
            rows = store.evaluations(run_id, r)
            metrics = weighted_metrics(rows)
            dropped = [] if hidden else sorted({n for (rr, a, n, _, _) in dropouts if rr == r and a == rec.attempt})
            participants = [] if hidden else sorted(
                n for a, n, _, _ in store.participants(run_id, r) if a == rec.attempt)
            at = {c: _latest_at(f, r) for c, f in client_figs.items()}
            eps_sample = {c: f.epsilon if f is not None and f.verified else None for c, f in at.items()}
            unverified = {c: f.reason for c, f in at.items() if f is not None and not f.verified}
            finite = [e for e in eps_sample.values() if e is not None]
            user = _latest_at(figures.get(FEDERATION, {}), r)
            eps_user = user.epsilon if user is not None and settings["dp"] in ("central", "distributed") else None
            if budget and settings["dp"] == "local":
                remaining = {c: (budget - e if e is not None else None) for c, e in eps_sample.items()}
            elif budget and eps_user is not None:
                remaining = {"federation": budget - eps_user}
            else:
                remaining = {}
            out.append({
                "round": r, "accuracy": metrics.get("accuracy"), "auc": metrics.get("auc"), "loss": metrics.get("loss"),
                "participants": [p for p in participants if p not in dropped], "dropped": dropped,
                "epsilon_sample": eps_sample,
                # no worst case while a site's figure is unverified: its ε is unknown
                "epsilon_sample_max": None if unverified else (max(finite) if finite else eps_user),
                "epsilon_sample_reported": {c: _latest_at(h, r) for c, h in claims.items()},
                "epsilon_sample_unverified": unverified,
                "epsilon_rdp_bound": sorted(p for p, f in {**at, FEDERATION: user}.items()
                                            if f is not None and f.accountant == "rdp" and self._numeric(config)),
                "epsilon_user": eps_user, "budget_remaining": remaining,
            })
        return out

    @staticmethod
    def _numeric(config: Mapping[str, Any]) -> bool:
        return str(config.get("dp_accountant", "rdp")) != "rdp"

    def list_runs(self) -> list[dict[str, Any]]:
        out = []
        for rec in sorted(self._store.runs(), key=lambda r: r.created_at, reverse=True):
            detail = self.get_run(rec.run_id)
            if detail is not None:
                out.append(_summary(detail))
        return out

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        rec = self._store.run(run_id)
        if rec is None:
            return None
        rounds = self._rounds(run_id, rec.config)
        status = "running" if rec.status == "running" else ("completed" if rec.status == "completed" else "failed")
        seen = {p for r in rounds for p in [*r["participants"], *r["dropped"]]}
        names = sorted(seen | set(self._store.enrolled_clients()))
        settings = self._settings(rec.config)
        return jsonable({
            "id": rec.run_id, "status": status, "settings": settings, "started_at": rec.created_at,
            "finished_at": rec.finished_at, "sites": names, "epsilon_budget": settings["epsilon_budget"],
            "delta": rec.config.get("dp_delta"), "rounds": rounds,
            "error": None if status != "failed" else (rec.summary or {}).get("message", rec.status),
        })

    def latest_model(self) -> Mapping[str, torch.Tensor] | None:
        from fedveil.task import vector_to_model

        latest = self._store.latest_run()
        if latest is None:
            return None
        ckpt = self._store.latest_checkpoint(latest.run_id)
        if ckpt is None or ckpt.version == 0:
            return None
        model = self.task.build_model()
        vector_to_model(np.asarray(ckpt.model, dtype=np.float32), model)
        return model.state_dict()




def _latest_at(history: Mapping[int, T], round_number: int) -> T | None:
    """The last value recorded at or before ``round_number`` (cumulative ε, a site's latest claim)."""
    known = [r for r in history if r <= round_number]
    return history[max(known)] if known else None


def _summary(run: Mapping[str, Any]) -> dict[str, Any]:
    rounds = run["rounds"]
    last = rounds[-1] if rounds else {}
    return {
        "id": run["id"],
        "status": run["status"],
        "settings": run["settings"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "rounds_done": len(rounds),
        "accuracy": last.get("accuracy"),
        "auc": last.get("auc"),
        "epsilon_sample_max": last.get("epsilon_sample_max"),
        "epsilon_user": last.get("epsilon_user"),
        "error": run.get("error"),
    }


def jsonable(value: Any) -> Any:
    """Floats that JSON can carry (NaN and ±∞ become None), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

