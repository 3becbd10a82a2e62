"""``fedveil server`` and ``fedveil client`` as real processes with ``--log-format json``: every
log line is one JSON object, the server's health service and ``--metrics-port`` answer while the
job runs, and no token reaches the logs. Bad operations flags are refused naming the flag."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedveil.cli import main
from fedveil.commands.log_format import JsonLineFormatter
from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.server.store import RunStore
from fedveil.tasks.synthetic import write_site_csv
from tests.ops_helpers import free_port, join_sites, run_sites
from tests.server_helpers import TASK, Scripted, vectors

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def json_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)  # every line: one JSON object, nothing else
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        entries.append(entry)
    return entries


@pytest.mark.slow
def test_server_and_client_processes_log_json_lines_and_the_server_answers_probes_and_scrapes(
        tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    names = ["north", "south", "east"]
    with RunStore(db) as store:
        tokens = {n: store.enroll(n).token for n in names}
    (tmp_path / "east.token").write_text(tokens["east"])
    write_site_csv(tmp_path / "east.csv", 2, 3, 5)
    metrics_port, port_file = free_port(), tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedveil.cli", "server", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
         "--store", str(db), "--task", TASK, "--rounds", "2", "--clients-per-round", "3", "--passive",
         "--insecure", "--seed", "5", "--linger", "2", "--stage-timeout", "30", "--no-evaluate",
         "--no-final-evaluation", "--metrics-port", str(metrics_port), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    client = None
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists() or not port_file.read_text().strip():
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            time.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scrape:
            assert "fedveil_rounds_completed_total 0.0" in scrape.read().decode()
        client = subprocess.Popen(
            [sys.executable, "-m", "fedveil.cli", "client", "--server", address, "--task", TASK,
             "--data", str(tmp_path / "east.csv"), "--token-file", str(tmp_path / "east.token"), "--insecure",
             "--trust-server", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        sites = [Scripted(None, n, v, transport=GrpcTransport.connect(  # type: ignore[arg-type]
            ChannelConfig(target=address, insecure=True), tokens[n], rpc_timeout_s=30))
            for n, v in zip(["north", "south"], vectors(2), strict=True)]
        join_sites(sites, run_sites(sites), timeout=180)
        _, client_err = client.communicate(timeout=120)
        _, server_err = server.communicate(timeout=60)
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert server.returncode == 0, server_err[-3000:]
    assert client.returncode == 0, client_err[-3000:]
    server_log, client_log = json_lines(server_err), json_lines(client_err)
    assert any(e["logger"] == "fedveil.server" and e["message"].startswith("listening on") for e in server_log)
    assert any(e["message"].startswith("metrics on http://127.0.0.1:") for e in server_log)
    assert any("round 2 completed" in e["message"] for e in server_log)
    assert {e["level"] for e in server_log} <= {"debug", "info", "warning", "error", "critical"}
    assert client_log and all(e["logger"].startswith(("fedveil", "py.warnings", "root")) for e in client_log)
    for token in tokens.values():
        assert token not in server_err and token not in client_err


def test_a_json_line_carries_structured_fields_and_the_traceback() -> None:
    logger = logging.getLogger("fedveil.test.json")
    record = logger.makeRecord("fedveil.test.json", logging.WARNING, __file__, 1, "round %d: %s", (3, "late"),
                               None, extra={"round": 3, "site": "north", "sizes": {1, 2}})
    entry = json.loads(JsonLineFormatter().format(record))
    assert entry["message"] == "round 3: late" and entry["level"] == "warning"
    assert entry["logger"] == "fedveil.test.json" and entry["time"].endswith("+00:00")
    assert entry["round"] == 3 and entry["site"] == "north" and entry["sizes"] == "{1, 2}"  # str() when not JSON
    assert "args" not in entry and "msg" not in entry and "exception" not in entry
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logger.makeRecord("fedveil.test.json", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    line = JsonLineFormatter().format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


@pytest.mark.parametrize(("args", "flag"), [
    (["--log-format", "yaml"], "--log-format"),
    (["--metrics-port", "70000"], "--metrics-port"),
    (["--metrics-port", "9100", "--metrics-host", "metrics.example"], "--metrics-host"),
    (["--metrics-host", "0.0.0.0"], "--metrics-host"),
])
def test_bad_operations_flags_are_refused_naming_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], flag: str) -> None:
    code = main(["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "run.db"), "--task", TASK,
                 "--rounds", "1", "--clients-per-round", "3", "--insecure", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and flag in err.splitlines()[-1] and not (tmp_path / "run.db").exists()


def test_the_client_refuses_an_unknown_log_format_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "--server", "127.0.0.1:1", "--task", TASK, "--data", "x.csv", "--log-format", "xml"]) == 2
    assert "--log-format" in capsys.readouterr().err


def test_the_client_path_does_not_import_opacus_before_logging_is_set_up() -> None:
    """Importing Opacus configures the root logger (basicConfig); on the client's import path it made
    `--log-format json` print plain text (found by the gate of 2026-12-07). It is imported when DP-SGD runs."""
    code = ("import sys, fedveil.clients, fedveil.clients.round, fedveil.clients.session, fedveil.commands.client; "
            "print('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
