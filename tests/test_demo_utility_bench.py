"""benchmarks/demo_utility.py: its split-seed parsing and one real (short) split."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_utility.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_utility_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_split_seeds_parse_ranges_and_lists() -> None:
    bench = load_bench()
    assert bench.parse_seeds("0-3") == [0, 1, 2, 3]
    assert bench.parse_seeds("0,3,5") == [0, 3, 5]
    assert bench.parse_seeds("2-3,7") == [2, 3, 7]


@pytest.mark.parametrize("text", ["a-b", "1-", "x", ""])
def test_bad_split_seeds_name_the_flag(text: str) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit, match="--splits"):
        bench.parse_seeds(text)


def test_a_split_counts_only_the_runs_that_meet_both_targets_alone() -> None:
    bench = load_bench()
    runs = [
        {"accuracy": 0.95, "auc": 0.99, "epsilon": 2.9},   # both met
        {"accuracy": 0.93, "auc": 0.98, "epsilon": 2.99},  # both met, on the boundary
        {"accuracy": 0.929, "auc": 0.99, "epsilon": 2.9},  # accuracy one patient short
        {"accuracy": 0.97, "auc": 0.979, "epsilon": 2.9},  # AUC short
    ]
    row = bench.split_row(1, runs, (0.98, 0.998))
    assert row["runs_meeting_target"] == 2
    assert row["accuracy"] == pytest.approx((0.95 + 0.93 + 0.929 + 0.97) / 4)
    assert row["auc"] == pytest.approx((0.99 + 0.98 + 0.99 + 0.979) / 4)
    # the mean meets both targets although half the runs, each of which the demo could serve, do not
    assert bench.meets_target(row["accuracy"], row["auc"])
    assert row["epsilon_max"] == 2.99
    assert (row["central_accuracy"], row["central_auc"]) == (0.98, 0.998)
