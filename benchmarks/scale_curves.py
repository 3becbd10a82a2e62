"""How a round's cost grows with the cohort: ``fedveil bench simulate`` at several n, drawn as a PNG.

Each point is one run of ``fedveil bench simulate --backend ray --json`` (its last line, saved as
``benchmarks/results/scale/n<N>-m<M>-<dp>-<mode>.json``); ``--run`` runs the points whose file is
missing, then the figure is drawn from every saved file: the median round time against the cohort
size n, with the same run's mask-expansion floor and public-key floor (runs at m ≥ 10,000), and the
driver's peak memory against n·k (the encrypted shares it routes) for each m, beside what keeping every
site's vector (n·m·4 bytes) would add.

    python benchmarks/scale_curves.py --run --clients 50 100 200 400 --dim 100000
    python benchmarks/scale_curves.py            # redraw docs/img/scale-rounds.png from the saved runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale"
FIGURE = ROOT / "docs" / "img" / "scale-rounds.png"
MASK_BOUND_DIM = 10_000
"""Runs at a smaller m go on the memory panel only."""


def result_path(clients: int, dim: int, dp: str, active: bool) -> Path:
    return RESULTS / f"n{clients}-m{dim}-{dp}-{'active' if active else 'passive'}.json"


def run_point(clients: int, dim: int, dp: str, active: bool, rounds: int, dropout: float) -> None:
    argv = [sys.executable, "-m", "fedveil.cli", "bench", "simulate", "--backend", "ray", "--clients", str(clients),
            "--dim", str(dim), "--rounds", str(rounds), "--dropout", str(dropout), "--dp", dp,
            "--active-adversary" if active else "--passive", "--json"]
    print("running:", " ".join(argv[3:]), flush=True)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path(clients, dim, dp, active).write_text(out.strip().splitlines()[-1] + "\n")


def draw() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not runs:
        sys.exit(f"no saved runs in {RESULTS}: run with --run first")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[int, str, bool], list[dict]] = {}
    for r in runs:
        series.setdefault((round(r["dim"], -3), r["dp"], r["active"]), []).append(r)
    for (dim, dp, active), points in sorted(series.items()):
        points.sort(key=lambda r: r["clients"])
        n = [r["clients"] for r in points]
        label = f"m≈{dim:,}, dp {dp}, {'active' if active else 'passive'}"
        n_k = [r["clients"] * r["degree"] for r in points]
        right.plot(n_k, [r["peak_rss_mb"] for r in points], "o-", label=label)
        if dim < MASK_BOUND_DIM:  # at small m the rounds are about sessions, not masks: memory only
            continue
        left.plot(n, [r["round_s"] for r in points], "o-", label=f"round ({label})")
        left.plot(n, [r["crypto_floor_s"] for r in points], "s--", label=f"masks + public keys ({label})")
        left.plot(n, [r["floor_s"] for r in points], "^:", label=f"mask floor ({label})")
        if dp == "none" and active and len(points) > 1:  # what O(n·m) would be: the first point plus n·m·4 bytes
            first = points[0]
            right.plot(n_k, [first["peak_rss_mb"] + r["n_times_m_mb"] - first["n_times_m_mb"] for r in points], ":",
                       color="grey", label=f"first point + n·m·4 bytes (m≈{dim:,})")
    left.set(xlabel="sites per round n (Harary SecAgg+, 10% leave at masked input)",
             ylabel="seconds (floors: one core)", title="Round time vs its floors", xscale="log", yscale="log")
    left.legend(fontsize=6, loc="upper left", framealpha=0.7)
    left.grid(alpha=0.3)
    right.set(xlabel="n·k (sites per round × Harary degree)", ylabel="driver + coordinator peak RSS (MiB)",
              title="Driver + coordinator memory: O(m + n·k)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    print(f"wrote {FIGURE} from {len(runs)} run(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the missing points first")
    parser.add_argument("--clients", type=int, nargs="*", default=[50, 100, 200, 400])
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dp", default="none")
    parser.add_argument("--passive", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    if args.run:
        for n in args.clients:
            if not result_path(n, args.dim, args.dp, not args.passive).exists():
                run_point(n, args.dim, args.dp, not args.passive, args.rounds, args.dropout)
    draw()


if __name__ == "__main__":
    main()
