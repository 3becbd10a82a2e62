"""The privacy mechanisms as objects: one class per ``--dp`` mode, each owning its plan, its decode
of the secure sum and its ledger event; the global model only delegates to them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedveil.dp.distributed_codec import encode_update
from fedveil.server.config import DP_MODES, ServerConfig, ServerConfigError
from fedveil.server.mechanisms import MECHANISMS, CentralDP, DistributedDP, LocalDP, NoPrivacy, mechanism_class
from fedveil.server.sanity import AggregateRejected
from fedveil.server.training import GlobalModel

DIM = 11


def config(dp: str, **kw: object) -> ServerConfig:
    settings: dict[str, object] = dict(task="t:t", rounds=3, clients_per_round=4, min_clients=2, dp=dp, dp_clip=1.0,
                                       dp_noise_multiplier=0.5, weighted=False)
    settings.update(kw)
    return ServerConfig.from_flat(**settings)  # type: ignore[arg-type]


def ring_sum(plan, updates: np.ndarray) -> np.ndarray:
    """The sum secure aggregation would release: each site's encoding, added in the ring."""
    if plan.distributed is not None:
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        encoded = [encode_update(plan.distributed, u, rotation_seed=plan.rotation_seed, rng=rng,
                                 ring_bits=plan.ring_bits) for u in updates]
    else:
        encoded = [plan.encoder.encode(u, os.urandom(16)) for u in updates]
    total = np.zeros_like(encoded[0])
    for e in encoded:
        total += e
    return total


def test_every_mode_has_exactly_one_mechanism_class() -> None:
    assert set(MECHANISMS) == set(DP_MODES)
    assert [mechanism_class(m) for m in ("none", "local", "central", "distributed")] == [
        NoPrivacy, LocalDP, CentralDP, DistributedDP]
    assert {m: c.user_level for m, c in MECHANISMS.items()} == {
        "none": False, "local": False, "central": True, "distributed": True}


@pytest.mark.parametrize("dp", ["none", "local", "central", "distributed"])
def test_plan_then_decode_gives_the_mean_and_the_ledger_event_is_the_mechanisms(dp: str) -> None:
    model = GlobalModel(config(dp), np.zeros(DIM, dtype=np.float32), seed=1)
    assert isinstance(model.mechanism, mechanism_class(dp))
    plan = model.plan(1, 4, 3, b"ctx")
    assert plan.dp.mode == dp
    rng = np.random.default_rng(3)
    updates = rng.normal(size=(4, DIM)) * 0.1  # norms well below S = 1: clipping changes nothing
    applied = model.apply(plan, ring_sum(plan, updates), survivors=4)
    if dp in ("none", "local"):
        assert np.allclose(applied.aggregate, updates.mean(axis=0), atol=1e-5)
        assert model.reserve_budget(plan, 4) is None
    else:  # user-level noise on the sum of 4 divided by K = 4: sd z·S/4 per coordinate
        assert not np.allclose(applied.aggregate, updates.mean(axis=0), atol=1e-5)
        assert np.abs(applied.aggregate - updates.mean(axis=0)).max() < 8 * 0.5 / 4 + 1e-3
        assert applied.stats["noise_stddev_sum"] > 0
        spend = model.reserve_budget(plan, 4)
        assert spend is not None and model.ledger is not None
        assert model.ledger.entries[-1].mechanism.startswith("dp-fedavg" if dp == "central" else "distributed-")


def test_central_rejects_a_sum_no_clipped_sites_can_produce() -> None:
    model = GlobalModel(config("central"), np.zeros(DIM, dtype=np.float32), seed=1)
    plan = model.plan(1, 4, 3, b"ctx")
    one_unclipped = np.zeros((4, DIM))
    one_unclipped[:2] = 1.0  # two sites, every coordinate at the clip range: norm 2·sqrt(11) > n·S = 4
    with pytest.raises(AggregateRejected, match="norm"):
        model.apply(plan, ring_sum(plan, one_unclipped), survivors=4)


@pytest.mark.parametrize(("dp", "flag", "settings"), [
    ("none", "--dp-adaptive-clipping", {"dp_adaptive_clipping": True}),
    ("distributed", "--dp-adaptive-clipping", {"dp_adaptive_clipping": True}),
    ("local", "--dp-sampling-amplification", {"dp_sampling_amplification": True}),
    ("distributed", "--dp-sampling-amplification", {"dp_sampling_amplification": True}),
    ("central", "--dp-accountant", {"dp_sampling_amplification": True, "dp_accountant": "pld"}),
    ("distributed", "--dp-accountant", {"dp_accountant": "pld"}),
    ("distributed", "--dp-accountant", {"dp_accountant": "prv"}),
])
def test_each_mechanism_refuses_settings_it_cannot_honour_naming_the_flag(dp: str, flag: str,
                                                                          settings: dict[str, object]) -> None:
    with pytest.raises(ServerConfigError) as refused:
        config(dp, **settings)
    assert str(refused.value).startswith(flag)


def test_central_takes_adaptive_clipping_and_amplification_with_rdp() -> None:
    model = GlobalModel(config("central", dp_adaptive_clipping=True, dp_sampling_amplification=True,
                               clients_per_round=10, dp_noise_multiplier=0.3),
                        np.zeros(DIM, dtype=np.float32), seed=1)
    plan = model.plan(1, 4, 3, b"ctx")
    assert plan.dp.adaptive_clipping and list(plan.encoding.extra_coordinates) == ["unclipped"]


def test_distributed_bits_whose_noise_cannot_be_sampled_exactly_are_refused_naming_the_flag() -> None:
    """At 40 bits a site's noise share would be 6.8e10: float64 samplers lose its low bits (review of 2026-12-07)."""
    from fedveil.server.coordinator.state import JobError

    model = GlobalModel(config("distributed", dp_bits=40, dp_noise_multiplier=6.0), np.zeros(DIM), seed=1)
    with pytest.raises(JobError, match=r"above 2\^20") as err:
        model.plan(1, 4, 3, b"ctx")
    assert err.value.field == "dp_bits"


def test_an_unclipped_count_within_the_checks_slack_is_clamped_not_an_internal_error() -> None:
    """The review of 2026-12-07: one site adding a unit to its unclipped slot gave a count the sanity
    check accepts (its rounding slack) but just above the survivors, and the release then raised
    ValueError: an internal error after the masked inputs were in."""
    model = GlobalModel(config("central", dp_adaptive_clipping=True, clients_per_round=4, dp_noise_multiplier=0.3),
                        np.zeros(DIM, dtype=np.float32), seed=1)
    plan = model.plan(1, 4, 3, b"ctx")
    rows = np.zeros((4, DIM + 1))
    rows[:, DIM] = 1.0  # four unclipped sites
    total = ring_sum(plan, rows)
    total[DIM] += 1  # one ring unit more: within the check's slack, above 4
    applied = model.apply(plan, total, survivors=4)
    assert 0.0 < applied.stats["next_clip_norm"] and "unclipped_fraction_noised" in applied.stats
