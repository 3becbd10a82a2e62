"""The worker side of the Ray backend: one :class:`SiteHost` runs inside each Ray actor of the pool
and hosts the simulated sites assigned to it.

Each site is the real client code (:class:`fedveil.clients.session.Federation` driven by
:func:`fedveil.clients.api.run_client`) talking to the driver's coordinator over gRPC, exactly as
``fedveil client`` does. What belongs to a site stays in its host for the whole job and never
passes through the driver:

- its data partition, generated here from the task's ``synthetic_data(index, n, seed)``;
- its Ed25519 identity key, made here (only the public key goes to the driver, whose in-memory
  authority vouches for it);
- its session state: the per-round secure-aggregation keys and shares, its local DP accountant
  and its own privacy ledger (in the :class:`Federation` object, across rounds).

This module does not import Ray: :mod:`fedveil.simulation.ray_backend` wraps :class:`SiteHost` in
``ray.remote`` so that the class itself stays testable and typed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch.utils.data import TensorDataset

from fedveil.clients.api import run_client
from fedveil.clients.policy import SitePolicy
from fedveil.clients.session import Federation
from fedveil.protocol.client import ChannelConfig, GrpcTransport, open_channel
from fedveil.secagg.signature_memo import SignatureMemo
from fedveil.server.config import ServerConfig
from fedveil.simulation.backends import client_dataset, site_options, site_patience_s
from fedveil.simulation.faults import DropoutPlan, LeaveAtMaskedInput, SimulatedDropout
from fedveil.simulation.host import job_seed
from fedveil.simulation.plain_sums import PlainSums, run_recording_site
from fedveil.simulation.site_threads import one_blas_thread
from fedveil.simulation.work_slots import WorkSlots
from fedveil.simulation.worker_memory import return_large_blocks_to_os
from fedveil.task import Task, load_task

log = logging.getLogger("fedveil.simulate")

JOINS_PER_S = 200.0
"""Site i of a job starts its session i / JOINS_PER_S seconds into it: 10,000 sites joining at once
kept more calls in flight than the server's gRPC admits (it refused or cancelled them)."""


@dataclass(frozen=True)
class SiteSpec:
    """What a host needs to create site ``index`` of ``n_clients``: no data, no keys."""

    name: str
    index: int
    n_clients: int


@dataclass(frozen=True)
class Connection:
    """How the sites reach the driver's coordinator: ``target`` HOST:PORT, plaintext on loopback or
    TLS verified against ``ca_cert_pem`` (the job's own CA, made by the driver)."""

    target: str
    ca_cert_pem: bytes | None = None

    @property
    def insecure(self) -> bool:
        return self.ca_cert_pem is None


@dataclass(frozen=True)
class SiteReport:
    """How the job went for one site, reported back to the driver when the site's session ends."""

    name: str
    node_id: str
    outcomes: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class _Site:
    spec: SiteSpec
    data: TensorDataset
    identity: Ed25519PrivateKey | None


def current_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray
    except ImportError:
        return ""
    if not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())


class SiteHost:
    """A pool worker: holds its sites' data and identity keys, and runs each site's session in one of
    the actor's threads (``max_concurrency`` covers every site it hosts)."""

    def __init__(self, config: ServerConfig, policy: SitePolicy, torch_threads: int = 1,
                 dropout: DropoutPlan | None = None, record_plain_sums: bool = False) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        # Ray sets OMP_NUM_THREADS (which numpy's BLAS reads) to the worker's whole CPUs: 1 by default, more
        # with --client-cpus 2 or above, where every site's BLAS call would take that many threads
        one_blas_thread()
        return_large_blocks_to_os()  # the sites' bursts of large messages must not stay resident
        self.config = config
        self.policy = policy
        self.dropout = dropout
        self.plain = PlainSums() if record_plain_sums else None
        self.task: Task = load_task(config.task)
        # a process's first torch optimizer imports torch._dynamo (about 1.3 s of CPU, under the import
        # lock): pay it while the pool starts, not inside the first round, where every site thread
        # of this worker would wait for it
        self.task.make_optimizer(self.task.build_model().parameters())
        self.sites: dict[str, _Site] = {}
        self.verified_credentials: set[bytes] = set()
        """The credential checks this host's sites share (each credential is checked once per worker)."""
        self.signature_memo = SignatureMemo()
        """The Ed25519 verdicts this host's sites share (each public signature is verified once per worker)."""
        self.node_id = current_node_id()
        self.pid = os.getpid()
        self.slots = WorkSlots()
        """How many of this host's sites run Python at once (the others wait for the server or a slot)."""
        self._channels: dict[Connection, grpc.Channel] = {}
        self._channels_lock = threading.Lock()

    def channel(self, connection: Connection) -> grpc.Channel:
        """The one channel this host's sites share to ``connection``: each site still authenticates
        every call with its own token, and the channel's one polling thread delivers every site's
        completions, where a channel per site woke a thread per site every 200 ms
        (``benchmarks/held_calls.py``)."""
        with self._channels_lock:
            if connection not in self._channels:
                self._channels[connection] = open_channel(ChannelConfig(
                    target=connection.target, ca_cert_pem=connection.ca_cert_pem, insecure=connection.insecure))
            return self._channels[connection]

    def where(self) -> tuple[str, int]:
        """(Ray node id, process id) of this host."""
        return self.node_id, self.pid

    def prepare(self, specs: list[SiteSpec]) -> dict[str, bytes]:
        """Create the sites: generate each one's data partition here and, in an active job, its
        identity key. Returns each site's identity public key (empty in a passive job)."""
        public: dict[str, bytes] = {}
        for spec in specs:
            data = client_dataset(self.task, spec.index, spec.n_clients, job_seed(self.config))
            identity = Ed25519PrivateKey.generate() if self.config.secagg.active_adversary else None
            self.sites[spec.name] = _Site(spec, data, identity)
            public[spec.name] = identity.public_key().public_bytes_raw() if identity is not None else b""
        return public

    def peak_rss_mb(self) -> float:
        """This worker process's peak resident memory (MiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def plain_sums(self) -> dict[int, tuple[np.ndarray, float]]:
        """This worker's plaintext update sums per round (benchmarks only; empty unless recording)."""
        return dict(self.plain.sums) if self.plain is not None else {}

    def run_site(self, name: str, credential: bytes, token: str, connection: Connection) -> SiteReport:
        """Run site ``name``'s whole job (join, every round it is sampled for, the final evaluation).

        A failure of the site's own code is reported, not raised: the coordinator has already
        treated the site as a dropout. The death of the whole worker is what Ray reports to the
        driver as an actor error."""
        site = self.sites[name]
        time.sleep(site.spec.index / JOINS_PER_S)  # the sites join at a bounded rate, as a real federation's do
        options = site_options(self.config, self.task, site.spec.index, site.data, identity=site.identity,
                               credential=credential, policy=self.policy,
                               verified_credentials=self.verified_credentials, signature_memo=self.signature_memo,
                               n_sites=site.spec.n_clients)
        transport: Any = GrpcTransport(self.channel(connection), token, owns_channel=False,
                                       rpc_timeout_s=site_patience_s(self.config, site.spec.n_clients))
        if self.dropout is not None:
            transport = LeaveAtMaskedInput(transport, name, self.dropout)
        federation = Federation(self.slots.transport(transport), self.task.name, self.task.build_model(), options,
                                sleep=self.slots.sleep)
        try:
            with self.slots.site():
                if self.plain is not None:
                    history = run_recording_site(federation, self.task, site.data, self.plain)
                else:
                    history = run_client(federation, self.task, site.data, leave_round_on=(SimulatedDropout,))
        except Exception as err:  # the coordinator sees a dropout; the driver gets the reason
            log.error("site %s failed: %s: %s", name, type(err).__name__, err)
            return SiteReport(name, self.node_id, [h.outcome for h in federation.history],
                              f"{type(err).__name__}: {err}")
        return SiteReport(name, self.node_id, [h.outcome for h in history])
