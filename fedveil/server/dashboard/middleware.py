"""The dashboard's guards, as ASGI middleware in front of every route.

In order: only GET, HEAD, POST and DELETE; the ``Host`` must name the bound address (against DNS
rebinding); no chunked bodies and no JSON body over :data:`MAX_JSON_BYTES` (uploads have their own
limit, enforced while streaming); the login URL (a page with ``?token=``) sets a session cookie;
every other request must present that cookie or the login token
(:mod:`fedveil.server.dashboard_auth`); POST and DELETE need the ``X-Fedveil-Request: 1`` header,
which a page on another origin cannot send without a CORS preflight this server never grants
(against cross-site request forgery). Every answer carries the security headers (no page may
frame the dashboard, against clickjacking), and an error answer closes the connection, so an
unread body is never taken for the next request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedveil.server.dashboard_auth import (
    UNAUTHORIZED_MESSAGE,
    UNAUTHORIZED_PAGE,
    LoginSessions,
    LoginToken,
    bearer_token,
    cookie_name,
    cookie_values,
    login_cookie,
)

REQUEST_HEADER = "X-Fedveil-Request"
ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
ALLOWED_METHODS = ("GET", "HEAD", "POST", "DELETE")
MAX_JSON_BYTES = 64 * 1024
HTML = "text/html; charset=utf-8"
SECURITY_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    # no page may frame the dashboard (clickjacking; default-src does not cover frame-ancestors)
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # a login URL must never travel in a Referer
)


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


async def _answer(send: Send, status: int, body: bytes, content_type: str,
                  extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str, **fields: str) -> None:
    await _answer(send, status, json.dumps({"error": message, **fields}).encode(), "application/json")


class SecurityHeaders:
    """Adds the security headers to every answer, and ``Connection: close`` to every 4xx/5xx one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                headers.extend(SECURITY_HEADERS)
                if message["status"] >= 400:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestGuard:
    """Methods, ``Host`` and request framing: refused before the token is even looked at."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in ALLOWED_METHODS:
            await _error(send, HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} is not supported")
            return
        host = (_headers(scope, b"host") or [""])[0].rsplit(":", 1)[0].strip("[]")
        bound = str((scope.get("server") or ("",))[0])
        if host not in ALLOWED_HOSTS and host != bound:
            await _error(send, HTTPStatus.FORBIDDEN, f"unexpected Host header {host[:60]!r}")
            return
        if _headers(scope, b"transfer-encoding"):
            await _error(send, HTTPStatus.LENGTH_REQUIRED,
                         "chunked request bodies are not supported; send a Content-Length")
            return
        length = (_headers(scope, b"content-length") or ["0"])[0].strip()
        if not length.isdigit():
            await _error(send, HTTPStatus.BAD_REQUEST, f"bad Content-Length {length[:30]!r}")
            return
        if int(length) > MAX_JSON_BYTES and not scope["path"].endswith("/upload"):
            await _error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"the request body is too large ({length} bytes; the limit is {MAX_JSON_BYTES})")
            return
        if method == "HEAD":  # answered as GET, without the body
            await self.app({**scope, "method": "GET"}, receive, _without_body(send))
            return
        await self.app(scope, receive, send)


def _without_body(send: Send) -> Send:
    async def send_headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers_only


class LoginGuard:
    """The login token on every request (see :mod:`fedveil.server.dashboard_auth`); the login URL sets its cookie."""

    def __init__(self, app: ASGIApp, token: LoginToken, pages: Iterable[str],
                 sessions: LoginSessions | None = None) -> None:
        self.app = app
        self.token = token
        self.pages = frozenset(pages)
        self.sessions = sessions if sessions is not None else LoginSessions()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        port = int((scope.get("server") or ("", 0))[1] or 0)
        page = scope["path"] in self.pages
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if page and scope["method"] in ("GET", "HEAD") and "token" in query:
            candidates = query["token"]
            if len(candidates) == 1 and self.token.matches(candidates[0]):
                await _answer(send, HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8",
                              [(b"location", scope["path"].encode()),
                               (b"set-cookie", login_cookie(self.sessions.issue(), port).encode())])
                return
        else:
            bearer = bearer_token((_headers(scope, b"authorization") or [""])[0])
            sessions = cookie_values(_headers(scope, b"cookie"), cookie_name(port))
            if self.token.matches(bearer) or any(self.sessions.matches(v) for v in sessions):
                await self.app(scope, receive, send)
                return
        challenge = [(b"www-authenticate", b'Bearer realm="fedveil dashboard"')]
        if page:
            await _answer(send, HTTPStatus.UNAUTHORIZED, UNAUTHORIZED_PAGE, HTML, challenge)
        else:
            body = json.dumps({"error": UNAUTHORIZED_MESSAGE, "field": "token"}).encode()
            await _answer(send, HTTPStatus.UNAUTHORIZED, body, "application/json", challenge)


class CsrfGuard:
    """POST and DELETE only with ``X-Fedveil-Request: 1`` (cross-site pages cannot set it without a preflight)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "DELETE"):
            if _headers(scope, REQUEST_HEADER.lower().encode()) != ["1"]:
                await _error(send, HTTPStatus.FORBIDDEN, f"state-changing requests need the {REQUEST_HEADER} header")
                return
        await self.app(scope, receive, send)
