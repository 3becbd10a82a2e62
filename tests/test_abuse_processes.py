"""Abusive sites against a real ``fedveil server`` process over loopback gRPC (issue 10).

Every party is its own OS process: the server, the honest ``fedveil client`` processes, and the
abusive sites of :mod:`tests.abusive_site` (the real client code with a tampered transport, or a
raw gRPC script with a real enrolled identity).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedveil.server.config import ServerConfig
from fedveil.server.store import RunStore
from fedveil.simulation.backends import client_name, client_seed
from fedveil.simulation.host import job_seed
from fedveil.simulation.process_backend import ProcessFederation, start_process_federation
from fedveil.simulation.processes import ManagedProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
TASK = "fedveil.tasks.synthetic:task"


def job(**kw: Any) -> ServerConfig:
    settings: dict[str, Any] = dict(task=TASK, rounds=2, clients_per_round=10, min_clients=10, seed=5,
                                    round_timeout=90.0, stage_timeout=30.0, cohort_wait=2.0, linger=2.0,
                                    poll_wait=2.0, final_evaluation=False, evaluate=False)
    settings.update(kw)
    return ServerConfig.from_flat(**settings)


def client_args(fed: ProcessFederation, config: ServerConfig, index: int) -> list[str]:
    """The ``fedveil client`` arguments :meth:`ProcessFederation.start_client` would use."""
    return ["--server", fed.address, "--task", config.task, "--data", str(fed.data_paths[index]),
            "--token", fed.tokens[index], "--insecure", "--seed", str(client_seed(job_seed(config), index)),
            "--give-up-after", "60", "--max-backoff", "1.0", *fed.identity_flags.get(client_name(index), [])]


def start_abusive(fed: ProcessFederation, name: str, *args: str) -> ManagedProcess:
    return fed.group.start(name, [sys.executable, "-m", "tests.abusive_site", *args])


def flag(fed: ProcessFederation, index: int, name: str) -> str:
    flags = fed.identity_flags[client_name(index)]
    return flags[flags.index(name) + 1]


def wait_exit(process: ManagedProcess, timeout_s: float) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} still running after {timeout_s:.0f} s:\n{process.errors()[-3000:]}")


def notes(process: ManagedProcess) -> list[dict[str, Any]]:
    out = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def summary_of(process: ManagedProcess) -> dict[str, Any]:
    last = process.last_line()
    try:
        return dict(json.loads(last))
    except ValueError:
        pytest.fail(f"{process.name} printed no summary: {last!r}\n{process.errors()[-3000:]}")


def test_honest_sites_finish_while_abusive_sites_flood_replay_and_send_out_of_range_reports(
    tmp_path: Path,
) -> None:
    # five honest sites and two flooders make the cohort of 7 (threshold 5, c = 2 colluders): the honest
    # sites alone reach the threshold, as they must if the flooders' uploads were all refused
    config = job(clients_per_round=7, min_clients=7)
    fed = start_process_federation(config, 8, tmp_path, start_clients=False)
    try:
        honest = [fed.start_client(i, config) for i in range(5)]
        flooders = [start_abusive(fed, client_name(i), "flood", "--", *client_args(fed, config, i))
                    for i in range(5, 7)]
        reporters = [start_abusive(fed, client_name(i), "reports", "--server", fed.address, "--token",
                                   fed.tokens[i], "--identity-key", flag(fed, i, "--identity-key"), "--credential",
                                   flag(fed, i, "--credential"), "--seconds", "12") for i in range(7, 8)]
        assert wait_exit(fed.server, 300) == 0, fed.server.errors()[-3000:]
        summary = summary_of(fed.server)
        for process in [*honest, *flooders, *reporters]:
            wait_exit(process, 60)
        server_log = fed.server.errors()
    finally:
        fed.group.close()
    assert summary["status"] == "completed" and summary["completed_rounds"] == 2, summary
    for process in [*honest, *reporters]:
        assert process.popen.returncode == 0, process.errors()[-2000:]
    # every released round is the exact mean of the sites that survived it: the floods changed nothing
    with RunStore(fed.store_path) as store:
        rounds = [r for r in store.rounds(summary["run_id"]) if r.status == "completed"]
        assert [r.round for r in rounds] == [1, 2]
        assert all(r.cohort_size == 7 and r.threshold == 5 for r in rounds), rounds
        assert all(r.survivors >= 5 for r in rounds)  # at least the threshold of 7 (c = 2 colluders)
        # the reporter joined but never asked for work: it is never drawn (before, it was, most runs,
        # and round 1 waited out its 30 s commit deadline for it)
        drawn = {name for r in (1, 2) for _attempt, name, _sid, _stage in store.participants(summary["run_id"], r)}
        assert client_name(7) not in drawn, drawn
    # the abuse was refused with status codes, never INTERNAL, and the server logged it
    refused = [n for p in [*flooders, *reporters] for n in notes(p) if n.get("refused")]
    codes = {n["code"] for n in refused}
    assert refused and "INTERNAL" not in codes and "UNKNOWN" not in codes, codes
    replays = [n for p in flooders for n in notes(p) if n.get("refused") and "replay" in n["rpc"]]
    assert replays, "no replayed upload reached the server"
    for p in flooders:  # of each burst (12 streams, 2 submissions of one header) at most one is taken per attempt
        taken = [n for n in notes(p) if n.get("accepted") and "MaskedInput" in n["rpc"]]
        assert len(taken) <= config.schedule.rounds + summary["aborted_attempts"], taken
    reports = [n for p in reporters for n in notes(p) if n.get("rpc") == "ReportMetrics"]
    assert reports and all(n.get("refused") for n in reports), [n for n in reports if not n.get("refused")]
    assert "internal error" not in server_log.lower()
    assert re.search(r"refused (UploadMaskedInput|SubmitMaskedInput|ReportMetrics)", server_log), server_log[-3000:]


@pytest.mark.parametrize("poison", ["weight", "unclipped"])
def test_a_poisoned_weight_is_refused_and_an_unclipped_update_is_bounded(tmp_path: Path, poison: str) -> None:
    # weight: uniform weighting off, so sites declare a weight. unclipped: central DP with S = 0.2 while
    # the encoder's clip range is 1, so one unclipped site can reach norm sqrt(12) > n·S = 1
    extra: dict[str, Any] = ({"weighted": True} if poison == "weight" else
                             {"dp": "central", "dp_clip": 0.2, "dp_noise_multiplier": 0.5, "weighted": False})
    # min_clients 4: a site refused at its round response ends its process, and the job goes on
    config = job(clients_per_round=5, min_clients=4, stage_timeout=10.0, **extra)
    fed = start_process_federation(config, 5, tmp_path, start_clients=False)
    try:
        # central DP's noise is the server's to add: its sites trust it to (--trust-server). Sites that do
        # not would decline round 2, whose model the rejected round 1 left unchanged (a replayed model)
        trust = ("--trust-server",) if poison == "unclipped" else ()
        honest = [fed.start_client(i, config, extra=trust) for i in range(4)]
        bad = start_abusive(fed, client_name(4), "poison", poison, "--", *client_args(fed, config, 4), *trust)
        assert wait_exit(fed.server, 300) == 0, fed.server.errors()[-3000:]
        summary = summary_of(fed.server)
        for process in [*honest, bad]:
            wait_exit(process, 60)
        server_log = fed.server.errors()
    finally:
        fed.group.close()
    assert "internal error" not in server_log.lower()
    with RunStore(fed.store_path) as store:
        records = store.rounds(summary["run_id"])
        released = [r for r in records if r.status == "completed"]
        if poison == "weight":
            # refused at the round response: the rounds go on without it, with honest weights only
            assert summary["status"] == "completed" and [r.round for r in released] == [1, 2], summary
            assert all(r.survivors == 4 for r in released), [(r.round, r.survivors) for r in released]
            assert all(r.stats["total_weight"] <= 4 * config.secagg.max_weight for r in released)
            assert re.search(r"refused RespondToRound from client-004 .*INVALID_ARGUMENT: weight", server_log)
            assert bad.popen.returncode != 0 and "weight: must be in" in bad.errors()
        else:
            # the job goes on; every aggregate it released is within what 5 clipped sites can give,
            # and rounds the poisoned update entered were skipped with the reason recorded
            assert summary["status"] == "completed", summary
            rejected = [r for r in records if r.status == "rejected"]
            assert rejected and all("norm" in (r.reason or "") for r in rejected), [(r.status, r.reason) for r in
                                                                                     records]
            for r in released:
                aggregate = store.aggregate(summary["run_id"], r.round)
                assert aggregate is not None
                # a released noised mean: the honest sum's norm is at most n·S, plus the noise's spread
                assert float(np.linalg.norm(aggregate)) < 2.0


def test_the_dashboard_process_answers_401_without_the_token_and_200_with_it(tmp_path: Path) -> None:
    store_path = tmp_path / "run.db"
    RunStore(store_path).close()
    process = subprocess.Popen(
        [sys.executable, "-m", "fedveil.cli", "dashboard", "--store", str(store_path), "--task", TASK, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        deadline, url = time.monotonic() + 60, ""
        while time.monotonic() < deadline and not url:
            line = process.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/)\S*", line)
            url = match.group(1) if match else ""
            token = re.search(r"token=([A-Za-z0-9._~-]+)", line)
        assert url and token, "the dashboard printed no login URL"

        def status(headers: dict[str, str]) -> int:
            request = urllib.request.Request(url + "api/runs", headers={"X-Fedveil-Request": "1", **headers})
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                return int(err.code)

        assert status({}) == 401
        assert status({"Authorization": "Bearer " + "w" * 43}) == 401
        assert status({"Authorization": f"Bearer {token.group(1)}"}) == 200
    finally:
        process.terminate()
        process.wait(20)
