"""``fedveil bench network``: a round over loopback gRPC with client processes vs in-process."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click

from fedveil.commands.bench import register_bench
from fedveil.commands.common import eprint, fail, print_json_last_line

if TYPE_CHECKING:
    from fedveil.server.config import ServerConfig


def bench_config(task_ref: str, clients: int, rounds: int) -> ServerConfig:
    """The measured job: every client in every round, no evaluation, generous deadlines."""
    from fedveil.server.config import ServerConfig

    return ServerConfig.from_flat(
        task=task_ref, rounds=rounds, clients_per_round=clients, min_clients=clients, seed=0,
        round_timeout=900.0, stage_timeout=600.0, cohort_wait=2.0, linger=1.0, poll_wait=2.0,
        evaluate=False, final_evaluation=False,
    )


def register(group: click.Group) -> None:
    register_bench(group, network_command)


@click.command("network")
@click.option("--clients", type=int, default=10, show_default=True, help="Client processes in the measured round.")
@click.option("--dim", type=int, default=1_000_000, show_default=True, help="Model parameters m (about).")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds per run; the fastest round counts.")
@click.option("--memory-clients", type=int, default=5, show_default=True,
              help="Second cohort size for the server-memory comparison (0: skip).")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True, help="Seconds per run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def network_command(clients: int, dim: int, rounds: int, memory_clients: int, timeout_s: float, as_json: bool) -> int:
    """Time a round with --clients `fedveil client` processes over loopback gRPC against the same
    round in-process (target: at most 1.5x), and the server's peak memory for two cohort sizes
    (target: growth O(m), not O(n*m))."""
    from fedveil.simulation.backends import SimulationError
    from fedveil.simulation.netbench import run_network_bench

    if clients < 2:
        fail("--clients", f"must be at least 2 (got {clients})")
    if dim < 13:
        fail("--dim", f"must be at least 13 (got {dim})")
    if rounds < 1:
        fail("--rounds", f"must be at least 1 (got {rounds})")
    if memory_clients != 0 and not 2 <= memory_clients:
        fail("--memory-clients", f"must be 0 or at least 2 (got {memory_clients})")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        fail("--timeout", f"must be a finite positive number of seconds (got {timeout_s})")
    try:
        report = run_network_bench(clients, dim, make_config=bench_config, rounds=rounds,
                                   memory_clients=memory_clients or None, timeout_s=timeout_s)
    except SimulationError as err:
        eprint(f"error: {err}")
        return 1
    if as_json:
        print_json_last_line(report)
        return 0
    click.echo(f"one round, {clients} clients, m = {report['dim']:,} parameters "
               f"({report['masked_input_mib']} MiB masked input per client)")
    click.echo(f"  in-process         : {report['in_process_best_s']:.3f} s  (rounds: "
               + ", ".join(f"{s:.3f}" for s in report["in_process_round_s"]) + ")")
    click.echo(f"  loopback gRPC      : {report['grpc_best_s']:.3f} s  (rounds: "
               + ", ".join(f"{s:.3f}" for s in report["grpc_round_s"]) + ")")
    click.echo(f"  ratio gRPC/in-proc : {report['ratio']:.2f}x  (target <= {report['target_ratio']}x)")
    for mem in report["server_memory"]:
        click.echo(f"  server memory, n={mem['clients']:>3}: baseline {mem['baseline_mib']:.1f} MiB, "
                   f"peak {mem['peak_mib']:.1f} MiB, growth {mem['growth_mib']:.1f} MiB "
                   f"(n*m*4 bytes = {mem['n_times_m_mib']:.1f} MiB)")
    return 0
