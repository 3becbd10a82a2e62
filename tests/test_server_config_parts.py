"""The job's configuration is composed of parts, and its flat form (the flags' names) round-trips."""

from __future__ import annotations

import pytest

from fedveil.server.config import (
    FLAT_NAMES,
    EvaluationConfig,
    PrivacyConfig,
    ScheduleConfig,
    SecAggConfig,
    ServerConfig,
    ServerConfigError,
    TrainingConfig,
)

TASK = "fedveil.tasks.synthetic:task"


def composed() -> ServerConfig:
    return ServerConfig(
        task=TASK, schedule=ScheduleConfig(rounds=7, clients_per_round=6, min_clients=4, stage_timeout=30.0),
        secagg=SecAggConfig(graph="harary", threshold=5, max_corrupt_fraction=0.2),
        privacy=PrivacyConfig(mode="central", clip=0.5, noise_multiplier=1.3, epsilon_budget=4.0),
        training=TrainingConfig(optimizer="fedadam", server_lr=0.1),
        evaluation=EvaluationConfig(final=False, max_per_job=2), seed=11)


def test_the_parts_and_the_flat_names_build_the_same_job() -> None:
    config = composed()
    flat = config.to_dict()
    assert flat["dp"] == "central" and flat["dp_clip"] == 0.5 and flat["secagg"] == "harary"
    assert flat["final_evaluation"] is False and flat["max_evaluations_per_job"] == 2
    assert set(flat) == set(FLAT_NAMES)
    assert ServerConfig.from_flat(**flat) == config
    assert ServerConfig.from_dict({**flat, "a_setting_of_a_later_version": 1}) == config


def test_replace_changes_flat_settings_and_validates_again() -> None:
    config = composed()
    changed = config.replace(dp_noise_multiplier=2.0, rounds=9)
    assert changed.privacy.noise_multiplier == 2.0 and changed.schedule.rounds == 9
    assert changed.secagg == config.secagg
    with pytest.raises(ServerConfigError) as refused:
        config.replace(min_clients=99)
    assert refused.value.flag == "--min-clients"


@pytest.mark.parametrize(("flat", "flag"), [
    ({"dp_clp": 1.0}, "--dp-clp"),                       # unknown name
    ({"dp": "loud"}, "--dp"),                           # a part's own check
    ({"secagg_degree": 3}, "--secagg-degree"),          # odd degree
    ({"threshold": 9}, "--threshold"),                  # spans secagg and schedule
    ({"evaluation": "sometimes"}, "--evaluation"),
    ({"dp_bits": 99}, "--dp-bits"),
    ({"dp": "none", "dp_epsilon_budget": 5.0}, "--dp-epsilon-budget"),       # nothing to cap: refused,
    ({"dp": "local", "dp_epsilon_budget": 5.0}, "--dp-epsilon-budget"),      # never a silent no-op
    ({"dp": "central", "dp_client_epsilon_budget": 5.0}, "--dp-client-epsilon-budget"),
])
def test_a_bad_setting_is_refused_naming_its_flag(flat: dict[str, object], flag: str) -> None:
    with pytest.raises(ServerConfigError) as refused:
        ServerConfig.from_flat(task=TASK, rounds=2, clients_per_round=4, min_clients=3, **flat)
    assert refused.value.flag == flag


def test_a_missing_schedule_setting_is_named() -> None:
    with pytest.raises(ServerConfigError) as refused:
        ServerConfig.from_flat(task=TASK, rounds=2)
    assert refused.value.flag == "--clients-per-round"


def test_a_stored_record_differs_only_where_a_setting_changed() -> None:
    config = composed()
    stored = config.resume_key()
    assert config.differences(stored) == []
    assert config.replace(stage_timeout=90.0).differences(stored) == []  # operational: may change on restart
    assert config.replace(dp_clip=0.25).differences(stored) == [
        "--dp-clip: the run was started with 0.5, now 0.25"]
    older = {k: v for k, v in stored.items() if k != "dp_client_epsilon_budget"}  # a record predating it
    assert config.differences(older) == []
