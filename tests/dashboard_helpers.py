"""Shared pieces of the dashboard API tests: a dashboard with known hospitals and login token,
and plain-HTTP helpers that log in with ``Authorization: Bearer`` unless told otherwise."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fedveil.demo import healthcare
from fedveil.demo.data import make_split
from fedveil.server.dashboard import Dashboard, DashboardServer, MemoryRunSource, SiteDataDirs
from fedveil.server.dashboard_auth import LoginToken

HOSPITALS = ("hospital-1", "hospital-2")
TOKEN = LoginToken.generate()
Board = tuple[DashboardServer, MemoryRunSource, SiteDataDirs]


def call(url: str, method: str = "GET", body: bytes | None = None, ctype: str = "application/json", *,
         token: str | None = TOKEN.value, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; ``token=None`` sends none. Returns (status, parsed JSON or text)."""
    sent = {"Content-Type": ctype, "X-Fedveil-Request": "1", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw, status, kind = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        raw, status, kind = err.read(), err.code, err.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    runs = MemoryRunSource()
    dirs = SiteDataDirs(tmp_path / "hospitals", HOSPITALS, healthcare.task, max_bytes=20_000)
    app = Dashboard(
        task=healthcare.task, runs=runs, sites=dirs, assessor=lambda m, x: healthcare.assess(m, x).to_dict()
    )
    server = DashboardServer(app, port=0, token=TOKEN).start()
    try:
        yield server, runs, dirs
    finally:
        server.stop()


def site_csv(rows: int = 20) -> str:
    h = make_split(5, 0).hospitals[1]
    return healthcare.SCHEMA.to_csv(h.features[:rows], h.labels[:rows])


def upload(url: str, hospital: str, body: bytes, filename: str = "site.csv", *,
           token: str | None = TOKEN.value) -> tuple[int, Any]:
    return call(f"{url}api/sites/{hospital}/upload?filename={filename}", "POST", body, "text/csv", token=token)


def files_in(dirs: SiteDataDirs, hospital: str) -> list[str]:
    d = dirs.root / hospital
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes on one connection and return everything the server sends until it closes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError("the server kept the connection open after a refused request") from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
