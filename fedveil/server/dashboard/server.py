"""The dashboard served by uvicorn on a background thread: ``start()``, ``login_url``, ``stop()``."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from fedveil.server.dashboard.app import Dashboard
from fedveil.server.dashboard.routes import build_app
from fedveil.server.dashboard.sources import StoreRunSource
from fedveil.server.dashboard_auth import LoginToken
from fedveil.task import Task

START_TIMEOUT_S = 10.0


class DashboardServer:
    """The dashboard's HTTP server. ``token`` is the login token (see :mod:`fedveil.server.dashboard_auth`);
    a fresh one is generated if none is given. Print :attr:`login_url` once, to the console: it carries the token.
    """

    def __init__(self, app: Dashboard, port: int = 0, host: str = "127.0.0.1",
                 token: LoginToken | None = None) -> None:
        self.app = app
        self.token = token or LoginToken.generate()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._host = host
        config = uvicorn.Config(build_app(app, self.token), http="h11", lifespan="off", access_log=False,
                                log_level="warning", server_header=False, date_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The URL that logs a browser in (it carries the token: show it once, never log it)."""
        return f"{self.url}?token={self.token.value}"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="fedveil-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard's web server did not start (see the log)")
            time.sleep(0.01)
        return self

    def serve_until_signalled(self, on_ready: Callable[[], None] | None = None) -> None:
        """Block until SIGINT or SIGTERM arrives; the caller then calls :meth:`stop`.

        Explicit handlers, restored on return: a process started in the background inherits SIGINT
        as ignored (Ctrl+C would never reach it, and ``kill -INT`` neither), and supervisors stop
        with SIGTERM. ``on_ready`` runs once the handlers are in place (say "press Ctrl+C" there: a
        signal sent after it is never lost). Off the main thread no handler can be installed and no
        signal (nor KeyboardInterrupt) arrives, so it serves until the process ends."""
        signalled = threading.Event()
        if threading.current_thread() is not threading.main_thread():
            if on_ready is not None:
                on_ready()
            signalled.wait()
            return
        previous = {sig: signal.signal(sig, lambda *_: signalled.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if on_ready is not None:
                on_ready()
            while not signalled.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
        close = getattr(self.app.runs, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_store_dashboard(store_path: Path, task: Task, port: int, host: str = "127.0.0.1",
                          token: LoginToken | None = None) -> DashboardServer:
    """The dashboard of ``fedveil server --dashboard PORT``: watches the run store (no uploads, no run starts)."""
    app = Dashboard(task=task, runs=StoreRunSource(Path(store_path), task), title="fedveil server")
    return DashboardServer(app, port=port, host=host, token=token).start()
