"""One call per user: the front doors that :mod:`fedveil` exports and that need more than a re-export.

``fedveil.federate`` (the data scientist's loop) and the budget functions (``compute_epsilon``,
``solve_noise_multiplier``, ``build_report``) are the library's own functions, re-exported as they
are. The three here wrap lower-level calls that take a task object, TLS settings or a full job
configuration, so that each is one call with the defaults of the matching command:

- :func:`serve` — ``fedveil server``: run a job behind gRPC until it completes;
- :func:`simulate` — ``fedveil simulate``: a whole federation on this machine;
- :func:`load_ledger` — what ``fedveil budget report`` reads: a ledger JSON file or a run store.

They add no behaviour of their own: validation, security checks and results are those of
:func:`fedveil.server.runner.serve`, :mod:`fedveil.simulation.backends` and
:func:`fedveil.server.store.load_ledger`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedveil.errors import FedveilError
from fedveil.simulation import BACKENDS as SIMULATION_BACKENDS

if TYPE_CHECKING:
    from fedveil.dp.ledger import PrivacyLedger
    from fedveil.server.config import ServerConfig
    from fedveil.server.coordinator import JobSummary
    from fedveil.simulation.backends import SimulationResult

__all__ = ["FrontDoorError", "load_ledger", "serve", "simulate"]

#: The settings ``fedveil simulate`` gives every simulated job (loopback peers answer at once, so the
#: waits are shorter than a real deployment's ``fedveil server`` defaults).
SIMULATION_DEFAULTS: dict[str, Any] = {
    "round_timeout": 120.0,
    "stage_timeout": 60.0,
    "cohort_wait": 2.0,
    "linger": 2.0,
    "poll_wait": 2.0,
}


class FrontDoorError(FedveilError, ValueError):
    """A front door's argument is invalid; ``field`` names the argument."""


def serve(
    config: ServerConfig,
    *,
    store: str | Path = "run.db",
    listen: str = "127.0.0.1:7000",
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    client_ca: str | Path | None = None,
    insecure: bool = False,
    allow_insecure_remote: bool = False,
    authority: str | Path | None = None,
    revocations: str | Path | None = None,
    new_run: bool = False,
) -> JobSummary:
    """Run ``config``'s job behind gRPC until it completes, as ``fedveil server`` does.

    The job's model comes from ``config.model`` (a model file, no user code imported) or the task
    ``config.task``. TLS is required: give ``tls_cert`` and ``tls_key``
    (PEM files; ``client_ca`` adds mutual TLS), or ``insecure=True`` for plaintext, which is refused
    on an address other than loopback unless ``allow_insecure_remote``. A rerun with the same
    ``config`` and ``store`` resumes the unfinished run (``new_run=True`` starts a new one).
    ``authority`` (the consortium authority's public file) makes the server check each site's
    credential at Join and at each cohort draw and announce the consortium, as ``fedveil server
    --authority`` does; an active-adversary job (the default) needs it.

    Args:
        config: the job (:class:`~fedveil.server.config.ServerConfig`).
        store: the SQLite run store holding enrolments, rounds, the privacy ledger and checkpoints.
        listen: ``HOST:PORT`` to listen on (port 0: any free port).
        tls_cert: the server's certificate (PEM file).
        tls_key: the server's private key (PEM file).
        client_ca: a CA (PEM file) whose client certificates the server then requires.
        insecure: run without TLS (loopback only, unless ``allow_insecure_remote``).
        allow_insecure_remote: accept plaintext on a non-loopback address; tokens travel in the clear.
        authority: the consortium authority's public file (``fedveil authority init``).
        revocations: the authority's latest signed revocation list (needs ``authority``); read again
            whenever the file changes, so a site can be revoked mid-job.
        new_run: start a new run in ``store`` even if an unfinished one has the same settings.

    Returns:
        The job's summary (status, rounds, dropouts, final metrics, ε).

    Raises:
        FrontDoorError: TLS or authority arguments missing or contradictory; ``field`` names the argument.
    """

    from fedveil.model_file import job_task
    from fedveil.protocol.identity_files import load_authority_public, load_revocations
    from fedveil.protocol.tls import plaintext_refusal, read_pem
    from fedveil.secagg.identity import verify_revocations
    from fedveil.server.config import ServerConfigError
    from fedveil.server.runner import TlsSettings
    from fedveil.server.runner import serve as run_server

    tls: TlsSettings | None = None
    if insecure:
        if tls_cert is not None or tls_key is not None or client_ca is not None:
            raise FrontDoorError("insecure: cannot be combined with tls_cert, tls_key or client_ca", field="insecure")
        refusal = plaintext_refusal(listen, "allow_insecure_remote=True")
        if refusal is not None and not allow_insecure_remote:
            raise FrontDoorError(f"insecure: {refusal}", field="insecure")
    else:
        if allow_insecure_remote:
            raise FrontDoorError("allow_insecure_remote: only applies together with insecure=True",
                                 field="allow_insecure_remote")
        if tls_cert is None or tls_key is None:
            raise FrontDoorError("tls_cert: give tls_cert and tls_key, or insecure=True to run without TLS",
                                 field="tls_cert")
        tls = TlsSettings(read_pem(tls_cert, "tls_cert"), read_pem(tls_key, "tls_key"),
                          read_pem(client_ca, "client_ca") if client_ca is not None else None)
    revocation_list = None
    if revocations is not None and authority is None:
        raise FrontDoorError("revocations: needs authority (the list is checked against the authority's key)",
                             field="revocations")
    if authority is not None:
        pinned = load_authority_public(Path(authority))
        config = config.replace(consortium=pinned.consortium,
                                authority_public_key=pinned.public_key.raw.hex())
        if revocations is not None:
            revocation_list = load_revocations(Path(revocations))
            verify_revocations(pinned.public_key, revocation_list, consortium=pinned.consortium)
    try:
        config.check_serving()
    except ServerConfigError as err:
        raise FrontDoorError(f"authority: {err.detail}", field="authority") from None
    return run_server(config, job_task(config.task, config.model), store, listen, tls=tls, new_run=new_run,
                      revocations=revocation_list, revocations_path=Path(revocations) if revocations else None)


def simulate(
    clients: int = 5,
    rounds: int = 3,
    *,
    task: str = "fedveil.tasks.synthetic",
    seed: int = 0,
    dp: str = "none",
    processes: bool = False,
    store: str | Path | None = None,
    backend: str | None = None,
    ray_address: str | None = None,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    **job: Any,
) -> SimulationResult:
    """Run a federation of ``clients`` simulated sites for ``rounds`` rounds, as ``fedveil simulate`` does.

    The real coordinator and the real client code run on this machine: in one process (each site
    in a thread, exchanging the protocol's messages directly) or, with ``processes=True``, as a
    ``fedveil server`` process and one ``fedveil client`` process per site over loopback gRPC, or,
    with ``backend="ray"``, the coordinator behind gRPC in this process and the sites in a pool of
    Ray actors (a local Ray, or the cluster at ``ray_address``; ``pip install 'fedveil[ray]'``).
    Each site's data comes from the task's ``synthetic_data``. Sites assume a malicious server
    (an in-memory authority vouches for them) unless ``active_adversary=False`` is passed.

    Args:
        clients: number of simulated sites (at least 2).
        rounds: training rounds.
        task: a task with ``synthetic_data(client_index, n_clients, seed)``, ``package.module[:attr]``.
        seed: the federation seed (initial model, data, cohorts, the sites' data order).
        dp: ``"none"``, ``"local"``, ``"central"`` or ``"distributed"``.
        processes: run the server and each site as its own OS process (``backend="processes"``).
        store: keep the run store at this path (default: a temporary file, removed afterwards).
        backend: ``"in-process"`` (default), ``"processes"`` or ``"ray"``.
        ray_address: with ``backend="ray"``, the Ray cluster to join (default: start a local Ray).
        client_cpus: with ``backend="ray"``, the CPUs each pool worker reserves (fractions allowed).
        client_gpus: with ``backend="ray"``, the GPUs each pool worker reserves.
        **job: any other :class:`~fedveil.server.config.ServerConfig` field, e.g.
            ``clients_per_round``, ``secagg="harary"``, ``dp_noise_multiplier``, ``optimizer``.

    Returns:
        The summary, one record per round (survivors, the released aggregate's statistics) and each
        site's outcomes.

    Raises:
        FrontDoorError: ``clients``, ``rounds``, ``store`` or ``backend`` is invalid, or a Ray
            setting was given for another backend.
        fedveil.simulation.backends.SimulationError: the simulation could not run (e.g. Ray is not
            installed: ``field`` is ``"backend"``).
        fedveil.server.config.ServerConfigError: a job setting is invalid.
    """
    from fedveil.server.config import ServerConfig
    from fedveil.simulation.backends import simulate_in_process
    from fedveil.simulation.process_backend import simulate_processes

    if not isinstance(clients, int) or clients < 2:
        raise FrontDoorError(f"clients: must be at least 2 (secure aggregation needs 2) (got {clients!r})",
                             field="clients")
    if not isinstance(rounds, int) or rounds < 1:
        raise FrontDoorError(f"rounds: must be at least 1 (got {rounds!r})", field="rounds")
    store_path = Path(store) if store is not None else None
    if store_path is not None and store_path.exists():
        raise FrontDoorError(f"store: {str(store_path)!r} already exists (choose a new path)", field="store")
    if backend is not None and backend not in SIMULATION_BACKENDS:
        raise FrontDoorError(f"backend: one of {', '.join(SIMULATION_BACKENDS)} (got {backend!r})", field="backend")
    if processes and backend not in (None, "processes"):
        raise FrontDoorError(f"processes: contradicts backend={backend!r}", field="processes")
    chosen = "processes" if processes else (backend or "in-process")
    if chosen != "ray" and (ray_address is not None or client_cpus != 1.0 or client_gpus != 0.0):
        raise FrontDoorError("ray_address: ray_address, client_cpus and client_gpus only apply with backend='ray'",
                             field="ray_address")
    settings = {**SIMULATION_DEFAULTS, **job}
    settings.setdefault("clients_per_round", clients)
    settings.setdefault("min_clients", settings["clients_per_round"])
    config = ServerConfig.from_flat(task=task, rounds=rounds, seed=seed, dp=dp, **settings)
    if chosen == "ray":
        from fedveil.simulation.ray_backend import RayOptions, simulate_ray

        options = RayOptions(address=ray_address, client_cpus=client_cpus, client_gpus=client_gpus)
        return simulate_ray(config, clients, options=options, store_path=store_path)
    if chosen == "processes":
        workdir = store_path.parent / (store_path.stem + "-sim") if store_path is not None else None
        return simulate_processes(config, clients, workdir=workdir, store_path=store_path)
    return simulate_in_process(config, clients, store_path=store_path)


def load_ledger(path: str | Path, run: str | None = None) -> PrivacyLedger:
    """The privacy ledger in ``path``: a ledger JSON file, or a run in a run store (SQLite).

    Hand it to :func:`fedveil.dp.report.build_report` for the per-round and cumulative ε of the
    federation (user level) and of each site (sample level).

    Args:
        path: a ledger JSON file, or a server's run store.
        run: the run id in a run store (default: the latest run); only for a run store.

    Raises:
        FrontDoorError: ``path`` cannot be read, or ``run`` was given for a JSON file.
        fedveil.dp.ledger.LedgerFormatError: the JSON is not a ledger; ``field`` names the bad field.
        fedveil.server.store.StoreError: the run store has no such run, or no ledger yet.
    """
    from fedveil.dp.ledger import PrivacyLedger
    from fedveil.server.store import is_run_store
    from fedveil.server.store import load_ledger as load_store_ledger

    p = Path(path).expanduser()
    if not p.is_file():
        raise FrontDoorError(f"path: no such file (got {str(path)!r})", field="path")
    if is_run_store(p):
        ledger = load_store_ledger(p, run)
        if not isinstance(ledger, PrivacyLedger):
            raise FrontDoorError(f"path: run store {str(path)!r} did not yield a privacy ledger", field="path")
        return ledger
    if run is not None:
        raise FrontDoorError(f"run: only applies to a run store; {str(path)!r} is a ledger file", field="run")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FrontDoorError(f"path: cannot read {str(path)!r} as a ledger: {err}", field="path") from None
    return PrivacyLedger.from_json(text)
