"""``fedveil simulate``: a whole federation on this machine (in-process or as real processes) or on a
Ray cluster."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import click

from fedveil.commands.common import MAX_THREADS, eprint, fail, fail_from, print_json_last_line
from fedveil.server.config import DEFAULT_MAX_CORRUPT_FRACTION
from fedveil.simulation import BACKENDS

#: The ``field`` of a Ray backend refusal that one of this command's flags caused (named after it).
RAY_FIELDS = ("backend", "client_cpus", "client_gpus", "ray_address")


def register(group: click.Group) -> None:
    group.add_command(simulate_command)


SERVER_TO_SIMULATE_FLAGS = {"--dp-noise-multiplier": "--noise-multiplier", "--dp-clip": "--clip"}
"""``fedveil server`` flags that ``fedveil simulate`` names otherwise: a config error names the flag the user typed."""


@click.command("simulate")
@click.option("--clients", "n_clients", type=int, required=True, help="Number of simulated clients (sites).")
@click.option("--rounds", type=int, required=True, help="Training rounds.")
@click.option("--task", "task_ref", default="fedveil.tasks.synthetic", show_default=True,
              help="Task with synthetic_data(client_index, n_clients, seed), package.module[:attr].")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="in-process (default): client threads around the coordinator; processes: `fedveil server` "
                   "and one `fedveil client` process per site over loopback gRPC; ray: the coordinator behind "
                   "gRPC here and the sites in a pool of Ray actors (pip install 'fedveil[ray]').")
@click.option("--processes", is_flag=True, help="Same as --backend processes.")
@click.option("--ray-address", default=None,
              help="With --backend ray: join this Ray cluster (`ray start --head` prints it; 'auto' finds a "
                   "local one) instead of starting a local Ray.")
@click.option("--client-cpus", type=float, default=None,
              help="With --backend ray: CPUs each pool worker reserves (fractions allowed) [default: 1].")
@click.option("--client-gpus", type=float, default=None,
              help="With --backend ray: GPUs each pool worker reserves (fractions allowed) [default: 0].")
@click.option("--clients-per-round", type=int, default=None, help="Cohort size K (default: all clients).")
@click.option("--min-clients", type=int, default=None, help="Smallest cohort M (default: K).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Federation seed: model init, data, cohorts, the sites' data order. Keys, masks and noise come "
                   "from the OS unless --insecure-deterministic.")
@click.option("--insecure-deterministic", is_flag=True,
              help="Derive keys, masks, rounding, noise and round nonces from --seed too: same seed, same released "
                   "aggregates, bit for bit (benchmarks and tests only: anyone with the seed could unmask).")
@click.option("--secagg", type=click.Choice(["complete", "harary"]), default="complete", show_default=True)
@click.option("--max-corrupt-fraction", type=float, default=DEFAULT_MAX_CORRUPT_FRACTION,
              help="Fraction of a cohort the server may control; secure-aggregation thresholds satisfy "
                   "2t > h + c for it [default: 1/3].")
@click.option("--dp", type=click.Choice(["none", "local", "central", "distributed"]), default="none",
              show_default=True)
@click.option("--noise-multiplier", type=float, default=1.0, show_default=True,
              help="User-level noise multiplier (central / distributed DP).")
@click.option("--clip", type=float, default=1.0, show_default=True,
              help="User-level clip norm S (central / distributed DP).")
@click.option("--active-adversary/--passive", "active_adversary", default=True, show_default=True,
              help="Malicious-server protections (an in-memory consortium authority vouches for the simulated "
                   "sites), or passive secure aggregation with sites that trust the server.")
@click.option("--optimizer", type=click.Choice(["fedavg", "fedadam", "fedyogi", "fedadagrad"]), default="fedavg",
              show_default=True)
@click.option("--server-lr", type=float, default=1.0, show_default=True)
@click.option("--round-timeout", type=float, default=120.0, show_default=True)
@click.option("--stage-timeout", type=float, default=60.0, show_default=True)
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Keep the run store here (default: a temporary file).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads per process.")
@click.option("--verbose", is_flag=True, help="Log every client and server step.")
def simulate_command(
    n_clients: int, rounds: int, task_ref: str, backend: str | None, processes: bool, ray_address: str | None,
    client_cpus: float | None, client_gpus: float | None, clients_per_round: int | None,
    min_clients: int | None, seed: int, secagg: str, max_corrupt_fraction: float, dp: str, noise_multiplier: float,
    clip: float, active_adversary: bool, insecure_deterministic: bool, optimizer: str,
    server_lr: float, round_timeout: float, stage_timeout: float, store_path: Path | None, threads: int,
    verbose: bool,
) -> int:
    """Run a federation of --clients simulated sites for --rounds rounds on this machine.

    In-process by default: the real coordinator and every client (each in a thread) exchange the
    protocol's messages directly. With --processes: a `fedveil server` process and one
    `fedveil client` process per site, over loopback gRPC. With --backend ray: the coordinator
    behind gRPC in this process and the sites in a pool of Ray actors, on a local Ray or the
    cluster at --ray-address. Prints one line per round and the summary as JSON on the last line.
    """
    import torch

    from fedveil.server.config import ServerConfig, ServerConfigError
    from fedveil.simulation.backends import SimulationError, simulate_in_process
    from fedveil.simulation.process_backend import simulate_processes
    from fedveil.simulation.ray_backend import RayOptions, simulate_ray
    from fedveil.task import TaskLoadError, load_task

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    if n_clients < 2:
        fail("--clients", f"must be at least 2 (secure aggregation needs 2) (got {n_clients})")
    if rounds < 1:
        fail("--rounds", f"must be at least 1 (got {rounds})")
    if not 1 <= threads <= MAX_THREADS:
        fail("--threads", f"must be between 1 and {MAX_THREADS} (got {threads})")
    if processes and backend not in (None, "processes"):
        fail("--processes", f"contradicts --backend {backend}")
    backend = "processes" if processes else (backend or "in-process")
    if backend != "ray":
        for flag, value in (("--ray-address", ray_address), ("--client-cpus", client_cpus),
                            ("--client-gpus", client_gpus)):
            if value is not None:
                fail(flag, "only applies with --backend ray")
    if client_cpus is not None and not (math.isfinite(client_cpus) and client_cpus > 0):
        fail("--client-cpus", f"must be a positive number (got {client_cpus})")
    if client_gpus is not None and not (math.isfinite(client_gpus) and client_gpus >= 0):
        fail("--client-gpus", f"must be a non-negative number (got {client_gpus})")
    k = clients_per_round if clients_per_round is not None else n_clients
    if not 2 <= k <= n_clients:
        fail("--clients-per-round", f"must be between 2 and --clients ({n_clients}) (got {k})")
    m = min_clients if min_clients is not None else k
    if seed < 0:
        fail("--seed", f"must be non-negative (got {seed})")
    try:
        task = load_task(task_ref)
    except TaskLoadError as err:
        fail_from(err, "--task")
    if task.synthetic_data is None:
        fail("--task", f"task {task.name!r} has no synthetic_data(client_index, n_clients, seed) to simulate with")
    if store_path is not None and store_path.exists():
        fail("--store", f"{str(store_path)!r} already exists (choose a new path)")
    if store_path is not None and not store_path.parent.is_dir():
        fail("--store", f"directory {str(store_path.parent)!r} does not exist")
    try:
        config = ServerConfig.from_flat(
            task=task_ref, rounds=rounds, clients_per_round=k, min_clients=m, round_timeout=round_timeout,
            stage_timeout=stage_timeout, cohort_wait=2.0, secagg=secagg, max_corrupt_fraction=max_corrupt_fraction,
            dp=dp, dp_clip=clip,
            dp_noise_multiplier=noise_multiplier, optimizer=optimizer, server_lr=server_lr, seed=seed,
            linger=2.0, poll_wait=2.0, active_adversary=active_adversary,
            insecure_deterministic=insecure_deterministic,
        )
    except ServerConfigError as err:
        fail(SERVER_TO_SIMULATE_FLAGS.get(err.flag, err.flag), err.detail)
    torch.set_num_threads(threads)
    try:
        if backend == "ray":
            options = RayOptions(address=ray_address, client_cpus=1.0 if client_cpus is None else client_cpus,
                                 client_gpus=0.0 if client_gpus is None else client_gpus, torch_threads=threads)
            result = simulate_ray(config, n_clients, options=options, store_path=store_path)
        elif backend == "processes":
            # the sites' CSV files and the processes' logs go next to a kept store
            workdir = store_path.parent / (store_path.stem + "-sim") if store_path is not None else None
            result = simulate_processes(config, n_clients, workdir=workdir,
                                        store_path=store_path)
        else:
            result = simulate_in_process(config, n_clients, store_path=store_path)
    except SimulationError as err:
        if err.field in RAY_FIELDS:
            fail_from(err, "--backend")
        eprint(f"error: {err}")
        return 1
    click.echo(f"{result.mode} simulation: {n_clients} clients, {rounds} rounds, task {task.name}, seed {seed}")
    for rnd in result.rounds:
        stats = rnd.stats
        click.echo(
            f"round {rnd.round}: {rnd.survivors} survivors, update norm {float(stats.get('update_norm', 0.0)):.4f}, "
            f"{float(stats.get('duration_s', 0.0)):.2f} s"
        )
    final = result.summary.get("final_metrics") or {}
    if final:
        click.echo("final model: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()) if k != "examples"))
    for name, error in sorted(result.client_errors.items()):
        eprint(f"warning: {name}: {error}")
    print_json_last_line(result.to_dict())
    ok = result.summary.get("status") == "completed" and not result.client_errors
    return 0 if ok else 1
