"""Benchmark: privacy accounting speed (target: RDP accounting of 10,000 rounds in < 1 s).

Run: ``python benchmarks/dp_accounting_bench.py [--rounds 10000]`` (not named ``dp_accounting.py``: run as a
script, that name would shadow Google's ``dp_accounting`` package). Prints one line per figure and a JSON
object as the last line. Figures measured on a shared, busy machine are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from fedveil.dp.accounting import RDPAccountant, SubsampledGaussianEvent
from fedveil.dp.calibration import compute_epsilon, solve_noise_multiplier
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger
from fedveil.dp.report import build_report

DELTA = 1e-5


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10_000)
    args = parser.parse_args()
    n = args.rounds
    fed = SubsampledGaussianEvent(sample_rate=0.01, noise_multiplier=1.0)  # 100 of 10,000 clients per round
    results: dict[str, float] = {}

    # Warm the import of Opacus's analysis (once per process; not part of accounting).
    compute_epsilon(sample_rate=0.5, noise_multiplier=1.0, steps=1, delta=DELTA)

    def rdp_round_by_round() -> float:
        acc = RDPAccountant()
        for _ in range(n):
            acc.compose(fed)
        return acc.get_epsilon(DELTA)

    sec, eps = timed(rdp_round_by_round)
    results["rdp_round_by_round_s"] = sec
    print(f"RDP accountant, {n} rounds composed one by one + final ε: {sec * 1e3:.1f} ms (ε = {eps:.4f})")

    def rdp_epsilon_every_round() -> float:
        acc = RDPAccountant()
        eps = 0.0
        for _ in range(n):
            acc.compose(fed)
            eps = acc.get_epsilon(DELTA)
        return eps

    sec, _ = timed(rdp_epsilon_every_round)
    results["rdp_epsilon_every_round_s"] = sec
    print(f"RDP accountant, {n} rounds with ε queried after every round: {sec * 1e3:.1f} ms")

    def ledger_reserve() -> float:
        ledger = PrivacyLedger(LedgerConfig(federation_epsilon_budget=1e6))
        for r in range(n):
            ledger.reserve(r, federation=fed)
        return ledger.epsilon()

    sec, _ = timed(ledger_reserve)
    results["ledger_reserve_s"] = sec
    print(f"PrivacyLedger.reserve (budget check + record), {n} rounds: {sec * 1e3:.1f} ms")

    def ledger_report() -> int:
        ledger = PrivacyLedger()
        for r in range(n):
            ledger.record(r, federation=fed)
        return len(build_report(PrivacyLedger.from_json(ledger.to_json())).rounds)

    sec, _ = timed(ledger_report)
    results["ledger_json_roundtrip_and_report_s"] = sec
    print(f"ledger of {n} rounds: JSON round trip + per-round report: {sec * 1e3:.1f} ms")

    distinct = 50
    def rdp_distinct() -> float:
        acc = RDPAccountant()
        for i in range(distinct):
            acc.compose(SubsampledGaussianEvent(0.01 + i * 1e-4, 1.0))
        return acc.get_epsilon(DELTA)

    sec, _ = timed(rdp_distinct)
    results["rdp_distinct_event_ms"] = sec / distinct * 1e3
    print(f"RDP curve for a NEW (q, z) (Opacus analysis, {len(RDPAccountant().orders)} orders): "
          f"{sec / distinct * 1e3:.1f} ms per distinct event")

    for name in ("prv", "pld"):
        sec, eps = timed(lambda name=name: compute_epsilon(
            sample_rate=0.01, noise_multiplier=1.0, steps=n, delta=DELTA, accountant=name))
        results[f"{name}_{n}_rounds_s"] = sec
        print(f"{name.upper()} accountant, {n} identical rounds: {sec * 1e3:.1f} ms (ε = {eps:.4f})")

    for name in ("rdp", "prv", "pld"):
        sec, sol = timed(lambda name=name: solve_noise_multiplier(
            target_epsilon=3.0, delta=DELTA, sample_rate=0.01, steps=1_000, accountant=name))
        results[f"noise_solve_{name}_s"] = sec
        print(f"solve noise for ε=3 ({name}, q=0.01, 1000 steps): {sec * 1e3:.0f} ms, z = {sol.noise_multiplier:.4f}, "
              f"ε = {sol.epsilon:.4f} ({sol.evaluations} evaluations)")

    print(json.dumps({k: round(v, 6) for k, v in results.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
