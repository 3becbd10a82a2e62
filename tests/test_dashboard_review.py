"""The dashboard against the findings of its attack review (2026-12-06), tested as the attacker tried them.

- A header of a hundred thousand columns was checked for duplicates in quadratic time, on the
  event loop: one upload froze every other request. It is now refused at the column limit, in
  linear time, and an upload is parsed on a worker thread while other requests are answered.
- No page may frame the dashboard (clickjacking from another server on 127.0.0.1).
- A round beyond SQLite's integers is a 4xx naming ``round`` (see test_dashboard_model_download).
- Another local application's cookie, unparsable for :mod:`http.cookies`, locked the user out;
  and the login cookie held the login token itself, sent to every port of 127.0.0.1.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedveil.demo import healthcare
from fedveil.server.dashboard import Dashboard, DashboardServer, MemoryRunSource, SiteDataDirs
from fedveil.server.dashboard_auth import MAX_SESSIONS, LoginSessions, cookie_name
from fedveil.task import ColumnSpec, DataSchema, SchemaError
from tests.dashboard_helpers import HOSPITALS, TOKEN, Board, call, files_in, site_csv, upload

WIDE = 100_000
"""Columns in the attacker's header: quadratic work took about 8 s for this many, linear takes milliseconds."""


def exchange(port: int, path: str, headers: dict[str, Any] | None = None) -> tuple[int, dict[str, str], list[str]]:
    """One GET without following redirects: (status, headers, Set-Cookie values)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.headers.get_all("Set-Cookie") or []
    finally:
        conn.close()


def log_in(port: int, page: str = "") -> str:
    """The ``name=value`` pair of the cookie the login URL sets."""
    status, _, cookies = exchange(port, f"{page}?token={TOKEN.value}")
    assert status == 303, status
    (cookie,) = cookies
    return cookie.split(";")[0].strip()


@pytest.fixture
def wide_board(tmp_path: Path) -> Iterator[tuple[DashboardServer, SiteDataDirs]]:
    """A dashboard with the default upload limit (2 MiB), room for a very wide header."""
    dirs = SiteDataDirs(tmp_path / "hospitals", HOSPITALS, healthcare.task)
    server = DashboardServer(Dashboard(task=healthcare.task, runs=MemoryRunSource(), sites=dirs),
                             port=0, token=TOKEN).start()
    try:
        yield server, dirs
    finally:
        server.stop()


# 1. the header check -----------------------------------------------------------------------------

def test_a_very_wide_header_is_refused_at_the_column_limit_in_linear_time() -> None:
    header = ",".join(["x"] * WIDE)  # every column a duplicate: the worst case of the old check
    started = time.perf_counter()
    with pytest.raises(SchemaError, match=rf"too many columns in the header \({WIDE}; the limit is 10000\)"):
        healthcare.SCHEMA.parse_csv(header + "\n" + header + "\n")
    assert time.perf_counter() - started < 5
    # at the limit, duplicates are still found and named (counted once each, linearly)
    at_limit = ",".join([f"c{i % 5000}" for i in range(10_000)])
    started = time.perf_counter()
    with pytest.raises(SchemaError, match="duplicate columns in the header: 'c0', 'c1', 'c10'"):
        healthcare.SCHEMA.parse_csv(at_limit + "\n")
    assert time.perf_counter() - started < 5


def test_the_column_limit_never_refuses_the_schemas_own_columns() -> None:
    schema = DataSchema(features=(ColumnSpec("a"), ColumnSpec("b")), label=ColumnSpec("y", "binary"), max_columns=1)
    features, labels = schema.parse_csv("a,b,y\n1,2,0\n")
    assert features.shape == (1, 2) and labels.tolist() == [0.0]
    with pytest.raises(SchemaError, match=r"too many columns in the header \(4; the limit is 3\)"):
        schema.parse_csv("a,b,y,z\n1,2,0,3\n")


def test_a_very_wide_upload_is_a_prompt_400_and_the_dashboard_keeps_answering(
    wide_board: tuple[DashboardServer, SiteDataDirs],
) -> None:
    server, dirs = wide_board
    body = (",".join(f"c{i}" for i in range(WIDE)) + "\n").encode()
    assert len(body) < dirs.max_bytes
    status, res = upload(server.url, "hospital-1", body)
    assert status == 400 and f"too many columns in the header ({WIDE}; the limit is 10000)" in res["error"], res
    assert files_in(dirs, "hospital-1") == []
    assert call(server.url + "api/status")[0] == 200


def test_another_request_is_answered_while_an_upload_is_being_parsed(
    board: Board, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upload's parse is held until ``/api/status`` has been answered (for at most 5 s): with the
    parse on the event loop, the status call waits for it and the order comes out reversed."""
    server, _, dirs = board
    parse = DataSchema.parse_csv
    started, released = threading.Event(), threading.Event()
    order: list[str] = []

    def held_parse(self: DataSchema, data: bytes | str | Path) -> Any:
        if isinstance(data, bytes):  # the upload, not a listing of the sites
            started.set()
            released.wait(5)
            order.append("upload parsed")
        return parse(self, data)

    monkeypatch.setattr(DataSchema, "parse_csv", held_parse)
    answer: list[tuple[int, Any]] = []
    uploader = threading.Thread(target=lambda: answer.append(upload(server.url, "hospital-1", site_csv().encode())))
    uploader.start()
    try:
        assert started.wait(10)
        status, st = call(server.url + "api/status")
        order.append("status answered")
        assert status == 200 and st["sites"] == list(HOSPITALS)
    finally:
        released.set()
        uploader.join(15)
    assert order == ["status answered", "upload parsed"]
    assert answer and answer[0][0] == 200 and answer[0][1]["rows"] == 20
    assert files_in(dirs, "hospital-1") == ["site.csv"]


def test_listing_the_sites_parses_a_file_again_only_when_it_changed(
    board: Board, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _, _ = board
    parse = DataSchema.parse_csv
    parsed: list[Path] = []

    def counted(self: DataSchema, data: bytes | str | Path) -> Any:
        if isinstance(data, Path):
            parsed.append(data)
        return parse(self, data)

    monkeypatch.setattr(DataSchema, "parse_csv", counted)
    assert upload(server.url, "hospital-1", site_csv(20).encode())[0] == 200
    for _ in range(3):
        status, res = call(server.url + "api/sites")
        assert status == 200 and res["sites"][0] == {"name": "hospital-1", "has_upload": True, "rows": 20,
                                                     "error": None}
    assert len(parsed) == 1
    assert upload(server.url, "hospital-1", site_csv(12).encode())[0] == 200  # a new file: parsed again
    assert call(server.url + "api/sites")[1]["sites"][0]["rows"] == 12 and len(parsed) == 2
    assert call(server.url + "api/sites/hospital-1/upload", "DELETE")[1] == {"removed": True}
    assert call(server.url + "api/sites")[1]["sites"][0] == {"name": "hospital-1", "has_upload": False, "rows": None,
                                                             "error": None}


# 2. framing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["", "site.html", "predict.html", "api/status", "app.css", "nope.html"])
def test_no_page_may_frame_the_dashboard(board: Board, path: str) -> None:
    server = board[0]
    for headers in ({"Authorization": f"Bearer {TOKEN.value}"}, {}):  # granted and refused answers alike
        _, head, _ = exchange(server.port, path, headers)
        assert "frame-ancestors 'none'" in head["content-security-policy"], (path, head)
        assert head["x-frame-options"] == "DENY", (path, head)


# 4. the login cookie ------------------------------------------------------------------------------

FOREIGN_COOKIES = [
    'prefs={"theme":"dark"}', "greeting=hello world", 'quoted="unterminated', "path=C:\\temp", "name=ünïcødé",
    "flag", "=", "", " ; ", "a=b=c", "fedveil-dashboard-1=other", "__Host-x=1",
]


@pytest.mark.parametrize("foreign", FOREIGN_COOKIES)
def test_another_apps_cookie_never_hides_the_login_cookie(board: Board, foreign: str) -> None:
    server = board[0]
    mine = log_in(server.port)
    for header in (f"{foreign}; {mine}", f"{mine}; {foreign}", f"{foreign};{mine};{foreign}"):
        for path in ("", "site.html", "app.css", "api/status"):
            status, _, _ = exchange(server.port, path, {"Cookie": header.encode("utf-8")})
            assert status == 200, (header, path, status)
    # and two Cookie headers (HTTP/2 proxies split them), the foreign one first
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("GET", "/api/status")
        conn.putheader("Cookie", foreign.encode("utf-8"))
        conn.putheader("Cookie", mine)
        conn.endheaders()
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_the_login_cookie_is_a_session_value_never_the_token(board: Board, tmp_path: Path) -> None:
    server = board[0]
    name = cookie_name(server.port)
    first, second = log_in(server.port), log_in(server.port, "site.html")
    for pair in (first, second):
        key, _, value = pair.partition("=")
        assert key == name and len(value) >= 43
        assert value != TOKEN.value and TOKEN.value not in value
    assert first != second  # a fresh value per login
    for pair in (first, second):
        assert exchange(server.port, "api/status", {"Cookie": pair})[0] == 200
    # the token in a cookie is not a login: the token belongs in the login URL or a Bearer header
    assert exchange(server.port, "api/status", {"Cookie": f"{name}={TOKEN.value}"})[0] == 401
    assert exchange(server.port, "api/status", {"Cookie": f"{name}={first.partition('=')[2]}x"})[0] == 401
    # a session lives only in its dashboard's process: another dashboard with the same token refuses it
    other = DashboardServer(Dashboard(task=healthcare.task, runs=MemoryRunSource()), port=0, token=TOKEN).start()
    try:
        stolen = f"{cookie_name(other.port)}={first.partition('=')[2]}"
        assert exchange(other.port, "api/status", {"Cookie": stolen})[0] == 401
        assert exchange(other.port, "api/status", {"Authorization": f"Bearer {TOKEN.value}"})[0] == 200
    finally:
        other.stop()


def test_sessions_are_kept_as_digests_and_the_oldest_forgotten() -> None:
    sessions = LoginSessions()
    values = [sessions.issue() for _ in range(MAX_SESSIONS + 1)]
    assert len(set(values)) == len(values)
    assert not sessions.matches(values[0])  # pushed out by newer logins
    assert all(sessions.matches(v) for v in values[1:])
    assert not sessions.matches(None) and not sessions.matches("") and not sessions.matches(values[-1] + "x")
    assert all(v not in repr(sessions) for v in values)
    assert all(v.encode() not in d for v in values for d in sessions._digests)
