"""``fedveil bench simulate`` and ``fedveil bench load`` run end to end at small sizes and report
what their figures claim: the round against its mask floor, exactness against the survivors'
plaintext updates, dropped sites, and for the load bench every RPC, the server's memory and file
descriptors, and no INTERNAL error or lost round."""

from __future__ import annotations

import json

import pytest

from fedveil.cli import main
from fedveil.simulation.scalebench import ScaleBench, masks_per_round

pytest.importorskip("ray")  # the `ray` extra: `make test` installs it (dev)


def test_masks_per_round_counts_survivors_and_the_leavers_pairwise_masks() -> None:
    # no dropout: every site expands k pairwise + 1 self mask, the server every self mask
    assert masks_per_round(10, 4, 0) == 10 * 5 + 10
    # two leavers of ten, degree 4: eight sites mask, eight self masks removed, and each leaver's
    # pairwise masks with its surviving neighbours (4 * 8/10 on average) rebuilt
    assert masks_per_round(10, 4, 2) == pytest.approx(8 * 5 + 8 + 2 * 4 * 8 / 10)


def test_the_held_polls_of_a_large_round_come_back_at_a_bounded_rate() -> None:
    """At 5,000 sites per round a 5 s poll wait meant 1,000 polls a second, the driver's whole core."""
    config = ScaleBench(clients=5000, dim=1000, rounds=1).config("fedveil.tasks.synthetic:task")
    assert config.schedule.poll_wait == pytest.approx(25.0)
    assert ScaleBench(clients=1000, dim=1000, rounds=1).poll_wait_s == 5.0  # the measured sizes keep 5 s


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.serial  # starts a local Ray, whose start-up windows a loaded machine can miss (tests/test_simulate_ray.py)
@pytest.mark.xdist_group("ray")  # under -n, on the worker that runs tests/test_simulate_ray.py: one local Ray at a time
def test_bench_simulate_on_ray_reports_round_floor_and_exactness(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "simulate", "--clients", "12", "--dim", "3000", "--rounds", "2", "--dropout", "0.15",
                 "--client-cpus", "0.5", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert report["clients"] == 12 and report["backend"] == "ray" and report["graph"] == "harary"
    assert 2900 <= report["dim"] <= 3000 and report["rounds"] == 2
    assert report["exact"] is True and report["max_abs_error"] < 1e-4
    assert report["dropped_per_round"] == [2, 2]  # seed 0 at 15%: two leavers in each round
    assert report["round_s"] > 0 and 0 < report["floor_s"] < report["crypto_floor_s"]
    assert report["round_over_floor"] == pytest.approx(report["round_s"] / report["floor_s"])
    # the floor's mask cost is the lower of the quiet measurement before the job and the one after it
    assert 0 < report["mask_s"] == min(report["mask_s_before_job"], report["mask_s_after_job"])
    assert {"masked-input", "unmasking", "consistency"} <= set(report["stage_s"])
    each = report["stage_s_each"]  # one entry per round, whose median is stage_s
    assert len(each) == 2 and set(each[0]) == set(report["stage_s"])
    assert report["stage_s"]["unmasking"] == pytest.approx((each[0]["unmasking"] + each[1]["unmasking"]) / 2, abs=2e-3)
    assert len(report["load_average"]) == 2 and min(report["load_average"]) >= 0
    assert report["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_simulate_with_distributed_dp_has_no_exactness_claim(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "simulate", "--backend", "in-process", "--clients", "6", "--dim", "500", "--rounds", "1",
                 "--dropout", "0", "--dp", "distributed", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["dp"] == "distributed" and report["exact"] is None
    assert report["dropped_per_round"] == [0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_load_holds_its_sites_without_internal_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "load", "--sites", "16", "--per-round", "6", "--rounds", "3", "--processes", "2", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert report["completed_rounds"] == 3 and report["lost_rounds"] == 0 and report["internal_errors"] == 0
    assert report["server_tracebacks"] == 0 and report["site_failures"] == 0
    assert report["rpc"]["join"]["calls"] == 16  # every site connected once
    assert report["rpc"]["submit_masked_input"]["calls"] == 3 * 6
    assert report["server_peak_fds"] >= 16  # a connection per site
    assert report["p99_ms"] >= report["p50_ms"] > 0 and report["server_peak_rss_mb"] > 0


@pytest.mark.parametrize(("args", "flag"), [
    (["simulate", "--clients", "2"], "--clients"),
    (["simulate", "--clients", "10", "--enrolled", "5"], "--enrolled"),
    (["simulate", "--clients", "10", "--dropout", "0.7"], "--dropout"),
    (["simulate", "--clients", "10", "--dim", "4"], "--dim"),
    (["load", "--sites", "10", "--per-round", "20"], "--sites"),
    (["load", "--processes", "0"], "--processes"),
])
def test_bench_refuses_bad_sizes_naming_the_flag(capsys: pytest.CaptureFixture[str], args: list[str],
                                                 flag: str) -> None:
    assert main(["bench", *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag}:")
