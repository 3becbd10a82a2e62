"""A real coordinator behind a real gRPC server with TLS on 127.0.0.1, for the gRPC protocol tests.

The server's certificate is generated at test time; clients are real gRPC channels (:class:`Federation_`).
Shared by the tests of who may speak (``test_protocol_grpc_access``), of what they may send
(``test_protocol_grpc_messages``) and of sites on one shared channel; ``tests/conftest.py`` makes
:func:`fed` and :func:`passive_fed` fixtures of every test module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import Authenticator
from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.protocol.model_delivery import ModelDelivery
from fedveil.protocol.service import ServerLimits, build_server
from fedveil.protocol.tls import PemPair, generate_ca, generate_certificate, server_credentials
from fedveil.protocol.transport import ClientSession
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.store import RunStore
from fedveil.task import Task, load_task
from tests.identity_helpers import TEST_AUTHORITY, secure_job
from tests.server_helpers import Scripted

TASK = "fedveil.tasks.synthetic:task"


@dataclass
class Federation_:
    port: int
    ca: PemPair
    tokens: dict[str, str]
    coordinator: Coordinator
    task: Task
    limit: int
    summary: list[JobSummary]
    thread: threading.Thread

    def transport(self, name: str | None, *, ca: PemPair | None = None, token: str | None = None,
                  insecure: bool = False, client: PemPair | None = None) -> GrpcTransport:
        config = ChannelConfig(
            target=f"127.0.0.1:{self.port}", ca_cert_pem=None if insecure else (ca or self.ca).cert_pem,
            insecure=insecure, client_cert_pem=client.cert_pem if client else None,
            client_key_pem=client.key_pem if client else None,
        )
        # 16-byte chunks: the 48-byte masked inputs of this task travel over the chunked upload.
        return GrpcTransport.connect(config, token if token is not None else (self.tokens[name] if name else None),
                                     rpc_timeout_s=20.0, chunk_bytes=16)

    def run_scripted(self, clients: Sequence[Scripted], job_timeout_s: float) -> None:
        """Run ``clients`` through the job (already running in :attr:`thread`) and wait for it, then for them."""
        threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for th in threads:
            th.start()
        self.thread.join(job_timeout_s)
        for th in threads:
            th.join(30)


def start_tls_job(tmp_path: Path, *, rounds: int, client_ca: PemPair | None = None,
                  names: tuple[str, ...] = ("alice", "bob", "mallory"), clients_per_round: int = 2,
                  limits: ServerLimits | None = None, stage_timeout: float = 20.0,
                  threshold: int = 0, active: bool = True) -> tuple[Federation_, grpc.Server]:
    """The job behind TLS; ``active`` (the secure default) needs every site to present its identity
    (``join_request``); passive jobs serve the scripted clients of :mod:`tests.server_helpers`,
    which cannot sign."""
    torch.set_num_threads(1)
    store = RunStore(tmp_path / "run.db")
    tokens = {n: store.enroll(n).token for n in names}
    task = load_task(TASK)
    config = ServerConfig.from_flat(task=TASK, rounds=rounds, clients_per_round=clients_per_round,
                          min_clients=clients_per_round, round_timeout=60,
                          stage_timeout=stage_timeout, cohort_wait=0.0, linger=1.0, seed=11, final_evaluation=False,
                          poll_wait=2.0, threshold=threshold,
                          **(secure_job() if active else {"active_adversary": False}))  # type: ignore[arg-type]
    coordinator = Coordinator(config, task, store)
    coordinator.model_delivery = ModelDelivery.fetched_in_chunks()  # as fedveil server does
    ca = generate_ca()
    cert = generate_certificate("localhost", ca, hostnames=["127.0.0.1", "localhost"])
    limit = coordinator.max_message_bytes()
    server, port = build_server(
        coordinator, Authenticator(store.credential, client_exists=store.client_enrolled), "127.0.0.1:0",
        credentials=server_credentials(cert.cert_pem, cert.key_pem, client_ca.cert_pem if client_ca else None),
        limits=limits or ServerLimits(max_message_bytes=limit, workers=16, max_concurrent_rpcs=64),
        mutual_tls=client_ca is not None,
    )
    summary: list[JobSummary] = []
    thread = threading.Thread(target=lambda: summary.append(coordinator.run()), daemon=True)
    thread.start()
    return Federation_(port, ca, tokens, coordinator, task, limit, summary, thread), server


def stop_tls_job(fed: Federation_, server: grpc.Server) -> None:
    """Undo :func:`start_tls_job`: stop the job, then its gRPC server, then close the store."""
    fed.coordinator.stop()
    fed.thread.join(30)
    server.stop(0).wait(5)
    fed.coordinator.store.close()


def serve_job(tmp_path: Path, active: bool) -> Iterator[Federation_]:
    f, server = start_tls_job(tmp_path, rounds=1, active=active)
    yield f
    stop_tls_job(f, server)


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation_]:
    """A one-round job on the secure default (active mode, the test authority's consortium)."""
    yield from serve_job(tmp_path, active=True)


@pytest.fixture
def passive_fed(tmp_path: Path) -> Iterator[Federation_]:
    """A one-round passive job, for scripted clients and raw protocol messages that carry no signatures."""
    yield from serve_job(tmp_path, active=False)


def join_request(name: str | None, task_name: str = "synthetic-logreg", **kw: Any) -> pb.JoinRequest:
    """A Join as a site ``name`` on the secure default sends it: its identity key and authority credential
    (None: a Join without them, for passive jobs)."""
    request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name=task_name, **kw)
    if name is not None:
        key, credential = TEST_AUTHORITY.identity(name, now=int(time.time()))
        request.identity_public_key = key.public_key().public_bytes_raw()
        request.identity_credential = credential.encode()
    return request


def join_session(t: GrpcTransport, name: str | None = None) -> ClientSession:
    return ClientSession.from_join(t.join(join_request(name)))


def poll_until(t: GrpcTransport, s: ClientSession, kind: str, timeout: float = 30.0) -> pb.PollResponse:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        resp = t.poll(pb.PollRequest(header=s.header(), max_wait_ms=1000))
        if resp.WhichOneof("instruction") == kind:
            return resp
    raise AssertionError(f"no {kind} instruction within {timeout}s")

