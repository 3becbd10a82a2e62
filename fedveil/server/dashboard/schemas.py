"""The shapes of the dashboard API's requests and answers, as pydantic models (served in ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: what is wrong, naming the field at fault where there is one."""

    error: str
    field: str | None = None
    request_id: str | None = None


class RunSettingsBody(BaseModel):
    """POST /api/runs: the settings of a run to start (missing ones take their defaults)."""

    model_config = ConfigDict(extra="forbid")

    # strict: a JSON true is not 1 round, nor "3" an ε budget (lax validation would take both)
    rounds: int | None = Field(None, ge=1, le=200, strict=True)
    sites_per_round: int | None = Field(None, ge=2, le=1000, strict=True)
    dp: Literal["local", "central", "distributed", "none"] | None = None
    epsilon_budget: float | None = Field(None, ge=0.05, le=100, allow_inf_nan=False, strict=True)


class RunStarted(BaseModel):
    run_id: str
    settings: dict[str, Any]


class PredictBody(BaseModel):
    """POST /api/predict: one input's feature values by name."""

    features: dict[str, Any]


class Status(BaseModel):
    """GET /api/status."""

    title: str
    task: str
    terms: dict[str, str]
    """The task's words for its records and predictions (:class:`fedveil.task.TaskTerms`)."""
    sites: list[str]
    uploads: bool
    can_start_runs: bool
    active_run: str | None
    has_model: bool
    dp_modes: list[str]
    defaults: dict[str, Any]


class RoundRow(BaseModel):
    """One round of a run as the dashboard shows it (a task may add metrics of its own)."""

    model_config = ConfigDict(extra="allow")

    round: int
    participants: list[str] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list)
    accuracy: float | None = None
    auc: float | None = None
    loss: float | None = None
    epsilon_sample: dict[str, float | None] = Field(default_factory=dict)
    """Each site's sample-level ε (None: undefined or not reported)."""
    epsilon_sample_max: float | None = None
    epsilon_user: float | None = None
    budget_remaining: dict[str, float | None] | float | None = None
    """What is left of the budget: per site (local DP) or for the federation."""


class RunHeader(BaseModel):
    """What a run's summary and its full record both carry."""

    id: str
    status: Literal["running", "completed", "failed"]
    settings: dict[str, Any]
    started_at: float | str | None
    finished_at: float | str | None
    error: str | None = None
    """Why a failed run failed."""


class Run(RunHeader):
    """GET /api/runs/{run_id}: a run's settings, status and rounds."""

    sites: list[str]
    epsilon_budget: float | None
    delta: float | None
    rounds: list[RoundRow]


class Column(BaseModel):
    name: str
    type: str
    description: str
    role: Literal["feature", "label"]


class SiteSchema(BaseModel):
    """GET /api/schema: the site CSV's columns and the upload size limit."""

    columns: list[Column]
    max_bytes: int


class Contribution(BaseModel):
    model_config = ConfigDict(extra="allow")

    feature: str
    value: float
    contribution: float
    direction: str


class Prediction(BaseModel):
    """POST /api/predict: the model's probability, its reading and the features that weighed most
    (a task's own explainer may add fields of its own)."""

    model_config = ConfigDict(extra="allow")

    probability: float
    logit: float | None = None
    risk_level: str | None = None
    confidence: str | None = None
    top_features: list[Contribution] = Field(default_factory=list)


class RunSummary(RunHeader):
    """One run in GET /api/runs: its settings, status and the figures of its latest round."""

    rounds_done: int
    accuracy: float | None = None
    auc: float | None = None
    epsilon_sample_max: float | None = None
    epsilon_user: float | None = None


class RunList(BaseModel):
    """GET /api/runs: run summaries, newest first."""

    runs: list[RunSummary]


class SiteInfo(BaseModel):
    """One site in GET /api/sites: whether it has a data file here, and its rows."""

    name: str
    has_upload: bool
    rows: int | None = None
    error: str | None = None
    """Why a file on disk no longer parses (edited by hand since it was accepted)."""


class SiteList(BaseModel):
    sites: list[SiteInfo]
    uploads: bool
    message: str | None = None


class UploadAccepted(BaseModel):
    site: str
    filename: str
    rows: int
    features: int
    label_share: float


class Removed(BaseModel):
    removed: bool


class Examples(BaseModel):
    examples: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 405, 409, 411, 413, 503)
}
"""The error answers every route may give (documented, so a schema check accepts them)."""
