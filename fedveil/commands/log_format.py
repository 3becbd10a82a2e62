"""How a command writes its log: plain text for people (the default) or JSON lines for log
shippers (``--log-format json``).

A JSON line is one object: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message`` (the formatted message), ``exception`` when a traceback was logged, and every
structured field the call passed with ``extra=`` (values that JSON cannot hold are written with
``str``). Nothing else is added, so a line carries what the text line would, and no more: the
code never logs tokens, keys or shares, and neither format can add them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import click

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
"""Attributes every LogRecord has: anything else on a record came from ``extra=``."""

log_format_option = click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
    help="Log lines on stderr as text, or as one JSON object per line (time, level, logger, message and "
         "structured fields) for log shippers.",
)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False, allow_nan=True)


def configure_logging(level: str, log_format: str = "text", *, text_format: str = TEXT_FORMAT) -> None:
    """Send the root logger's records at ``level`` and above to stderr in ``log_format`` (like
    :func:`logging.basicConfig`, it leaves a root logger that already has handlers alone)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
