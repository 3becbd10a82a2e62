"""Scripted protocol clients for server tests.

Each sends a *known* update vector through the real secure-aggregation client (``fedveil.secagg``,
via the clients' protobuf driver), so the server's released aggregate can be checked against the
true mean of the survivors' updates, and each can be told to go silent at a given stage to create a
dropout exactly there.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedveil.clients.secagg_driver import SecAggClientDriver
from fedveil.clients.update import encoder_for
from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.errors import ProtocolError
from fedveil.protocol.transport import ClientSession, InProcessTransport
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import load_task

TASK = "fedveil.tasks.synthetic:task"
DIM = 11  # the synthetic logistic regression: 10 weights + bias


@dataclass
class Scripted:
    """A protocol client sending ``vector`` (scaled by the round number) with weight ``weight``."""

    coordinator: Coordinator
    name: str
    vector: np.ndarray
    weight: float = 1.0
    silent_at: dict[tuple[int, int], str] = field(default_factory=dict)
    """(round, n-th RoundStart of that round) → stage at which to stay silent."""
    results: list[tuple[int, int]] = field(default_factory=list)
    sent: dict[int, np.ndarray] = field(default_factory=dict)
    privacy: pb.LocalPrivacySpend | None = None
    """A local DP-SGD spend to report (with a ``loss`` metric) in every round the client trains."""
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # surfaced by the test
            self.error = err

    def _run(self) -> None:
        t = InProcessTransport(self.coordinator, self.name)
        s = ClientSession.from_join(t.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION,
                                                          task_name="synthetic-logreg")))
        driver: SecAggClientDriver | None = None
        rnd, nonce, skip = 0, b"", ""
        starts: dict[int, int] = {}
        while True:
            resp = t.poll(pb.PollRequest(header=s.header(), max_wait_ms=500))
            kind = resp.WhichOneof("instruction")
            try:
                if kind == "round_start":
                    start = resp.round_start
                    rnd, nonce = start.round, start.round_nonce
                    starts[rnd] = starts.get(rnd, 0) + 1
                    skip = self.silent_at.get((rnd, starts[rnd]), "")
                    if skip == "training":
                        continue
                    if self.privacy is not None:
                        t.report_metrics(pb.MetricsReport(
                            header=s.header(rnd, nonce), model_version=start.model.version, num_examples=100,
                            metrics=[pb.Metric(name="loss", value=0.5)], privacy=self.privacy))
                    driver = SecAggClientDriver(start, seed=os.urandom(32))
                    update = self.vector * rnd
                    enc = encoder_for(start.encoding, start.secagg.cohort_size)
                    ring = enc.encode(update, os.urandom(16), weight=self.weight) if enc.weighted else \
                        enc.encode(update, os.urandom(16))
                    driver.set_input(ring)
                    self.sent[rnd] = update
                    t.advertise_keys(pb.AdvertiseKeysRequest(header=s.header(rnd, nonce), **driver.advertise()))
                elif kind == "peer_keys" and driver is not None and skip != "share-keys":
                    t.share_keys(pb.ShareKeysRequest(header=s.header(rnd, nonce),
                                                     shares=driver.share_keys(resp.peer_keys)))
                elif kind == "incoming_shares" and driver is not None and skip != "masked-input":
                    t.submit_masked_input(pb.MaskedInputRequest(
                        header=s.header(rnd, nonce), masked_vector=driver.masked_input(resp.incoming_shares)))
                elif kind == "unmasking" and driver is not None and skip != "unmasking":
                    t.unmask(pb.UnmaskRequest(header=s.header(rnd, nonce), shares=driver.unmask(resp.unmasking)))
                elif kind == "round_result":
                    self.results.append((resp.round_result.round, resp.round_result.outcome))
                    driver = None
                elif kind == "evaluate":
                    ev = resp.evaluate
                    t.report_metrics(pb.MetricsReport(header=s.header(ev.phase, ev.round_nonce),
                                                      model_version=ev.round, num_examples=10,
                                                      metrics=[pb.Metric(name="loss", value=float(self.weight))]))
                elif kind == "job_done":
                    self.done = True
                    return
            except ProtocolError:
                driver = None  # a closed stage: wait for the round result


def make_job(tmp_path: Path, names: list[str], **overrides: object) -> tuple[Coordinator, RunStore]:
    torch.set_num_threads(1)
    store = RunStore(tmp_path / "run.db")
    for n in names:
        if not store.client_enrolled(n):
            store.enroll(n)
    settings: dict[str, object] = dict(task=TASK, rounds=1, clients_per_round=len(names), min_clients=len(names),
                                       round_timeout=30.0, stage_timeout=1.5, cohort_wait=0.0, linger=1.0, seed=3,
                                       poll_wait=0.5, evaluate=False)
    settings.update(overrides)
    config = ServerConfig(**settings)  # type: ignore[arg-type]
    return Coordinator(config, load_task(TASK), store), store


def run_job(coordinator: Coordinator, clients: list[Scripted]) -> JobSummary:
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for th in threads:
        th.start()
    finished = threading.Event()

    def watchdog() -> None:  # a client that crashed would leave the server waiting: fail fast
        while not finished.wait(0.2):
            if any(c.error is not None for c in clients):
                coordinator.stop()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    summary = coordinator.run()
    finished.set()
    for th in threads:
        th.join(30)
    for c in clients:
        assert c.error is None, f"{c.name}: {c.error!r}"
    return summary


def vectors(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.5, 0.5, DIM) for _ in range(n)]
