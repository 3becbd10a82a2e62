"""Injected dropouts at the masked-input stage (fedveil.simulation.faults): a site that leaves after
its keys and shares are out says so, the round does not wait for its deadline, and the released
sum is exactly that of the survivors (the server removed the leaver's pairwise masks)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import simulate_in_process
from fedveil.simulation.faults import DropoutPlan

pytestmark = pytest.mark.timeout(300)


def config(n: int, **kw: object) -> ServerConfig:
    settings: dict[str, object] = dict(task="fedveil.tasks.synthetic:task", rounds=2, clients_per_round=n,
                                       min_clients=n, seed=11, round_timeout=600.0, stage_timeout=300.0,
                                       cohort_wait=0.5, linger=0.5, poll_wait=1.0, insecure_deterministic=True,
                                       evaluate=False, final_evaluation=False)
    settings.update(kw)
    return ServerConfig.from_flat(**settings)  # type: ignore[arg-type]


def test_the_plan_is_a_deterministic_per_site_per_round_choice_near_its_fraction() -> None:
    plan = DropoutPlan(0.1, seed=3)
    picks = [plan.drops(f"client-{i:03d}", r) for i in range(1000) for r in (1, 2)]
    assert 150 <= sum(picks) <= 250  # 2,000 draws at 10%
    assert picks == [DropoutPlan(0.1, seed=3).drops(f"client-{i:03d}", r) for i in range(1000) for r in (1, 2)]
    assert picks != [DropoutPlan(0.1, seed=4).drops(f"client-{i:03d}", r) for i in range(1000) for r in (1, 2)]
    assert not any(DropoutPlan(0.0).drops(f"client-{i:03d}", 1) for i in range(100))
    with pytest.raises(ValueError, match="dropout"):
        DropoutPlan(1.0)
    with pytest.raises(ValueError, match=r"stage.*'unmasking'"):
        DropoutPlan(0.1, stage="unmasking")


@pytest.mark.parametrize("active", [True, False])
def test_sites_leaving_at_masked_input_are_dropouts_at_once_and_the_sum_is_exact(active: bool) -> None:
    n, plan = 8, DropoutPlan(0.2, seed=11)
    leavers = {r: {f"client-{i:03d}" for i in range(n) if plan.drops(f"client-{i:03d}", r)} for r in (1, 2)}
    assert all(0 < len(v) <= 2 for v in leavers.values()), leavers  # the seed gives a usable example
    cfg = config(n, min_clients=n - 2, active_adversary=active)
    started = time.monotonic()
    with_drops = simulate_in_process(cfg, n, dropout=plan)
    elapsed = time.monotonic() - started
    assert elapsed < 120.0  # a stage deadline of 300 s was never waited for
    assert [r.survivors for r in with_drops.rounds] == [n - len(leavers[1]), n - len(leavers[2])]
    for r in with_drops.rounds:
        assert sorted(r.stats["dropped"]) == sorted(leavers[r.round])
    for name, history in with_drops.client_histories.items():
        assert [o == "dropped" for o in history[:2]] == [name in leavers[1], name in leavers[2]], (name, history)
    # exactness: the same deterministic job in which the same sites decline round 1 up front (they
    # never mask, so nothing needs removing) releases the same round-1 aggregate, bit for bit
    reference = simulate_in_process(config(n, min_clients=n - 2, active_adversary=active, rounds=1), n,
                                    dropout=DropoutPlan(0.2, seed=11, stage="commit"))
    assert reference.rounds[0].survivors == n - len(leavers[1])
    assert np.array_equal(reference.rounds[0].aggregate, with_drops.rounds[0].aggregate)
