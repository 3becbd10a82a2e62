"""The multi-process simulation backend: ``fedveil server`` and N ``fedveil client`` processes on one machine.

:func:`simulate_processes` runs a job over loopback gRPC, each client with its own CSV file written
from the task's synthetic data; :func:`start_process_federation` starts the same processes for
tests and benchmarks (``fedveil bench network``, ``fedveil bench load``) that drive them
themselves. Its sites get the same names, seeds, data and identities as the in-process backend
(:mod:`fedveil.simulation.backends`), so the two release identical aggregates; starting, watching
and stopping the processes is :mod:`fedveil.simulation.processes`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import (
    COORDINATOR_HOST,
    STILL_RUNNING,
    SimulatedSites,
    SimulationError,
    SimulationResult,
    client_name,
    client_seed,
)
from fedveil.simulation.host import CoordinatorHost, job_seed
from fedveil.simulation.processes import ManagedProcess, ProcessGroup, fedveil_argv, wait_for_port
from fedveil.task import load_task


@dataclass
class ProcessFederation:
    """A running multi-process federation (server + clients) for tests and benchmarks."""

    group: ProcessGroup
    server: ManagedProcess
    clients: list[ManagedProcess]
    address: str
    store_path: Path
    tokens: list[str]
    data_paths: list[Path]
    identity_flags: dict[str, list[str]] = field(default_factory=dict)
    """Per client name (and "server"): the identity flags of the secure default (or --trust-server)."""
    sites: SimulatedSites | None = None
    """The sites' identities (their authority), for clients started by other means than :meth:`start_client`."""

    def start_client(self, index: int, config: ServerConfig, *, extra: tuple[str, ...] = ()) -> ManagedProcess:
        deterministic = ("--insecure-deterministic",) if config.insecure_deterministic else ()
        argv = fedveil_argv(
            "client", "--server", self.address, "--task", config.task, "--data", str(self.data_paths[index]),
            "--token", self.tokens[index], "--insecure", "--seed", str(client_seed(job_seed(config), index)),
            "--give-up-after", "60", "--max-backoff", "1.0", *self.identity_flags.get(client_name(index), []),
            *deterministic, *extra,
        )
        return self.group.start(client_name(index), argv)


def start_process_federation(
    config: ServerConfig,
    n_clients: int,
    workdir: Path,
    *,
    host: CoordinatorHost = COORDINATOR_HOST,
    start_clients: bool = True,
    listen_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    store_path: Path | None = None,
) -> ProcessFederation:
    """Enrol ``n_clients``, write their data, start ``fedveil server`` and the clients."""
    from fedveil.tasks.synthetic import write_site_csv

    task = load_task(config.task)
    workdir.mkdir(parents=True, exist_ok=True)
    sites = SimulatedSites.create(config, [client_name(i) for i in range(n_clients)])
    config = sites.config
    identity_flags = sites.write_files(workdir)
    store_path = store_path if store_path is not None else workdir / "run.sqlite"
    tokens = host.enroll(store_path, [client_name(i) for i in range(n_clients)])
    data_paths = [write_site_csv(workdir / f"{client_name(i)}.csv", i, n_clients, job_seed(config), task)
                  for i in range(n_clients)]
    port_file = workdir / "server.port"
    port_file.unlink(missing_ok=True)
    group = ProcessGroup(workdir / "logs", env=dict(env or {}))
    try:
        # port 0: the server binds a free ephemeral port and writes it to port_file (no race)
        server = group.start("server", host.server_argv(config, "127.0.0.1:0", store_path, port_file)
                             + identity_flags["server"])
        port = read_port_file(port_file, listen_timeout_s, server)
        address = f"127.0.0.1:{port}"
        wait_for_port("127.0.0.1", port, listen_timeout_s, server.popen)
        fed = ProcessFederation(group, server, [], address, store_path, tokens, data_paths, identity_flags, sites)
        if start_clients:
            fed.clients = [fed.start_client(i, config) for i in range(n_clients)]
        return fed
    except BaseException:
        group.close()
        raise


def read_port_file(path: Path, timeout_s: float, server: ManagedProcess) -> int:
    """The port ``fedveil server --port-file`` wrote, once it is there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise SimulationError(f"the server exited with status {server.popen.returncode}: {server.errors()[-2000:]}")
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    raise SimulationError(f"the server did not report its port within {timeout_s:.0f} s")


def orphan_grace_s(config: ServerConfig) -> float:
    """How long a server may outlive all its clients before :func:`wait_for_server` stops it: its
    linger (it may still be saying goodbye) plus room for a slow final stage."""
    return max(config.schedule.linger, 1.0) + 15.0


def wait_for_server(fed: ProcessFederation, timeout_s: float, *, grace_s: float) -> int:
    """The server's exit status; a :class:`SimulationError` if it outlives ``timeout_s``, or outlives
    every client by ``grace_s`` (no round can complete without them, so it would only wait)."""
    deadline = time.monotonic() + timeout_s
    clients_gone_at: float | None = None
    while True:
        code = fed.server.popen.poll()
        if code is not None:
            return code
        now = time.monotonic()
        if now >= deadline:
            raise SimulationError(f"the server did not finish within {timeout_s:g} s")
        if fed.clients and not any(c.alive() for c in fed.clients):
            clients_gone_at = clients_gone_at if clients_gone_at is not None else now
            if now - clients_gone_at >= grace_s:
                # SIGTERM, not SIGINT: a process started in the background inherits SIGINT as ignored
                fed.server.kill(signal.SIGTERM)
                try:
                    fed.server.popen.wait(10)
                except subprocess.TimeoutExpired:
                    fed.server.kill(signal.SIGKILL)
                exits = "; ".join(f"{c.name}: exit {c.popen.returncode}: {c.last_line()[-300:]}" for c in fed.clients)
                raise SimulationError(f"every client exited before the job finished ({exits})")
        time.sleep(0.2)


def simulate_processes(
    config: ServerConfig,
    n_clients: int,
    *,
    host: CoordinatorHost = COORDINATOR_HOST,
    workdir: Path | None = None,
    store_path: Path | None = None,
    timeout_s: float = 900.0,
) -> SimulationResult:
    """Run the job with ``fedveil server`` and ``n_clients`` ``fedveil client`` processes over loopback gRPC.

    ``workdir`` holds the sites' CSV files and the processes' logs (default: a temporary
    directory); the run store goes to ``store_path`` (default: inside ``workdir``).
    """
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedveil-sim-")
        workdir = Path(tmp.name)
    started = time.monotonic()
    fed = start_process_federation(config, n_clients, workdir, host=host, store_path=store_path)
    errors: dict[str, str] = {}
    histories: dict[str, list[str]] = {}
    try:
        status = wait_for_server(fed, timeout_s, grace_s=orphan_grace_s(config))
        if status != 0:
            raise SimulationError(f"the server exited with status {status}: {fed.server.errors()[-2000:]}")
        for proc in fed.clients:
            try:
                code = proc.wait(max(config.schedule.linger, 1.0) + 30.0)
            except Exception:
                errors[proc.name] = STILL_RUNNING
                continue
            last = proc.last_line()
            if code != 0:
                errors[proc.name] = f"exit status {code}: {last}"
                continue
            try:
                histories[proc.name] = list(json.loads(last).get("outcomes", []))
            except ValueError:
                errors[proc.name] = f"no summary line: {last}"
        try:
            summary = json.loads(fed.server.last_line())
        except ValueError:
            raise SimulationError(f"the server printed no summary: {fed.server.errors()[-2000:]}") from None
        rounds = list(host.read_rounds(fed.store_path, str(summary.get("run_id", ""))))
    finally:
        fed.group.close()
    result = SimulationResult("processes", summary, rounds, histories, fed.store_path,
                              time.monotonic() - started, errors)
    if tmp is not None and store_path is None:
        result.store_path = Path("(temporary)")
    if tmp is not None:
        tmp.cleanup()
    return result
