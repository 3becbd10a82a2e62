"""``fedveil bench simulate``: a whole job at scale (Ray or in-process) against its mask-expansion floor."""

from __future__ import annotations

import click

from fedveil.commands.bench import register_bench
from fedveil.commands.common import fail_from, print_json_last_line


def register(group: click.Group) -> None:
    register_bench(group, simulate_bench_command)


@click.command("simulate")
@click.option("--backend", type=click.Choice(["ray", "in-process"]), default="ray", show_default=True)
@click.option("--clients", type=int, required=True, help="Sites per round (the cohort n).")
@click.option("--enrolled", type=int, default=None,
              help="Connected sites the cohorts are drawn from (default: --clients).")
@click.option("--dim", type=int, default=100_000, show_default=True, help="Model parameters m (about).")
@click.option("--dropout", type=float, default=0.1, show_default=True,
              help="Each site leaves each round at the masked-input stage with this probability.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds; round_s is their median.")
@click.option("--graph", type=click.Choice(["harary", "complete"]), default="harary", show_default=True)
@click.option("--dp", type=click.Choice(["none", "central", "distributed"]), default="none", show_default=True)
@click.option("--active-adversary/--passive", "active", default=True, show_default=True,
              help="Malicious-server protections (signatures, consistency check) or sites that trust the server.")
@click.option("--client-cpus", type=float, default=1.0, show_default=True, help="CPUs per Ray pool worker.")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of starting a local Ray.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help="Seconds for the job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def simulate_bench_command(backend: str, clients: int, enrolled: int | None, dim: int, dropout: float, rounds: int,
                           graph: str, dp: str, active: bool, client_cpus: float, ray_address: str | None, seed: int,
                           timeout_s: float, as_json: bool) -> int:
    """Run --rounds rounds of --clients sites (SecAgg+ on a Harary graph by default, --dropout of them
    leaving at the masked-input stage) and compare the median round with the round's mask-expansion
    floor measured in the same run (target: at most 3x). Reports the peak memory of this process,
    which holds the driver and the coordinator."""
    from fedveil.simulation.backends import SimulationError
    from fedveil.simulation.scalebench import ScaleBench, run_scale_bench

    try:
        bench = ScaleBench(clients=clients, dim=dim, rounds=rounds, dropout=dropout, enrolled=enrolled, backend=backend,
                           graph=graph, dp=dp, active=active, client_cpus=client_cpus, ray_address=ray_address,
                           seed=seed, timeout_s=timeout_s)
        report = run_scale_bench(bench)
    except SimulationError as err:
        fail_from(err, "--clients")
    if as_json:
        print_json_last_line(report)
        return 0
    click.echo(f"{report['rounds']} round(s), {clients} sites per round of {report['enrolled']} on {backend}, "
               f"m = {report['dim']:,}, {graph} k = {report['degree']}, t = {report['threshold']}, dp {dp}, "
               f"{'active' if active else 'passive'}")
    click.echo(f"  round (median)   : {report['round_s']:.2f} s  (each: "
               + ", ".join(f"{s:.2f}" for s in report["round_s_each"]) + f"); dropped {report['dropped_per_round']}")
    click.echo(f"  mask floor       : {report['floor_s']:.2f} s on one core, {report['floor_parallel_s']:.2f} s on "
               f"{report['cores']} ({report['masks_per_round']:.0f} masks of {report['mask_s'] * 1e3:.3f} ms)")
    click.echo(f"  round / floor    : {report['round_over_floor']:.2f}x  (over the {report['cores']}-core floor: "
               f"{report['round_over_parallel_floor']:.2f}x; target <= 3x)")
    click.echo(f"  with public keys : {report['crypto_floor_s']:.2f} s on one core (masks + 2k X25519 of "
               f"{report['x25519_s'] * 1e6:.0f} us" + (f" + (k + t) Ed25519 verifications of "
               f"{report['ed25519_verify_s'] * 1e6:.0f} us" if active else "")
               + f" per site); round / that: {report['round_over_crypto_floor']:.2f}x")
    click.echo(f"  exact            : {report['exact']} (max abs error {report['max_abs_error']})")
    click.echo(f"  peak RSS (driver + coordinator): {report['peak_rss_mb']:.0f} MiB "
               f"(n*m*4 bytes = {report['n_times_m_mb']:.0f} MiB)")
    for stage, seconds in report["stage_s"].items():
        click.echo(f"  stage {stage:<14}: {seconds:.2f} s")
    return 0
