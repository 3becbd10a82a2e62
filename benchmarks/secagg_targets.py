"""Run issue 2's secure-aggregation targets with ``fedveil bench secagg`` and compare.

Each configuration runs ``--repeat`` times (default 3) in fresh processes; the table shows the
median and the best total_s next to the target. Figures depend on the machine and on whatever
else runs on it: state both when you quote them.

    python benchmarks/secagg_targets.py [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

TARGETS = [
    # (args, target total_s)
    (["--clients", "100", "--dim", "100000", "--graph", "complete", "--dropout", "0.1", "--dropout-stage", "masked"],
     3.0),
    (["--clients", "100", "--dim", "100000", "--graph", "harary"], 1.0),
    (["--clients", "20", "--dim", "1000000", "--graph", "harary", "--dropout", "0.1", "--dropout-stage", "masked"],
     0.6),
    (["--clients", "500", "--dim", "100000", "--graph", "harary", "--dropout", "0.1", "--dropout-stage", "masked"],
     10.0),
]
UPLOAD_DIM = 1_000_000


def fedveil_cmd() -> list[str]:
    local = Path(sys.executable).with_name("fedveil")
    if local.exists():
        return [str(local)]
    found = shutil.which("fedveil")
    return [found] if found else [sys.executable, "-m", "fedveil.cli"]


def run(args: list[str]) -> dict:
    out = subprocess.run([*fedveil_cmd(), "bench", "secagg", *args, "--json"], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Run issue 2's secure-aggregation targets and print the figures.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (fresh process each)")
    parser.add_argument("--json", action="store_true", help="also print one JSON summary as the last line")
    options = parser.parse_args()
    repeat = options.repeat
    rows = []
    for args, target in TARGETS:
        reports = [run(args) for _ in range(repeat)]
        totals = [r["total_s"] for r in reports]
        last = reports[-1]
        rows.append({
            "args": " ".join(args), "target_s": target, "median_total_s": statistics.median(totals),
            "best_total_s": min(totals), "server_s": last["server_s"], "client_s_mean": last["client_s_mean"],
            "degree": last["degree"], "threshold": last["threshold"], "exact": all(r["exact"] for r in reports),
            "upload_bytes_per_client": last["upload_bytes_per_client"],
            "met": statistics.median(totals) <= target,
        })
    upload = run(["--clients", "20", "--dim", str(UPLOAD_DIM), "--graph", "harary"])
    limit = 1.05 * 4 * UPLOAD_DIM + 64_000
    summary = {"targets": rows, "upload_bytes_per_client_m1e6": upload["upload_bytes_per_client"],
               "upload_limit": limit, "upload_met": upload["upload_bytes_per_client"] <= limit}
    if options.json:
        print(json.dumps(summary))
        return
    for row in rows:
        print(f"{row['args']:<95} median {row['median_total_s']:.3f}s best {row['best_total_s']:.3f}s "
              f"target {row['target_s']}s {'met' if row['met'] else 'MISSED'} (k={row['degree']}, "
              f"t={row['threshold']}, exact={row['exact']})")
    print(f"upload at m=1e6: {summary['upload_bytes_per_client_m1e6']} bytes, limit {limit:.0f} "
          f"({'met' if summary['upload_met'] else 'MISSED'})")


if __name__ == "__main__":
    main()
