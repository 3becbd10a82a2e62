"""``fedveil server``: the coordinator behind the gRPC service, until the job is done.

:func:`serve` opens the store, builds the coordinator (resuming an unfinished run of the same
job), starts the gRPC server (TLS, optional mutual TLS, size limits derived from the model),
runs the job in the calling thread and stops the server. SIGINT/SIGTERM stop the job cleanly
between two store transactions; running the same command again resumes it.

Stopping is bounded: held long polls are released, calls still in flight get
:data:`STOP_GRACE_S` and are then cancelled, and :func:`serve` waits at most
:data:`STOP_WAIT_S` more for gRPC to finish (a warning says so when it does not). Handler threads
that outlive that are the process's business: ``fedveil server`` ends with
:func:`fedveil.commands.common.exit_within`, which does not wait for them without limit.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import grpc

from fedveil.protocol.auth import Authenticator
from fedveil.protocol.service import ServerLimits, build_server
from fedveil.secagg.identity import RevocationList
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.observability import ObservabilityConfig, ServerObservability
from fedveil.server.store import RunStore, StoreError
from fedveil.task import Task

log = logging.getLogger("fedveil.server")

STOP_GRACE_S = 1.0
"""Calls in flight when the job ends get this long to finish before they are cancelled (clients
have heard JobDone during the linger already)."""
STOP_WAIT_S = 5.0
"""How long, after the grace, :func:`serve` waits for the gRPC server to report it has stopped."""


@dataclass(frozen=True)
class TlsSettings:
    """Server TLS: certificate and key (PEM); ``client_ca_pem`` turns on mutual TLS."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None


def serve(
    config: ServerConfig,
    task: Task,
    store_path: str | Path,
    listen: str,
    *,
    tls: TlsSettings | None,
    new_run: bool = False,
    max_message_bytes: int | None = None,
    port_file: Path | None = None,
    on_listening: threading.Event | None = None,
    install_signal_handlers: bool = True,
    revocations: RevocationList | None = None,
    observability: ObservabilityConfig | None = None,
) -> JobSummary:
    """Run ``config``'s job on ``listen`` until it completes (or a signal stops it).

    The server also serves the standard gRPC health service, and Prometheus metrics when
    ``observability`` gives a metrics port (:mod:`fedveil.server.observability`)."""
    _limit_malloc_arenas()
    lock = _lock_store(Path(store_path))
    store = RunStore(store_path)
    server: grpc.Server | None = None
    ops: ServerObservability | None = None
    try:
        coordinator = Coordinator(config, task, store, new_run=new_run)
        ops = ServerObservability(observability)
        ops.attach(coordinator)
        if ops.endpoint is not None:
            log.info("metrics on %s", ops.endpoint.url)
        coordinator.revocations = revocations
        limit = max_message_bytes or coordinator.max_message_bytes()
        workers = max(32, 2 * config.clients_per_round + 16)
        limits = ServerLimits(max_message_bytes=limit, workers=workers, max_concurrent_rpcs=max(256, 4 * workers),
                              upload_timeout_s=config.stage_timeout)
        coordinator.max_waiting_polls = workers - 8  # long polls never take the last workers
        coordinator.inline_model = False  # clients fetch the model in chunks (FetchModel)
        credentials = None
        if tls is not None:
            from fedveil.protocol.tls import server_credentials

            credentials = server_credentials(tls.cert_pem, tls.key_pem, tls.client_ca_pem)
        authenticator = Authenticator(store.credential, client_exists=store.client_enrolled)
        server, port = build_server(
            coordinator, authenticator, listen, credentials=credentials, limits=limits,
            mutual_tls=tls is not None and tls.client_ca_pem is not None, health=ops.health, traffic=ops.traffic,
        )
        ops.job_running(coordinator.finished is None)
        host = listen.rpartition(":")[0]
        log.info("listening on %s:%d (%s), run %s, message limit %d bytes", host, port,
                 "TLS" + (" + client certificates" if tls and tls.client_ca_pem else "") if tls else "INSECURE",
                 coordinator.run_id, limit)
        print(f"fedveil server listening on {host}:{port} (run {coordinator.run_id})", flush=True)
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(port_file)
        if on_listening is not None:
            on_listening.set()
        previous: dict[signal.Signals, object] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():

            def handle(signum: int, _frame: FrameType | None) -> None:
                log.warning("signal %d: stopping after the current step; rerun the command to resume", signum)
                coordinator.stop()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handle)
        try:
            return coordinator.run()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
    finally:
        if ops is not None:
            ops.close()
        if server is not None:
            stop_server(server, coordinator)
        store.close()
        lock.close()


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


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does). By default every handler thread that
    touches a multi-megabyte vector may get its own arena, whose freed memory is not returned, so
    RSS grows with the number of threads that served uploads (i.e. with the cohort), though no
    vector is kept. Without glibc this does nothing."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        return


def _lock_store(path: Path) -> TextIO:
    """Hold an exclusive lock beside the store for the server's lifetime: two servers writing one
    run would interleave its history. The OS drops the lock when the process dies (even SIGKILL)."""
    lock_path = path.with_name(path.name + ".server-lock")
    try:
        handle = lock_path.open("a+")
    except OSError as err:
        raise StoreError(f"cannot create the lock file {str(lock_path)!r}: {err.strerror or err}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise StoreError(f"store {str(path)!r} is in use by another fedveil server (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
