"""``fedveil server``: the coordinator behind the gRPC service, until the job is done.

:func:`serve` locks and opens the store and runs the job through
:class:`~fedveil.server.job_runner.JobRunner` (the coordinator, resuming an unfinished run of the
same job, behind the gRPC server with TLS, optional mutual TLS and size limits derived from the
model) in the calling thread, then stops the server. SIGINT/SIGTERM stop the job cleanly
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
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import TextIO

from fedveil.secagg.identity import RevocationList
from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import JobSummary
from fedveil.server.events import JobListener
from fedveil.server.job_runner import STOP_GRACE_S, STOP_WAIT_S, GrpcEndpoint, JobRunner, TlsSettings, stop_server
from fedveil.server.observability import ObservabilityConfig, ServerObservability
from fedveil.server.store import RunStore, StoreError
from fedveil.task import Task

log = logging.getLogger("fedveil.server")

__all__ = ["STOP_GRACE_S", "STOP_WAIT_S", "TlsSettings", "serve", "stop_server"]


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
    listeners: Iterable[JobListener] = (),
    observability: ObservabilityConfig | None = None,
    revocations_path: Path | None = None,
) -> JobSummary:
    """Run ``config``'s job on ``listen`` until it completes (or a signal stops it).

    ``revocations_path`` (``--revocations``) is read again whenever the file changes, so a site can
    be revoked mid-job (:class:`fedveil.server.revocation_file.RevocationFile`).

    The server also serves the standard gRPC health service, and Prometheus metrics when
    ``observability`` gives a metrics port (:mod:`fedveil.server.observability`)."""
    _limit_malloc_arenas()
    lock = _lock_store(Path(store_path))
    store = RunStore(store_path)
    runner: JobRunner | None = None
    try:
        ops = ServerObservability(observability)
        runner = JobRunner(config, task, store, new_run=new_run, listeners=listeners, revocations=revocations,
                           endpoint=GrpcEndpoint(listen, tls, max_message_bytes), observability=ops,
                           revocations_path=revocations_path)
        if ops.endpoint is not None:
            log.info("metrics on %s", ops.endpoint.url)
        host = listen.rpartition(":")[0]
        log.info("listening on %s:%d (%s), run %s, message limit %d bytes", host, runner.port,
                 "TLS" + (" + client certificates" if tls and tls.client_ca_pem else "") if tls else "INSECURE",
                 runner.run_id, runner.max_message_bytes)
        # the handlers go in before the server says it is listening: a signal sent as soon as the port file
        # appears was taken by Python's default handler, and the process sometimes never exited (a test that
        # sends SIGINT at once hung once in a loaded run)
        previous: dict[signal.Signals, object] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            stop = runner.stop

            def handle(signum: int, _frame: FrameType | None) -> None:
                log.warning("signal %d: stopping after the current step; rerun the command to resume", signum)
                stop()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handle)
        try:
            print(f"fedveil server listening on {host}:{runner.port} (run {runner.run_id})", flush=True)
            if port_file is not None:
                tmp = port_file.with_name(port_file.name + ".tmp")
                tmp.write_text(f"{runner.port}\n")
                tmp.replace(port_file)
            if on_listening is not None:
                on_listening.set()
            return runner.run()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
    finally:
        if runner is not None:
            runner.close()
        store.close()
        lock.close()


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
