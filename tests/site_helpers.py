"""Transport wrappers for tests of sites that misbehave (or whose reports a test wants to vary).

They wrap any transport (``InProcessTransport`` or ``GrpcTransport``) used by a protocol client such as
``tests.server_helpers.Scripted``, so tests reuse the helpers' protocol steps instead of repeating them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Renumbered:
    """A site's transport that numbers every request itself, so a test may send extra requests (with
    :meth:`next_sequence`) outside the site's ``ClientSession`` and its later requests still count up.

    ``before``: RPC method name → hook called with the (renumbered) request just before it is sent."""

    def __init__(self, inner: Any, before: dict[str, Callable[[Any], None]] | None = None) -> None:
        self._inner = inner
        self._before = dict(before or {})
        self._sequence = 0
        self._lock = threading.Lock()

    def next_sequence(self) -> int:
        with self._lock:
            self._sequence += 1
            return self._sequence

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(request: Any, *args: Any, **kwargs: Any) -> Any:
            if hasattr(request, "header"):
                request.header.sequence = self.next_sequence()
            hook = self._before.get(name)
            if hook is not None:
                hook(request)
            return attr(request, *args, **kwargs)

        return call
