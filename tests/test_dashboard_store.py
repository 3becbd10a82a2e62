"""The dashboard reading a server's run store: StoreRunSource and ``fedveil server --dashboard``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedveil.demo import healthcare
from fedveil.demo.data import make_split
from fedveil.demo.federation import DropoutPlan, FederationSettings, run_federation
from fedveil.demo.recipe import Recipe
from fedveil.server.dashboard import StoreRunSource
from fedveil.server.store import RunStore
from fedveil.task import vector_to_model
from tests.identity_helpers import write_authority

torch.set_num_threads(1)


@pytest.mark.slow
def test_store_source_shows_rounds_privacy_dropouts_and_the_model(tmp_path: Path) -> None:
    # four hospitals: under 2t > h + c a cohort of 4 has t = 3, so round 2 completes without hospital-3
    # (with three, t = 3 too and the dropout would abort every attempt)
    split = make_split(4, 0)
    files = {}
    for h in split.hospitals:
        p = tmp_path / h.name / "site.csv"
        p.parent.mkdir()
        p.write_text(healthcare.SCHEMA.to_csv(h.features, h.labels))
        files[h.name] = p
    test = TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
    settings = FederationSettings(rounds=3, hospitals_per_round=4, dp="local", transport="in-process")
    plan = DropoutPlan({2: frozenset({"hospital-3"})})
    result = run_federation(store_path=tmp_path / "runs.sqlite", site_files=files, test=test, settings=settings,
                            recipe=Recipe(rounds=3), dropout_plan=plan)
    assert result.status == "completed"
    source = StoreRunSource(tmp_path / "runs.sqlite", healthcare.task)
    try:
        runs = source.list_runs()
        assert [r["id"] for r in runs] == [result.run_id] and runs[0]["status"] == "completed"
        run = source.get_run(result.run_id)
        assert run is not None and run["settings"]["dp"] == "local" and run["settings"]["epsilon_budget"] == 3.0
        rounds = run["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert rounds[1]["dropped"] == ["hospital-3"] and "hospital-3" not in rounds[1]["participants"]
        assert rounds[0]["dropped"] == [] and len(rounds[0]["participants"]) == 4
        for r in rounds:  # each round's model on the demo's held-out test set (hospitals never evaluate)
            assert r["accuracy"] is not None and 0 <= r["accuracy"] <= 1 and r["loss"] is not None
        # clients' reported sample-level ε, as the ledger recorded them, matching the hospitals' own accountants
        last = rounds[-1]["epsilon_sample"]
        for name, info in result.hospitals.items():
            assert last[name] is not None and abs(last[name] - info["epsilon"]) < 1e-6
        assert rounds[-1]["budget_remaining"]["hospital-1"] == 3.0 - last["hospital-1"]
        assert rounds[-1]["epsilon_user"] is None
        # the store's dashboard serves the last released global model; the demo's run serves the mean of the
        # last rounds' models (Recipe().average_last = 5, so here all three), both read back from the checkpoints
        state = source.latest_model()
        assert state is not None
        store = RunStore(tmp_path / "runs.sqlite")
        try:
            vectors = []
            for version in (1, 2, 3):
                checkpoint = store.checkpoint(result.run_id, version)
                assert checkpoint is not None
                vectors.append(checkpoint.model)
        finally:
            store.close()
        last = healthcare.build_model()
        vector_to_model(vectors[-1], last)
        for k, v in last.state_dict().items():
            assert np.allclose(state[k].numpy(), v.numpy(), atol=1e-6)
        mean = healthcare.build_model()
        vector_to_model(np.mean(vectors, axis=0, dtype=np.float64).astype(np.float32), mean)
        for k, v in mean.state_dict().items():
            assert np.allclose(result.model.state_dict()[k].numpy(), v.numpy(), atol=1e-6)
        assert not np.allclose(vectors[-1], vectors[0])  # the mean is not any one round's model
        assert result.served is not None and result.served.rounds == [1, 2, 3]
        assert result.served.description == "mean of the global models of rounds 1–3"
        figures = healthcare.evaluate(mean, test)
        assert result.served.accuracy == figures["accuracy"] and result.served.auc == pytest.approx(figures["auc"])
        assert source.get_run("nope") is None
    finally:
        source.close()


def _get(url: str, token: str) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _login_url(line: str) -> tuple[str, str]:
    """(base URL, token) from the line ``dashboard: http://127.0.0.1:PORT/?token=...``."""
    url = line.split()[1]
    base, _, query = url.partition("?token=")
    assert base.startswith("http://127.0.0.1:") and len(query) >= 43, line
    return base, query


@pytest.mark.slow
def test_fedveil_server_serves_the_dashboard(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedveil.cli", "server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s.db"),
         "--task", "fedveil.demo.healthcare:task", "--rounds", "1", "--clients-per-round", "2", "--insecure",
         "--dashboard", "0", "--log-level", "error", "--authority", str(write_authority(tmp_path / "authority.pub"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not line.startswith("dashboard: "):
            line = proc.stdout.readline()
            output.append(line)
            if not line:
                break
        assert line.startswith("dashboard: "), "the server did not print its dashboard URL"
        url, token = _login_url(line)
        assert _get(url + "api/runs", "x" * 43)[0] == 401
        runs: list[Any] = []
        while time.monotonic() < deadline and not runs:
            runs = _get(url + "api/runs", token)[1]["runs"]
            time.sleep(0.2)
        assert runs and runs[0]["status"] == "running" and runs[0]["rounds_done"] == 0
        status, st = _get(url + "api/status", token)
        assert status == 200 and st["can_start_runs"] is False and st["uploads"] is False
        status, sites = _get(url + "api/sites", token)
        assert sites["uploads"] is False and "never receives site data" in sites["message"]
        req = urllib.request.Request(url + "api/sites/x/upload?filename=a.csv", data=b"a", method="POST",
                                     headers={"X-Fedveil-Request": "1", "Authorization": f"Bearer {token}"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("upload accepted by the coordinator's dashboard")
        except urllib.error.HTTPError as err:
            assert err.code == 409
        req = urllib.request.Request(url + "predict.html", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert b"data-term=\"{predict_action}\"" in resp.read()  # the task's words come with /api/status
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=20)
            output.append(rest)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # the login URL is the only place the token appears: not in the logs (stderr is merged here)
    assert "".join(output).count(token) == 1


@pytest.mark.slow
def test_fedveil_dashboard_serves_a_finished_run_with_the_tasks_own_explanations(tmp_path: Path) -> None:
    from fedveil.cli import main

    split = make_split(3)
    files = {}
    for h in split.hospitals:
        files[h.name] = tmp_path / f"{h.name}.csv"
        files[h.name].write_text(healthcare.SCHEMA.to_csv(h.features, h.labels))
    test = TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
    result = run_federation(store_path=tmp_path / "runs.sqlite", site_files=files, test=test,
                            settings=FederationSettings(rounds=1, hospitals_per_round=3, transport="in-process"),
                            recipe=Recipe(rounds=1))
    assert result.status == "completed"
    for args, flag in (([ "--store", str(tmp_path / "none.db")], "--store"), (["--task", "no.such"], "--task"),
                       (["--port", "70000"], "--port")):
        argv = ["dashboard", "--store", str(tmp_path / "runs.sqlite"), "--task", "fedveil.demo.healthcare:task", *args]
        assert main(argv) == 2, flag
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedveil.cli", "dashboard", "--store", str(tmp_path / "runs.sqlite"),
         "--task", "fedveil.demo.healthcare:task", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard: http://127.0.0.1:"), line
        url, token = _login_url(line)
        runs = _get(url + "api/runs", token)[1]["runs"]
        assert [r["id"] for r in runs] == [result.run_id] and runs[0]["status"] == "completed"
        examples = _get(url + "api/examples", token)[1]["examples"]
        assert len(examples) == 3  # the task's own example patients
        body = json.dumps({"features": examples[0]["features"]}).encode()
        req = urllib.request.Request(url + "api/predict", data=body, method="POST",
                                     headers={"X-Fedveil-Request": "1", "Content-Type": "application/json",
                                              "Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        exact = healthcare.assess(result.model, healthcare.SCHEMA.parse_values(examples[0]["features"]))
        assert abs(answer["logit"] - exact.logit) < 1e-4  # the task's exact explanation, not gradient x input
        assert [f["feature"] for f in answer["top_features"]] == [c.feature for c in exact.contributions[:5]]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=20) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
