"""``fedveil bench secagg``: output format, exactness and argument errors."""

from __future__ import annotations

import json

import pytest

from fedveil.cli import main

KEYS = {"total_s", "server_s", "client_s_mean", "client_s_max", "upload_bytes_per_client", "plaintext_sum_s",
        "exact", "max_abs_error", "clients", "dim", "dropout", "dropout_stage", "graph", "threshold", "degree",
        "corrupt_bound", "collusion_failure_log2", "dropout_failure_log2", "max_corrupt_fraction"}


@pytest.mark.parametrize("graph,stage", [("complete", "masked"), ("harary", "unmask"), ("harary", "keys"),
                                         ("complete", "shares")])
def test_json_report(capsys, graph, stage):
    code = main(["bench", "secagg", "--clients", "12", "--dim", "500", "--dropout", "0.2", "--dropout-stage", stage,
                 "--graph", graph, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    report = json.loads(out[-1])
    assert KEYS <= set(report)
    assert report["exact"] is True
    assert report["clients"] == 12 and report["dim"] == 500 and report["graph"] == graph
    assert report["dropout_stage"] == stage and report["dropout"] == 0.2
    assert report["max_abs_error"] <= report["error_bound"]
    assert report["survivors"] == (12 if stage == "unmask" else 10)
    # 12 clients are too few for a sparse graph: complete, c = 4 of 12 colluders, 2t > 12 + 4
    assert (report["threshold"], report["degree"], report["corrupt_bound"]) == (9, 11, 4)
    assert report["max_corrupt_fraction"] == pytest.approx(1 / 3) and report["collusion_failure_log2"] is None
    assert report["dropout_failure_log2"] < 0
    # The masked input alone is 500 ring elements of 4 bytes; the rest is keys, shares, headers.
    assert 4 * 500 < report["upload_bytes_per_client"] < 4 * 500 + 12 * 300 + 500
    assert report["client_s_max"] >= report["client_s_mean"] > 0
    assert report["total_s"] >= report["server_s"] > 0


def test_table_output(capsys):
    code = main(["bench", "secagg", "--clients", "5", "--dim", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "upload_bytes_per_client" in out and "exact" in out and "True" in out
    assert "threshold t (smallest with 2t > h + c)" in out and "collusion failure" in out and "dropout failure" in out


def test_max_corrupt_fraction_sets_the_threshold(capsys):
    code = main(["bench", "secagg", "--clients", "12", "--dim", "20", "--dropout", "0.4", "--max-corrupt-fraction",
                 "0", "--active", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["exact"] is True  # no colluders: t = 7, and 5 of 12 may drop
    assert (report["threshold"], report["corrupt_bound"], report["max_corrupt_fraction"]) == (7, 0, 0.0)


@pytest.mark.parametrize("args,flag", [
    (["--dropout", "1.0"], "--dropout"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "0.6"], "--dropout"),  # 6 of 10 drop, t = 7: more than n - t
    (["--dropout", "0.4"], "--dropout"),  # 4 of 10 drop: more than n - t = 3 (c = 3 colluders)
    (["--max-corrupt-fraction", "0.5"], "--max-corrupt-fraction"),
    (["--dim", "0"], "--dim"),
    (["--clients", "1"], "--clients"),
    (["--graph", "ring"], "--graph"),
    (["--dropout-stage", "later"], "--dropout-stage"),
    (["--repeat", "0"], "--repeat"),
])
def test_invalid_arguments_one_line_exit_2(capsys, args, flag):
    code = main(["bench", "secagg", "--clients", "10", "--dim", "10", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]


def test_active_mode_round(capsys):
    code = main(["bench", "secagg", "--clients", "8", "--dim", "64", "--dropout", "0.25", "--dropout-stage", "unmask",
                 "--active", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["active"] is True and report["exact"] is True
    assert report["survivors"] == 8 and report["repeat"] == 3
    # sites in parallel: more than the server alone, less than every site one after another
    assert report["server_s"] < report["parallel_s"]
    assert report["parallel_s"] < report["total_s"] and report["passive_parallel_s"] < report["passive_total_s"]
    assert report["active_over_passive_parallel"] == pytest.approx(report["parallel_s"] / report["passive_parallel_s"])
    # a site holding the authority's signed roster checks it once at start, not each credential in its first round
    assert report["roster_check_s_mean"] > 0 and report["admission_s_mean_roster"] < report["admission_s_mean"]
    assert report["parallel_s_roster"] <= report["parallel_s"]
    assert "_stage_s" not in report


def test_the_critical_path_is_the_server_plus_the_slowest_site_of_each_stage():
    from fedveil.secagg.simulation import SimulationResult

    result = SimulationResult(config=None, result=None, abort_reason=None, server_s=1.0,  # type: ignore[arg-type]
                              client_s={0: 5.0, 1: 4.0}, upload_bytes={}, download_bytes={},
                              client_stage_s={"keys": {0: 2.0, 1: 1.0}, "masked": {0: 3.0, 1: 3.5}})
    assert result.total_s == 10.0
    assert result.critical_path_s() == 1.0 + 2.0 + 3.5
    assert result.critical_path_s({0: 0.5, 1: 0.25}) == 1.0 + 0.5 + 2.0 + 3.5


def test_repeated_runs_take_each_sites_median_before_the_slowest_site():
    from fedveil.commands.bench import parallel_round_s

    def run(server: float, a: float, b: float) -> dict:
        return {"server_s": server, "_stage_s": {"masked": {0: a, 1: b}, "admission": {0: 9.0, 1: 9.0},
                                                 "admission_roster": {0: 0.25, 1: 0.5},
                                                 "admission_warm": {0: 0.0, 1: 0.0}}}

    # site 1 was preempted once (5.0): its median is 1.0, so the slowest site's median is site 0's 2.0
    runs = [run(1.0, 2.0, 1.0), run(1.0, 2.0, 5.0), run(3.0, 2.0, 1.0)]
    assert parallel_round_s(runs, admission="admission_warm") == 1.0 + 2.0
    assert parallel_round_s(runs, admission="admission_roster") == 1.0 + 2.0 + 0.5
    assert parallel_round_s(runs) == 1.0 + 2.0 + 9.0
