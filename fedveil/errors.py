"""The root of every error fedveil raises on purpose: :class:`FedveilError`.

One root lets an application catch fedveil's refusals in one ``except`` clause, apart from
programming errors, while each subclass keeps the builtin base it always had (``ValueError`` for
bad input, ``RuntimeError`` for a state that cannot go on), so existing ``except ValueError``
code keeps working. ``field`` names the input at fault where there is one: a config field, a
message field or a policy key. The CLI maps it to its flag; it never parses the message.

This module imports nothing, so even the pure engines (``fedveil.secagg``, ``fedveil.dp``) may
derive from it without depending on the rest of the package.
"""

from __future__ import annotations

__all__ = ["FedveilError"]


class FedveilError(Exception):
    """Base class of fedveil's errors; ``field`` is the name of the input at fault, or None."""

    field: str | None = None

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        if field is not None:
            self.field = field
