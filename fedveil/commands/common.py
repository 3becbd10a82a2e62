"""Shared helpers for CLI commands: one-line usage errors with exit status 2, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

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


def eprint(message: str) -> None:
    print(message, file=sys.stderr)
