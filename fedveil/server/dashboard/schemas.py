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

    rounds: int | None = Field(None, ge=1, le=200)
    sites_per_round: int | None = Field(None, ge=2, le=1000)
    dp: Literal["local", "central", "distributed", "none"] | None = None
    epsilon_budget: float | None = Field(None, ge=0.05, le=100, allow_inf_nan=False)


class RunStarted(BaseModel):
    run_id: str
    settings: dict[str, Any]


class PredictBody(BaseModel):
    """POST /api/predict: one input's feature values by name."""

    features: dict[str, Any]


class RunList(BaseModel):
    runs: list[dict[str, Any]]


class SiteList(BaseModel):
    sites: list[dict[str, Any]]
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
