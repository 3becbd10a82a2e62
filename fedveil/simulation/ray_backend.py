"""The Ray backend: the real coordinator behind gRPC in the driver, the simulated sites in a pool of
Ray actors, on this machine or across a Ray cluster.

The driver (this module) enrols the sites in the run store, serves the job with
:class:`fedveil.server.job_runner.JobRunner` and watches the pool. Each actor of the pool is a
:class:`fedveil.simulation.site_host.SiteHost`: it reserves ``client_cpus`` CPUs and ``client_gpus``
GPUs, like a Flower simulation's client resources, and the pool has as many actors as the cluster
fits, at most one per site; the sites are spread over the actors (site ``i`` on actor
``i mod W``) and each runs the real client code, in one of its actor's threads, over gRPC to the
driver. A site's data partition and identity key are made inside its actor; its keys, shares and
accountants stay there across rounds.

Networking: on a local Ray (the default) the coordinator listens on 127.0.0.1 in plaintext, as the
process backend does. With ``address`` (a Ray cluster that may span machines) it listens on the
driver's node address with TLS: the driver makes a one-job CA and a server certificate for that
address, and the actors verify the server against the CA (only the CA certificate travels).

Determinism: with the same seed and ``insecure_deterministic``, the sites get the same private
seeds, data and options as in the in-process backend (:func:`fedveil.simulation.backends.site_options`),
so the job releases the same aggregates, bit for bit.

A worker that dies (killed, out of memory, its node lost) takes its sites with it: the coordinator
treats them as dropouts at the stage they missed, and the driver records the failure; when fewer
live sites than the job's smallest cohort remain, it stops the job instead of waiting forever.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fedveil.server.config import ServerConfig
from fedveil.server.coordinator import JobSummary
from fedveil.server.events import JobListener
from fedveil.server.job_runner import GrpcEndpoint, JobRunner, TlsSettings
from fedveil.server.store import RunStore
from fedveil.simulation.backends import STILL_RUNNING, SimulatedSites, SimulationError, SimulationResult, client_name
from fedveil.simulation.faults import DropoutPlan
from fedveil.simulation.host import read_rounds
from fedveil.simulation.plain_sums import PlainSums
from fedveil.simulation.site_host import Connection, SiteHost, SiteReport, SiteSpec
from fedveil.task import load_task

log = logging.getLogger("fedveil.simulate")

RAY_EXTRA = "pip install 'fedveil[ray]'"
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
"""A local Ray's object store: nothing large goes through it (each site makes its own data)."""
STARTUP_TIMEOUT_S = 300.0
"""How long the pool may take to start and create its sites (a cluster may have to add nodes)."""
INLINE_MODEL_BYTES = 64 * 1024
"""Models up to this size ride inside the RoundStart: at 5,000 sites per round, 1,651 of a worker's
sites at once each waited on a ``FetchModel`` stream for a 4 KB model, waking 10 times a second
apiece (a load average near 500). Larger models are still fetched in chunks."""
RAY_START_ATTEMPTS = 2
"""Starts of a local Ray node that missed one of Ray's start-up windows (see :func:`init_local_ray`)."""
START_WINDOW_MISSES = ("timed out during startup", "Timed out waiting for file")
"""How Ray reports a missed start-up window: the raylet's registration with the GCS (a bare
``Exception``), or a port file of a process it starts (a ``RuntimeError``; the GCS server's, in the
failed run that added it)."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`SimulationError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise SimulationError(f"the Ray backend needs Ray, which is not installed: {RAY_EXTRA}",
                              field="backend") from None
    return ray


def init_local_ray(ray: ModuleType, **kwargs: Any) -> None:
    """``ray.init`` for a local Ray, tried again once when its node did not start in time.

    Ray waits a fixed 30 s for its GCS server to write its port file, and 30 s for its raylet to
    register with the GCS; it then raises a ``RuntimeError`` ("Timed out waiting for file
    .../gcs_server_port_...") or a bare ``Exception`` ("timed out during startup"). On a loaded
    machine (a test run beside other jobs) the first start can miss either window while a second
    one, after a clean shutdown, does not: a CI run on a 2-core machine missed the first."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception or a RuntimeError for these
            if not any(miss in str(err) for miss in START_WINDOW_MISSES):
                raise
            ray.shutdown()
            if attempt == RAY_START_ATTEMPTS:
                raise SimulationError(f"cannot start Ray: its node did not start in time, {RAY_START_ATTEMPTS} "
                                      f"attempts ({err})", field="backend") from None
            log.warning("the local Ray node did not start in time (%s); starting it again", err)


@dataclass(frozen=True)
class RayOptions:
    """Where the pool runs and what each of its actors reserves.

    ``address`` joins a running Ray cluster (``ray start --head``; ``"auto"`` finds a local one);
    None starts a local Ray with ``num_cpus`` CPUs (default: all of this machine's) and stops it
    afterwards. ``client_cpus``/``client_gpus`` are the resources each pool actor reserves
    (fractions allowed, as in Flower); ``torch_threads`` the torch CPU threads in each actor.
    ``working_dir``: a local directory Ray ships to every worker and puts on its import path (a task
    module that is not installed on the cluster's machines, e.g. a benchmark's generated one).
    """

    address: str | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    num_cpus: int | None = None
    torch_threads: int = 1
    working_dir: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.client_cpus) and self.client_cpus > 0):
            raise SimulationError(f"client_cpus: must be a positive number (got {self.client_cpus})",
                                  field="client_cpus")
        if not (math.isfinite(self.client_gpus) and self.client_gpus >= 0):
            raise SimulationError(f"client_gpus: must be a non-negative number (got {self.client_gpus})",
                                  field="client_gpus")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SimulationError(f"num_cpus: must be at least 1 (got {self.num_cpus})", field="num_cpus")
        if self.address is not None and self.num_cpus is not None:
            raise SimulationError("num_cpus: only for a local Ray (the cluster at address has its own)",
                                  field="num_cpus")


def pool_size(resources: dict[str, float], n_sites: int, options: RayOptions) -> int:
    """How many actors the pool gets: as many as the cluster's CPUs (and GPUs) fit, at most one per site."""
    fits = math.floor(resources.get("CPU", 0.0) / options.client_cpus + 1e-9)
    if options.client_gpus > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / options.client_gpus + 1e-9))
    if fits < 1:
        what = (f"{resources.get('CPU', 0.0):g} CPU(s) and {resources.get('GPU', 0.0):g} GPU(s)")
        raise SimulationError(f"the Ray cluster has {what}, not enough for one site worker with "
                              f"{options.client_cpus:g} CPU(s) and {options.client_gpus:g} GPU(s)",
                              field="client_gpus" if options.client_gpus > 0 else "client_cpus")
    return min(n_sites, fits)


class RaySimulation:
    """One job on the Ray backend. :meth:`run` runs it; :meth:`host_of` gives the actor hosting a
    site (tests kill it to make the site drop out); :attr:`placement` says on which node each site ran."""

    def __init__(self, config: ServerConfig, n_clients: int, *, options: RayOptions | None = None,
                 store_path: Path | None = None, listeners: Iterable[JobListener] = (),
                 timeout_s: float = 900.0, dropout: DropoutPlan | None = None,
                 record_plain_sums: bool = False) -> None:
        if n_clients < config.schedule.min_clients:
            raise SimulationError(f"--clients {n_clients} is fewer than --min-clients {config.schedule.min_clients}",
                                  field="clients")
        self.ray = import_ray()
        self.options = options or RayOptions()
        self.n_clients = n_clients
        self.names = [client_name(i) for i in range(n_clients)]
        self.sites = SimulatedSites.create(config, self.names)
        self.config = self.sites.config
        self.task = load_task(self.config.task)
        if self.task.synthetic_data is None:
            raise SimulationError(f"task {self.task.name!r} has no synthetic_data(client_index, n_clients, seed) "
                                  "to simulate with", field="task")
        self.store_path = store_path
        self.listeners = list(listeners)
        self.timeout_s = timeout_s
        self.dropout = dropout
        self.record_plain_sums = record_plain_sums
        self.plain_sums = PlainSums()
        self.worker_peak_rss_mb: list[float] = []
        """Each pool worker's peak resident memory (MiB), gathered after the job."""
        """With ``record_plain_sums`` (benchmarks): the sites' plaintext update sums, gathered after the job."""
        self.hosts: list[Any] = []
        self.assignment: dict[str, int] = {}
        self.placement: dict[str, str] = {}
        self.reports: dict[str, SiteReport] = {}
        self.errors: dict[str, str] = {}
        self._started_ray = False
        self._timed_out = False
        self.public_keys: dict[str, bytes] = {}

    def host_of(self, site: str) -> Any:
        """The actor handle hosting ``site`` (valid while :meth:`run` runs)."""
        return self.hosts[self.assignment[site]]

    # -- the pool -------------------------------------------------------------------------------

    def _start_ray(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return  # the caller's Ray (e.g. a test's cluster): used as it is, and left running
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if self.options.working_dir is not None:
            kwargs["runtime_env"] = {"working_dir": self.options.working_dir}
        start: Callable[..., None]
        if self.options.address is None:  # a local node, started again if it misses Ray's window
            kwargs.update(num_cpus=self.options.num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            start = functools.partial(init_local_ray, ray)
        else:
            kwargs["address"] = self.options.address
            start = ray.init
        try:
            start(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"join the Ray cluster at {self.options.address!r}" if self.options.address else "start Ray"
            raise SimulationError(f"cannot {where}: {err}",
                                  field="ray_address" if self.options.address else "backend") from None
        self._started_ray = True

    def _start_pool(self) -> None:
        ray = self.ray
        size = pool_size(ray.cluster_resources(), self.n_clients, self.options)
        per_host = math.ceil(self.n_clients / size)
        actor = ray.remote(SiteHost).options(
            num_cpus=self.options.client_cpus, num_gpus=self.options.client_gpus,
            max_concurrency=per_host + 2,  # each hosted site's session, and the driver's queries
            max_restarts=0, scheduling_strategy="SPREAD",
        )
        threads = self.options.torch_threads
        self.hosts = [actor.remote(self.config, self.sites.policy(with_roster=False), threads, self.dropout,
                                   self.record_plain_sums) for _ in range(size)]
        self.assignment = {name: i % size for i, name in enumerate(self.names)}
        specs: list[list[SiteSpec]] = [[] for _ in range(size)]
        for i, name in enumerate(self.names):
            specs[self.assignment[name]].append(SiteSpec(name, i, self.n_clients))
        try:
            created = ray.get([h.prepare.remote(s) for h, s in zip(self.hosts, specs, strict=True)],
                              timeout=STARTUP_TIMEOUT_S)
            where = ray.get([h.where.remote() for h in self.hosts], timeout=STARTUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise SimulationError(f"the Ray pool of {size} worker(s) did not start within {STARTUP_TIMEOUT_S:g} s "
                                  "(are the resources there? see `ray status`)", field="backend") from None
        self.public_keys = {name: key for batch in created for name, key in batch.items()}
        self.placement = {name: where[self.assignment[name]][0] for name in self.names}
        log.info("Ray pool: %d worker(s), %d site(s) each at most, on %d node(s)", size, per_host,
                 len(set(self.placement.values())))

    def _endpoint(self) -> tuple[GrpcEndpoint, Connection, str]:
        """Where to serve and how the sites connect: loopback plaintext on a local Ray, TLS on the
        driver's node address for a cluster. Returns (endpoint, connection without port, host)."""
        if self.options.address is None:
            return GrpcEndpoint("127.0.0.1:0", None, inline_model_up_to_bytes=INLINE_MODEL_BYTES), Connection(""), \
                "127.0.0.1"
        from fedveil.protocol.tls import generate_ca, generate_certificate

        host = self.ray.util.get_node_ip_address()
        ca = generate_ca("fedveil simulation CA", days=2)
        cert = generate_certificate(host, ca, hostnames=[host], days=2)
        bind = f"[{host}]:0" if ":" in host else f"{host}:0"
        endpoint = GrpcEndpoint(bind, TlsSettings(cert.cert_pem, cert.key_pem),
                                inline_model_up_to_bytes=INLINE_MODEL_BYTES)
        return endpoint, Connection("", ca.cert_pem), host

    # -- the job --------------------------------------------------------------------------------

    def run(self) -> SimulationResult:
        tmp: tempfile.TemporaryDirectory[str] | None = None
        store_path = self.store_path
        if store_path is None:
            tmp = tempfile.TemporaryDirectory(prefix="fedveil-sim-")
            store_path = Path(tmp.name) / "run.sqlite"
        started = time.monotonic()
        try:
            self._start_ray()
            self._start_pool()
            summary = self._run_job(store_path)
            rounds = read_rounds(store_path, summary.run_id)
        finally:
            self._close()
        histories = {name: report.outcomes for name, report in sorted(self.reports.items()) if not report.error}
        result = SimulationResult("ray", summary.to_dict(), rounds, histories, store_path,
                                  time.monotonic() - started, dict(sorted(self.errors.items())), dict(self.placement))
        if tmp is not None:
            result.store_path = Path("(temporary)")
            tmp.cleanup()
        return result

    def _run_job(self, store_path: Path) -> JobSummary:
        endpoint, connection, host = self._endpoint()
        with RunStore(store_path) as store:
            tokens = {name: store.enroll(name).token for name in self.names}
            runner = JobRunner(self.config, self.task, store, new_run=True, endpoint=endpoint,
                               listeners=self.listeners)
            try:
                target = f"[{host}]:{runner.port}" if ":" in host else f"{host}:{runner.port}"
                connection = Connection(target, connection.ca_cert_pem)
                pending = {
                    self.host_of(name).run_site.remote(name, self.sites.vouch(name, self.public_keys[name]),
                                                       tokens[name], connection): name
                    for name in self.names
                }
                done = threading.Event()
                watcher = threading.Thread(target=self._watch, args=(pending, runner, done), name="ray-watch",
                                           daemon=True)
                watcher.start()
                timer = threading.Timer(self.timeout_s, self._time_out, args=(runner,))
                timer.daemon = True
                timer.start()
                try:
                    self._await_sites(runner)
                    summary = runner.run()
                finally:
                    timer.cancel()
                    runner.stop()
                    done.set()
                    watcher.join()
                self._collect(pending, max(self.config.schedule.linger, 1.0) + 30.0)
                if self.record_plain_sums:
                    self._gather_plain_sums()
                self._gather_worker_memory()
            finally:
                runner.close()
        if self._timed_out:
            raise SimulationError(f"the job did not finish within {self.timeout_s:g} s", field="timeout_s")
        return summary

    def _gather_worker_memory(self) -> None:
        ray = self.ray
        for host in self.hosts:
            try:
                self.worker_peak_rss_mb.append(float(ray.get(host.peak_rss_mb.remote(), timeout=60.0)))
            except ray.exceptions.RayError:
                continue  # a dead worker has no figure

    def _gather_plain_sums(self) -> None:
        ray = self.ray
        for host in self.hosts:
            try:
                self.plain_sums.merge(ray.get(host.plain_sums.remote(), timeout=120.0))
            except ray.exceptions.RayError as err:  # a dead worker: its sites' sums are lost with it
                log.error("could not gather a worker's plaintext sums: %s", str(err).splitlines()[0])

    def _await_sites(self, runner: JobRunner) -> None:
        """Hold the first round until every live site has joined (or :data:`STARTUP_TIMEOUT_S`), so
        its cohort is drawn from all the simulated sites rather than the first to connect: with
        10,000 sites and 1,000 per round, those all sit in whichever worker started first. It counts
        sessions, not sites present: with 10,000 sites, pace steering keeps thousands away at any
        moment and a share of them late back, and waiting for all of them to be present at once held
        the first round until this wait's limit (6,949 of 10,000 present after 300 s, every one of
        them joined after 150 s)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and not self._timed_out:
            live = self.n_clients - len(self.errors)
            if live < self.config.schedule.min_clients or runner.coordinator.joined_sites() >= live:
                return  # (too few left: the watcher stops the job)
            time.sleep(0.2)
        log.warning("starting the job with %d of %d sites joined", runner.coordinator.joined_sites(), self.n_clients)

    def _time_out(self, runner: JobRunner) -> None:
        log.error("the job did not finish within %g s: stopping it", self.timeout_s)
        self._timed_out = True
        runner.stop()

    def _settle(self, ref: Any, name: str, runner: JobRunner | None = None) -> None:
        """Record a finished site session: its report, or the death of its worker. A session that
        ended in an error is gone for good: the coordinator hears it (``runner``, while the job runs),
        so the site is not drawn again and a round it is in does not wait for it."""
        ray = self.ray
        try:
            report: SiteReport = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self.errors[name] = f"its Ray worker died: {str(err).splitlines()[0]}"
            log.error("site %s: its Ray worker died", name)
        except ray.exceptions.RayError as err:
            self.errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        else:
            self.reports[name] = report
            if report.error:
                self.errors[name] = report.error
        if runner is not None and name in self.errors:
            runner.coordinator.site_gone(name, self.errors[name])

    def _watch(self, pending: dict[Any, str], runner: JobRunner, done: threading.Event) -> None:
        """While the job runs: settle each site whose session ends, and stop the job once too few
        sites are left to fill a cohort (no round could complete; it would only wait)."""
        ray = self.ray
        while not done.is_set() and pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                self._settle(ref, pending.pop(ref), runner)
            live = self.n_clients - len(self.errors)
            if ready and live < self.config.schedule.min_clients:
                log.error("%d site(s) left, the job needs %d: stopping it", live, self.config.schedule.min_clients)
                runner.stop()
                return

    def _collect(self, pending: dict[Any, str], timeout_s: float) -> None:
        """After the job: wait up to ``timeout_s`` for the sessions still running to end."""
        ray = self.ray
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(deadline - time.monotonic(), 0.1))
            for ref in ready:
                self._settle(ref, pending.pop(ref))
        for name in pending.values():
            self.errors.setdefault(name, STILL_RUNNING)

    def _close(self) -> None:
        ray = self.ray
        for handle in self.hosts:
            try:
                ray.kill(handle)
            except Exception as err:  # already dead, or Ray going down: nothing left to stop
                log.debug("killing a pool actor: %s", err)
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def simulate_ray(config: ServerConfig, n_clients: int, *, options: RayOptions | None = None,
                 store_path: Path | None = None, listeners: Iterable[JobListener] = (),
                 timeout_s: float = 900.0, dropout: DropoutPlan | None = None) -> SimulationResult:
    """Run the job with the real coordinator behind gRPC in this process and ``n_clients`` sites in a
    pool of Ray actors (local Ray by default, a cluster with ``options.address``)."""
    return RaySimulation(config, n_clients, options=options, store_path=store_path, listeners=listeners,
                         timeout_s=timeout_s, dropout=dropout).run()
