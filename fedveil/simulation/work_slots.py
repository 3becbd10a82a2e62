"""At most a few of a Ray worker's sites run Python at once (issue 13).

A pool worker hosts thousands of site threads. When a stage opens, every member among them gets its
instruction within a second and starts on it: at 5,000 sites per round, 2,500 runnable threads per
process took turns at one interpreter lock, the load average passed 350 and the machine spent most
of its CPU in the kernel handing the lock around. :class:`WorkSlots` lets a few sites of a process
compute at a time: a site holds a slot while it runs its own code, and gives it up for every call
to the server and every sleep (a held poll, a backoff, pace steering), so a slot is never held by a
site that waits. The work is the same; it is done a few sites at a time instead of all at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SLOTS_PER_WORKER = 4
"""Sites of one worker process that may run Python at once (a worker has one interpreter lock;
cryptography's Ed25519 checks and torch's kernels run without it, so a few overlap usefully)."""


class WorkSlots:
    """A process's slots. A thread holds at most one; only the thread that holds a slot gives it
    up around a wait (a call from another thread, such as gRPC's upload iterator, is passed on as is)."""

    def __init__(self, slots: int = SLOTS_PER_WORKER) -> None:
        if slots < 1:
            raise ValueError(f"slots: must be at least 1 (got {slots})")
        self._slots = threading.BoundedSemaphore(slots)
        self._held = threading.local()

    def holding(self) -> bool:
        return bool(getattr(self._held, "slot", False))

    def acquire(self) -> None:
        if not self.holding():
            self._slots.acquire()
            self._held.slot = True

    def release(self) -> None:
        if self.holding():
            self._held.slot = False
            self._slots.release()

    @contextmanager
    def site(self) -> Iterator[None]:
        """A site's whole session: it holds a slot whenever it is not waiting."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Give the slot up for a wait, and take one again after it."""
        if not self.holding():
            yield
            return
        self.release()
        try:
            yield
        finally:
            self.acquire()

    def sleep(self, seconds: float) -> None:
        with self.waiting():
            time.sleep(seconds)

    def transport(self, inner: Any) -> SlotReleasingTransport:
        return SlotReleasingTransport(inner, self)


class SlotReleasingTransport:
    """Forwards every call to ``inner`` with the calling site's slot given up while it waits."""

    def __init__(self, inner: Any, slots: WorkSlots) -> None:
        self._inner = inner
        self._slots = slots

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute
        slots = self._slots

        def call(*args: Any, **kwargs: Any) -> Any:
            with slots.waiting():
                return attribute(*args, **kwargs)

        return call
