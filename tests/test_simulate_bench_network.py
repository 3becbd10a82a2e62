"""``fedveil bench network`` runs end to end on a tiny model and reports both timings and memory."""

import json

import pytest

from fedveil.cli import main


@pytest.mark.slow
def test_bench_network_small(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "network", "--clients", "3", "--dim", "2000", "--rounds", "2", "--memory-clients", "2",
                 "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert report["clients"] == 3 and 1900 <= report["dim"] <= 2000
    assert len(report["in_process_round_s"]) == 2 and len(report["grpc_round_s"]) == 2
    assert report["ratio"] == pytest.approx(report["grpc_best_s"] / report["in_process_best_s"], rel=0.01)
    assert [m["clients"] for m in report["server_memory"]] == [2, 3]
    assert all(m["peak_mib"] >= m["baseline_mib"] > 0 for m in report["server_memory"])


def test_bench_network_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "network", "--clients", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --clients: must be at least 2 (got 1)"
    assert main(["bench", "network", "--dim", "5"]) == 2
    assert "error: --dim:" in capsys.readouterr().err
