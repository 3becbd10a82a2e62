"""``fedveil demo healthcare``: the scripted breast-cancer federation (see :mod:`fedveil.demo.runner`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from fedveil.commands.common import dashboard_token_option, fail, print_json_last_line, read_dashboard_token

MAX_HOSPITALS = 40


def register(group: click.Group) -> None:
    group.add_command(demo_group)


@click.group(name="demo")
def demo_group() -> None:
    """Scripted demos."""


@demo_group.command(name="healthcare")
@click.option("--hospitals", type=int, default=5, show_default=True, help="Number of hospitals (clients).")
@click.option("--rounds", type=int, default=None,
              help="Federated rounds [default: the tuned recipe's, fedveil.demo.recipe.Recipe.rounds].")
@click.option("--dropout", type=float, default=0.1, show_default=True,
              help="Probability that a hospital drops out of a round (mid-protocol, after the key exchange).")
@click.option("--dp", "dp_mode", type=str, default="local", show_default=True,
              help="local (patient-level DP-SGD per hospital), central or distributed (user-level), or none.")
@click.option("--in-process", is_flag=True, help="Call the coordinator in-process instead of TLS gRPC on loopback.")
@click.option("--dashboard", "dashboard_port", type=int, default=None, metavar="PORT",
              help="Serve the web dashboard on 127.0.0.1:PORT during the demo (and after it, until Ctrl+C); "
                   "its login URL is printed once.")
@dashboard_token_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Directory for report.json, report.md/html, plots, the run store and the hospitals' data.")
@click.option("--export-csv", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Only write each hospital's data as CSV (with SCHEMA.md) into DIR, then exit.")
@click.option("--sweep", is_flag=True,
              help="Instead of one run: the privacy-utility curve, the federation with local DP at each "
                   "--sweep-eps target on --sweep-splits split seeds, plus the non-private baselines "
                   "(sweep.png, sweep.json and report.html in --out; in process, so minutes per point).")
@click.option("--sweep-eps", default=",".join(f"{e:g}" for e in (0.5, 1, 2, 3, 5, 8)), show_default=True,
              help="Patient-level ε targets of the sweep, comma-separated.")
@click.option("--sweep-splits", type=int, default=3, show_default=True, help="Split seeds per point of the sweep.")
def healthcare_command(
    hospitals: int, rounds: int | None, dropout: float, dp_mode: str, in_process: bool,
    dashboard_port: int | None, out: Path, export_csv: Path | None, dashboard_token_file: Path | None,
    sweep: bool, sweep_eps: str, sweep_splits: int,
) -> None:
    """Hospitals train a breast-cancer risk model with local DP-SGD and secure aggregation."""
    if not 2 <= hospitals <= MAX_HOSPITALS:
        fail("--hospitals", f"must be between 2 and {MAX_HOSPITALS} (got {hospitals})")
    if rounds is not None and not 1 <= rounds <= 1000:
        fail("--rounds", f"must be between 1 and 1000 (got {rounds})")
    if not 0.0 <= dropout < 1.0:
        fail("--dropout", f"must be a probability in [0, 1) (got {dropout})")
    if dp_mode not in ("local", "central", "distributed", "none"):
        fail("--dp", f"must be one of local, central, distributed, none (got {dp_mode!r})")
    if dashboard_port is not None and not 0 <= dashboard_port <= 65535:
        fail("--dashboard", f"must be a TCP port in 0..65535 (got {dashboard_port})")
    if dashboard_token_file is not None and dashboard_port is None:
        fail("--dashboard-token-file", "only applies together with --dashboard PORT")
    if sweep:
        _run_sweep(hospitals, rounds, out, sweep_eps, sweep_splits, dashboard_port, export_csv)
        return
    dashboard_token = read_dashboard_token(dashboard_token_file)
    if export_csv is not None:
        ensure_directory("--export-csv", export_csv)
    else:
        ensure_directory("--out", out)

    from fedveil.demo.data import DEMO_SPLIT_SEED, make_split
    from fedveil.demo.runner import DemoOptions, OutputDirectoryError, run_demo
    from fedveil.demo.runner import export_csv as do_export

    try:
        split = make_split(hospitals, seed=DEMO_SPLIT_SEED)
    except ValueError as err:
        fail("--hospitals", str(err))
    if export_csv is not None:
        result = do_export(split, export_csv)
        for f in result["files"]:
            click.echo(f"{f['hospital']}: {f['rows']} patients -> {f['path']}")
        click.echo(f"schema: {result['schema']}")
        print_json_last_line(result)
        return
    options = DemoOptions(hospitals=hospitals, rounds=rounds, dropout=dropout, dp=dp_mode,  # type: ignore[arg-type]
                          in_process=in_process, dashboard_port=dashboard_port, out=out,
                          dashboard_token=dashboard_token)
    from fedveil.server.store import StoreError

    try:
        report = run_demo(options)
    except (StoreError, OutputDirectoryError) as err:
        fail("--out", str(err))
    except OSError as err:
        if dashboard_port is not None and "address" in str(err).lower():
            fail("--dashboard", f"cannot listen on port {dashboard_port}: {err}")
        raise
    print_json_last_line({
        "final_accuracy": report["final_accuracy"], "final_auc": report["final_auc"],
        "epsilon_sample_max": report["epsilon_sample_max"], "epsilon_user": report["epsilon_user"],
        "delta": report["delta"], "rounds": len(report["rounds"]), "status": report["status"],
        "report": report["files"]["json"], "wall_seconds": report["wall_seconds"],
    })


def ensure_directory(flag: str, path: Path) -> None:
    """Create ``path`` (and parents) or fail naming ``flag``; a file in the way is refused, not replaced."""
    if path.exists() and not path.is_dir():
        fail(flag, f"{str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(flag, f"cannot create directory {str(path)!r}: {err.strerror or err}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(flag, f"directory {str(path)!r} is not writable")


def _run_sweep(hospitals: int, rounds: int | None, out: Path, sweep_eps: str, sweep_splits: int,
               dashboard_port: int | None, export_csv: Path | None) -> None:
    """``--sweep``: the privacy-utility curve (:mod:`fedveil.demo.sweep`)."""
    if dashboard_port is not None or export_csv is not None:
        fail("--sweep", "runs on its own: leave out --dashboard and --export-csv")
    from fedveil.demo.sweep import SweepOptions, parse_epsilons, run_sweep

    try:
        epsilons = parse_epsilons(sweep_eps)
    except ValueError as err:
        fail("--sweep-eps", str(err))
    if not 1 <= sweep_splits <= 20:
        fail("--sweep-splits", f"must be between 1 and 20 (got {sweep_splits})")
    ensure_directory("--out", out)

    def progress(point: Any) -> None:
        label = "no DP" if point.epsilon is None else f"ε = {point.epsilon:g}"
        click.echo(f"split {point.split_seed}, {label}: accuracy {point.accuracy:.3f}, AUC {point.auc:.3f} "
                   f"({point.seconds:.0f} s)")

    summary = run_sweep(SweepOptions(out=out, epsilons=epsilons, splits=sweep_splits, hospitals=hospitals,
                                     rounds=rounds), on_point=progress)
    click.echo(f"privacy-utility curve: {out / 'sweep.png'}; report: {out / 'report.html'}; "
               f"wall time {summary['wall_seconds']:.0f} s")
    print_json_last_line({"curve": summary["curve"], "federated_non_private": summary["federated_non_private"],
                          "centralized": summary["centralized"], "wall_seconds": summary["wall_seconds"],
                          "png": str(out / "sweep.png")})
