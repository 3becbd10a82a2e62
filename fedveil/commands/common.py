"""Shared helpers for CLI commands: one-line usage errors with exit status 2, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from fedveil.server.dashboard_auth import LoginToken

USAGE_EXIT_CODE = 2


class CliUsageError(click.UsageError):
    """A bad argument: printed as one line naming the parameter, exit status 2."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param_name = param


#: Upper bound for --threads (torch takes a C int; more threads than this helps nobody).
MAX_THREADS = 1024


def fail(param: str, message: str) -> NoReturn:
    """Abort the command because ``param`` is invalid (one-line error, exit status 2)."""
    raise CliUsageError(param, message)


def print_json_last_line(payload: dict[str, Any]) -> None:
    """Print exactly one JSON object on a single line (the command's last line)."""
    click.echo(json.dumps(payload, sort_keys=True, default=_json_default))


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
