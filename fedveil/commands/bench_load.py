"""``fedveil bench load``: one ``fedveil server`` process holding many connected sites."""

from __future__ import annotations

import click

from fedveil.commands.bench import register_bench
from fedveil.commands.common import eprint, fail_from, print_json_last_line


def register(group: click.Group) -> None:
    register_bench(group, load_bench_command)


@click.command("load")
@click.option("--sites", type=int, default=1000, show_default=True, help="Connected sites (sessions).")
@click.option("--per-round", type=int, default=150, show_default=True, help="Sites sampled per round.")
@click.option("--rounds", type=int, default=20, show_default=True)
@click.option("--processes", type=int, default=4, show_default=True, help="Worker processes the sites run in.")
@click.option("--active-adversary/--passive", "active", default=True, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help="Seconds for the job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def load_bench_command(sites: int, per_round: int, rounds: int, processes: int, active: bool, timeout_s: float,
                       as_json: bool) -> int:
    """Start `fedveil server` on loopback and connect --sites real client sessions to it (a thread each
    in --processes processes); rounds sample --per-round of them. Reports RPC latency (p50/p99), round
    time, the server's peak memory and file descriptors, INTERNAL errors and lost rounds."""
    from fedveil.simulation.backends import SimulationError
    from fedveil.simulation.loadbench import LoadBench, run_load_bench

    try:
        report = run_load_bench(LoadBench(sites=sites, per_round=per_round, rounds=rounds, processes=processes,
                                          active=active, timeout_s=timeout_s), progress=eprint)
    except SimulationError as err:
        fail_from(err, "--sites")
    if as_json:
        print_json_last_line(report)
        return 0
    click.echo(f"{sites} connected sites, {per_round} per round, {report['completed_rounds']}/{rounds} rounds "
               f"completed ({report['aborted_attempts']} aborted attempts), round {report['round_s']} s (median)")
    click.echo(f"  RPC latency (all but Poll): p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms")
    for name, figures in report["rpc"].items():
        held = "  (long poll: held by the server)" if name == "poll" else ""
        click.echo(f"    {name:<22} {figures['calls']:>7} calls  p50 {figures['p50_ms']:9.1f} ms  "
                   f"p99 {figures['p99_ms']:9.1f} ms{held}")
    click.echo(f"  server: peak RSS {report['server_peak_rss_mb']:.0f} MiB, peak open fds {report['server_peak_fds']}")
    click.echo(f"  INTERNAL errors: {report['internal_errors']}; server tracebacks: {report['server_tracebacks']}; "
               f"site failures: {report['site_failures']}")
    return 0 if report["internal_errors"] == 0 and report["lost_rounds"] == 0 else 1
