"""The dashboard's API fuzzed from its own ``/openapi.json`` with schemathesis (issue 14), on the live
uvicorn server with all its guards: no answer is a 5xx, and every answer matches the declared schema."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.dashboard_helpers import TOKEN, Board, board  # noqa: F401 (the fixture)

AUTH = {"Authorization": f"Bearer {TOKEN.value}", "X-Fedveil-Request": "1"}
MAX_EXAMPLES = 15
"""Per API operation (about a dozen of them): a few seconds in all."""


def _load(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}openapi.json", headers=AUTH)


def test_the_api_answers_every_generated_request_within_its_schema(board: Board) -> None:  # noqa: F811
    server, _runs, _dirs = board
    operations = [result.ok() for result in _load(server.url).get_all_operations()]
    assert len(operations) >= 10
    calls: list[int] = []
    for operation in operations:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            response = case.call(headers=AUTH)
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        fuzz()
    assert len(calls) >= len(operations) * 3 and all(code < 500 for code in calls)


def test_the_schema_declares_the_api(board: Board) -> None:  # noqa: F811
    server, _runs, _dirs = board
    loaded = schemathesis.openapi.from_url(f"{server.url}openapi.json", headers=AUTH)
    paths = set(loaded.raw_schema["paths"])
    assert {"/api/status", "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/model", "/api/predict",
            "/api/schema", "/api/clinician/examples"} <= paths
    assert not any(p.endswith(".html") or p.endswith(".js") for p in paths)  # pages are not API
    operations = [op for ops in loaded.raw_schema["paths"].values() for op in ops.values()]
    # a bad request is answered 400, never FastAPI's 422: the schema says so
    assert all("422" not in op["responses"] and "400" in op["responses"] for op in operations)
    # every JSON answer has a declared shape, not a bare object
    for path in ("/api/status", "/api/runs/{run_id}", "/api/schema", "/api/predict"):
        (operation,) = loaded.raw_schema["paths"][path].values()
        declared = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in declared, (path, declared)
