"""A whole federation on one machine: the real coordinator and N real clients, in one process.

In-process (:func:`simulate_in_process`): the coordinator (:class:`fedveil.server.coordinator.Coordinator`)
runs its job in this process and every client runs the same client code as ``fedveil client``
(:class:`fedveil.clients.session.Federation`) in its own thread, talking to the coordinator
through :class:`fedveil.protocol.transport.InProcessTransport` — the same protobuf objects the
gRPC servicer would pass, without serialization or sockets.

Also here, for every backend (processes: :mod:`fedveil.simulation.process_backend`; Ray:
:mod:`fedveil.simulation.ray_backend`): the simulated sites' names, seeds, data, identities
(:class:`SimulatedSites`) and client options, and the :class:`SimulationResult` they return.

The backends are deterministic given ``seed``: the server's seed fixes the initial model, the cohorts and
the round seeds; client ``i`` gets private seed :func:`client_seed` and the data
``task.synthetic_data(i, n, seed)``, so the in-process and multi-process modes release identical aggregates.

The server side (start the in-process job, enrol clients in the run store, the ``fedveil server``
command line, the released rounds) is :class:`fedveil.simulation.host.CoordinatorHost`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch.utils.data import TensorDataset

from fedveil.clients.api import evaluator, run_client
from fedveil.clients.backoff import BackoffPolicy
from fedveil.clients.policy import DEFAULT_MAX_CORRUPT_FRACTION, DEFAULT_MIN_COHORT, SitePolicy
from fedveil.clients.session import ClientOptions, Federation, RoundOutcome
from fedveil.errors import FedveilError
from fedveil.protocol.transport import InProcessTransport
from fedveil.secagg.local_authority import DEFAULT_LIFETIME_SECONDS, LocalAuthority
from fedveil.secagg.signature_memo import SignatureMemo
from fedveil.secagg.signed_roster import SignedRoster
from fedveil.server.config import ServerConfig
from fedveil.simulation.faults import DropoutPlan, LeaveAtMaskedInput, SimulatedDropout
from fedveil.simulation.host import CoordinatorHost, StoredRound, job_seed
from fedveil.simulation.site_threads import one_blas_thread
from fedveil.task import Task, load_task

log = logging.getLogger("fedveil.simulate")

JobResult = TypeVar("JobResult")
#: The error recorded for a client thread still running ``join_timeout_s`` after its job ended.
STILL_RUNNING = "still running after the job ended"
#: The real coordinator and run store (stateless, so one instance serves every simulation).
COORDINATOR_HOST = CoordinatorHost()


class SimulationError(FedveilError, RuntimeError):
    """The simulation could not run to completion; the message says which party failed and why."""


def client_name(index: int) -> str:
    return f"client-{index:03d}"


def client_seed(seed: int, index: int) -> int:
    """Client ``index``'s private seed in a simulation with federation seed ``seed``."""
    digest = hashlib.sha256(f"fedveil/simulate/client/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


SIMULATED_CONSORTIUM = "fedveil-simulation"


@dataclass
class SimulatedSites:
    """The identities of a simulation's sites: an in-memory authority vouches for each (secure default)."""

    config: ServerConfig
    """The job's configuration, with the authority's consortium and key filled in (active mode)."""
    authority: LocalAuthority | None
    names: list[str]
    roster: SignedRoster | None = None
    """The authority's signed roster of the sites' credentials: each site checks it once, not per round."""

    @classmethod
    def create(cls, config: ServerConfig, names: Sequence[str]) -> SimulatedSites:
        names = list(names)
        if not config.secagg.active_adversary:
            return cls(config, None, names)
        authority = LocalAuthority(SIMULATED_CONSORTIUM)
        now = int(time.time())
        for name in names:
            authority.identity(name, now=now)
        config = config.replace(consortium=SIMULATED_CONSORTIUM,
                                authority_public_key=authority.public_key.raw.hex())
        return cls(config, authority, names, authority.signed_roster(issued_at=now))

    def policy(self, *, with_roster: bool = True) -> SitePolicy:
        """The sites' policy; ``with_roster=False`` for sites that make their own keys (the roster
        lists the credentials :meth:`create` made, which such sites do not use)."""
        if self.authority is None:  # a passive job: the sites opt in to trusting the server
            return SitePolicy(trust_server=True, **self._accepted())
        return SitePolicy(authority_public_key=self.authority.public_key.raw, consortium=self.authority.consortium,
                          roster=self.roster if with_roster else None, **self._accepted())

    def _accepted(self) -> dict[str, Any]:
        """What the simulated sites accept of their own job beyond a site's defaults: the job's colluding
        fraction if it assumes fewer colluders, and its smallest cohort if below the default minimum
        (the same for threads and processes)."""
        return {"max_corrupt_fraction": min(self.config.secagg.max_corrupt_fraction, DEFAULT_MAX_CORRUPT_FRACTION),
                "min_cohort": max(2, min(int(self.config.schedule.min_clients), DEFAULT_MIN_COHORT))}

    def _policy_flags(self) -> list[str]:
        accepted = self._accepted()
        return ["--max-corrupt-fraction", repr(accepted["max_corrupt_fraction"]),
                "--min-cohort", str(accepted["min_cohort"])]

    def identity(self, name: str) -> tuple[Ed25519PrivateKey | None, bytes]:
        if self.authority is None:
            return None, b""
        key, credential = self.authority.identity(name, now=int(time.time()))
        return key, credential.encode()

    def vouch(self, name: str, identity_public_key: bytes) -> bytes:
        """The authority's credential for a key the site made itself (its private key never leaves
        the site: the Ray backend's workers make theirs); empty in a passive job."""
        if self.authority is None:
            return b""
        now = int(time.time())
        return self.authority.issue(name, identity_public_key, not_before=now,
                                    not_after=now + DEFAULT_LIFETIME_SECONDS).encode()

    def write_files(self, workdir: Path) -> dict[str, list[str]]:
        """Key, credential and authority files for ``fedveil client``/``server`` processes: their extra flags."""
        from cryptography.hazmat.primitives import serialization

        from fedveil.protocol.identity_files import (
            CREDENTIAL_LABEL,
            SIGNED_ROSTER_LABEL,
            PinnedAuthority,
            armor,
            authority_public_text,
        )

        if self.authority is None:
            return {"server": ["--passive"], **{n: ["--trust-server", *self._policy_flags()] for n in self.names}}
        folder = workdir / "identities"
        folder.mkdir(parents=True, exist_ok=True)
        pub = folder / "authority.pub"
        pub.write_text(authority_public_text(PinnedAuthority(self.authority.consortium, self.authority.public_key)))
        flags: dict[str, list[str]] = {"server": ["--authority", str(pub)]}
        roster_flags: list[str] = []
        if self.roster is not None:
            roster_path = folder / "roster.bin"
            roster_path.write_text(armor(self.roster.encode(), SIGNED_ROSTER_LABEL))
            roster_flags = ["--roster", str(roster_path)]
        for name in self.names:
            key, credential = self.authority.identity(name, now=int(time.time()))
            key_path, cred_path = folder / f"{name}.key", folder / f"{name}.cred"
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            key_path.chmod(0o600)
            cred_path.write_text(armor(credential.encode(), CREDENTIAL_LABEL))
            flags[name] = ["--identity-key", str(key_path), "--credential", str(cred_path), "--authority", str(pub),
                           *roster_flags, *self._policy_flags()]
        return flags


def client_dataset(task: Task, index: int, n_clients: int, seed: int) -> TensorDataset:
    if task.synthetic_data is None:
        raise SimulationError(
            f"task {task.name!r} has no synthetic_data(client_index, n_clients, seed) to simulate with"
        )
    return task.synthetic_data(index, n_clients, seed)


SITE_PATIENCE_S = 120.0
"""How long a simulated site waits for one call, and retries one operation, before it gives up."""

SITE_PATIENCE_PER_MEMBER_S = 0.06
"""... and how much longer per cohort member: each site of a round gets the cohort's n keys and
credentials in its RoundStart and n advertisements in its PeerKeys, so a stage sends n² of them (at
n = 5,000 about 5 GB of RoundStarts on two cores), and the last sites' calls of a 5,000-site
round passed 120 s. It counts the enrolled sites too when there are more of them: 10,000 sites
that have all just joined poll at once, the server admits 8,064 calls, gRPC cancels a call queued
past 30 s, and 9 of the 10,000 ran out of 120 s of retries (one of them then drawn for a cohort)."""


def site_patience_s(config: ServerConfig, n_sites: int = 0) -> float:
    """A simulated site's call deadline and retry budget in a job of ``n_sites`` enrolled sites and
    the config's sites per round."""
    return max(SITE_PATIENCE_S, SITE_PATIENCE_PER_MEMBER_S * max(config.schedule.clients_per_round, n_sites))


def site_options(config: ServerConfig, task: Task, index: int, data: TensorDataset, *,
                 identity: Ed25519PrivateKey | None, credential: bytes, policy: SitePolicy,
                 verified_credentials: set[bytes] | None = None, signature_memo: SignatureMemo | None = None,
                 n_sites: int = 0) -> ClientOptions:
    """The client options of simulated site ``index``, the same for every backend that runs the
    client code in Python (in-process threads, Ray actors): its private seed, its data's size and
    evaluator, its identity and policy, backoff suited to a peer that answers at once, and the
    credential checks and signature verdicts its process shares among its sites."""
    return ClientOptions(
        seed=client_seed(job_seed(config), index), num_examples=len(data), evaluate=evaluator(task, data),
        identity_key=identity, credential=credential, policy=policy, verified_credentials=verified_credentials,
        signature_memo=signature_memo,
        insecure_deterministic=config.insecure_deterministic,
        poll_wait_ms=int(max(config.schedule.poll_wait, 0.5) * 1000),
        backoff=BackoffPolicy(initial_delay_s=0.05, max_delay_s=1.0,
                              give_up_after_s=site_patience_s(config, n_sites)),
    )


@dataclass
class SimulationResult:
    mode: str
    summary: dict[str, Any]
    rounds: list[StoredRound]
    client_histories: dict[str, list[str]]
    store_path: Path
    wall_s: float
    client_errors: dict[str, str] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)
    """Where each site ran, for backends that spread sites over machines (Ray: the node id)."""

    def to_dict(self) -> dict[str, Any]:
        placement = {"placement": self.placement} if self.placement else {}
        return {
            **placement,
            "mode": self.mode,
            "summary": self.summary,
            "rounds": [
                {"round": r.round, "survivors": r.survivors,
                 **{k: v for k, v in r.stats.items() if isinstance(v, (int, float, str))}}
                for r in self.rounds
            ],
            "clients": self.client_histories,
            "client_errors": self.client_errors,
            "store": str(self.store_path),
            "wall_s": round(self.wall_s, 3),
        }


@dataclass(frozen=True)
class ThreadedClient:
    """One client of an in-process job: its federation session and its local data."""

    name: str
    federation: Federation
    data: TensorDataset


def run_with_client_threads(
    run_job: Callable[[], JobResult],
    stop_job: Callable[[], None],
    task: Task,
    clients: Sequence[ThreadedClient],
    *,
    join_timeout_s: float,
    min_live_clients: int = 1,
    leave_round_on: tuple[type[Exception], ...] = (),
    site_gone: Callable[[str, str], None] | None = None,
) -> tuple[JobResult, dict[str, list[RoundOutcome]], dict[str, str]]:
    """Run the job in this thread while each client runs :func:`run_client` in its own thread.

    Returns the job's result, each client's round outcomes, and an error per client that failed
    (the coordinator treats it as a dropout) or was still running ``join_timeout_s`` after the
    job ended. When failures leave fewer than ``min_live_clients`` clients (the job's cohort), no
    round could ever fill again, so the job is stopped instead of waiting for them forever.
    ``site_gone`` (the coordinator's :meth:`~fedveil.server.coordinator.Coordinator.site_gone`) hears of
    each failed client at once, as the Ray backend's driver tells it of a dead worker: the round it is in
    goes on without it instead of waiting out the stage's deadline for it.
    Used by :func:`simulate_in_process` and the healthcare demo.
    """
    histories: dict[str, list[RoundOutcome]] = {}
    errors: dict[str, str] = {}
    failed_lock = threading.Lock()

    def client_main(client: ThreadedClient) -> None:
        try:
            histories[client.name] = run_client(client.federation, task, client.data, leave_round_on=leave_round_on)
        except Exception as err:  # reported, and the coordinator treats the client as a dropout
            with failed_lock:
                errors[client.name] = f"{type(err).__name__}: {err}"
                live = len(clients) - len(errors)
            log.error("client %s failed: %s: %s", client.name, type(err).__name__, err)
            log.debug("client %s failure", client.name, exc_info=True)
            if site_gone is not None:
                site_gone(client.name, f"its client failed: {type(err).__name__}: {err}")
            if live < min_live_clients:
                log.error("%d client(s) left, the job needs %d: stopping it", live, min_live_clients)
                stop_job()

    threads = [threading.Thread(target=client_main, args=(c,), name=c.name, daemon=True) for c in clients]
    with one_blas_thread():  # the sites run side by side: numpy's BLAS must not fight them for the cores
        for thread in threads:
            thread.start()
        try:
            result = run_job()
        finally:
            stop_job()
        deadline = time.monotonic() + join_timeout_s
        for thread in threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
    for thread in threads:
        if thread.is_alive():
            errors.setdefault(thread.name, STILL_RUNNING)
    return result, histories, errors


def simulate_in_process(
    config: ServerConfig,
    n_clients: int,
    *,
    host: CoordinatorHost = COORDINATOR_HOST,
    store_path: Path | None = None,
    client_timeout_s: float = 600.0,
    dropout: DropoutPlan | None = None,
) -> SimulationResult:
    """Run the job with the real coordinator (started by ``host``) and ``n_clients`` client
    threads in this process; ``dropout`` makes sites leave rounds at the masked-input stage."""
    task = load_task(config.task)
    if n_clients < config.schedule.min_clients:
        raise SimulationError(f"--clients {n_clients} is fewer than --min-clients {config.schedule.min_clients}")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if store_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedveil-sim-")
        store_path = Path(tmp.name) / "run.sqlite"
    started = time.monotonic()
    sites = SimulatedSites.create(config, [client_name(i) for i in range(n_clients)])
    config = sites.config
    job = host.start_job(config, task, store_path)
    try:
        clients = []
        verified: set[bytes] = set()  # the credential checks the sites of this process share
        memo = SignatureMemo()  # and their Ed25519 verdicts
        for i in range(n_clients):
            name = client_name(i)
            data = client_dataset(task, i, n_clients, job_seed(config))
            identity, credential = sites.identity(name)
            options = site_options(config, task, i, data, identity=identity, credential=credential,
                                   policy=sites.policy(), verified_credentials=verified, signature_memo=memo,
                                   n_sites=n_clients)
            transport: Any = InProcessTransport(job.service, name)
            if dropout is not None:
                transport = LeaveAtMaskedInput(transport, name, dropout)
            fed = Federation(transport, task.name, task.build_model(), options)
            clients.append(ThreadedClient(name, fed, data))
        summary, histories, errors = run_with_client_threads(
            job.run, job.stop, task, clients, join_timeout_s=client_timeout_s,
            min_live_clients=config.schedule.min_clients, leave_round_on=(SimulatedDropout,),
            site_gone=job.coordinator.site_gone,
        )
    finally:
        job.close()
    rounds = list(host.read_rounds(store_path, summary.run_id))
    result = SimulationResult(
        mode="in-process",
        summary=summary.to_dict(),
        rounds=rounds,
        client_histories={k: [h.outcome for h in v] for k, v in sorted(histories.items())},
        store_path=store_path,
        wall_s=time.monotonic() - started,
        client_errors=errors,
    )
    if tmp is not None:
        result.store_path = Path("(temporary)")
        tmp.cleanup()
    return result
