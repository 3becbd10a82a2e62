"""A real ``fedveil server`` job (:func:`fedveil.server.runner.serve`: coordinator, gRPC service,
token auth, health and metrics) on a loopback port in a background thread, with scripted sites
talking to it over real gRPC. For the operations tests: health probes, metrics scrapes, export."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.server.config import ServerConfig
from fedveil.server.observability import ObservabilityConfig
from fedveil.server.runner import serve
from fedveil.server.store import RunStore
from fedveil.task import load_task
from tests.server_helpers import TASK, Scripted, vectors


@dataclass
class ServedJob:
    address: str
    store_path: Path
    tokens: dict[str, str]
    thread: threading.Thread
    out: dict[str, Any] = field(default_factory=dict)

    def sites(self, **kw: Any) -> list[Scripted]:
        """One scripted site per enrolled name, each over its own gRPC channel with its own token."""
        names = sorted(self.tokens)
        return [
            Scripted(None, name, vector, transport=GrpcTransport.connect(  # type: ignore[arg-type]
                ChannelConfig(target=self.address, insecure=True), self.tokens[name], rpc_timeout_s=30), **kw)
            for name, vector in zip(names, vectors(len(names)), strict=True)
        ]

    def finish(self, timeout: float = 120) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not finish"
        assert "error" not in self.out, self.out.get("error")
        return self.out["summary"]


def free_port() -> int:
    """A free loopback TCP port (for a listener that, like ``--metrics-port``, takes no 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_config(names: list[str], **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = dict(task=TASK, rounds=2, clients_per_round=len(names), min_clients=len(names),
                                    round_timeout=60.0, stage_timeout=20.0, cohort_wait=0.0, linger=2.0, seed=3,
                                    poll_wait=0.5, evaluate=False, final_evaluation=False, active_adversary=False)
    settings.update(overrides)
    return ServerConfig.from_flat(**settings)


def start_served_job(tmp_path: Path, names: list[str], *, observability: ObservabilityConfig | None = None,
                     **overrides: Any) -> ServedJob:
    store_path = tmp_path / "run.db"
    with RunStore(store_path) as store:
        tokens = {n: store.enroll(n).token for n in names}
    port_file = tmp_path / "port"
    out: dict[str, Any] = {}
    config = job_config(names, **overrides)

    def run() -> None:
        try:
            out["summary"] = serve(config, load_task(TASK), store_path, "127.0.0.1:0", tls=None,
                                   port_file=port_file, install_signal_handlers=False, observability=observability)
        except BaseException as err:  # surfaced by finish()
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline and "error" not in out, out.get("error")
        time.sleep(0.05)
    return ServedJob(f"127.0.0.1:{int(port_file.read_text())}", store_path, tokens, thread, out)


def run_sites(sites: list[Scripted]) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, daemon=True) for s in sites]
    for t in threads:
        t.start()
    return threads


def join_sites(sites: list[Scripted], threads: list[threading.Thread], timeout: float = 60) -> None:
    for t in threads:
        t.join(timeout)
    for s in sites:
        assert s.error is None, f"{s.name}: {s.error!r}"
        assert s.done, f"{s.name} never heard that the job is done"
