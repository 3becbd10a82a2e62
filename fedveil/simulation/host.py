"""The server side of a simulation: a job on the real coordinator and run store in this process,
client enrolment, the ``fedveil server`` command line of a job, and the rounds a run released.
:mod:`fedveil.simulation.backends` and :mod:`fedveil.simulation.process_backend` drive it next to
the real clients.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.job_runner import JobRunner
from fedveil.server.job_settings import command_line
from fedveil.server.store import RunStore
from fedveil.task import Task


@dataclass(frozen=True)
class StoredRound:
    """A completed round of a run, with its released aggregate, as the run store holds it."""

    round: int
    survivors: int
    aggregate: np.ndarray | None
    stats: dict[str, Any]


def read_rounds(store_path: Path, run_id: str) -> list[StoredRound]:
    """The completed rounds of ``run_id``, with their released aggregates, from a run store."""
    out: list[StoredRound] = []
    with RunStore(store_path) as store:
        for rec in store.rounds(run_id):
            if rec.status != "completed":
                continue
            out.append(StoredRound(rec.round, int(rec.survivors or 0), store.aggregate(run_id, rec.round),
                                   dict(rec.stats or {})))
    return out


def job_seed(config: ServerConfig) -> int:
    """The federation seed of a simulation (0 when the configuration leaves it unset)."""
    return int(config.seed) if config.seed is not None else 0


def server_args(config: ServerConfig, listen: str, store_path: Path, port_file: Path | None = None) -> list[str]:
    """``fedveil server`` arguments (after ``fedveil``) for ``config``: plaintext on loopback, JSON summary.

    The settings come from :func:`fedveil.server.job_settings.command_line`, the same table that
    turns the command's flags back into a config, so the two cannot drift apart."""
    settings = command_line(dataclasses.replace(config, seed=job_seed(config)))
    argv = ["server", "--listen", listen, "--store", str(store_path), *settings, "--insecure", "--json"]
    if port_file is not None:
        argv += ["--port-file", str(port_file)]
    return argv


def server_argv(config: ServerConfig, listen: str, store_path: Path, port_file: Path | None = None) -> list[str]:
    """Command line running ``fedveil server`` for ``config`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "fedveil.cli", *server_args(config, listen, store_path, port_file)]


class CoordinatorJob:
    """A job run in this process by :class:`~fedveil.server.job_runner.JobRunner` (the real
    coordinator), on its own run store."""

    def __init__(self, config: ServerConfig, task: Task, store_path: Path) -> None:
        self.store = RunStore(store_path)
        try:
            self.runner = JobRunner(config, task, self.store, new_run=True)
        except BaseException:
            self.store.close()
            raise

    @property
    def coordinator(self) -> Coordinator:
        return self.runner.coordinator

    @property
    def service(self) -> Coordinator:
        """The RPC handler the clients' ``InProcessTransport`` calls."""
        return self.runner.coordinator

    def run(self) -> JobSummary:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    def close(self) -> None:
        self.runner.close()
        self.store.close()


class CoordinatorHost:
    """What the simulation backends need of the server side: start a job in process,
    enrol clients, the ``fedveil server`` command line, and the released rounds of a run."""

    def start_job(self, config: ServerConfig, task: Task, store_path: Path) -> CoordinatorJob:
        return CoordinatorJob(config, task, store_path)

    def enroll(self, store_path: Path, names: list[str]) -> list[str]:
        """Enrol ``names`` in the store at ``store_path``; returns their tokens, in order."""
        with RunStore(store_path) as store:
            return [store.enroll(name).token for name in names]

    def server_argv(self, config: ServerConfig, listen: str, store_path: Path, port_file: Path | None) -> list[str]:
        return server_argv(config, listen, store_path, port_file)

    def read_rounds(self, store_path: Path, run_id: str) -> list[StoredRound]:
        return read_rounds(store_path, run_id)
