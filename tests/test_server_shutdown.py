"""A finished ``fedveil server`` exits, whatever its peers do.

Python's exit waits without limit for non-daemon threads, and gRPC's handler pool is made of them
(concurrent.futures joins its workers at exit), so one handler that never returns keeps a process
alive after its work is done. The first test shows that mechanism with a plain thread pool and
that :func:`~fedveil.commands.common.exit_within` ends such a process on time anyway. The second
runs a real job on 127.0.0.1 under attack (a site SIGKILLed before joining, a forged token, a
peer holding calls open that never send their message, and a site that keeps a long poll open
and then freezes, never polling again) and requires the server to exit 0 within a bound after
the run is finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedveil.commands.common import EXIT_DEADLINE_S
from fedveil.server.config import ServerConfig
from fedveil.server.runner import STOP_GRACE_S, STOP_WAIT_S
from fedveil.server.store import RunStore
from fedveil.simulation.backends import SimulatedSites
from fedveil.task import load_task
from fedveil.tasks.synthetic import write_site_csv
from tests.server_helpers import read_store

pytestmark = pytest.mark.timeout(300)
TASK = "fedveil.tasks.synthetic:task"
STUCK_POOL = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from fedveil.commands.common import exit_within
pool = ThreadPoolExecutor(2, thread_name_prefix="handler")
started = threading.Event()
pool.submit(lambda: (started.set(), threading.Event().wait()))  # a handler that never returns
started.wait()
print("working", flush=True)
if sys.argv[1] == "exit_within":
    exit_within(7, deadline_s=1.0)
sys.exit(7)
"""
# Joins with a valid token, opens calls that never send their request (one with a forged token,
# which the server cannot check before the request arrives), opens a masked-input upload that
# never sends a chunk, starts a long poll, then stops itself: it never reads a reply again. It joins
# as a vouched-for site (identity key and credential files), as the secure default requires.
MALLORY = """
import os, signal, sys, threading
from pathlib import Path
import grpc
from fedveil.clients.api import load_identity_key
from fedveil.protocol import PROTOCOL_VERSION, SERVICE_NAME
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import bearer_metadata
from fedveil.protocol.identity_files import load_credential
from fedveil.protocol.transport import ClientSession
address, token, forged, task_name, key_file, credential_file = sys.argv[1:7]
identity = load_identity_key(Path(key_file)).public_key().public_bytes_raw()
credential = load_credential(Path(credential_file)).encode()
channel = grpc.insecure_channel(address)
never = threading.Event()
def silent():
    never.wait()
    yield b""
def stream(rpc):
    return channel.stream_unary(f"/{SERVICE_NAME}/{rpc}", request_serializer=None, response_deserializer=None)
held = [stream(rpc).future(silent(), metadata=bearer_metadata(forged)) for rpc in ("Poll", "Join", "Unmask")]
held.append(stream("UploadMaskedInput").future(silent(), metadata=bearer_metadata(token)))
join = channel.unary_unary(f"/{SERVICE_NAME}/Join", request_serializer=pb.JoinRequest.SerializeToString,
                           response_deserializer=pb.JoinResponse.FromString)
session = ClientSession.from_join(join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name=task_name,
                                                     identity_public_key=identity, identity_credential=credential),
                                       metadata=bearer_metadata(token), timeout=60))
poll = channel.unary_unary(f"/{SERVICE_NAME}/Poll", request_serializer=pb.PollRequest.SerializeToString,
                           response_deserializer=pb.PollResponse.FromString)
held.append(poll.future(pb.PollRequest(header=session.header(), max_wait_ms=3_600_000),
                        metadata=bearer_metadata(token)))
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["sys.exit", "exit_within"])
def test_a_handler_that_never_returns_holds_a_plain_exit_but_not_exit_within(ending: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_POOL, ending], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "working\n"
        started = time.monotonic()
        if ending == "sys.exit":  # the mechanism: Python's exit joins the pool's worker forever
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=4)
            return
        assert proc.wait(timeout=30) == 7  # the exit code survives
        assert time.monotonic() - started < 10
        err = proc.stderr.read() if proc.stderr is not None else ""
        assert "exiting with 1 thread(s) still running" in err and "handler_0 in wait (threading.py:" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _run_status(db: Path) -> str:
    rows = read_store(db, "SELECT status FROM runs")
    return str(rows[0][0]) if rows else ""


@pytest.mark.slow
def test_server_exits_after_a_job_with_a_killed_site_a_forged_token_and_a_frozen_long_poll(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    honest, killed = ["north", "south", "east"], "west"
    with RunStore(db) as store:
        tokens = {n: store.enroll(n).token for n in [*honest, killed, "mallory"]}
    for i, name in enumerate([*honest, killed]):
        write_site_csv(tmp_path / f"{name}.csv", i, 4, 3)
    # the secure default: an authority vouches for every site (identity files; --authority for everyone)
    flags = SimulatedSites.create(ServerConfig.from_flat(task=TASK, rounds=2, clients_per_round=3, min_clients=3),
                                  [*honest, killed, "mallory"]).write_files(tmp_path)
    forged = tokens["north"][:-4] + ("AAAA" if not tokens["north"].endswith("AAAA") else "BBBB")
    linger = 2.0
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        procs[name] = subprocess.Popen(argv, env=_env(), stdout=(logs / f"{name}.out").open("wb"),
                                       stderr=(logs / f"{name}.err").open("wb"))
        return procs[name]

    def client(name: str, token: str, port: int) -> list[str]:
        return [sys.executable, "-m", "fedveil.cli", "client", "--server", f"127.0.0.1:{port}", "--task", TASK,
                "--data", str(tmp_path / f"{name if name in tokens else 'north'}.csv"), "--token", token,
                "--insecure", "--give-up-after", "120", "--max-backoff", "0.5",
                *flags[name if name in flags else "north"]]

    def wait_for(what: str, predicate: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    try:
        port_file = tmp_path / "port"
        # the killed site: started before the server exists, SIGKILLed while it is still retrying
        from fedveil.simulation.processes import free_port

        port = free_port()
        victim = spawn(killed, client(killed, tokens[killed], port))
        wait_for("the site to retry", lambda: "retry" in (logs / f"{killed}.err").read_text())
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        server = spawn("server", [
            sys.executable, "-m", "fedveil.cli", "server", "--listen", f"127.0.0.1:{port}", "--store", str(db),
            "--task", TASK, "--rounds", "2", "--clients-per-round", "3", "--min-clients", "3",
            "--round-timeout", "10", "--stage-timeout", "10", "--cohort-wait", "1", "--linger", str(linger),
            "--poll-wait", "2", "--seed", "3", "--insecure", "--json", "--port-file", str(port_file), *flags["server"]])
        wait_for("the server to listen", lambda: port_file.exists() or server.poll() is not None)
        assert server.poll() is None, (logs / "server.err").read_text()
        intruder = spawn("intruder", client("intruder", forged, port))
        assert intruder.wait(120) == 3  # refused: a forged token is an authentication failure
        identity = tmp_path / "identities"
        mallory = spawn("mallory", [sys.executable, "-c", MALLORY, f"127.0.0.1:{port}", tokens["mallory"], forged,
                                    load_task(TASK).name, str(identity / "mallory.key"),
                                    str(identity / "mallory.cred")])
        wait_for("mallory to hold its calls", lambda: "holding" in (logs / "mallory.out").read_text()
                 or mallory.poll() is not None)
        assert mallory.poll() is None, (logs / "mallory.err").read_text()
        for name in honest:
            spawn(name, client(name, tokens[name], port))
        wait_for("the run to finish", lambda: _run_status(db) not in ("", "running") or server.poll() is not None,
                 timeout=240)
        finished = time.monotonic()
        bound = linger + STOP_GRACE_S + STOP_WAIT_S + EXIT_DEADLINE_S + 5.0
        try:
            code = server.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server was still running {bound:.0f} s after its run finished: "
                                 + (logs / "server.err").read_text()[-3000:]) from None
        assert code == 0, (logs / "server.err").read_text()[-3000:]
        exited_after = time.monotonic() - finished
        for name in honest:
            assert procs[name].wait(60) == 0, (logs / f"{name}.err").read_text()[-2000:]
        assert mallory.poll() is None  # still frozen, its calls still open on its side
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    summary = json.loads((logs / "server.out").read_text().strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["completed_rounds"] == 2, summary
    server_log = (logs / "server.err").read_text()
    assert "refused Join from <unauthenticated>" in server_log
    assert exited_after <= bound
    for token in [*tokens.values(), forged]:
        assert token.split(".")[-1] not in server_log
