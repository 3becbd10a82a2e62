"""A site whose session has ended for good (issue 13).

A simulation's driver knows when a site's client code has given up or its process has died
(:meth:`Coordinator.site_gone`). The site is then not drawn again, and a round it is in does not wait
out the stage deadline for it: at 10,000 sites, one that gave up during the first polls was drawn
for the first cohort and held the round for the bench's hour-long stage deadline.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.transport import ClientSession, InProcessTransport
from fedveil.server.coordinator import Coordinator
from fedveil.server.coordinator.state import Stage
from tests.server_helpers import Scripted, make_job, run_job, vectors

pytestmark = pytest.mark.timeout(120)
LONG = 300.0  # a stage deadline no test here may wait for


def when(condition: object, coordinator: Coordinator, then: object) -> threading.Thread:
    """Run ``then()`` once ``condition(round)`` holds for the running round (checked under the lock)."""

    def watch() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with coordinator._cond:
                rnd = coordinator._round
                ready = rnd is not None and condition(rnd)  # type: ignore[operator]
            if ready:
                then()  # type: ignore[operator]
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_member_gone_before_it_answered_is_out_at_once_and_the_round_is_exact(tmp_path: Path) -> None:
    names, vecs = ["a", "b", "c", "d"], vectors(4)
    # the cohort is all four (a slow start must not draw it from three); three survive
    coordinator, store = make_job(tmp_path, names, stage_timeout=LONG, round_timeout=LONG)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[2].silent_at[(1, 1)] = "training"  # never answers its RoundStart, as a site that gave up
    when(lambda rnd: "c" in rnd.cohort, coordinator,
         lambda: coordinator.site_gone("c", "GaveUp: gave up after 4 attempts over 128.8 s: CANCELLED"))
    start = time.monotonic()
    summary = run_job(coordinator, clients)
    assert time.monotonic() - start < 60  # not the 300 s stage deadline
    assert summary.status == "completed" and summary.completed_rounds == 1
    aggregate = store.aggregate(coordinator.run_id, 1)
    assert aggregate is not None
    np.testing.assert_allclose(aggregate, (vecs[0] + vecs[1] + vecs[3]) / 3, atol=1e-4)
    assert store.dropouts(coordinator.run_id) == [
        (1, 1, "c", "commit", "its session ended: GaveUp: gave up after 4 attempts over 128.8 s: CANCELLED")]
    store.close()


def test_a_member_gone_after_its_masked_input_stays_in_the_sum_and_is_not_waited_for(tmp_path: Path) -> None:
    names, vecs = ["a", "b", "c", "d", "e"], vectors(5)
    coordinator, store = make_job(tmp_path, names, stage_timeout=LONG, round_timeout=LONG, threshold=3)
    clients = [Scripted(coordinator, n, v) for n, v in zip(names, vecs, strict=True)]
    clients[2].silent_at[(1, 1)] = "unmasking"  # its masked input is in; then its process dies
    when(lambda rnd: Stage.MASKED_INPUT in rnd.submitted.get("c", set()), coordinator,
         lambda: coordinator.site_gone("c", "its Ray worker died"))
    start = time.monotonic()
    summary = run_job(coordinator, clients)
    assert time.monotonic() - start < 60
    assert summary.status == "completed"
    (rec,) = store.rounds(coordinator.run_id)  # one attempt: the others' shares unmask without c's
    assert rec.status == "completed" and rec.survivors == 5
    aggregate = store.aggregate(coordinator.run_id, 1)
    assert aggregate is not None
    np.testing.assert_allclose(aggregate, sum(vecs) / 5, atol=1e-4)  # its input counts: it was in the sum
    # recorded as out of the unmasking stage, as a member missing its deadline is
    assert store.dropouts(coordinator.run_id) == [(1, 1, "c", "unmasking", "its session ended: its Ray worker died")]
    store.close()


def test_a_gone_site_is_not_drawn_again_nor_counted_as_joined(tmp_path: Path) -> None:
    coordinator, store = make_job(tmp_path, ["a", "b"], stage_timeout=LONG)
    for name in ("a", "b"):
        transport = InProcessTransport(coordinator, name)
        joined = transport.join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_name="synthetic-logreg"))
        transport.poll(pb.PollRequest(header=ClientSession.from_join(joined).header(), max_wait_ms=10))
    assert coordinator.joined_sites() == 2
    with coordinator._cond:
        assert coordinator._available() == ["a", "b"]
    coordinator.site_gone("b", "failed")
    coordinator.site_gone("nobody", "never joined")  # an unknown name changes nothing
    assert coordinator.joined_sites() == 1
    with coordinator._cond:
        assert coordinator._available() == ["a"]
    store.close()
