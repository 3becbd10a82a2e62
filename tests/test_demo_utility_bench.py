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
