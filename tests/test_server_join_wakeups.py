"""A held poll wakes only when something it waits for changes, or at its own deadline.

A Join wakes no held poll unless it replaces a session whose poll must end.

Every held poll used to re-check its instruction at every Join: with 1,000 polls held and sites
joining at 200 per second that is 200,000 wake-ups a second, and the server fell behind on the
Joins themselves (10,000 simulated sites, see docs/simulation.md). The real coordinator on a
SQLite store, real threads holding real polls.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from tests.test_server_pace_steering import job, join, poll

pytestmark = pytest.mark.timeout(60)
HELD = 10
JOINING = 100


def count_instruction_checks(coordinator: Coordinator) -> list[str]:
    """The names of the sites whose instruction the coordinator checks, from now on, in order."""
    checks: list[str] = []
    real = coordinator._instruction_for

    def counted(client):  # type: ignore[no-untyped-def]
        checks.append(client.name)
        return real(client)

    coordinator._instruction_for = counted  # type: ignore[method-assign]
    return checks


def test_sites_joining_do_not_wake_the_held_polls(tmp_path: Path) -> None:
    held = [f"held-{i}" for i in range(HELD)]
    joining = [f"new-{i}" for i in range(JOINING)]
    coordinator, store = job(tmp_path, held + joining, clients_per_round=500, min_clients=500)
    try:
        sites = [join(coordinator, name) for name in held]
        checks = count_instruction_checks(coordinator)
        answers: list[pb.PollResponse] = []
        threads = [threading.Thread(target=lambda s=s: answers.append(poll(s, 4000))) for s in sites]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while coordinator._waiting_polls < HELD and time.monotonic() < deadline:
            time.sleep(0.01)
        assert coordinator._waiting_polls == HELD
        before = len(checks)
        for name in joining:
            join(coordinator, name)
        woken = len(checks) - before
        # at most each poll's own deadline falls in the window; the Joins add nothing to that
        assert woken <= HELD, f"{woken} instruction checks by {HELD} held polls during {JOINING} Joins"
        for t in threads:
            t.join()
        assert len(answers) == HELD and all(a.WhichOneof("instruction") == "wait" for a in answers)
    finally:
        store.close()


def test_a_site_joining_again_ends_its_old_sessions_held_poll(tmp_path: Path) -> None:
    coordinator, store = job(tmp_path, ["a", "b"])
    try:
        first = join(coordinator, "a")
        answer: list[pb.PollResponse] = []
        thread = threading.Thread(target=lambda: answer.append(poll(first, 4000)))
        wakes = []
        real_notify = coordinator._cond.notify_all

        def notify_all() -> None:
            wakes.append(1)
            real_notify()

        coordinator._cond.notify_all = notify_all  # type: ignore[method-assign]
        join(coordinator, "b")
        assert wakes == []  # a first Join wakes no one
        thread.start()
        while coordinator._waiting_polls < 1:
            time.sleep(0.01)
        join(coordinator, "a")  # the same site again: its old poll must end now, not at its deadline
        assert wakes == [1]
        thread.join(5)
        assert answer and answer[0].wait.reason == "superseded by a newer poll"
    finally:
        store.close()


def test_a_held_poll_with_nothing_to_wait_for_checks_only_at_its_start_and_deadline(tmp_path: Path) -> None:
    """With 1,000 polls held, a wake-up of each once a second cost the server about 15 s of kernel
    CPU per round at n = 1,000 (threads handing the lock around; docs/scale-measurements.md)."""
    coordinator, store = job(tmp_path, ["a", "b"], clients_per_round=5, min_clients=5)
    try:
        site = join(coordinator, "a")
        checks = count_instruction_checks(coordinator)
        answer = poll(site, 3500)
        assert answer.WhichOneof("instruction") == "wait"
        assert checks == ["a", "a"], f"{len(checks)} instruction checks in one 3.5 s poll"
    finally:
        store.close()
