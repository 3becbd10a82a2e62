"""``fedveil simulate --processes``: server and clients as OS processes over loopback gRPC, releasing
exactly the aggregates of the in-process simulation with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedveil.cli import main
from fedveil.simulation.host import read_rounds

torch.set_num_threads(1)


def run(capsys: pytest.CaptureFixture[str], store: Path, *extra: str) -> dict:
    # the same bits in both modes need --insecure-deterministic (by default rounding and keys come from the OS)
    code = main(["simulate", "--clients", "3", "--rounds", "2", "--seed", "4", "--store", str(store),
                 "--insecure-deterministic", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    return json.loads(out[-1])


@pytest.mark.slow
def test_processes_and_in_process_release_the_same_aggregates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    net = run(capsys, tmp_path / "net.sqlite", "--processes")
    local = run(capsys, tmp_path / "local.sqlite")
    assert net["mode"] == "processes" and local["mode"] == "in-process"
    # two training rounds, then the final evaluation (an evaluation-only round 3)
    assert net["clients"] == {f"client-{i:03d}": ["completed"] * 3 for i in range(3)}
    assert (tmp_path / "net-sim" / "logs" / "server.log").exists()  # logs and CSVs kept next to the store
    net_rounds = read_rounds(tmp_path / "net.sqlite", net["summary"]["run_id"])
    local_rounds = read_rounds(tmp_path / "local.sqlite", local["summary"]["run_id"])
    assert len(net_rounds) == len(local_rounds) == 2
    for a, b in zip(net_rounds, local_rounds, strict=True):
        assert a.aggregate is not None and b.aggregate is not None
        np.testing.assert_array_equal(a.aggregate, b.aggregate)


@pytest.mark.slow
def test_processes_run_the_secure_default_with_vouched_identities(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    """Active mode, once refused with --processes, is the default: an in-memory authority vouches for each
    site, whose processes get their key and credential files and the authority's signed roster (the
    authority's private key stays in memory)."""
    code = main(["simulate", "--clients", "3", "--rounds", "1", "--processes", "--store", str(tmp_path / "run.db")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and json.loads(out[-1])["summary"]["status"] == "completed"
    folder = tmp_path / "run-sim" / "identities"
    names = [f"client-{i:03d}" for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["authority.pub", "roster.bin", *(f"{n}.key" for n in names), *(f"{n}.cred" for n in names)])
    assert all((folder / f"{n}.key").stat().st_mode & 0o077 == 0 for n in names)
    joins = [line for line in (tmp_path / "run-sim" / "logs" / "server.log").read_text().splitlines()
             if " joined " in line]
    assert len(joins) == 3 and all("malicious-server checks, credential" in line for line in joins)


@pytest.mark.slow
def test_a_server_outliving_every_client_is_stopped_with_their_exit_statuses(tmp_path: Path) -> None:
    import sys
    import time

    from fedveil.simulation.backends import SimulationError
    from fedveil.simulation.process_backend import ProcessFederation, wait_for_server
    from fedveil.simulation.processes import ProcessGroup

    group = ProcessGroup(tmp_path / "logs")
    try:
        server = group.start("server", [sys.executable, "-c", "import time; time.sleep(120)"])
        failing = "print('local data unusable'); raise SystemExit(1)"
        clients = [group.start(f"client-{i}", [sys.executable, "-c", failing]) for i in range(2)]
        fed = ProcessFederation(group, server, clients, "127.0.0.1:1", tmp_path / "run.db", [], [])
        started = time.monotonic()
        with pytest.raises(SimulationError, match=r"every client exited .*client-0: exit 1: local data unusable"):
            wait_for_server(fed, 60, grace_s=0.5)
        assert time.monotonic() - started < 30  # not the 60 s timeout
        server.popen.wait(10)  # and the server was told to stop
    finally:
        group.close()
