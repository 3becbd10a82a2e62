"""The turnkey client against real server processes: it waits out a server that is not up yet,
rides out a server killed mid-job (backoff, then re-join), and stops on refused credentials."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fedveil.cli import main
from fedveil.server.config import ServerConfig
from fedveil.server.store import RunStore
from fedveil.simulation.backends import SimulatedSites, client_name, client_seed
from fedveil.simulation.host import server_argv
from fedveil.simulation.processes import ProcessGroup, fedveil_argv, free_port, wait_for_port
from fedveil.tasks.synthetic import write_site_csv
from tests.identity_helpers import write_authority

N = 3


def config() -> ServerConfig:
    return ServerConfig.from_flat(task="fedveil.tasks.synthetic", rounds=3, clients_per_round=N, min_clients=N, seed=2,
                        round_timeout=60.0, stage_timeout=30.0, cohort_wait=1.0, linger=3.0, poll_wait=1.0,
                        local_epochs=40)


def prepare(tmp_path: Path) -> tuple[Path, list[str], list[Path], dict[str, list[str]]]:
    """The store with N enrolled sites, their data, and each process's identity flags (the secure
    default: an authority vouches for every site; the server gets ``--authority``)."""
    store_path = tmp_path / "run.sqlite"
    with RunStore(store_path) as store:
        tokens = [store.enroll(client_name(i)).token for i in range(N)]
    data = [write_site_csv(tmp_path / f"site{i}.csv", i, N, 2) for i in range(N)]
    flags = SimulatedSites.create(config(), [client_name(i) for i in range(N)]).write_files(tmp_path)
    return store_path, tokens, data, flags


def client_argv(address: str, token: str, data: Path, index: int, flags: dict[str, list[str]]) -> list[str]:
    return fedveil_argv("client", "--server", address, "--task", "fedveil.tasks.synthetic", "--data", str(data),
                        "--token", token, "--insecure", "--seed", str(client_seed(2, index)),
                        "--give-up-after", "120", "--max-backoff", "1.0", *flags[client_name(index)])


def completed_rounds(store_path: Path) -> int:
    with RunStore(store_path) as store:
        run = store.latest_run()
        return 0 if run is None else store.completed_rounds(run.run_id)


@pytest.mark.slow
def test_clients_wait_for_a_late_server_and_survive_a_server_killed_mid_job(tmp_path: Path) -> None:
    store_path, tokens, data, flags = prepare(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        clients = [group.start(client_name(i), client_argv(address, tokens[i], data[i], i, flags)) for i in range(N)]
        time.sleep(3.0)  # nothing listens yet: the clients back off and retry
        assert all(c.alive() for c in clients)
        server = group.start("server-1", [*server_argv(config(), address, store_path), *flags["server"]])
        wait_for_port("127.0.0.1", port, 60, server.popen)
        deadline = time.monotonic() + 180
        while completed_rounds(store_path) < 1:
            assert time.monotonic() < deadline and server.alive(), server.errors()[-3000:]
            time.sleep(0.02)
        server.kill(signal.SIGKILL)  # the server dies mid-job ...
        server.wait(10)
        assert completed_rounds(store_path) < 3, "the job finished before the kill landed"
        time.sleep(2.0)
        restarted = group.start("server-2", [*server_argv(config(), address, store_path), *flags["server"]])  # back
        assert restarted.wait(240) == 0, restarted.errors()[-3000:]
        codes = [c.wait(60) for c in clients]
        summaries = [json.loads(c.last_line()) for c in clients]
        logs = [c.errors() for c in clients]
    assert codes == [0] * N, logs
    final = json.loads(restarted.last_line())
    assert final["status"] == "completed" and final["completed_rounds"] == 3
    assert final["resumed_from"] >= 1
    assert all("retry" in log for log in logs)  # they backed off while no server was there
    assert all(s["reconnects"] >= 1 for s in summaries)  # and joined the restarted server again
    assert all(s["rounds_completed"] >= 2 for s in summaries)


@pytest.mark.slow
def test_a_refused_token_ends_the_client_with_status_3(tmp_path: Path) -> None:
    store_path, _tokens, data, flags = prepare(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        server = group.start("server", [*server_argv(config(), address, store_path), *flags["server"]])
        wait_for_port("127.0.0.1", port, 60, server.popen)
        unknown = well_formed_token()  # well formed, never issued: the server must refuse it
        client = group.start("intruder", client_argv(address, unknown, data[0], 0, flags))
        code = client.wait(120)
        err = client.errors().strip().splitlines()
    assert code == 3
    assert err[-1].startswith("error: the server refused this client's credentials")
    assert unknown not in client.errors() and unknown.split(".")[2] not in client.errors()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "nohost", "--data", "{data}"], "error: --server: expected HOST:PORT"),
        (["--server", "127.0.0.1:1", "--data", "{missing}"], "error: --data: no such file"),
        (["--server", "127.0.0.1:1", "--data", "{bad}"], "error: --data: "),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--insecure", "--ca-cert", "{data}"], "error: --insecure:"),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--ca-cert", "{data}"], "error: --ca-cert:"),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--task", "nope.nope"], "error: --task:"),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--give-up-after", "nan"], "error: --give-up-after:"),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--max-backoff", "nan"], "error: --max-backoff:"),
        (["--server", "127.0.0.1:1", "--data", "{data}", "--threads", "99999999999"], "error: --threads:"),
    ],
)
def test_client_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    data = write_site_csv(tmp_path / "ok.csv", 0, 2, 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("x0,y\n1,0\n")
    values = {"data": str(data), "missing": str(tmp_path / "none.csv"), "bad": str(bad)}
    token = well_formed_token()
    # the authority pinned (the secure default needs it before anything is read), so each case fails on its own flag
    pinned = ["--authority", str(write_authority(tmp_path / "authority.pub"))]
    argv = ["client", "--task", "fedveil.tasks.synthetic", "--token", token, *pinned,
            *[a.format(**values) for a in args]]
    if "--task" in args:
        argv = ["client", "--token", token, *pinned, *[a.format(**values) for a in args]]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(message), err


def well_formed_token() -> str:
    import base64

    from fedveil.protocol.auth import TOKEN_ID_BYTES, TOKEN_PREFIX, TOKEN_SECRET_BYTES

    secret = base64.urlsafe_b64encode(bytes(range(TOKEN_SECRET_BYTES))).decode().rstrip("=")
    return f"{TOKEN_PREFIX}.{'ab' * TOKEN_ID_BYTES}.{secret}"


@pytest.mark.parametrize("source", ["--token", "--token-file", "FEDVEIL_TOKEN"])
def test_a_malformed_token_fails_at_once_naming_its_source_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    data = write_site_csv(tmp_path / "ok.csv", 0, 2, 0)
    secret_looking = "fvt1.not-a-token-s3cr3t-value"
    argv = ["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data), "--insecure"]
    monkeypatch.delenv("FEDVEIL_TOKEN", raising=False)
    if source == "--token":
        argv += ["--token", secret_looking]
    elif source == "--token-file":
        (tmp_path / "token").write_text(secret_looking + "\n")
        argv += ["--token-file", str(tmp_path / "token")]
    else:
        monkeypatch.setenv("FEDVEIL_TOKEN", secret_looking)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {source}: malformed token"), err
    assert "s3cr3t" not in err[0]
