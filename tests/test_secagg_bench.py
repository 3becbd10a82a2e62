"""``fedveil bench secagg``: output format, exactness and argument errors."""

from __future__ import annotations

import json

import pytest

from fedveil.cli import main

KEYS = {"total_s", "server_s", "client_s_mean", "client_s_max", "upload_bytes_per_client", "plaintext_sum_s",
        "exact", "max_abs_error", "clients", "dim", "dropout", "dropout_stage", "graph"}


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
    # The masked input alone is 500 ring elements of 4 bytes; the rest is keys, shares, headers.
    assert 4 * 500 < report["upload_bytes_per_client"] < 4 * 500 + 12 * 200 + 500
    assert report["client_s_max"] >= report["client_s_mean"] > 0
    assert report["total_s"] >= report["server_s"] > 0


def test_table_output(capsys):
    code = main(["bench", "secagg", "--clients", "5", "--dim", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "upload_bytes_per_client" in out and "exact" in out and "True" in out


@pytest.mark.parametrize("args,flag", [
    (["--dropout", "1.0"], "--dropout"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "0.6"], "--dropout"),  # 6 of 10 drop, t = 6: more than n - t
    (["--dim", "0"], "--dim"),
    (["--clients", "1"], "--clients"),
    (["--graph", "ring"], "--graph"),
    (["--dropout-stage", "later"], "--dropout-stage"),
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
    assert report["survivors"] == 8
