"""The web dashboard: runs and rounds live, hospitals' data upload, the clinician's risk view.

Served by the standard library's :class:`http.server.ThreadingHTTPServer` (no web framework:
the API is a dozen small JSON routes), with plain HTML/JS/CSS pages shipped in
``fedveil/server/static`` (no Node build, nothing fetched from the internet; charts are drawn
on ``<canvas>`` by ``static/charts.js``). It binds to 127.0.0.1 unless told otherwise; it
answers only requests whose ``Host`` names that address (against DNS rebinding), and POST/DELETE
only with an ``X-Fedveil-Request: 1`` header, which a page on another origin cannot send without
a CORS preflight that this server never grants (against cross-site request forgery). Every
request must also carry the dashboard's login token (a cookie set by the login URL printed at
start-up, or ``Authorization: Bearer``; see :mod:`fedveil.server.dashboard_auth`), because
loopback is open to every local user and process.

Where the data comes from is behind two small interfaces, so the same pages serve the demo
(an in-memory record of the runs it drives) and ``fedveil server`` (the SQLite run store):

- :class:`RunSource` — ``list_runs()``, ``get_run(run_id)`` and ``latest_model()``: runs and
  their rounds as plain JSON-ready dicts (see :class:`MemoryRunSource` for the shapes), and
  the current global model's state dict;
- :class:`RunStarter` — ``start(settings)`` starts a run with :class:`RunSettings` from the
  browser and returns its id; ``busy()`` says whether one is still going.

Hospital uploads (:class:`HospitalDataDirs`) are validated against the task's
:class:`~fedveil.task.DataSchema` *before* anything is written; a rejected upload leaves no
trace, and an accepted one is written atomically to that hospital's own data directory and
nowhere else: the coordinator and its store never see it. When a run starts, each hospital's
client trains on its directory's ``site.csv`` if there is one.

JSON API (all responses are JSON; errors are ``{"error": "..."}`` with a 4xx status, naming the
field at fault but never a server path; 401 adds ``"field": "token"``; an unexpected failure is a
500 ``internal error (logged; request ID)`` whose traceback goes only to the server's log):

=======  ======================================  ==========================================
GET      /api/status                             task, hospitals, whether runs can start
GET      /api/runs/<id>/model[?round=N]          the global model (safetensors, metadata of fedveil export)
GET      /api/runs                               run summaries, newest first
GET      /api/runs/<id>                          one run: settings, status, rounds
POST     /api/runs                               start a run: RunSettings as JSON
GET      /api/schema                             the site CSV columns
GET      /api/hospitals                          hospitals and their local data files
POST     /api/hospitals/<name>/upload?filename=  the CSV as the request body
DELETE   /api/hospitals/<name>/upload            remove the hospital's file
GET      /api/clinician/examples                 example patients
POST     /api/predict                            ``{"features": {...}}`` → risk and reasons
=======  ======================================  ==========================================
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from fedveil.dp.ledger import FEDERATION
from fedveil.errors import FedveilError
from fedveil.metrics import weighted_metrics
from fedveil.server.dashboard_auth import (
    UNAUTHORIZED_MESSAGE,
    UNAUTHORIZED_PAGE,
    LoginToken,
    login_cookie,
    presented_tokens,
)
from fedveil.server.privacy_view import LedgerViews
from fedveil.task import SchemaError, Task, describe_margin, risk_level

T = TypeVar("T")

log = logging.getLogger("fedveil.dashboard")

STATIC_FILES: dict[str, str] = {
    "/": "index.html",
    "/index.html": "index.html",
    "/hospital.html": "hospital.html",
    "/clinician.html": "clinician.html",
    "/app.css": "app.css",
    "/charts.js": "charts.js",
    "/common.js": "common.js",
    "/runs.js": "runs.js",
    "/hospital.js": "hospital.js",
    "/clinician.js": "clinician.js",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
DP_MODES = ("local", "central", "distributed", "none")
DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_DISCARD_BYTES = 64 * 1024 * 1024
REQUEST_HEADER = "X-Fedveil-Request"
ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
SITE_FILE = "site.csv"
NO_UPLOADS = (
    "this dashboard runs beside the coordinator, which never receives hospital data: each hospital keeps its "
    "file on its own machine (fedveil client --data FILE), or try uploads in fedveil demo healthcare --dashboard"
)
_HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DashboardError(FedveilError, ValueError):
    """A request the dashboard refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Run settings and the data interfaces


@dataclass(frozen=True)
class RunSettings:
    """What the browser's "start a run" form sends."""

    rounds: int = 10
    hospitals_per_round: int = 5
    dp: str = "local"
    epsilon_budget: float = 3.0

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], *, max_hospitals: int, max_rounds: int = 200) -> RunSettings:
        unknown = sorted(set(payload) - {"rounds", "hospitals_per_round", "dp", "epsilon_budget"})
        if unknown:
            raise DashboardError(f"unknown setting(s): {', '.join(unknown)}")
        defaults = cls()
        rounds = _int_field(payload, "rounds", defaults.rounds, 1, max_rounds)
        per_round = _int_field(payload, "hospitals_per_round", min(defaults.hospitals_per_round, max_hospitals), 2,
                               max_hospitals)
        dp = payload.get("dp", defaults.dp)
        if dp not in DP_MODES:
            raise DashboardError(f"dp: must be one of {', '.join(DP_MODES)} (got {dp!r})")
        budget_raw = payload.get("epsilon_budget", defaults.epsilon_budget)
        try:
            if isinstance(budget_raw, bool):
                raise ValueError
            budget = float(budget_raw)
        except (TypeError, ValueError, OverflowError):
            raise DashboardError(f"epsilon_budget: not a number (got {_shown(budget_raw)})") from None
        if not (math.isfinite(budget) and 0.05 <= budget <= 100):
            raise DashboardError(f"epsilon_budget: must be between 0.05 and 100 (got {_shown(budget_raw)})")
        return cls(rounds=rounds, hospitals_per_round=per_round, dp=str(dp), epsilon_budget=budget)


def _int_field(payload: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    raw = payload.get(name, default)
    if isinstance(raw, bool):
        raise DashboardError(f"{name}: not a whole number (got {raw!r})")
    try:
        value = int(raw)
        if isinstance(raw, float | str) and float(raw) != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise DashboardError(f"{name}: not a whole number (got {_shown(raw)})") from None
    if not low <= value <= high:
        raise DashboardError(f"{name}: must be between {low} and {high} (got {_shown(value)})")
    return value


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about hostile input."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    "finished_at", "hospitals", "epsilon_budget", "delta", "error", "rounds": [...]}``; a round is
    ``{"round", "accuracy", "auc", "loss", "participants", "dropped", "epsilon_sample"
    ({hospital: ε}), "epsilon_sample_max", "epsilon_user" (or None), "budget_remaining"}``.
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
        hospitals: Sequence[str],
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
                "hospitals": list(hospitals),
                "epsilon_budget": epsilon_budget,
                "delta": delta,
                "error": None,
                "rounds": [],
            }
            self._order.append(rid)
        return rid

    def add_round(self, run_id: str, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._runs[run_id]["rounds"].append(_jsonable(dict(record)))

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
                run["summary"] = _jsonable(dict(summary))

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
        return {"rounds": config.get("rounds"), "hospitals_per_round": config.get("clients_per_round"), "dp": dp,
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
        return _jsonable({
            "id": rec.run_id, "status": status, "settings": settings, "started_at": rec.created_at,
            "finished_at": rec.finished_at, "hospitals": names, "epsilon_budget": settings["epsilon_budget"],
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


def _jsonable(value: Any) -> Any:
    """Floats that JSON can carry (NaN and ±∞ become None), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Hospital data directories


@dataclass
class HospitalDataDirs:
    """Each hospital's own data directory, ``root/<hospital>/site.csv``.

    Stands for storage on the hospital's side: nothing here is sent to the coordinator; the
    hospital's client reads the file when it trains.
    """

    root: Path
    hospitals: tuple[str, ...]
    task: Task
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        for name in self.hospitals:
            if not _HOSPITAL_NAME.match(name):
                raise ValueError(f"hospital name {name!r} is not a safe directory name")

    def path(self, hospital: str) -> Path:
        if hospital not in self.hospitals:
            raise DashboardError(f"unknown hospital {hospital!r}", HTTPStatus.NOT_FOUND)
        return self.root / hospital / SITE_FILE

    def site_file(self, hospital: str) -> Path | None:
        p = self.path(hospital)
        return p if p.is_file() else None

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in self.hospitals:
            p = self.path(name)
            info: dict[str, Any] = {"name": name, "has_upload": p.is_file(), "rows": None}
            if p.is_file():
                try:
                    _, labels = self.task.schema.parse_csv(p)
                    info["rows"] = len(labels)
                except SchemaError as err:  # a file edited by hand since it was accepted
                    info["error"] = str(err)
            out.append(info)
        return out

    def accept(self, hospital: str, filename: str, body: bytes) -> dict[str, Any]:
        """Validate ``body``; only if it is a good site file, write it atomically. Returns a summary."""
        target = self.path(hospital)
        if len(body) > self.max_bytes:
            raise DashboardError(
                f"the file is too large ({len(body)} bytes; the limit is {self.max_bytes})",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if not filename.lower().endswith(".csv"):
            raise DashboardError(f"{filename or 'the file'!s} is not a CSV file (expected a name ending in .csv)")
        try:
            features, labels = self.task.schema.parse_csv(body)
        except SchemaError as err:
            raise DashboardError(f"{filename}: {err}") from None
        with self._lock:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".csv", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        positives = float(labels.mean()) if len(labels) else 0.0
        return {
            "hospital": hospital,
            "filename": filename,
            "rows": len(labels),
            "features": int(features.shape[1]),
            "label_share": positives,
        }

    def remove(self, hospital: str) -> bool:
        p = self.path(hospital)
        with self._lock:
            if p.is_file():
                p.unlink()
                return True
        return False


# ---------------------------------------------------------------------------------------------
# Predictions


Assessor = Callable[[torch.nn.Module, np.ndarray], dict[str, Any]]


def gradient_times_input(model: torch.nn.Module, features: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Generic explanation for a model with one logit: gradient × input per feature (first order)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(1, -1).requires_grad_(True)
    model.eval()
    logit = model(x).reshape(-1)[0]
    logit_value = float(logit.item())
    if not math.isfinite(logit_value):
        raise ValueError("the model's output is not finite for these values; check the measurements' units")
    (grad,) = torch.autograd.grad(logit, x)
    contrib = (grad * x).detach().numpy()[0].astype(np.float64)
    prob = float(torch.sigmoid(logit).item())
    order = np.argsort(-np.abs(contrib), kind="stable")
    return {
        "probability": prob,
        "logit": logit_value,
        "risk_level": risk_level(prob),
        "confidence": describe_margin(logit_value)
        + ". Contributions are first-order (gradient × input) approximations.",
        "top_features": [
            {
                "feature": names[i],
                "value": float(features[i]),
                "contribution": float(contrib[i]),
                "direction": "raises risk" if contrib[i] > 0 else "lowers risk",
            }
            for i in order[:5]
        ],
    }


# ---------------------------------------------------------------------------------------------
# The dashboard application


@dataclass
class Dashboard:
    """Everything the HTTP handler needs: the task, the data sources and the hospitals' dirs."""

    task: Task
    runs: RunSource
    hospitals: HospitalDataDirs | None = None
    starter: RunStarter | None = None
    examples: Sequence[Mapping[str, Any]] = ()
    assessor: Assessor | None = None
    title: str = "fedveil dashboard"
    _model_cache: tuple[int, torch.nn.Module] | None = field(default=None, repr=False)

    # -- API handlers (each returns a JSON-ready object or raises DashboardError) --

    def status(self) -> dict[str, Any]:
        runs = self.runs.list_runs()
        active = next((r["id"] for r in runs if r["status"] == "running"), None)
        names = list(self.hospitals.hospitals) if self.hospitals is not None else []
        return {
            "title": self.title,
            "task": self.task.name,
            "hospitals": names,
            "uploads": self.hospitals is not None,
            "can_start_runs": self.starter is not None,
            "active_run": active,
            "has_model": self.runs.latest_model() is not None,
            "dp_modes": list(DP_MODES),
            "defaults": asdict(RunSettings(hospitals_per_round=max(2, len(names)))),
        }

    def example_inputs(self) -> list[Mapping[str, Any]]:
        """The examples given to the dashboard, else the task's own (computed once)."""
        if not self.examples and self.task.examples is not None:
            self.examples = tuple(self.task.examples())
        return list(self.examples)

    def site_dirs(self) -> HospitalDataDirs:
        if self.hospitals is None:
            raise DashboardError(NO_UPLOADS, HTTPStatus.CONFLICT)
        return self.hospitals

    def start_run(self, payload: Any) -> dict[str, Any]:
        if self.starter is None:
            raise DashboardError("this dashboard cannot start runs (it only watches a server's store)",
                                 HTTPStatus.CONFLICT)
        if not isinstance(payload, dict):
            raise DashboardError("the request body must be a JSON object of run settings")
        settings = RunSettings.from_json(payload, max_hospitals=len(self.site_dirs().hospitals))
        if self.starter.busy():
            raise DashboardError("a run is already in progress; wait for it to finish", HTTPStatus.CONFLICT)
        run_id = self.starter.start(settings)
        return {"run_id": run_id, "settings": asdict(settings)}

    def get_run(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get_run(run_id)
        if run is None:
            raise DashboardError(f"no run {run_id!r}", HTTPStatus.NOT_FOUND)
        return _jsonable(run)  # type: ignore[no-any-return]

    def schema(self) -> dict[str, Any]:
        s = self.task.schema
        return {
            "columns": [
                {"name": c.name, "type": c.dtype, "description": c.description, "role": "feature"} for c in s.features
            ]
            + [{"name": s.label.name, "type": s.label.dtype, "description": s.label.description, "role": "label"}],
            "max_bytes": self.hospitals.max_bytes if self.hospitals is not None else DEFAULT_MAX_UPLOAD_BYTES,
        }

    def _current_model(self) -> torch.nn.Module:
        state = self.runs.latest_model()
        if state is None:
            raise DashboardError("no global model yet: start a run and wait for its first round",
                                 HTTPStatus.SERVICE_UNAVAILABLE)
        key = id(state) if not state else hash(tuple(float(v.float().sum()) for v in state.values()))
        if self._model_cache is not None and self._model_cache[0] == key:
            return self._model_cache[1]
        model = self.task.build_model()
        model.load_state_dict(dict(state))
        model.eval()
        self._model_cache = (key, model)
        return model

    def predict(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("features"), dict):
            raise DashboardError('the request body must be {"features": {name: value, ...}}')
        try:
            x = self.task.schema.parse_values(payload["features"])
        except SchemaError as err:
            raise DashboardError(str(err)) from None
        names = [c.name for c in self.task.schema.features]
        model = self._current_model()
        assessor = self.assessor or self.task.explain
        try:
            result = assessor(model, x) if assessor is not None else gradient_times_input(model, x, names)
        except ValueError as err:
            raise DashboardError(str(err)) from None
        return _jsonable(result)  # type: ignore[no-any-return]


def make_handler(app: Dashboard, token: LoginToken) -> type[BaseHTTPRequestHandler]:
    """An HTTP handler class bound to ``app``, open only to holders of ``token`` (see :mod:`.dashboard_auth`)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedveil-dashboard"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: the demo prints its own progress

        # -- plumbing --
        def _send(self, status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()) -> None:
            if status >= 400 or self._unread_body():
                # A body we did not read to its end must never be parsed as the next request on
                # this connection (request smuggling past the Host and header checks): close it.
                self.close_connection = True
            self.send_response(status)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
            self.send_header("Referrer-Policy", "no-referrer")  # a login URL must never travel in a Referer
            for name, value in extra:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _port(self) -> int:
            addr = self.server.server_address
            return int(addr[1]) if isinstance(addr, tuple) else 0

        def _login(self, path: str, candidates: list[str]) -> None:
            """The login URL: a right token sets the cookie and redirects to ``path`` without it."""
            if len(candidates) == 1 and token.matches(candidates[0]):
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8",
                           [("Location", path), ("Set-Cookie", login_cookie(token, self._port()))])
            else:
                self._unauthorized(page=True)

        def _unauthorized(self, *, page: bool) -> None:
            challenge = [("WWW-Authenticate", 'Bearer realm="fedveil dashboard"')]
            if page:
                self._send(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED_PAGE, CONTENT_TYPES[".html"], challenge)
            else:
                body = json.dumps({"error": UNAUTHORIZED_MESSAGE, "field": "token"}).encode()
                self._send(HTTPStatus.UNAUTHORIZED, body, "application/json", challenge)

        def _unread_body(self) -> bool:
            if self.headers.get("Transfer-Encoding"):
                return True  # chunked bodies are never read
            length = (self.headers.get("Content-Length") or "0").strip()
            return not self._body_read and length != "0"

        def _read_body(self, limit: int) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                raise DashboardError("chunked request bodies are not supported; send a Content-Length",
                                     HTTPStatus.LENGTH_REQUIRED)
            length_raw = self.headers.get("Content-Length")
            if length_raw is None:
                raise DashboardError("the request needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
            try:
                length = int(length_raw)
            except ValueError:
                raise DashboardError(f"bad Content-Length {length_raw!r}") from None
            if length < 0:
                raise DashboardError(f"bad Content-Length {length_raw!r}")
            if length > limit:
                self._discard(length)
                raise DashboardError(
                    f"the file is too large ({length} bytes; the limit is {limit})",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            body = self.rfile.read(length)
            self._body_read = len(body) == length
            return body

        def _discard(self, length: int) -> None:
            """Read and drop an oversized body (nothing is kept), so the client sees our answer.

            Beyond :data:`MAX_DISCARD_BYTES` the connection is closed instead of read to the end.
            """
            if length > MAX_DISCARD_BYTES:
                self.close_connection = True
                return
            left = length
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

        def _read_json(self) -> Any:
            body = self._read_body(MAX_JSON_BYTES)
            try:
                return json.loads(body.decode("utf-8") or "null")
            except ValueError as err:  # bad UTF-8, bad JSON, or an integer beyond Python's digit limit
                raise DashboardError(f"the request body is not valid JSON: {err}") from None

        def _dispatch(self, method: str) -> None:
            self._body_read = False
            parts = urlsplit(self.path)
            path = parts.path
            try:
                if method not in ("GET", "HEAD", "POST", "DELETE"):
                    raise DashboardError(f"method {method} is not supported", HTTPStatus.METHOD_NOT_ALLOWED)
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
                addr = self.server.server_address
                bound = str(addr[0]) if isinstance(addr, tuple) else ""
                if host not in ALLOWED_HOSTS and host != bound:
                    # DNS rebinding: a page on another name must not reach this local server
                    raise DashboardError(f"unexpected Host header {host!r}", HTTPStatus.FORBIDDEN)
                query = parse_qs(parts.query, keep_blank_values=True)
                page = STATIC_FILES.get(path, "").endswith(".html")
                if method in ("GET", "HEAD") and page and "token" in query:
                    self._login(path, query["token"])
                    return
                if not any(token.matches(t) for t in presented_tokens(self.headers, self._port())):
                    self._unauthorized(page=page)
                    return
                if method in ("POST", "DELETE") and self.headers.get(REQUEST_HEADER) != "1":
                    # cross-site requests cannot set custom headers without a CORS preflight we never grant
                    raise DashboardError(f"state-changing requests need the {REQUEST_HEADER} header",
                                         HTTPStatus.FORBIDDEN)
                if method in ("GET", "HEAD") and path in STATIC_FILES:
                    self._static(STATIC_FILES[path])
                    return
                if not path.startswith("/api/"):
                    raise DashboardError(f"not found: {path}", HTTPStatus.NOT_FOUND)
                api_method = "GET" if method == "HEAD" else method
                answer = self._api(api_method, path, query)
                if answer is not _SENT:
                    self._json(HTTPStatus.OK, answer)
            except DashboardError as err:
                self._error(err.status, str(err))
            except Exception:  # never crash the server on one request, nor show its internals
                request_id = secrets.token_hex(6)
                log.exception("dashboard: internal error in %s %s (request %s)", method, path, request_id)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"internal error (logged; request {request_id})", "request_id": request_id})

        def _api(self, method: str, path: str, query: dict[str, list[str]]) -> Any:
            seg = [s for s in path.split("/") if s][1:]  # drop "api"
            if method == "GET" and seg == ["status"]:
                return app.status()
            if seg == ["runs"]:
                if method == "GET":
                    return {"runs": app.runs.list_runs()}
                if method == "POST":
                    return app.start_run(self._read_json())
            if method == "GET" and len(seg) == 2 and seg[0] == "runs":
                return app.get_run(seg[1])
            if method == "GET" and len(seg) == 3 and seg[0] == "runs" and seg[2] == "model":
                self._model_download(seg[1], query)
                return _SENT
            if method == "GET" and seg == ["schema"]:
                return app.schema()
            if method == "GET" and seg == ["hospitals"]:
                if app.hospitals is None:
                    return {"hospitals": [], "uploads": False, "message": NO_UPLOADS}
                return {"hospitals": app.hospitals.describe(), "uploads": True}
            if len(seg) == 3 and seg[0] == "hospitals" and seg[2] == "upload":
                hospital = seg[1]
                dirs = app.site_dirs()
                dirs.path(hospital)  # 404 for an unknown hospital, before reading a body
                if method == "POST":
                    filename = (query.get("filename") or [""])[0]
                    body = self._read_body(dirs.max_bytes)
                    return dirs.accept(hospital, filename, body)
                if method == "DELETE":
                    return {"removed": dirs.remove(hospital)}
            if method == "GET" and seg == ["clinician", "examples"]:
                return {"examples": app.example_inputs()}
            if method == "POST" and seg == ["predict"]:
                return app.predict(self._read_json())
            raise DashboardError(f"no such endpoint: {method} {path}", HTTPStatus.NOT_FOUND)

        def _model_download(self, run_id: str, query: dict[str, list[str]]) -> None:
            """GET /api/runs/<id>/model[?round=N]: the global model as safetensors, with its metadata."""
            raw = (query.get("round") or [""])[0]
            if raw and not raw.isdigit():
                raise DashboardError(f"round: must be a round number >= 0 (got {raw[:20]!r})")
            number = int(raw) if raw else None
            name, data = store_model_file(getattr(app.runs, "store_path", None), run_id, number)
            self._send(HTTPStatus.OK, data, "application/octet-stream",
                       [("Content-Disposition", f'attachment; filename="{name}"')])

        def _static(self, name: str) -> None:
            data = resources.files("fedveil.server").joinpath("static").joinpath(name).read_bytes()
            self._send(HTTPStatus.OK, data, CONTENT_TYPES[Path(name).suffix])

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_OPTIONS(self) -> None:
            self._dispatch("OPTIONS")

    return Handler


_SENT = object()
"""An API handler that wrote its own (non-JSON) response returns this."""


class _QuietHTTPServer(ThreadingHTTPServer):
    """A browser that goes away mid-reply is not an error worth a traceback on the demo's console."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):
            log.debug("dashboard client %s went away: %s", client_address, err)
            return
        log.warning("dashboard request from %s failed", client_address, exc_info=True)


class DashboardServer:
    """The dashboard's HTTP server on a background thread: ``start()``, ``login_url``, ``stop()``.

    ``token`` is the login token (see :mod:`.dashboard_auth`); a fresh one is generated if none is
    given. Print :attr:`login_url` once, to the console: it carries the token.
    """

    def __init__(self, app: Dashboard, port: int = 0, host: str = "127.0.0.1",
                 token: LoginToken | None = None) -> None:
        self.app = app
        self.token = token or LoginToken.generate()
        self._httpd = _QuietHTTPServer((host, port), make_handler(app, self.token))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The URL that logs a browser in (it carries the token: show it once, never log it)."""
        return f"{self.url}?token={self.token.value}"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fedveil-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        close = getattr(self.app.runs, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_store_dashboard(store_path: Path, task: Task, port: int, host: str = "127.0.0.1",
                          token: LoginToken | None = None) -> DashboardServer:
    """The dashboard of ``fedveil server --dashboard PORT``: watches the run store (no uploads, no run starts)."""
    app = Dashboard(task=task, runs=StoreRunSource(Path(store_path), task), title="fedveil server")
    return DashboardServer(app, port=port, host=host, token=token).start()
