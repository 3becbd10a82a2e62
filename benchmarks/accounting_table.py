"""The user-level accounting table of docs/accounting.md: what fedveil reports for each sampling situation,
next to what Google's dp-accounting computes for the same event.

Run: ``python benchmarks/accounting_table.py [--noise-multiplier 1.0] [--rounds 5] [--delta 1e-5]``.
The defaults are the issue's figures (z = 1.0, 5 rounds, δ = 1e-5): 10 sites enrolled, K = 4 per round.
"fedveil" is the ε in the ledger of a server (``GlobalModel.reserve_budget``, the RDP accountant) after
the rounds; the dp-accounting columns compose the same event with dp-accounting's own API.
Prints a Markdown table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import dp_accounting
import numpy as np
from absl import logging as absl_logging
from dp_accounting import NeighboringRelation as Rel

from fedveil.server.config import ServerConfig
from fedveil.server.training import GlobalModel

ENROLLED, K, DIM = 10, 4, 11  # 11: the synthetic task's model (only distributed DP's noise depends on it)


def fedveil_epsilon(*, dp: str, z: float, rounds: int, delta: float, available: int, amplification: bool) -> float:
    """ε in the server's ledger after ``rounds`` rounds of K drawn from ``available`` sites."""
    config = ServerConfig.from_flat(task="table:t", rounds=rounds, clients_per_round=K, min_clients=2, dp=dp,
                          dp_noise_multiplier=z, dp_delta=delta, dp_sampling_amplification=amplification)
    model = GlobalModel(config, np.zeros(DIM, dtype=np.float32), seed=0)
    cohort = min(K, available)
    for r in range(1, rounds + 1):
        model.reserve_budget(model.plan(r, cohort, cohort // 2 + 1, b"table"), available)
    assert model.ledger is not None
    return model.ledger.epsilon()


def dpa(event: dp_accounting.DpEvent, relation: Rel, delta: float, kind: str) -> float | None:
    """dp-accounting's ε for ``event`` (None where its accountant does not support the event).

    Mind the conventions under REPLACE_ONE: dp-accounting's PLD accountant doubles a Gaussian's
    sensitivity itself (its GaussianDpEvent multiplier is std / clip norm), its RDP accountant does not
    (the multiplier must already be std / 2S). The rows below hand each accountant its own convention.
    """
    acc: Any
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    else:
        acc = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    if not acc.supports(event):
        return None
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def rows(z: float, rounds: int, delta: float) -> list[dict[str, Any]]:
    def times(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(event, rounds)

    plain = times(dp_accounting.GaussianDpEvent(z))

    def wor(n: int) -> dp_accounting.DpEvent:
        # Replace-one: the clipped sum moves by up to 2S, so the multiplier is z / 2 (see the docs).
        return times(dp_accounting.SampledWithoutReplacementDpEvent(n, K, dp_accounting.GaussianDpEvent(z / 2)))

    out: list[dict[str, Any]] = []

    def add(situation: str, online: int, amplification: bool, event_text: str, relation: str, fed: float,
            event: dp_accounting.DpEvent | None, rel: Rel, note: str = "",
            pld_event: dp_accounting.DpEvent | None = None) -> None:
        pld_event = pld_event or event
        out.append({
            "situation": situation, "enrolled": max(ENROLLED, online), "online": online, "cohort": min(K, online),
            "amplification": amplification, "event": event_text, "relation": relation, "fedveil": fed,
            "dp_accounting_rdp": None if event is None else dpa(event, rel, delta, "rdp"),
            "dp_accounting_pld": None if pld_event is None else dpa(pld_event, rel, delta, "pld"), "note": note,
        })

    common = {"z": z, "rounds": rounds, "delta": delta}
    for amp in (False, True):
        add("all available sites taken", 4, amp, "Gaussian, q = 1", "add/remove",
            fedveil_epsilon(dp="central", available=4, amplification=amp, **common), plain, Rel.ADD_OR_REMOVE_ONE)
    add("old rule for the row above (unsound)", 4, True, "Poisson q = K / enrolled = 0.4", "add/remove",
        float("nan"), times(dp_accounting.PoissonSampledDpEvent(K / ENROLLED, dp_accounting.GaussianDpEvent(z))),
        Rel.ADD_OR_REMOVE_ONE, "what the ledger claimed before issue 10")
    add("K of N available, no amplification (default)", 10, False, "Gaussian, q = 1", "add/remove",
        fedveil_epsilon(dp="central", available=10, amplification=False, **common), plain, Rel.ADD_OR_REMOVE_ONE)
    for n in (10, 100):
        add(f"K of N available, amplification (N = {n})", n, True, f"without replacement, {K} of {n}",
            "replace-one", fedveil_epsilon(dp="central", available=n, amplification=True, **common), wor(n),
            Rel.REPLACE_ONE, "dp-accounting's PLD has no without-replacement event")
    add("same, plain Gaussian under replace-one (reference)", 10, False, "Gaussian at z / 2, q = 1", "replace-one",
        float("nan"), times(dp_accounting.GaussianDpEvent(z / 2)), Rel.REPLACE_ONE,
        "what taking everyone costs under the same relation (PLD: GaussianDpEvent(z), it doubles itself)",
        pld_event=plain)
    reference = dpa(plain, Rel.ADD_OR_REMOVE_ONE, delta, "rdp")
    add("distributed DP (Skellam, t = 3 of 4)", 10, False, "RDP curve at the threshold, q = 1", "add/remove",
        fedveil_epsilon(dp="distributed", available=10, amplification=False, **common), None, Rel.ADD_OR_REMOVE_ONE,
        f"dp-accounting has no Skellam event; the plain Gaussian at z gives {reference:.2f}")
    return out


def _cell(x: Any) -> str:
    if x is None:
        return "unsupported"
    if isinstance(x, float):
        return "–" if x != x else f"{x:.2f}"
    if isinstance(x, bool):
        return "on" if x else "off"
    return str(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    # dp-accounting logs a warning per RDP order its Poisson series drops; the table needs none of them.
    absl_logging.set_verbosity(absl_logging.ERROR)
    table = rows(args.noise_multiplier, args.rounds, args.delta)
    print(f"z = {args.noise_multiplier:g}, {args.rounds} rounds, δ = {args.delta:g}, K = {K}\n")
    head = ["situation", "enrolled", "online", "amplification", "event", "relation", "ε fedveil", "ε dp-accounting RDP",
            "ε dp-accounting PLD", "note"]
    keys = ["situation", "enrolled", "online", "amplification", "event", "relation", "fedveil", "dp_accounting_rdp",
            "dp_accounting_pld", "note"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in table:
        print("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
    clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in table]
    print(json.dumps({"noise_multiplier": args.noise_multiplier, "rounds": args.rounds, "delta": args.delta,
                      "rows": clean}))


if __name__ == "__main__":
    main()
