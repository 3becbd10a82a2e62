"""The dashboard's model download (issue 14): GET /api/runs/<id>/model gives the global model as a
safetensors file with the metadata of ``fedveil export``, and refuses what does not exist."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from fedveil.front_doors import simulate
from fedveil.server.dashboard import start_store_dashboard
from fedveil.server.store import RunStore
from fedveil.task import load_task, vector_to_model

TASK = "fedveil.tasks.synthetic:task"


def fetch(url: str, token: str | None) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return int(resp.status), resp.read(), {k.title(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return int(err.code), err.read(), dict(err.headers)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("download") / "run.db"
    result = simulate(clients=3, rounds=2, seed=3, store=store)
    return store, str(result.summary["run_id"])


def test_the_download_is_the_global_model_of_the_round_with_its_metadata(finished_run: tuple[Path, str]) -> None:
    store, run_id = finished_run
    task = load_task(TASK)
    server = start_store_dashboard(store, task, port=0)
    try:
        base, token = server.url, server.token.value
        status, body, headers = fetch(f"{base}api/runs/{run_id}/model", token)
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert headers["Content-Disposition"] == f'attachment; filename="{run_id}-round2.safetensors"'
        tensors = load(body)
        with RunStore(store) as runs:
            latest, first = runs.checkpoint(run_id), runs.checkpoint(run_id, 1)
        assert latest is not None and first is not None and latest.version == 2
        expected = vector_to_model(latest.model, task.build_model()).state_dict()
        assert set(tensors) == set(expected)
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        status, body, headers = fetch(f"{base}api/runs/{run_id}/model?round=1", token)
        assert status == 200 and headers["Content-Disposition"].endswith('-round1.safetensors"')
        round1 = vector_to_model(first.model, task.build_model()).state_dict()
        assert all(torch.equal(load(body)[k], round1[k]) for k in round1)
        assert not all(torch.equal(round1[k], expected[k]) for k in expected)  # the round matters
    finally:
        server.stop()


def test_the_metadata_names_run_round_task_and_epsilon(finished_run: tuple[Path, str]) -> None:
    store, run_id = finished_run
    server = start_store_dashboard(store, load_task(TASK), port=0)
    try:
        _, body, _ = fetch(f"{server.url}api/runs/{run_id}/model", server.token.value)
    finally:
        server.stop()
    header_len = int.from_bytes(body[:8], "little")
    import json

    metadata = json.loads(body[8:8 + header_len])["__metadata__"]
    assert metadata["run_id"] == run_id and metadata["round"] == "2" and metadata["task"] == "synthetic-logreg"
    assert metadata["epsilon"] == "none"  # --dp none: no user-level guarantee to claim


@pytest.mark.parametrize(("suffix", "status", "says"), [
    ("model?round=99", 404, "round"),
    ("model?round=-1", 400, "round"),
    ("model?round=x", 400, "round"),
    ("model?round=9223372036854775807", 404, "round"),  # the largest round a store can hold
    ("model?round=9223372036854775808", 400, "round"),  # beyond SQLite's integers: was a 500
    (f"model?round={10**40}", 400, "round"),
])
def test_a_round_or_run_that_does_not_exist_is_refused_naming_it(finished_run: tuple[Path, str], suffix: str,
                                                                 status: int, says: str) -> None:
    store, run_id = finished_run
    server = start_store_dashboard(store, load_task(TASK), port=0)
    try:
        code, body, _ = fetch(f"{server.url}api/runs/{run_id}/{suffix}", server.token.value)
        assert code == status and says in body.decode()
        code, body, _ = fetch(f"{server.url}api/runs/no-such-run/model", server.token.value)
        assert code == 404 and "run" in body.decode() and str(store) not in body.decode()
        code, _, _ = fetch(f"{server.url}api/runs/{run_id}/model", None)
        assert code == 401
    finally:
        server.stop()


def test_an_export_request_beyond_the_stores_integers_names_the_round() -> None:
    """``fedveil export --round`` too: a round no SQLite INTEGER can hold is refused, not a crash."""
    from fedveil.server.model_export import MAX_ROUND, ExportError, ExportRequest

    with pytest.raises(ExportError, match=f"rounds are at most {MAX_ROUND}") as err:
        ExportRequest(Path("runs.db"), Path("out"), round=MAX_ROUND + 1)
    assert err.value.field == "round"
    assert ExportRequest(Path("runs.db"), Path("out"), round=MAX_ROUND).round == MAX_ROUND
