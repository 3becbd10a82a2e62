"""The dashboard's API fuzzed from its own ``/openapi.json`` with schemathesis (issue 14), on the live
uvicorn server with all its guards: no answer is a 5xx, and every answer matches the declared schema.
Fuzzed on an empty dashboard (the refusals) and on one watching a real finished run, where a request
known to be good is also sent to every operation, so the granted answers are checked as well."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from fedveil.demo import healthcare
from fedveil.front_doors import simulate
from fedveil.server.dashboard import Dashboard, DashboardServer, SiteDataDirs
from fedveil.server.dashboard.sources import StoreRunSource
from fedveil.task import Task, load_task
from tests.dashboard_helpers import TOKEN, Board, board  # noqa: F401 (the fixture)

AUTH = {"Authorization": f"Bearer {TOKEN.value}", "X-Fedveil-Request": "1"}
MAX_EXAMPLES = 15
"""Per API operation (about a dozen of them): a few seconds in all."""


def _load(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}openapi.json", headers=AUTH)


def _fuzz(operation: Any) -> list[int]:
    """The statuses of the answers to requests generated from ``operation``'s schema (each checked)."""
    codes: list[int] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        response = case.call(headers=AUTH)
        codes.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    fuzz()
    return codes


def test_the_api_answers_every_generated_request_within_its_schema(board: Board) -> None:  # noqa: F811
    server, runs, _dirs = board
    operations = [result.ok() for result in _load(server.url).get_all_operations()]
    assert len(operations) >= 10
    calls = [code for operation in operations for code in _fuzz(operation)]  # no run, no model yet
    assert len(calls) >= len(operations) * 3 and all(code < 500 for code in calls)
    # with a model, the healthcare task's own assessment (fields of its own) is within the schema too
    runs.set_model(healthcare.task.build_model().state_dict())
    (predict,) = [op for op in operations if op.label == "POST /api/predict"]
    examples = healthcare.task.examples
    assert examples is not None
    example = dict(examples()[0]["features"])
    case = predict.Case(body={"features": example}, media_type="application/json")
    response = case.call(headers=AUTH)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    assert response.status_code == 200 and "risk_level" in response.json()


def test_the_schema_declares_the_api(board: Board) -> None:  # noqa: F811
    server, _runs, _dirs = board
    loaded = schemathesis.openapi.from_url(f"{server.url}openapi.json", headers=AUTH)
    paths = set(loaded.raw_schema["paths"])
    assert {"/api/status", "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/model", "/api/predict",
            "/api/schema", "/api/examples"} <= paths
    assert not any(p.endswith(".html") or p.endswith(".js") for p in paths)  # pages are not API
    operations = [op for ops in loaded.raw_schema["paths"].values() for op in ops.values()]
    # a bad request is answered 400, never FastAPI's 422: the schema says so
    assert all("422" not in op["responses"] and "400" in op["responses"] for op in operations)
    # every JSON answer has a declared shape, not a bare object
    for path in ("/api/status", "/api/runs/{run_id}", "/api/schema", "/api/predict"):
        (operation,) = loaded.raw_schema["paths"][path].values()
        declared = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in declared, (path, declared)
    # and the lists hold declared shapes too: the run summaries and sites the pages read
    components = loaded.raw_schema["components"]["schemas"]
    assert components["RunList"]["properties"]["runs"]["items"] == {"$ref": "#/components/schemas/RunSummary"}
    assert components["SiteList"]["properties"]["sites"]["items"] == {"$ref": "#/components/schemas/SiteInfo"}
    assert {"id", "status", "rounds_done"} <= set(components["RunSummary"]["required"])


SYNTHETIC = "fedveil.tasks.synthetic:task"
SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def trained_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DashboardServer, str]]:
    """A dashboard on the run store of a real finished federation (so runs, rounds and a global model
    exist) with two sites taking uploads: the state in which the API's 200 answers are given."""
    tmp = tmp_path_factory.mktemp("openapi")
    store = tmp / "run.db"
    run_id = str(simulate(clients=3, rounds=2, seed=3, store=store).summary["run_id"])
    task = load_task(SYNTHETIC)
    app = Dashboard(task=task, runs=StoreRunSource(store, task),
                    sites=SiteDataDirs(tmp / "sites", SITES, task, max_bytes=20_000))
    server = DashboardServer(app, port=0, token=TOKEN).start()
    try:
        yield server, run_id
    finally:
        server.stop()


def _known_good(operation: Any, run_id: str, task: Task, csv: str) -> Any:
    """A request that the API must grant, for each operation that can be granted on this dashboard."""
    features = {c.name: 0.25 for c in task.schema.features}
    cases: dict[str, dict[str, Any]] = {
        "POST /api/runs": {"body": {}, "media_type": "application/json"},
        "GET /api/runs/{run_id}": {"path_parameters": {"run_id": run_id}},
        "GET /api/runs/{run_id}/model": {"path_parameters": {"run_id": run_id}, "query": {"round": 1}},
        "POST /api/predict": {"body": {"features": features}, "media_type": "application/json"},
        "POST /api/sites/{name}/upload": {"path_parameters": {"name": SITES[0]}, "query": {"filename": "a.csv"},
                                          "body": csv, "media_type": "text/csv"},
        "DELETE /api/sites/{name}/upload": {"path_parameters": {"name": SITES[0]}},
    }
    return operation.Case(**cases.get(operation.label, {}))


@pytest.mark.slow
def test_the_granted_answers_of_a_trained_dashboard_match_their_schema_too(
        trained_board: tuple[DashboardServer, str]) -> None:
    """With runs, a model and sites, every operation but starting a run (this dashboard watches a store)
    gives a 2xx answer, checked against the schema like the fuzzed ones, which get no 5xx here either."""
    server, run_id = trained_board
    task = load_task(SYNTHETIC)
    with_data = task.synthetic_data
    assert with_data is not None
    x, y = with_data(0, 3, 5).tensors
    csv = task.schema.to_csv(x[:30].numpy(), y[:30].numpy())
    granted: dict[str, list[int]] = {}
    for operation in [result.ok() for result in _load(server.url).get_all_operations()]:
        # the schema lists the upload before its removal, so the removal has a file to remove
        case = _known_good(operation, run_id, task, csv)
        response = case.call(headers=AUTH)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        granted[operation.label] = [response.status_code, *_fuzz(operation)]
    refused = {label: codes for label, codes in granted.items() if not any(200 <= c < 300 for c in codes)}
    assert set(refused) == {"POST /api/runs"}, refused  # a store's dashboard watches; it cannot start runs
    assert refused["POST /api/runs"][0] == 409
    assert all(c < 500 for codes in granted.values() for c in codes)
