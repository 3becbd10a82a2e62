"""A malicious server that differences a site's inputs across rounds by reusing a round number.

Sum(round r, cohort A) − sum(round r, cohort A − victim) isolates the victim when both sums hold
the same input. The retry rule (tests/test_attack_malicious_server.py) covers fake aborts; here
the server lets round 1 complete, then asks the victim to take part in "round 1" again (a
renumbered round 2), or in a round it already left behind. The victim, running the unmodified
client code, declines: it never sends a second masked input for a round number it released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedveil.protocol import fedveil_pb2 as pb
from fedveil.server.coordinator import Coordinator
from fedveil.tasks.synthetic import task as synthetic
from tests.attack_helpers import Consortium, TamperingServer, job_config, run_job, turnkey

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(240)
NAMES = [f"site-{i}" for i in range(4)]
VICTIM = "site-0"


def _run(tmp_path: Path, tamper: Any, config: Any) -> tuple[Any, TamperingServer, list[Any]]:
    consortium = Consortium.create(NAMES)
    holder: dict[str, TamperingServer] = {}

    def front(coordinator: Coordinator) -> TamperingServer:
        holder["s"] = TamperingServer(coordinator, VICTIM, tamper, rebind=True)  # a careful liar binds what it shows
        return holder["s"]

    sites = [turnkey(synthetic, n, i, consortium) for i, n in enumerate(NAMES)]
    summary, results, _errors = run_job(tmp_path, config, synthetic, sites, service=front)
    return summary, holder["s"], results


@pytest.mark.slow
@pytest.mark.parametrize("renumber_to", [1, 0])
def test_a_released_round_number_is_never_joined_again(tmp_path: Path, renumber_to: int) -> None:
    """Round 1 completes; the victim's RoundStart of round 2 is renumbered to 1 (or 0)."""
    def reuse(resp: pb.PollResponse) -> pb.PollResponse:
        if resp.WhichOneof("instruction") == "round_start" and resp.round_start.round == 2:
            resp.round_start.round = renumber_to
        return resp

    # round 2's commit stage waits out its timeout for the declining victim: 2.5 s instead of the helpers' 5
    # (round 1, which must complete, needs milliseconds per stage for four sites on a 24-weight model)
    _summary, server, results = _run(tmp_path, reuse, job_config(rounds=2, max_round_attempts=1, stage_timeout=2.5))
    masked = server.sent.named("submit_masked_input")
    assert len(masked) == 1  # round 1's, and never a second input under a released round number
    declined = [r.decline_reason for r in server.sent.named("respond_to_round") if not r.accept]
    assert declined and ("already released" in declined[0] or "outside the job's rounds" in declined[0])
    fed = results[0][0]
    assert fed.state.last_released_round(fed.run_id) == 1
    assert len(fed.state.releases) == 1
