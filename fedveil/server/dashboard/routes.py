"""The dashboard's HTTP layer on FastAPI: the pages, the JSON API and its error answers.

Each route translates HTTP to one call on :class:`~.app.Dashboard`; the guards in front of all
of them are in :mod:`.middleware`. Errors are ``{"error": ...}`` with a 4xx status naming the
field at fault (never a server path); an unexpected failure is a 500 ``internal error (logged;
request ID)`` whose traceback goes only to the server's log.
"""

from __future__ import annotations

import logging
import secrets
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fedveil.server.dashboard.app import NO_UPLOADS, Dashboard
from fedveil.server.dashboard.middleware import CsrfGuard, LoginGuard, RequestGuard, SecurityHeaders
from fedveil.server.dashboard.schemas import (
    ERRORS,
    Examples,
    PredictBody,
    Prediction,
    Removed,
    Run,
    RunList,
    RunSettingsBody,
    RunStarted,
    SiteList,
    SiteSchema,
    Status,
    UploadAccepted,
)
from fedveil.server.dashboard.settings import DashboardError
from fedveil.server.dashboard.sources import store_model_file
from fedveil.server.dashboard_auth import LoginSessions, LoginToken
from fedveil.server.model_export import MAX_ROUND

log = logging.getLogger("fedveil.dashboard")

STATIC_FILES: dict[str, str] = {
    "/": "index.html",
    "/index.html": "index.html",
    "/site.html": "site.html",
    "/predict.html": "predict.html",
    "/app.css": "app.css",
    "/charts.js": "charts.js",
    "/common.js": "common.js",
    "/runs.js": "runs.js",
    "/site.js": "site.js",
    "/predict.js": "predict.js",
}
MAX_DISCARD_BYTES = 64 * 1024 * 1024
"""An oversized upload is read and dropped up to this size (so the sender sees the 413), then cut off."""
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8"}


def _error(status: int, message: str, **extra: str) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _field_errors(err: RequestValidationError) -> str:
    """pydantic's errors as ``field: what is wrong`` (the value is never echoed: it may be huge)."""
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        parts.append(f"{'.'.join(loc) or 'the request body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(DashboardError)
    async def refused(_request: Request, err: DashboardError) -> JSONResponse:
        return _error(err.status, str(err))

    @api.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, _field_errors(err))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == HTTPStatus.NOT_FOUND:
            return _error(err.status_code, f"no such endpoint: {request.method} {request.url.path}")
        if err.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            return _error(err.status_code, f"method {request.method} is not supported on {request.url.path}")
        if err.status_code == HTTPStatus.BAD_REQUEST:  # FastAPI could not parse the body
            return _error(err.status_code, f"the request body is not valid JSON: {err.detail}")
        return _error(err.status_code, str(err.detail))

    @api.exception_handler(Exception)
    async def internal(request: Request, _err: Exception) -> JSONResponse:
        request_id = secrets.token_hex(6)
        log.exception("dashboard: internal error in %s %s (request %s)", request.method, request.url.path, request_id)
        return JSONResponse({"error": f"internal error (logged; request {request_id})", "request_id": request_id},
                            status_code=HTTPStatus.INTERNAL_SERVER_ERROR)


async def _streamed_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit``: nothing past the limit is kept.

    The rest of an oversized body is read and dropped (up to :data:`MAX_DISCARD_BYTES`), so the
    client, still sending, sees the answer; beyond that the connection is closed instead.
    """
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else 0
    chunks: list[bytes] = []
    seen = 0
    if size <= limit:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    if max(size, seen) <= MAX_DISCARD_BYTES:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > MAX_DISCARD_BYTES:
                break
    raise DashboardError(f"the file is too large ({max(size, seen)} bytes; the limit is {limit})",
                         HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def _add_static(api: FastAPI) -> None:
    for path, name in STATIC_FILES.items():
        data = resources.files("fedveil.server").joinpath("static").joinpath(name).read_bytes()
        kind = CONTENT_TYPES[Path(name).suffix]

        def page(data: bytes = data, kind: str = kind) -> Response:
            return Response(data, media_type=kind)

        api.add_api_route(path, page, methods=["GET"], include_in_schema=False)


def _add_api(api: FastAPI, board: Dashboard) -> None:
    @api.get("/api/status", response_model=Status, responses=ERRORS)
    def status() -> dict[str, Any]:
        """The task, the sites, whether runs can start."""
        return board.status()

    @api.get("/api/runs", response_model=RunList, responses=ERRORS)
    def list_runs() -> dict[str, Any]:
        """Run summaries, newest first."""
        return {"runs": board.runs.list_runs()}

    @api.post("/api/runs", response_model=RunStarted, responses=ERRORS)
    def start_run(body: RunSettingsBody) -> dict[str, Any]:
        """Start a run with these settings."""
        return board.start_run(body.model_dump(exclude_none=True))

    @api.get("/api/runs/{run_id}", response_model=Run, responses=ERRORS)
    def get_run(run_id: str) -> dict[str, Any]:
        """One run: settings, status, rounds."""
        return board.get_run(run_id)

    @api.get("/api/runs/{run_id}/model", response_class=Response, responses={
        200: {"content": {"application/octet-stream": {}}}, **ERRORS})
    def model(run_id: str, round: int | None = Query(None, ge=0, le=MAX_ROUND)) -> Response:
        """The run's global model (safetensors, with the metadata of ``fedveil export``)."""
        name, data = store_model_file(getattr(board.runs, "store_path", None), run_id, round)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @api.get("/api/schema", response_model=SiteSchema, responses=ERRORS)
    def schema() -> dict[str, Any]:
        """The site CSV's columns and the upload size limit."""
        return board.schema()

    @api.get("/api/sites", response_model=SiteList, responses=ERRORS)
    def sites() -> dict[str, Any]:
        """The sites and their local data files."""
        if board.sites is None:
            return {"sites": [], "uploads": False, "message": NO_UPLOADS}
        return {"sites": board.sites.describe(), "uploads": True}

    @api.post("/api/sites/{name}/upload", response_model=UploadAccepted, responses=ERRORS, openapi_extra={
        "requestBody": {"content": {"text/csv": {"schema": {"type": "string"}}}}})
    async def upload(name: str, request: Request, filename: str = Query("")) -> dict[str, Any]:
        """A site's CSV as the request body, streamed within the size limit; validated before it is written."""
        dirs = board.site_dirs()
        dirs.path(name)  # 404 for an unknown site, before reading a body
        body = await _streamed_body(request, dirs.max_bytes)
        # parsed and written on a worker thread: a large file never holds up other requests
        return await run_in_threadpool(dirs.accept, name, filename, body)

    @api.delete("/api/sites/{name}/upload", response_model=Removed, responses=ERRORS)
    def remove(name: str) -> dict[str, Any]:
        """Remove the site's file."""
        return {"removed": board.site_dirs().remove(name)}

    @api.get("/api/examples", response_model=Examples, responses=ERRORS)
    def examples() -> dict[str, Any]:
        """Example inputs."""
        return {"examples": board.example_inputs()}

    @api.post("/api/predict", response_model=Prediction, responses=ERRORS)
    def predict(body: PredictBody) -> dict[str, Any]:
        """One input's prediction and the features that weighed most."""
        return board.predict(body.model_dump())


def _without_422(api: FastAPI) -> None:
    """Serve a schema without FastAPI's automatic 422 answers: a request that fails validation gets
    the 400 of :func:`_add_error_handlers` (declared in :data:`ERRORS`), never a 422."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def build_app(board: Dashboard, token: LoginToken) -> FastAPI:
    """The dashboard's ASGI application, open only to holders of ``token``."""
    api = FastAPI(title=board.title, docs_url=None, redoc_url=None)
    _add_error_handlers(api)
    _add_static(api)
    _add_api(api, board)
    _without_422(api)
    pages = [p for p, name in STATIC_FILES.items() if name.endswith(".html")]
    # the last added runs first: headers on every answer, then method/Host/framing, token, CSRF header
    api.add_middleware(CsrfGuard)
    api.add_middleware(LoginGuard, token=token, pages=pages, sessions=LoginSessions())
    api.add_middleware(RequestGuard)
    api.add_middleware(SecurityHeaders)
    return api
