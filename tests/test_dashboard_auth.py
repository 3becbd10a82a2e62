"""The dashboard's login token, tested as an attacker on the same machine would try it.

Loopback is open to every local user and process, so every route (API, pages, assets) must
refuse a request without the token, with a wrong one, and with one that differs from the right
token in a single character; only the login URL may set the cookie; a token put in an API call's
query string must not come back in any answer; no answer may carry a server path or an
exception's text.
"""

from __future__ import annotations

import http.client
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedveil.demo import healthcare
from fedveil.server.dashboard import Dashboard, DashboardServer, StoreRunSource
from fedveil.server.dashboard_auth import MIN_TOKEN_CHARS, DashboardTokenError, LoginToken, cookie_name
from fedveil.server.store import RunStore
from tests.dashboard_helpers import TOKEN, Board, call, files_in, site_csv, upload

ROUTES = [
    ("GET", "api/status"), ("GET", "api/runs"), ("GET", "api/runs/some-run"), ("POST", "api/runs"),
    ("GET", "api/schema"), ("GET", "api/sites"), ("POST", "api/sites/hospital-1/upload?filename=a.csv"),
    ("DELETE", "api/sites/hospital-1/upload"), ("GET", "api/examples"), ("POST", "api/predict"),
    ("GET", "api/no-such-route"), ("HEAD", "api/status"),
]
PAGES = ["", "index.html", "site.html", "predict.html"]
ASSETS = ["app.css", "charts.js", "common.js", "runs.js", "site.js", "predict.js"]


def one_char_off(token: str) -> str:
    """The right token with its middle character changed (same length, same alphabet)."""
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


def exchange(board: Board, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> tuple[int, dict[str, str], list[str], bytes]:
    """One request without following redirects: (status, headers, Set-Cookie values, body)."""
    server = board[0]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, "/" + path, body=body, headers={"X-Fedveil-Request": "1", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.headers.get_all("Set-Cookie") or [], data
    finally:
        conn.close()


@pytest.mark.parametrize("presented", ["none", "wrong", "one_char_off", "empty_bearer", "basic", "other_port_cookie",
                                       "wrong_cookie", "token_as_cookie", "query_string"])
def test_every_route_refuses_a_request_without_the_right_token(board: Board, presented: str) -> None:
    server, _, dirs = board
    assert upload(server.url, "hospital-2", site_csv().encode())[0] == 200
    right = TOKEN.value
    headers = {
        "none": {},
        "wrong": {"Authorization": f"Bearer {LoginToken.generate().value}"},
        "one_char_off": {"Authorization": f"Bearer {one_char_off(right)}"},
        "empty_bearer": {"Authorization": "Bearer "},
        "basic": {"Authorization": f"Basic {right}"},
        "other_port_cookie": {"Cookie": f"{cookie_name(server.port + 1)}={right}"},
        "wrong_cookie": {"Cookie": f"{cookie_name(server.port)}={one_char_off(right)}"},
        "token_as_cookie": {"Cookie": f"{cookie_name(server.port)}={right}"},  # cookies carry sessions only
        "query_string": {},
    }[presented]
    assert len(one_char_off(right)) == len(right) and one_char_off(right) != right
    for method, path in ROUTES:
        if presented == "query_string":  # a token in an API call's URL is not a login
            path += ("&" if "?" in path else "?") + f"token={right}"
        status, head, cookies, body = exchange(board, method, path, headers, b"{}" if method == "POST" else None)
        assert status == 401, (method, path, status, body[:200])
        assert head.get("www-authenticate", "").startswith("Bearer") and not cookies
        if method != "HEAD":
            answer = json.loads(body)
            assert answer["field"] == "token" and "login token" in answer["error"], answer
            assert right not in body.decode()
    for path in PAGES + ASSETS:
        status, head, cookies, body = exchange(board, "GET", path, headers)
        assert status == 401 and not cookies, path
        if path in PAGES:  # a page tells the person at the browser what to do
            assert b"Open the URL that was printed when the dashboard started" in body
            assert head["content-type"].startswith("text/html")
        else:
            assert json.loads(body)["field"] == "token"
    # nothing was written, removed or started by the refused requests
    assert files_in(dirs, "hospital-2") == ["site.csv"] and files_in(dirs, "hospital-1") == []
    assert board[1].list_runs() == []


def test_the_login_url_alone_sets_an_httponly_samesite_cookie_and_drops_the_token(board: Board) -> None:
    server, _, _ = board
    assert server.login_url == f"http://127.0.0.1:{server.port}/?token={TOKEN.value}"
    status, head, cookies, _ = exchange(board, "GET", f"?token={TOKEN.value}")
    assert status == 303 and head["location"] == "/"  # the token leaves the address bar and the history
    (cookie,) = cookies
    parts = [p.strip() for p in cookie.split(";")]
    name, _, session = parts[0].partition("=")
    assert name == cookie_name(server.port) and session
    assert TOKEN.value not in cookie  # a session value, never the token
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts)
    assert head["referrer-policy"] == "no-referrer"
    status, head, _, _ = exchange(board, "GET", f"site.html?token={TOKEN.value}")
    assert status == 303 and head["location"] == "/site.html"
    # the cookie is then a login for pages, assets and the API
    jar = {"Cookie": parts[0]}
    for path in ("", "site.html", "app.css", "api/status"):
        status, _, cookies, body = exchange(board, "GET", path, jar)
        assert status == 200 and not cookies, path
    # no other answer sets a cookie: a wrong login, an API call with the token, a plain page
    for path, headers in [(f"?token={one_char_off(TOKEN.value)}", {}), (f"?token={TOKEN.value}&token=x", {}),
                          ("?token=", {}), (f"api/status?token={TOKEN.value}", {}),
                          ("api/status", {"Authorization": f"Bearer {TOKEN.value}"}), ("", jar)]:
        status, _, cookies, body = exchange(board, "GET", path, headers)
        assert not cookies, path
        assert TOKEN.value not in body.decode(), path
        if "token=" in path:
            assert status == 401, path


def test_a_token_in_an_api_query_string_never_comes_back(board: Board, caplog: pytest.LogCaptureFixture) -> None:
    server, _, _ = board
    secret = TOKEN.value
    for path in ["api/runs/nope", "api/nope", "api/sites/hospital-9/upload", "api/status"]:
        status, res = call(f"{server.url}{path}?token={secret}&filename={secret}.csv")
        assert status in (200, 404, 405), (path, status, res)
        assert secret not in json.dumps(res), res
    assert secret not in caplog.text


def test_upload_and_hospital_replies_carry_no_server_path(board: Board) -> None:
    server, _, dirs = board
    status, res = upload(server.url, "hospital-1", site_csv().encode())
    assert status == 200 and res["site"] == "hospital-1" and res["rows"] == 20
    _, listing = call(server.url + "api/sites")
    for text in (json.dumps(res), json.dumps(listing)):
        assert str(dirs.root) not in text and str(Path.home()) not in text and "/tmp" not in text


def test_an_internal_error_is_a_500_with_a_request_id_and_no_exception_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A store damaged under a running dashboard (another process dropped a table): the answer says
    only that an internal error was logged; the traceback goes to the server's log."""
    store = tmp_path / "runs.sqlite"
    RunStore(store).close()
    app = Dashboard(task=healthcare.task, runs=StoreRunSource(store, healthcare.task))
    with DashboardServer(app, token=TOKEN) as server:
        assert call(server.url + "api/runs") == (200, {"runs": []})
        with sqlite3.connect(store) as conn:
            conn.execute("DROP TABLE runs")
        with caplog.at_level(logging.ERROR, logger="fedveil.dashboard"):
            status, res = call(server.url + f"api/runs?token={TOKEN.value}")
    assert status == 500, res
    assert set(res) == {"error", "request_id"}
    assert res["error"] == f"internal error (logged; request {res['request_id']})"
    text = json.dumps(res)
    for leak in ("OperationalError", "no such table", "sqlite", str(tmp_path), "Traceback"):
        assert leak not in text
    assert f"request {res['request_id']}" in caplog.text and "no such table: runs" in caplog.text
    assert TOKEN.value not in caplog.text


def test_generated_tokens_and_token_files() -> None:
    tokens = {LoginToken.generate().value for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 43 for t in tokens)  # 32 random bytes, URL-safe base64
    token = LoginToken.generate()
    assert token.value not in repr(token) and token.value not in str(token) and token.value not in f"{token!r}"
    assert token.matches(token.value) and not token.matches(one_char_off(token.value)) and not token.matches(None)
    assert not token.matches(token.value + "x") and not token.matches("") and not token.matches(token.value[:-1])
    with pytest.raises(DashboardTokenError, match="got 12 characters"):
        LoginToken("abcdefghijkl")
    with pytest.raises(DashboardTokenError, match="some of them others"):
        LoginToken("a" * MIN_TOKEN_CHARS + " b")


def test_a_token_file_is_checked_without_echoing_its_content(tmp_path: Path) -> None:
    from fedveil.cli import main

    good = tmp_path / "good.token"
    good.write_text("  " + "x" * 40 + "\n")
    assert LoginToken.from_file(good).value == "x" * 40
    short = tmp_path / "short.token"
    short.write_text("hunter2hunter2")
    with pytest.raises(DashboardTokenError) as err:
        LoginToken.from_file(short)
    assert "hunter2" not in str(err.value)
    with pytest.raises(DashboardTokenError, match="cannot read"):
        LoginToken.from_file(tmp_path / "missing.token")
    store = tmp_path / "runs.sqlite"
    RunStore(store).close()
    argv = ["dashboard", "--store", str(store), "--task", "fedveil.demo.healthcare:task", "--port", "0",
            "--dashboard-token-file", str(short)]
    assert main(argv) == 2


def test_fedveil_server_refuses_a_token_file_without_a_dashboard(tmp_path: Path, capsys: Any) -> None:
    from fedveil.cli import main

    (tmp_path / "t").write_text("y" * 40)
    code = main(["server", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s.db"), "--task",
                 "fedveil.tasks.synthetic:task", "--rounds", "1", "--clients-per-round", "2", "--insecure",
                 "--dashboard-token-file", str(tmp_path / "t")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --dashboard-token-file:")
