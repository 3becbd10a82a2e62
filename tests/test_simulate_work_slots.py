"""A pool worker's sites run Python a few at a time, and never hold a slot while they wait (issue 13)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fedveil.simulation.work_slots import WorkSlots


class _Server:
    """A transport whose calls block until released, counting how many sites compute at once."""

    def __init__(self, slots: WorkSlots) -> None:
        self.slots = slots
        self.release = threading.Event()
        self.in_calls = 0
        self.lock = threading.Lock()
        self.max_value = 7

    def poll(self, request: Any) -> Any:
        assert not self.slots.holding()  # a site waiting for the server holds no slot
        with self.lock:
            self.in_calls += 1
        self.release.wait(10)
        return request

    def fail(self) -> None:
        raise RuntimeError("refused")


def test_at_most_the_slots_compute_at_once_and_waiting_sites_hold_none() -> None:
    slots = WorkSlots(2)
    server = _Server(slots)
    transport = slots.transport(server)
    computing, peak = [0], [0]
    lock = threading.Lock()

    def site() -> None:
        with slots.site():
            assert transport.poll("x") == "x"
            with lock:
                computing[0] += 1
                peak[0] = max(peak[0], computing[0])
            time.sleep(0.02)  # its own work, holding the slot
            with lock:
                computing[0] -= 1
            slots.sleep(0.01)  # a backoff: no slot held
        assert not slots.holding()

    threads = [threading.Thread(target=site) for _ in range(12)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 5
    while server.in_calls < 12 and time.monotonic() < end:  # all 12 wait on the server at once,
        time.sleep(0.01)  # though only 2 slots exist: a waiting site gives its slot up
    assert server.in_calls == 12
    server.release.set()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 2
    assert transport.max_value == 7  # attributes pass through


def test_a_failed_call_gives_the_slot_back_and_the_site_holds_one_again() -> None:
    slots = WorkSlots(1)
    transport = slots.transport(_Server(slots))
    with slots.site():
        with pytest.raises(RuntimeError, match="refused"):
            transport.fail()
        assert slots.holding()
    assert not slots.holding()
    with slots.site():  # the one slot is free again
        assert slots.holding()


def test_a_call_from_a_thread_without_a_slot_takes_none() -> None:
    """gRPC's upload iterator runs in its own thread: it must not take a slot and keep it."""
    slots = WorkSlots(1)
    transport = slots.transport(_Server(slots))
    server = transport._inner
    server.release.set()
    transport.poll("y")
    assert not slots.holding()
    with slots.site():  # the slot is still free
        pass


def test_no_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="slots: must be at least 1"):
        WorkSlots(0)
