"""When the server draws a round's cohort: K connected sites at once; M connected sites after
``--cohort-wait``; and M at once when no other enrolled site could be drawn by waiting longer.

The waits here are an hour, so a draw that should not wait shows as a job that never starts (the
watchdog stops it) rather than as a timing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from fedveil.server.coordinator import Coordinator, JobSummary
from fedveil.server.coordinator.state import _Client
from fedveil.server.store import RunStore
from tests.server_helpers import Scripted, coordinator_watchdog, make_job, vectors

AN_HOUR = 3600.0


def _run_for(tmp_path: Path, enrolled: list[str], present: list[str], seconds: float,
             clients_per_round: int) -> JobSummary:
    """One round with ``enrolled`` in the store and ``present`` connected, stopped after ``seconds``.
    The sites start in the order given, each once the one before is polling (so the last ones cannot
    complete a drawable set before the first are in)."""
    coordinator, store = make_job(tmp_path, enrolled, clients_per_round=clients_per_round, min_clients=3,
                                  cohort_wait=AN_HOUR, stage_timeout=30.0)
    sites = [Scripted(coordinator, name, vector) for name, vector in zip(present, vectors(len(present)))]
    for site in sites:
        threading.Thread(target=site.run, daemon=True).start()
        deadline = time.monotonic() + 30.0
        while True:
            with coordinator._cond:
                if site.name in coordinator._available() or coordinator._round is not None:
                    break
            assert time.monotonic() < deadline and site.error is None, f"{site.name} never polled: {site.error!r}"
            time.sleep(0.01)
    try:
        with coordinator_watchdog(seconds) as stop_later:
            stop_later(coordinator)
            return coordinator.run()
    finally:
        coordinator.stop()
        store.close()


def test_every_enrolled_site_connected_starts_the_round_without_the_cohort_wait(tmp_path: Path) -> None:
    # K = 4 asks for more sites than the three enrolled: none can come, so there is nothing to wait for
    summary = _run_for(tmp_path, ["a", "b", "c"], ["a", "b", "c"], 120.0, clients_per_round=4)
    assert summary.status == "completed" and summary.completed_rounds == 1, summary.message


def test_an_enrolled_site_not_connected_yet_is_waited_for(tmp_path: Path) -> None:
    summary = _run_for(tmp_path, ["a", "b", "c", "d"], ["a", "b", "c"], 4.0, clients_per_round=4)
    assert summary.status == "stopped" and summary.completed_rounds == 0, summary.message


def test_a_site_connected_without_enrolling_keeps_the_wait(tmp_path: Path) -> None:
    # an in-process job's sites need no enrollment: the store does not list who else may join
    summary = _run_for(tmp_path, ["a", "b", "c"], ["u", "a", "b", "c"], 4.0, clients_per_round=5)
    assert summary.status == "stopped" and summary.completed_rounds == 0, summary.message


def _four_polling(tmp_path: Path) -> tuple[Coordinator, RunStore]:
    coordinator, store = make_job(tmp_path, ["a", "b", "c", "d"], clients_per_round=4, min_clients=2,
                                  cohort_wait=AN_HOUR)
    for name in "abcd":
        coordinator._clients[name] = _Client(name=name, session_id=os.urandom(16), polling=1)
    return coordinator, store


def _draws_now(coordinator: Coordinator) -> tuple[list[str], bool]:
    with coordinator._cond:
        _connected, barred, available = coordinator._draw_pool(1)
        return available, coordinator._nobody_else_drawable(available, barred)


def test_a_session_closed_for_its_credential_is_not_waited_for(tmp_path: Path) -> None:
    # what the draw's credential check does to a site whose credential expired or was listed as revoked
    coordinator, store = _four_polling(tmp_path)
    coordinator._clients["d"].refused = "identity_credential: expired"
    coordinator._clients["d"].disconnected = True
    assert _draws_now(coordinator) == (["a", "b", "c"], True)
    store.close()


def test_a_site_revoked_in_the_store_but_still_polling_keeps_the_wait(tmp_path: Path) -> None:
    coordinator, store = _four_polling(tmp_path)
    store.revoke("d")
    assert _draws_now(coordinator) == (["a", "b", "c", "d"], False)
    store.close()
