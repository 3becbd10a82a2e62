"""One way to run a job: the coordinator on a run store, served in process or over gRPC, with its
events going to listeners.

``fedveil server`` (:func:`fedveil.server.runner.serve`), the in-process simulation backend
(:mod:`fedveil.simulation.host`) and the healthcare demo all run their jobs through
:class:`JobRunner`, so the gRPC server every one of them starts carries the same safeguards
(worker pool sized to the cohort, long polls that can never take the last workers, model
fetched in chunks, size limits derived from the model) and stops the same bounded way. The
process-level concerns of a real server — the store lock, signals, the port file — stay in
:func:`~fedveil.server.runner.serve`; the process simulation backend runs that command.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from fedveil.protocol.auth import Authenticator
from fedveil.protocol.model_delivery import ModelDelivery
from fedveil.protocol.service import ServerLimits, build_server
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg.identity import RevocationList
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.events import JobListener
from fedveil.server.observability import ServerObservability
from fedveil.server.store import RunStore
from fedveil.task import Task

log = logging.getLogger("fedveil.server")

STOP_GRACE_S = 1.0
"""Calls in flight when the job ends get this long to finish before they are cancelled (clients
have heard JobDone during the linger already)."""
STOP_WAIT_S = 5.0
"""How long, after the grace, the runner waits for the gRPC server to report it has stopped."""


@dataclass(frozen=True)
class TlsSettings:
    """Server TLS: certificate and key (PEM); ``client_ca_pem`` turns on mutual TLS."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None


@dataclass(frozen=True)
class GrpcEndpoint:
    """Where and how a job is served over gRPC. ``tls=None`` serves plaintext (loopback trials);
    ``max_message_bytes`` overrides the limit derived from the model."""

    listen: str
    tls: TlsSettings | None
    max_message_bytes: int | None = None
    inline_model_up_to_bytes: int = 0
    """A model no larger than this goes inside each RoundStart instead of over ``FetchModel``."""


UPLOAD_BUFFER_BUDGET = 64 << 20
"""Bytes of masked-input uploads the server receives at once (the slots times the largest upload)."""


def upload_slots(max_message_bytes: int) -> int:
    """Uploads received at once: as many as :data:`UPLOAD_BUFFER_BUDGET` holds, between 2 and 16.

    Small models afford more slots for the same memory, large ones keep two. (At n = 400 sites and
    m = 100,000, 16 slots gave no faster masked-input stage than 2: ``fedveil bench simulate``.)"""
    return max(2, min(16, UPLOAD_BUFFER_BUDGET // max(1, max_message_bytes)))


#: The most threads the server takes to hold every enrolled site's poll (see :func:`server_workers`).
MAX_WORKERS_FOR_ENROLLED = 256


def server_workers(clients_per_round: int, enrolled: int) -> int:
    """The gRPC server's worker threads: 8 are kept from long polls, and of the rest half are kept
    for the running round's members (:meth:`~fedveil.server.coordinator.Coordinator._busy_wait`).

    Twice the cohort plus 16 holds a round's members; a federation of up to about 120 enrolled sites
    also gets enough for every site's poll, so pace steering never sends one away. Before, 16 sites
    with a cohort of 6 had 12 held polls for the sites outside the round: 4 were sent away for up to
    12.5 s, and a round that drew one of them waited for it (rounds of 10 s for a 0.1 s job).
    """
    return max(32, 2 * clients_per_round + 16, min(2 * enrolled + 16, MAX_WORKERS_FOR_ENROLLED))


class JobRunner:
    """A job on the real coordinator: in process (sites call :meth:`transport`) or behind gRPC
    (``endpoint``; sites connect to :attr:`port`). Listeners hear every round and the job's end
    (:mod:`fedveil.server.events`). The store stays the caller's: the runner never closes it."""

    def __init__(self, config: ServerConfig, task: Task, store: RunStore, *, listeners: Iterable[JobListener] = (),
                 new_run: bool = False, endpoint: GrpcEndpoint | None = None,
                 revocations: RevocationList | None = None,
                 observability: ServerObservability | None = None,
                 revocations_path: Path | None = None) -> None:
        self.coordinator = Coordinator(config, task, store, new_run=new_run, listeners=listeners)
        self.coordinator.revocations = revocations
        if revocations_path is not None:  # read again whenever it changes: a site can be revoked mid-job
            self.coordinator.watch_revocations(revocations_path)
        self.endpoint = endpoint
        self.observability = observability
        """Health service and metrics (:mod:`fedveil.server.observability`), served with the gRPC endpoint."""
        if observability is not None:
            observability.attach(self.coordinator)
        self.port: int | None = None
        """The bound gRPC port (``endpoint`` may ask for port 0); None in process."""
        self.max_message_bytes = self.coordinator.max_message_bytes()
        self._server: grpc.Server | None = None
        if endpoint is not None:
            self._server, self.port = self._serve(config, store, endpoint)

    @property
    def run_id(self) -> str:
        return self.coordinator.run_id

    def _serve(self, config: ServerConfig, store: RunStore, endpoint: GrpcEndpoint) -> tuple[grpc.Server, int]:
        coordinator = self.coordinator
        if endpoint.max_message_bytes:
            self.max_message_bytes = endpoint.max_message_bytes
        workers = server_workers(config.schedule.clients_per_round, len(store.enrolled_clients()))
        limits = ServerLimits(max_message_bytes=self.max_message_bytes, workers=workers,
                              max_concurrent_rpcs=max(256, 4 * workers), upload_timeout_s=config.schedule.stage_timeout,
                              max_concurrent_uploads=upload_slots(self.max_message_bytes))
        coordinator.max_waiting_polls = workers - 8  # long polls never take the last workers
        coordinator.model_delivery = ModelDelivery.fetched_in_chunks(  # FetchModel, one buffer per model
            inline_up_to_bytes=endpoint.inline_model_up_to_bytes)
        credentials = None
        tls = endpoint.tls
        if tls is not None:
            from fedveil.protocol.tls import server_credentials

            credentials = server_credentials(tls.cert_pem, tls.key_pem, tls.client_ca_pem)
        authenticator = Authenticator(store.credential, client_exists=store.client_enrolled)
        ops = self.observability
        served = build_server(coordinator, authenticator, endpoint.listen, credentials=credentials, limits=limits,
                              mutual_tls=tls is not None and tls.client_ca_pem is not None,
                              health=ops.health if ops is not None else None,
                              traffic=ops.traffic if ops is not None else None)
        if ops is not None:
            ops.job_running(coordinator.finished is None)
        return served

    def transport(self, site: str) -> InProcessTransport:
        """An in-process transport for ``site`` (the coordinator runs the same validation as behind gRPC)."""
        return InProcessTransport(self.coordinator, site)

    def run(self) -> JobSummary:
        """Run the job to completion (or until :meth:`stop`), in the calling thread."""
        return self.coordinator.run()

    def stop(self) -> None:
        """Ask the job to stop after its current step (a signal handler may call it)."""
        self.coordinator.stop()

    def close(self) -> bool:
        """Stop serving (bounded, see :func:`stop_server`); False if gRPC had not finished in time."""
        if self.observability is not None:
            self.observability.close()
        server, self._server = self._server, None
        return stop_server(server, self.coordinator) if server is not None else True

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def stop_server(server: grpc.Server, coordinator: Coordinator) -> bool:
    """Stop serving within ``STOP_GRACE_S + STOP_WAIT_S``; False (and a warning) if gRPC had not
    finished by then. New calls are refused at once, held long polls are released, and calls still
    in flight after the grace are cancelled (a client holding a stream open cannot keep it)."""
    stopped = server.stop(grace=STOP_GRACE_S)
    coordinator.stop()  # a poll held until poll_wait returns now
    if stopped.wait(STOP_GRACE_S + STOP_WAIT_S):
        return True
    log.warning("the gRPC server had not stopped %.0f s after the job ended (calls still in flight); "
                "going on without it", STOP_GRACE_S + STOP_WAIT_S)
    return False
