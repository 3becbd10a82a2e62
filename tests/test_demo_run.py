"""A reduced demo, end to end: real coordinator, real clients, secure aggregation, DP, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedveil.demo.federation import DropoutPlan
from fedveil.demo.runner import DemoOptions, run_demo

torch.set_num_threads(1)


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=120)


def test_dropout_plan_never_leaves_fewer_than_the_threshold() -> None:
    names = [f"hospital-{i}" for i in range(1, 6)]
    plan = DropoutPlan.draw(names, 200, 0.6, max_silent=2, seed=1)
    counts = [len(plan.silent.get(r, ())) for r in range(1, 201)]
    assert max(counts) == 2 and sum(counts) > 100
    assert DropoutPlan.draw(names, 200, 0.6, 2, seed=1) == plan  # fixed by the seed
    assert not DropoutPlan.draw(names, 50, 0.0, 2, seed=1).silent


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["in-process", "grpc"])
def test_reduced_demo_local_dp_with_dropouts(tmp_path: Path, transport: str) -> None:
    # four hospitals: the threshold is 3 (c = 1 colluder of 4, 2t > 4 + 1), so one may drop per round
    options = DemoOptions(hospitals=4, rounds=2, dropout=0.5, dp="local", in_process=transport == "in-process",
                          out=tmp_path / "out", seed=4)
    report = run_demo(options, quiet(), serve_forever=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["final_accuracy"] == report["final_accuracy"]
    for key in ("final_accuracy", "final_auc", "epsilon_sample_max", "epsilon_user", "delta", "rounds"):
        assert key in saved
    assert saved["epsilon_user"] is None and saved["delta"] == 1e-5
    assert len(saved["rounds"]) == 2 and [r["round"] for r in saved["rounds"]] == [1, 2]
    # the dropout plan with seed 4 drops someone in each of the two rounds; every round keeps at least the
    # threshold (3 of 4)
    names = [f"hospital-{i}" for i in range(1, 5)]
    assert saved["secure_aggregation"]["threshold"] == 3
    plan = DropoutPlan.draw(names, 2, 0.5, 1, 4)
    assert plan.silent, "this seed must exercise a dropout"
    for r in saved["rounds"]:
        assert set(r["dropped"]) == set(plan.silent.get(r["round"], ()))
        assert sorted(r["participants"] + r["dropped"]) == names
        assert r["epsilon_sample_max"] <= 3.0 + 1e-9
    eps = [h["epsilon"] for h in saved["hospitals"]]
    assert all(0 < e <= 3.0 + 1e-9 for e in eps) and saved["epsilon_sample_max"] == pytest.approx(max(eps))
    assert 0.5 < saved["final_accuracy"] <= 1 and 0.5 < saved["final_auc"] <= 1
    # the served model is the mean of the released global models (the recipe's window of 5 covers both
    # rounds); the last round's own figures are reported beside it
    assert saved["served_model"] == {"description": "mean of the global models of rounds 1–2", "rounds": [1, 2]}
    assert saved["last_round"]["round"] == 2 and saved["last_round"]["accuracy"] == saved["rounds"][-1]["accuracy"]
    assert saved["recipe"]["average_last"] == 5
    served_note = "The served model is the mean of the global models of rounds 1–2 ("
    assert any(n.startswith(served_note) for n in saved["notes"])
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.json", "report.md", "report.html", "accuracy_auc_by_round.png", "epsilon_by_round.png",
            "privacy_utility.png", "runs.sqlite", "hospitals"} <= files
    md = (tmp_path / "out" / "report.md").read_text()
    assert "centralized, non-private" in md and "federated, non-private" in md
    assert "| served model | mean of the global models of rounds 1–2 |" in md
    assert "`fedveil demo healthcare --sweep`" in md  # one run is one point; the report says where the curve is
    assert saved["baselines"]["centralized"]["accuracy"] > 0.9
    # the non-private baseline ran the real job with the private run's dropouts replayed
    federated = saved["baselines"]["federated_non_private"]
    assert f"secure aggregation, {saved['secure_aggregation']['dropouts']} dropouts" in federated["detail"]
    assert 0.5 < federated["accuracy"] <= 1 and 0.5 < federated["auc"] <= 1


@pytest.mark.slow
def test_reduced_demo_central_and_none(tmp_path: Path) -> None:
    central = run_demo(DemoOptions(hospitals=3, rounds=2, dropout=0.0, dp="central", in_process=True,
                                   out=tmp_path / "c"), quiet(), serve_forever=False)
    assert central["epsilon_user"] is not None and 0 < central["epsilon_user"] <= 3.0 + 1e-9
    assert central["rounds"][-1]["epsilon_user"] == pytest.approx(central["epsilon_user"], rel=1e-6)
    dist = run_demo(DemoOptions(hospitals=3, rounds=2, dropout=0.0, dp="distributed", in_process=True,
                                out=tmp_path / "d"), quiet(), serve_forever=False)
    assert dist["status"] == "completed" and len(dist["rounds"]) == 2
    assert dist["epsilon_user"] is not None and 0 < dist["epsilon_user"] <= 3.0
    for report in (central, dist):  # three hospitals cannot drown user-level noise: the report says so
        assert any("dominated by noise" in n for n in report["notes"])
    none = run_demo(DemoOptions(hospitals=3, rounds=2, dropout=0.0, dp="none", in_process=True,
                                out=tmp_path / "n"), quiet(), serve_forever=False)
    assert none["epsilon_user"] is None and none["epsilon_sample_max"] is None


@pytest.mark.slow
def test_only_one_run_at_a_time(tmp_path: Path) -> None:
    """While the demo's own run is going, the dashboard cannot start another on the same hospitals."""
    from fedveil.demo.data import make_split
    from fedveil.demo.federation import FederationSettings
    from fedveil.demo.recipe import Recipe
    from fedveil.demo.runner import DemoRuns, write_hospital_shares
    from fedveil.server.dashboard import DashboardError, MemoryRunSource, RunSettings

    options = DemoOptions(hospitals=3, rounds=1, dropout=0.0, in_process=True, out=tmp_path)
    split = make_split(3, 0)
    write_hospital_shares(split, tmp_path)
    runs = MemoryRunSource()
    demo_runs = DemoRuns(options, split, runs, quiet())
    seen: list[bool] = []

    def during(_: object) -> None:
        seen.append(demo_runs.busy())
        with pytest.raises(DashboardError, match="already in progress"):
            demo_runs.start(RunSettings(rounds=1, sites_per_round=3))

    assert not demo_runs.busy()
    result = demo_runs.run(FederationSettings(rounds=1, hospitals_per_round=3, transport="in-process"),
                           Recipe(rounds=1), prefer_uploads=False, on_round=during)
    assert seen == [True] and not demo_runs.busy()
    assert [r["id"] for r in runs.list_runs()] == [result.run_id]
    assert runs.get_run(result.run_id)["status"] == "completed"
    assert runs.get_run(result.run_id)["settings"]["warning"] is None  # local DP: nothing to warn about
    central = demo_runs.run(FederationSettings(rounds=1, hospitals_per_round=3, dp="central", transport="in-process"),
                            Recipe(rounds=1), prefer_uploads=False)
    warning = runs.get_run(central.run_id)["settings"]["warning"]
    assert "user-level DP over 3 hospitals" in warning and "dominated by noise" in warning  # shown on the runs page


def test_user_level_noise_ratio_matches_the_mechanism() -> None:
    import math

    from fedveil.demo.federation import FederationSettings, server_config, user_level_noise_ratio
    from fedveil.demo.recipe import Recipe

    recipe = Recipe()
    assert user_level_noise_ratio(FederationSettings(rounds=30, hospitals_per_round=5, dp="local"), recipe, 5) is None
    assert user_level_noise_ratio(FederationSettings(rounds=30, hospitals_per_round=5, dp="none"), recipe, 5) is None
    central = FederationSettings(rounds=30, hospitals_per_round=5, dp="central")
    z = server_config(central, recipe, 5).privacy.noise_multiplier
    assert user_level_noise_ratio(central, recipe, 5) == pytest.approx(z * math.sqrt(31) / 5)
    # fewer rounds spend less per round, so the same ε buys less noise
    short = FederationSettings(rounds=3, hospitals_per_round=5, dp="central")
    assert user_level_noise_ratio(short, recipe, 5) < user_level_noise_ratio(central, recipe, 5)  # type: ignore[operator]
    distributed = FederationSettings(rounds=30, hospitals_per_round=5, dp="distributed")
    zd = server_config(distributed, recipe, 5).privacy.noise_multiplier
    # distributed DP sizes each share for t = 4 contributors (c = 1 of 5 hospitals: 2t > 5 + 1)
    assert user_level_noise_ratio(distributed, recipe, 5) == pytest.approx(zd * math.sqrt(5 / 4) * math.sqrt(31) / 5)


@pytest.mark.slow
def test_a_hospital_with_one_class_only_takes_part_without_crashing(tmp_path: Path) -> None:
    """Its local ROC AUC is undefined (NaN): the client leaves it out of its report instead of failing."""
    import torch
    from torch.utils.data import TensorDataset

    from fedveil.demo import healthcare
    from fedveil.demo.data import make_split
    from fedveil.demo.federation import FederationSettings, run_federation
    from fedveil.demo.recipe import Recipe

    split = make_split(3)
    files = {}
    for site in split.hospitals:
        keep = site.labels == 0 if site.name == "hospital-1" else slice(None)
        path = tmp_path / f"{site.name}.csv"
        path.write_text(healthcare.SCHEMA.to_csv(site.features[keep], site.labels[keep]))
        files[site.name] = path
    test = TensorDataset(torch.from_numpy(split.test.features), torch.from_numpy(split.test.labels))
    result = run_federation(store_path=tmp_path / "runs.sqlite", site_files=files, test=test,
                            settings=FederationSettings(rounds=2, hospitals_per_round=3, transport="in-process"),
                            recipe=Recipe(rounds=2))
    assert result.status == "completed" and not result.client_errors, (result.message, result.client_errors)
    assert [r.participants for r in result.rounds] == [["hospital-1", "hospital-2", "hospital-3"]] * 2
