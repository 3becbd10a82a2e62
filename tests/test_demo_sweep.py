"""The demo's privacy–utility sweep: argument checks naming the bad value, the summary's statistics,
and a tiny real sweep (the real federation, two ε targets, two split seeds, one round)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedveil.cli import main
from fedveil.demo.sweep import SweepPoint, parse_epsilons, summarize


@pytest.mark.parametrize(("text", "message"), [
    ("1,-2", "-2 is not an ε target"),
    ("1,abc", "'abc' is not a number"),
    ("0", "0 is not an ε target"),
    ("1,inf", "inf is not an ε target"),
    ("2,2", "given twice"),
])
def test_bad_epsilon_targets_are_refused_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_epsilons(text)


def test_epsilon_targets_are_sorted() -> None:
    assert parse_epsilons("8, 0.5,3") == (0.5, 3.0, 8.0)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--sweep-eps", "1,-1"], "--sweep-eps"),
    (["--sweep-splits", "0"], "--sweep-splits"),
    (["--dashboard", "0"], "--sweep"),
])
def test_the_command_names_the_flag_at_fault(argv: list[str], flag: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "healthcare", "--sweep", "--out", str(tmp_path / "out"), *argv]) == 2
    assert f"error: {flag}:" in capsys.readouterr().err


def test_the_summary_is_the_mean_and_sd_over_splits_per_epsilon() -> None:
    points = [SweepPoint(1.0, 7, 0.90, 0.95, 1.0, 1.0), SweepPoint(1.0, 8, 0.94, 0.97, 1.0, 1.0),
              SweepPoint(None, 7, 0.96, 0.99, None, 1.0), SweepPoint(None, 8, 0.98, 0.99, None, 1.0)]
    summary = summarize(points, [(0.97, 0.995), (0.99, 0.997)])
    (row,) = summary["curve"]
    assert row["epsilon"] == 1.0 and row["runs"] == 2
    assert row["accuracy"] == pytest.approx(0.92) and row["accuracy_sd"] == pytest.approx(0.0282842712)
    assert summary["federated_non_private"]["accuracy"] == pytest.approx(0.97)
    assert summary["centralized"]["auc"] == pytest.approx(0.996)


@pytest.mark.slow
def test_a_tiny_sweep_writes_the_curve_the_figures_and_the_report(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    assert main(["demo", "healthcare", "--sweep", "--rounds", "1", "--hospitals", "3", "--sweep-eps", "1,8",
                 "--sweep-splits", "2", "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["epsilon"] for row in last["curve"]] == [1.0, 8.0]
    assert all(row["runs"] == 2 and 0.5 < row["auc"] <= 1.0 for row in last["curve"])
    for row in last["curve"]:  # each hospital's DP-SGD stayed within the target it was given
        assert 0 < row["epsilon_spent_max"] <= row["epsilon"] + 1e-6
    assert last["federated_non_private"]["runs"] == 2 and last["centralized"]["runs"] == 2
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "Privacy–utility curve" in html and "sweep.png" in html and "centralized, no DP" in html
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["points"]) == 2 * 3 and saved["wall_seconds"] > 0
