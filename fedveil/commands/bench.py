"""``fedveil bench``: measured runs of fedveil's engines.

``fedveil bench secagg`` runs one whole secure-aggregation round in this process — every client
and the server one after another, on random float32 updates, with the dropped clients chosen at
random and dropping at the given stage — and reports timings, the upload size and exactness.
Other benchmarks add subcommands to :data:`bench_group`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import click
import numpy as np

from fedveil.commands.common import fail, print_json_last_line
from fedveil.server.config import DEFAULT_MAX_CORRUPT_FRACTION

DROPOUT_STAGE_CHOICES = ("keys", "shares", "masked", "unmask")
CLIP = 1.0


@click.group(name="bench")
def bench_group() -> None:
    """Benchmarks that print measured figures (add --json for one machine-readable line)."""


def register(group: click.Group) -> None:
    if "bench" not in group.commands:
        group.add_command(bench_group)


def register_bench(group: click.Group, command: click.Command) -> None:
    """Add ``command`` under ``fedveil bench`` (each benchmark module's ``register``)."""
    bench_group.add_command(command)
    register(group)


def secagg_round_plan(clients: int, dropout: float, graph: str, max_corrupt_fraction: float) -> Any:
    """The bench's :class:`~fedveil.secagg.threshold.ThresholdPlan`: graph degree and the smallest
    threshold with 2t > h + c, as the coordinator derives them (degree 0 = the complete graph)."""
    from fedveil.secagg.threshold import plan_threshold

    return plan_threshold(clients, graph, expected_dropout=dropout, max_corrupt_fraction=max_corrupt_fraction)


def run_secagg_bench(clients: int, dim: int, dropout: float, dropout_stage: str, graph: str,
                     seed: int | None = None, active: bool = False,
                     max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION) -> dict[str, Any]:
    """Run the benchmark round and return the report (the JSON object of ``--json``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedveil.secagg import FixedPointEncoder, SecAggConfig
    from fedveil.secagg.prg import SEED_BYTES
    from fedveil.secagg.simulation import run_round

    plan = secagg_round_plan(clients, dropout, graph, max_corrupt_fraction)
    degree, threshold = plan.degree, plan.threshold
    n_drop = round(dropout * clients)
    if n_drop > clients - threshold:
        fail("--dropout", f"{n_drop} dropouts of {clients} clients leave fewer than the threshold t={threshold} "
                          f"(at most n - t = {clients - threshold} may drop; got dropout={dropout})")
    rng = np.random.default_rng(seed)  # test data and the choice of dropouts only, never masks
    updates = rng.uniform(-CLIP, CLIP, size=(clients, dim)).astype(np.float32)
    dropped = sorted(int(i) for i in rng.choice(clients, size=n_drop, replace=False))
    encoder = FixedPointEncoder.for_clients(clients, clip=CLIP, ring_bits=32)
    identity: dict[int, Ed25519PrivateKey] | None = None
    # a site's admission checks per pass: its first round without and with the authority's signed
    # roster, and a later round (all zero when passive); and the roster's one check at start
    admission: dict[str, dict[int, float]] = {name: dict.fromkeys(range(clients), 0.0) for name in ADMISSION_PASSES}
    roster_check_s: dict[int, float] = dict.fromkeys(range(clients), 0.0)
    graph_seed = b""
    if active:
        identity, admission, roster_check_s, graph_seed = _identities_and_admission(clients, plan,
                                                                                   max_corrupt_fraction)
    admission_s = admission["admission"]
    config = SecAggConfig(clients, threshold, encoder.encoded_length(dim), round_id=1, graph=plan.spec, active=active,
                          identity_keys=tuple(identity[c].public_key().public_bytes_raw() for c in range(clients))
                          if identity else None, max_corrupt_fraction=max_corrupt_fraction, graph_seed=graph_seed)

    wall_start = time.perf_counter()
    encode_s: dict[int, float] = {}
    inputs: dict[int, np.ndarray] = {}
    for cid in range(clients):
        start = time.perf_counter()
        inputs[cid] = encoder.encode(updates[cid], os.urandom(SEED_BYTES))
        encode_s[cid] = time.perf_counter() - start
    sim = run_round(config, inputs, dropouts={dropout_stage: dropped} if dropped else None, identity_keys=identity)
    total_s = time.perf_counter() - wall_start + sum(admission_s.values())

    client_s = [sim.client_s[c] + encode_s[c] + admission_s[c] for c in range(clients)]
    report: dict[str, Any] = {
        "clients": clients, "dim": dim, "dropout": dropout, "dropout_stage": dropout_stage, "graph": graph,
        "active": active,
        "degree": degree if degree else clients - 1, "threshold": threshold, "dropped": n_drop,
        "corrupt_bound": plan.corrupt, "max_corrupt_fraction": max_corrupt_fraction,
        "collusion_failure_log2": plan.to_dict()["collusion_failure_log2"],
        "dropout_failure_log2": plan.to_dict()["dropout_failure_log2"], "plan": plan.describe(),
        "dropped_clients": dropped,
        "completed": sim.completed,
        "total_s": total_s, "server_s": sim.server_s, "admission_s_mean": float(np.mean(list(admission_s.values()))),
        **{f"total_s{suffix}": total_s - sum(admission_s.values()) + sum(admission[name].values())
           for name, suffix in ADMISSION_PASSES.items() if suffix},
        **{f"admission_s_mean{suffix}": float(np.mean(list(admission[name].values())))
           for name, suffix in ADMISSION_PASSES.items() if suffix},
        "roster_check_s_mean": float(np.mean(list(roster_check_s.values()))),
        "client_s_mean": float(np.mean(client_s)), "client_s_max": float(np.max(client_s)),
        "upload_bytes_per_client": max(sim.upload_bytes.values()),
        # every site on its own machine: the server plus the slowest site of each stage
        **{f"parallel_s{suffix}": sim.critical_path_s({c: encode_s[c] + admission[name][c] for c in range(clients)})
           for name, suffix in ADMISSION_PASSES.items()},
        "_stage_s": _stage_times(sim.client_stage_s, encode_s, admission),
    }
    if sim.result is None:
        report.update(survivors=0, plaintext_sum_s=None, exact=False, max_abs_error=None,
                      abort_reason=sim.abort_reason)
        return report
    survivors = list(sim.result.survivors)
    selected = updates[survivors]
    start = time.perf_counter()
    plain_sum = np.sum(selected, axis=0)
    report["plaintext_sum_s"] = time.perf_counter() - start
    expected = np.zeros(config.vector_length, dtype=config.ring.dtype)
    for cid in survivors:
        config.ring.add(expected, inputs[cid])
    mean = encoder.decode_mean(sim.result.ring_sum, len(survivors))
    float_mean = selected.astype(np.float64).mean(axis=0)
    del plain_sum
    report.update(survivors=len(survivors), exact=bool(np.array_equal(expected, sim.result.ring_sum)),
                  max_abs_error=float(np.max(np.abs(mean - float_mean))),
                  error_bound=encoder.error_bound(len(survivors)),
                  preview={"decoded_mean": mean[:3].tolist(), "float_mean": float_mean[:3].tolist()})
    return report


def _stage_times(stages: dict[str, dict[int, float]], encode_s: dict[int, float],
                 admission: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Per-stage, per-site seconds, with encoding and each admission pass as their own stages."""
    out = {name: dict(per_client) for name, per_client in stages.items()}
    out["encode"] = dict(encode_s)
    out.update((name, dict(per_client)) for name, per_client in admission.items())
    return out


def parallel_round_s(runs: list[dict[str, Any]], *, admission: str = "admission") -> float:
    """The round's time with every site on its own machine, robust to a busy benchmark machine:
    each site's time in each stage is its median over the repeated runs, then each stage costs its
    slowest site, plus the server's median time (one preempted site in one run decides nothing).
    ``admission`` names the pass of :data:`ADMISSION_PASSES` the round pays for."""
    total = float(np.median([run["server_s"] for run in runs]))
    for stage in runs[0]["_stage_s"]:
        if stage in ADMISSION_PASSES and stage != admission:
            continue
        sites = set().union(*(run["_stage_s"].get(stage, {}).keys() for run in runs))
        medians = [float(np.median([run["_stage_s"].get(stage, {}).get(c, 0.0) for run in runs])) for c in sites]
        total += max(medians, default=0.0)
    return total


ADMISSION_PASSES = {"admission": "", "admission_roster": "_roster", "admission_warm": "_warm"}
"""A site's admission checks as timed: its first round of a job holding no roster (every peer's
credential signature and key checked in the round), its first round holding the authority's signed
roster (checked once at start), and a later round. Values: the suffix of their report keys."""


def _identities_and_admission(clients: int, plan: Any, fraction: float
                              ) -> tuple[Any, dict[str, dict[int, float]], dict[int, float], bytes]:
    """Active mode as a real site runs it, timed per client: an authority vouches for every identity;
    each client checks the whole roster and the threshold rule (its policy checks) and takes part in
    the commit-then-reveal of the graph seed. Timed in three passes (:data:`ADMISSION_PASSES`). Each
    first-round pass clears the process-wide memos of decoded credentials, checked keys and checked
    rosters before each site, so each site pays for its own decoding and checks; with a roster, the
    site's one check of it at start is timed apart (``roster_check_s``)."""
    from fedveil.secagg import beacon
    from fedveil.secagg.identity import decode_credential, verify_roster
    from fedveil.secagg.local_authority import LocalAuthority
    from fedveil.secagg.signed_roster import forget_checks, verify_signed_roster
    from fedveil.secagg.threshold import cohort_bound, threshold_problem

    authority = LocalAuthority("fedveil-bench")
    now = int(time.time())
    enrolled = [authority.identity(f"site-{c}", now=now) for c in range(clients)]
    signed_roster = authority.signed_roster(issued_at=now)
    roster = [credential.encode() for _, credential in enrolled]
    values = {c: beacon.new_contribution() for c in range(clients)}
    commitments = {c: beacon.commitment(1, c, v) for c, v in values.items()}
    seeds = set()

    def admit(c: int, verified: set[bytes]) -> float:
        start = time.perf_counter()
        credentials = [decode_credential(raw) for raw in roster]
        verify_roster(authority.public_key, credentials, consortium=authority.consortium, now=now,
                      revocations=None, verified=verified)
        holders, corrupt = cohort_bound(clients, plan.degree, fraction)
        if threshold_problem(plan.threshold, holders, corrupt) is not None:
            raise RuntimeError("the bench's threshold fails the policy check")
        beacon.check_commitments(commitments, own_id=c, own_commitment=commitments[c], num_clients=clients)
        seeds.add(beacon.combine(1, commitments, values))
        return time.perf_counter() - start

    def with_roster(c: int) -> tuple[float, float]:
        forget_checks()
        start = time.perf_counter()
        marks = verify_signed_roster(authority.public_key, signed_roster, consortium=authority.consortium)
        check_s = time.perf_counter() - start
        return check_s, admit(c, set(marks))

    times: dict[str, dict[int, float]] = {name: {} for name in ADMISSION_PASSES}
    caches: dict[int, set[bytes]] = {c: set() for c in range(clients)}
    roster_check_s: dict[int, float] = {}
    for c in range(clients):
        forget_checks()
        times["admission"][c] = admit(c, caches[c])
        roster_check_s[c], times["admission_roster"][c] = with_roster(c)
    for c in range(clients):
        times["admission_warm"][c] = admit(c, caches[c])
    assert len(seeds) == 1
    return {c: key for c, (key, _) in enumerate(enrolled)}, times, roster_check_s, seeds.pop()


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    graph = report["graph"]
    mode = "active-adversary" if report["active"] else "honest-but-curious"
    title = (f"secure aggregation round ({mode} server): {report['clients']} clients, dim {report['dim']}, "
             f"{graph} graph (degree {report['degree']}, threshold {report['threshold']}), "
             f"{report['dropped']} dropped at stage '{report['dropout_stage']}'")
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    def log2p(value: float | None) -> str:
        return "0 (impossible)" if value is None else f"2^{value:.1f}"

    rows = [
        ("threshold t (smallest with 2t > h + c)", report["threshold"]),
        (f"colluding holders c (f = {report['max_corrupt_fraction']:.4g})", report["corrupt_bound"]),
        ("collusion failure (more than c colluders)", log2p(report["collusion_failure_log2"])),
        ("dropout failure (fewer than t holders survive)", log2p(report["dropout_failure_log2"])),
        ("completed", report["completed"]), ("survivors", report["survivors"]),
        ("total_s (server + every site, one after another)", report["total_s"]), ("server_s", report["server_s"]),
        ("parallel_s (server + slowest site per stage)", report["parallel_s"]),
        ("admission_s_mean (identities, policy, graph seed)", report["admission_s_mean"]),
        ("client_s_mean", report["client_s_mean"]), ("client_s_max", report["client_s_max"]),
        ("upload_bytes_per_client", report["upload_bytes_per_client"]),
        ("plaintext_sum_s", report["plaintext_sum_s"]),
        ("exact (unmasked sum == sum of survivors' encodings)", report["exact"]),
        ("max_abs_error (decoded mean vs float mean)", report["max_abs_error"]),
    ]
    if "error_bound" in report:
        rows.append(("error bound (1 / fixed-point scale)", report["error_bound"]))
        preview = report["preview"]
        rows.append(("decoded mean, first coordinates", ", ".join(f"{v:+.7f}" for v in preview["decoded_mean"])))
        rows.append(("float mean, first coordinates", ", ".join(f"{v:+.7f}" for v in preview["float_mean"])))
    if report["dropped_clients"]:
        shown = report["dropped_clients"][:20]
        more = " …" if len(report["dropped_clients"]) > 20 else ""
        rows.insert(0, ("dropped clients", ", ".join(map(str, shown)) + more))
    if "passive_total_s" in report:
        rows.append(("passive round total_s (same run)", report["passive_total_s"]))
        rows.append(("active / passive (first round, no roster: every credential checked)",
                     report["active_over_passive"]))
        rows.append(("active / passive (first round, signed roster checked at start)",
                     report["active_over_passive_roster"]))
        rows.append(("active / passive (later rounds: credentials checked before)",
                     report["active_over_passive_warm"]))
        rows.append(("passive round parallel_s (same run)", report["passive_parallel_s"]))
        rows.append(("active / passive, sites in parallel (first round, no roster)",
                     report["active_over_passive_parallel"]))
        rows.append(("active / passive, sites in parallel (first round, signed roster)",
                     report["active_over_passive_parallel_roster"]))
        rows.append(("active / passive, sites in parallel (later rounds)",
                     report["active_over_passive_parallel_warm"]))
        rows.append(("signed roster's check at start, per site (once per job)", report["roster_check_s_mean"]))
    if report.get("abort_reason"):
        rows.append(("abort reason", report["abort_reason"]))
    for name, value in rows:
        table.add_row(name, fmt(value))
    Console().print(table)


@bench_group.command("secagg")
@click.option("--clients", type=int, default=100, show_default=True, help="number of clients n")
@click.option("--dim", type=int, default=100_000, show_default=True, help="update dimension m")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="fraction of clients that drop")
@click.option("--dropout-stage", type=click.Choice(DROPOUT_STAGE_CHOICES), default="masked", show_default=True,
              help="stage at which the dropped clients stop responding")
@click.option("--graph", type=click.Choice(("complete", "harary")), default="complete", show_default=True,
              help="masking graph: complete (SecAgg) or Harary (SecAgg+)")
@click.option("--seed", type=int, default=None, help="seed for the random updates and dropout choice")
@click.option("--active", is_flag=True, help="active-adversary mode: signed keys and a consistency-check round")
@click.option("--max-corrupt-fraction", type=float, default=DEFAULT_MAX_CORRUPT_FRACTION,
              help="fraction of the clients the server may control: t is the smallest with 2t > h + c "
                   "[default: 1/3]")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="rounds to run (interleaved active/passive with --active); timings are their medians")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def secagg_command(clients: int, dim: int, dropout: float, dropout_stage: str, graph: str, seed: int | None,
                   active: bool, max_corrupt_fraction: float, repeat: int, as_json: bool) -> None:
    """Run one whole secure-aggregation round in-process and report its cost and exactness."""
    if clients < 2:
        fail("--clients", f"need at least 2 clients (got {clients})")
    if dim < 1:
        fail("--dim", f"must be at least 1 (got {dim})")
    if not (math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        fail("--dropout", f"must be in [0, 1) (got {dropout})")
    if not (math.isfinite(max_corrupt_fraction) and 0.0 <= max_corrupt_fraction < 0.5):
        fail("--max-corrupt-fraction", f"must be in [0, 0.5) (got {max_corrupt_fraction})")
    if repeat < 1:
        fail("--repeat", f"must be at least 1 (got {repeat})")
    timed = ("total_s", "total_s_roster", "total_s_warm", "server_s")
    runs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for _ in range(repeat):
        # the same round without identities, interleaved in the same run: what the protections cost
        run = run_secagg_bench(clients, dim, dropout, dropout_stage, graph, seed, active, max_corrupt_fraction)
        passive = (run_secagg_bench(clients, dim, dropout, dropout_stage, graph, seed, False, max_corrupt_fraction)
                   if active else None)
        runs.append((run, passive))
    report = runs[-1][0]
    report["repeat"] = repeat
    actives = [run for run, _ in runs]
    for key in timed:  # medians over the repeats: one slow pass on a busy machine does not decide
        report[key] = float(np.median([run[key] for run in actives]))
    for name, suffix in ADMISSION_PASSES.items():
        report[f"parallel_s{suffix}"] = parallel_round_s(actives, admission=name)
    report["roster_check_s_mean"] = float(np.median([run["roster_check_s_mean"] for run in actives]))
    if active:
        passives = [p for _, p in runs if p is not None]
        passive_median = {key: float(np.median([p[key] for p in passives])) for key in timed}
        passive_median["parallel_s"] = parallel_round_s(passives)
        report["passive_total_s"] = passive_median["total_s"]
        report["passive_client_s_max"] = runs[-1][1]["client_s_max"] if runs[-1][1] else None
        report["active_over_passive"] = report["total_s"] / passive_median["total_s"]
        report["active_over_passive_roster"] = report["total_s_roster"] / passive_median["total_s"]
        report["active_over_passive_warm"] = report["total_s_warm"] / passive_median["total_s"]
        report["passive_parallel_s"] = passive_median["parallel_s"]
        report["active_over_passive_parallel"] = report["parallel_s"] / passive_median["parallel_s"]
        report["active_over_passive_parallel_roster"] = report["parallel_s_roster"] / passive_median["parallel_s"]
        report["active_over_passive_parallel_warm"] = report["parallel_s_warm"] / passive_median["parallel_s"]
    for run, passive in runs:
        run.pop("_stage_s", None)
        if passive is not None:
            passive.pop("_stage_s", None)
    if as_json:
        print_json_last_line(report)
    else:
        _print_table(report)
    if not report["completed"]:
        raise click.exceptions.Exit(1)
