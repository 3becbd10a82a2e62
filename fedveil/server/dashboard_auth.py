"""Who may use the dashboard: one login token per dashboard, presented as Jupyter's is.

The dashboard binds to loopback, but loopback is shared by every local user and process: without
a secret any of them could read the runs, upload or delete a site's data, start runs and ask
for predictions. So each dashboard has a login token: 256 bits from :mod:`secrets`, made at
start-up (or read from a file the operator supplies for scripted use, never from the command
line, where ``ps`` would show it). The command prints it once, inside the login URL
``http://127.0.0.1:PORT/?token=...``; it is never logged.

- Opening a page with ``?token=`` (the login URL) sets an ``HttpOnly``, ``SameSite=Strict`` cookie
  and redirects to the same page without the token, so the token does not stay in the address
  bar or the history. The cookie holds a fresh random session value (:class:`LoginSessions`),
  never the token: cookies are scoped by host, not port, so a browser also sends them to any
  other server on 127.0.0.1; the session value lets whoever catches it in only until this
  dashboard process ends, while the token itself never leaves the login URL. The cookie is named
  after the port, so two dashboards do not overwrite each other's.
- Every other request (pages, assets, API) must carry a session cookie or ``Authorization: Bearer
  <token>``; a token in an API call's query string is not accepted (it would end up in logs and
  histories). Otherwise: 401, with ``{"error": ..., "field": "token"}`` for the API and a short
  page pointing at the start-up URL for pages.
- The ``Cookie`` header is split on ``;`` and ``=`` here, not by :mod:`http.cookies`, so another
  local application's cookies (with spaces, quotes, JSON or non-ASCII text) cannot hide this one.

Tokens and session values are compared as SHA-256 digests with :func:`hmac.compare_digest`, so the
comparison takes the same time wherever a guess differs, and for guesses of any length; only the
sessions' digests are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from fedveil.errors import FedveilError

TOKEN_BYTES = 32
"""Random bytes in a generated token (256 bits; URL-safe base64, 43 characters)."""
MIN_TOKEN_CHARS = 32
"""Shortest token accepted from a file (32 characters of the alphabet below: at least 128 bits if random)."""
MAX_TOKEN_CHARS = 256
_TOKEN_ALPHABET = re.compile(r"^[A-Za-z0-9._~-]+$")
"""Characters that need no escaping in a URL, a cookie or a header."""
COOKIE_PREFIX = "fedveil-dashboard-"
UNAUTHORIZED_MESSAGE = (
    "this dashboard needs its login token: open the URL printed when it started "
    "(http://127.0.0.1:PORT/?token=...), or send 'Authorization: Bearer <token>'"
)
UNAUTHORIZED_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedveil dashboard: log in</title></head>
<body><h1>Log in to the fedveil dashboard</h1>
<p>This dashboard needs its login token. Open the URL that was printed when the dashboard started,
<code>http://127.0.0.1:PORT/?token=...</code> (on the console of <code>fedveil demo</code>,
<code>fedveil server --dashboard</code> or <code>fedveil dashboard</code>).</p></body></html>
"""


class DashboardTokenError(FedveilError, ValueError):
    """A token file that cannot be used; the message never contains the token."""


class LoginToken:
    """The dashboard's secret. ``repr`` and ``str`` never show it; :attr:`value` does."""

    __slots__ = ("_digest", "_value")

    def __init__(self, value: str) -> None:
        if not MIN_TOKEN_CHARS <= len(value) <= MAX_TOKEN_CHARS or not _TOKEN_ALPHABET.match(value):
            raise DashboardTokenError(
                f"the token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters of A-Z a-z 0-9 . _ ~ - "
                f"(got {len(value)} characters{'' if _TOKEN_ALPHABET.match(value or 'x') else ', some of them others'})"
            )
        self._value = value
        self._digest = hashlib.sha256(value.encode("ascii")).digest()

    @classmethod
    def generate(cls) -> LoginToken:
        return cls(secrets.token_urlsafe(TOKEN_BYTES))

    @classmethod
    def from_file(cls, path: Path) -> LoginToken:
        """The token in ``path`` (surrounding whitespace ignored), for scripted use."""
        try:
            text = path.read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise DashboardTokenError(f"{str(path)!r} holds characters other than ASCII") from None
        except OSError as err:
            raise DashboardTokenError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
        return cls(text.strip())

    @property
    def value(self) -> str:
        return self._value

    def matches(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is this token, in time independent of where (or whether) it differs."""
        if candidate is None:
            return False
        return hmac.compare_digest(_digest(candidate), self._digest)

    def __repr__(self) -> str:
        return "LoginToken(<redacted>)"

    __str__ = __repr__


def cookie_name(port: int) -> str:
    return f"{COOKIE_PREFIX}{port}"


MAX_SESSIONS = 64
"""Logins remembered at once; the oldest is forgotten (that browser logs in again with the URL)."""


class LoginSessions:
    """The session values handed out by successful logins, kept only as SHA-256 digests in this
    process's memory: they end with it (or when :data:`MAX_SESSIONS` newer logins push them out)."""

    def __init__(self) -> None:
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> str:
        """A new random session value (256 bits) for a login cookie."""
        value = secrets.token_urlsafe(TOKEN_BYTES)
        with self._lock:
            self._digests[_digest(value)] = None
            while len(self._digests) > MAX_SESSIONS:
                self._digests.popitem(last=False)
        return value

    def matches(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is a live session value; every digest is compared in constant time."""
        if not candidate:
            return False
        digest = _digest(candidate)
        with self._lock:
            known = list(self._digests)
        found = False
        for d in known:
            found |= hmac.compare_digest(digest, d)
        return found

    def __repr__(self) -> str:
        return f"LoginSessions(<{len(self._digests)} redacted>)"


def _digest(candidate: str) -> bytes:
    """What tokens and session values are compared (and sessions kept) as: SHA-256 of the text
    (any text a request carries, undecodable bytes included)."""
    return hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()


def login_cookie(session: str, port: int) -> str:
    """The ``Set-Cookie`` value of a successful login: a session value (never the token) in a cookie
    scripts cannot read and that other sites' requests never carry."""
    return f"{cookie_name(port)}={session}; Path=/; HttpOnly; SameSite=Strict"


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def cookie_values(cookie_headers: Sequence[str], name: str) -> list[str]:
    """Every value of the cookie ``name`` in these ``Cookie`` headers.

    Split on ``;`` and the first ``=`` of each pair, leniently: a pair that is not
    ``name=value``, or whose value holds spaces, quotes, JSON or non-ASCII text (another
    application's cookie on this host), is skipped and never hides the others.
    """
    found = []
    for header in cookie_headers:
        for pair in header.split(";"):
            key, eq, value = pair.partition("=")
            if eq and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if value:
                    found.append(value)
    return found
