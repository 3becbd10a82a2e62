"""The dashboard's application: the task, the run source and the sites' data, and one method per API call.

Each method returns a JSON-ready object or raises :class:`DashboardError`; the web layer
(:mod:`.routes`) only translates HTTP to these calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any

import torch

from fedveil.server.dashboard.explain import Assessor, gradient_times_input
from fedveil.server.dashboard.settings import DP_MODES, DashboardError, RunSettings
from fedveil.server.dashboard.site_data import DEFAULT_MAX_UPLOAD_BYTES, SiteDataDirs
from fedveil.server.dashboard.sources import RunSource, RunStarter, jsonable
from fedveil.task import SchemaError, Task

NO_UPLOADS = (
    "this dashboard runs beside the coordinator, which never receives site data: each site keeps its "
    "file on its own machine (fedveil client --data FILE), or try uploads in fedveil demo healthcare --dashboard"
)


@dataclass
class Dashboard:
    """Everything the HTTP handler needs: the task, the data sources and the sites' dirs."""

    task: Task
    runs: RunSource
    sites: SiteDataDirs | None = None
    starter: RunStarter | None = None
    examples: Sequence[Mapping[str, Any]] = ()
    assessor: Assessor | None = None
    title: str = "fedveil dashboard"
    _model_cache: tuple[int, torch.nn.Module] | None = field(default=None, repr=False)

    # -- API handlers (each returns a JSON-ready object or raises DashboardError) --

    def status(self) -> dict[str, Any]:
        runs = self.runs.list_runs()
        active = next((r["id"] for r in runs if r["status"] == "running"), None)
        names = list(self.sites.sites) if self.sites is not None else []
        return {
            "title": self.title,
            "task": self.task.name,
            "terms": asdict(self.task.terms),
            "sites": names,
            "uploads": self.sites is not None,
            "can_start_runs": self.starter is not None,
            "active_run": active,
            "has_model": self.runs.latest_model() is not None,
            "dp_modes": list(DP_MODES),
            "defaults": asdict(RunSettings(sites_per_round=max(2, len(names)))),
        }

    def example_inputs(self) -> list[Mapping[str, Any]]:
        """The examples given to the dashboard, else the task's own (computed once)."""
        if not self.examples and self.task.examples is not None:
            self.examples = tuple(self.task.examples())
        return list(self.examples)

    def site_dirs(self) -> SiteDataDirs:
        if self.sites is None:
            raise DashboardError(NO_UPLOADS, HTTPStatus.CONFLICT)
        return self.sites

    def start_run(self, payload: Any) -> dict[str, Any]:
        if self.starter is None:
            raise DashboardError("this dashboard cannot start runs (it only watches a server's store)",
                                 HTTPStatus.CONFLICT)
        if not isinstance(payload, dict):
            raise DashboardError("the request body must be a JSON object of run settings")
        settings = RunSettings.from_json(payload, max_sites=len(self.site_dirs().sites))
        if self.starter.busy():
            raise DashboardError("a run is already in progress; wait for it to finish", HTTPStatus.CONFLICT)
        run_id = self.starter.start(settings)
        return {"run_id": run_id, "settings": asdict(settings)}

    def get_run(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get_run(run_id)
        if run is None:
            raise DashboardError(f"no run {run_id!r}", HTTPStatus.NOT_FOUND)
        return jsonable(run)  # type: ignore[no-any-return]

    def schema(self) -> dict[str, Any]:
        s = self.task.schema
        return {
            "columns": [
                {"name": c.name, "type": c.dtype, "description": c.description, "role": "feature"} for c in s.features
            ]
            + [{"name": s.label.name, "type": s.label.dtype, "description": s.label.description, "role": "label"}],
            "max_bytes": self.sites.max_bytes if self.sites is not None else DEFAULT_MAX_UPLOAD_BYTES,
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
        return jsonable(result)  # type: ignore[no-any-return]

