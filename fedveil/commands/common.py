"""Shared helpers for CLI commands: one-line usage errors with exit status 2, JSON output, and
leaving a process within a deadline."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fedveil.errors import FedveilError

if TYPE_CHECKING:
    from fedveil.server.dashboard_auth import LoginToken

USAGE_EXIT_CODE = 2


class CliUsageError(FedveilError, click.UsageError):
    """A bad argument: printed as one line naming the parameter, exit status 2."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param_name = param


#: Upper bound for --threads (torch takes a C int; more threads than this helps nobody).
MAX_THREADS = 1024


def fail(param: str, message: str) -> NoReturn:
    """Abort the command because ``param`` is invalid (one-line error, exit status 2)."""
    raise CliUsageError(param, message)


def flag_of(field: str | None, default: str) -> str:
    """The flag of a library error's ``field`` (``tls_cert`` → ``--tls-cert``): every command's
    flags are named after the fields they set, so the mapping is this rule, never a message parse."""
    return "--" + field.replace("_", "-") if field else default


def file_key(section: str, field: str, flag: str, path: object) -> str:
    """How an error names a value a settings file gave: ``section.key in --flag FILE`` (the job file, the
    site policy), as the file's own type errors name it."""
    return f"{section}.{field} in {flag} {path}"


def fail_from(err: FedveilError, default: str) -> NoReturn:
    """Abort the command on a library refusal, naming the flag of its ``field`` (else ``default``)."""
    fail(flag_of(err.field, default), str(err))


def print_json_last_line(payload: dict[str, Any]) -> None:
    """Print exactly one JSON object on a single line (the command's last line). An infinite or NaN
    number (an ε without noise) is null: ``Infinity`` is not JSON, and jq read it as a finite 1.8e308."""
    click.echo(json.dumps(_finite_json(payload), sort_keys=True, default=_json_default, allow_nan=False))


def _finite_json(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value


def finite_or_none(value: float) -> float | None:
    """``value``, or None where JSON has no number for it (an infinite or NaN ε)."""
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


DASHBOARD_TOKEN_FILE = "--dashboard-token-file"  # noqa: S105 (a flag name, not a secret)

dashboard_token_option = click.option(
    DASHBOARD_TOKEN_FILE, "dashboard_token_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
    help="Read the dashboard's login token from FILE (32+ characters of A-Z a-z 0-9 . _ ~ -) instead of "
         "generating one; for scripts. Never give the token on the command line.",
)


def read_dashboard_token(path: Path | None) -> LoginToken | None:
    """The login token in ``--dashboard-token-file``, or None (the dashboard then generates one)."""
    if path is None:
        return None
    from fedveil.server.dashboard_auth import DashboardTokenError, LoginToken

    try:
        return LoginToken.from_file(path)
    except DashboardTokenError as err:
        fail(DASHBOARD_TOKEN_FILE, str(err))


def eprint(message: str) -> None:
    print(message, file=sys.stderr)


EXIT_DEADLINE_S = 10.0
"""How long :func:`exit_within` lets threads still running finish before the process ends anyway."""


def exit_within(code: int, deadline_s: float = EXIT_DEADLINE_S) -> NoReturn:
    """End this process with ``code`` within about ``deadline_s`` seconds, whatever still runs.

    For a command whose work is done (``fedveil server`` after its summary). Python's own exit
    waits without limit for every non-daemon thread, and gRPC's handler pool is one
    (:mod:`concurrent.futures` joins its workers at exit), so one handler that never returns (a
    call a peer holds open, a write to a stderr nobody reads) would keep a finished server alive;
    after them, tearing down gRPC's C core waits for calls still in flight. Here the threads get
    ``deadline_s`` to finish; any still running are named in a WARNING with where they are, output
    is flushed, and the process ends with :func:`os._exit` (the store and its lock are closed
    already). A watchdog ends it even if flushing blocks.
    """
    watchdog = threading.Timer(deadline_s + 5.0, os._exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    deadline = time.monotonic() + deadline_s
    me = threading.current_thread()
    pending = [t for t in threading.enumerate() if t is not me and t is not watchdog and not t.daemon]
    for thread in pending:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in pending if t.is_alive()]
    if stuck:
        frames = sys._current_frames()
        logging.getLogger("fedveil").warning(
            "exiting with %d thread(s) still running %.0f s after the work ended: %s", len(stuck), deadline_s,
            "; ".join(f"{t.name} in {_where(frames.get(t.ident or -1))}" for t in stuck))
    for flush in [h.flush for h in logging.getLogger().handlers] + [sys.stdout.flush, sys.stderr.flush]:
        try:
            flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def _where(frame: FrameType | None) -> str:
    """The innermost frame of a stuck thread, as ``function (file:line)``."""
    if frame is None:
        return "?"
    return f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"


def load_pinned_authority(authority_path: Path | None, revocations_path: Path | None) -> tuple[Any, Any]:
    """``--authority`` (the consortium authority's public file) and ``--revocations`` (its signed list,
    checked against that key): ``(PinnedAuthority | None, RevocationList | None)``; errors name the flag."""
    from fedveil.protocol.identity_files import IdentityFileError, load_authority_public, load_revocations
    from fedveil.secagg.errors import IdentityError
    from fedveil.secagg.identity import verify_revocations

    if revocations_path is not None and authority_path is None:
        fail("--revocations", "needs --authority (the list is checked against the authority's key)")
    if authority_path is None:
        return None, None
    try:
        pinned = load_authority_public(authority_path)
    except IdentityFileError as err:
        fail("--authority", str(err))
    revocations = None
    if revocations_path is not None:
        try:
            revocations = load_revocations(revocations_path)
            verify_revocations(pinned.public_key, revocations, consortium=pinned.consortium)
        except (IdentityFileError, IdentityError) as err:
            fail("--revocations", str(err))
    return pinned, revocations
