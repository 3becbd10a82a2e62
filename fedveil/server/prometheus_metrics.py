"""The job's Prometheus metrics (``fedveil server --metrics-port``), fed by the coordinator's events.

:class:`JobMetrics` is a job listener (:mod:`fedveil.server.events`) that keeps its metrics in a
private :class:`prometheus_client.CollectorRegistry`: two servers in one process (a test, a
simulation) never share a counter, and nothing is registered globally. What it cannot learn from
events it reads through cheap hooks at scrape time: the number of connected sites (one call
under the coordinator's lock) and the federation RPCs' message bytes
(:class:`~fedveil.protocol.traffic.TrafficCounter`). The user-level ε is recomputed from the
released ledger only when a scrape finds a newer one, on the scraping thread, never on the job's.

Like every listener, it sees only what the store keeps: counts, durations, stage names and the ε
already spent; never a site's update, a key or a token. Metric names are listed in
``docs/operations.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedveil.errors import FedveilError
from fedveil.protocol.traffic import TrafficCounter
from fedveil.server.events import (
    EvaluationRecorded,
    JobEvent,
    JobFinished,
    RoundAborted,
    RoundCompleted,
    RoundRejected,
    RoundStarted,
    StageClosed,
)

ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class MetricsEndpointError(FedveilError, OSError):
    """The metrics endpoint could not listen (``field``: ``metrics_port``)."""


class _TrafficCollector(Collector):
    """``fedveil_rpc_{received,sent}_bytes_total{rpc}`` from the servicer's byte counter."""

    def __init__(self, traffic: TrafficCounter) -> None:
        self._traffic = traffic

    def collect(self) -> Iterator[Metric]:
        received, sent = self._traffic.snapshot()
        families = (
            ("fedveil_rpc_received_bytes", "Message bytes received by the federation service, per RPC.", received),
            ("fedveil_rpc_sent_bytes", "Message bytes sent by the federation service, per RPC.", sent),
        )
        for name, doc, totals in families:
            family = CounterMetricFamily(name, doc, labels=["rpc"])
            for rpc, total in sorted(totals.items()):
                family.add_metric([rpc], float(total))
            yield family


class _EpsilonCollector(Collector):
    """The ε spent so far, from the ledger of the latest released round: ``fedveil_user_epsilon`` and
    ``fedveil_user_delta`` under user-level DP; ``fedveil_site_epsilon_max`` and its δ under local DP
    (the largest site's sample-level ε, as the sites reported their DP-SGD); absent without DP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledger_json: str | None = None
        self._computed: tuple[str, list[tuple[str, str, float]]] | None = None

    def update(self, ledger_json: str | None) -> None:
        if ledger_json is not None:
            with self._lock:
                self._ledger_json = ledger_json

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            text, computed = self._ledger_json, self._computed
            if text is None:
                return
            if computed is None or computed[0] is not text:
                computed = (text, _epsilon_gauges(text))
                self._computed = computed
        for name, doc, value in computed[1]:
            yield GaugeMetricFamily(name, doc, value=value)


def _epsilon_gauges(ledger_json: str) -> list[tuple[str, str, float]]:
    from fedveil.dp.ledger import PrivacyLedger
    from fedveil.server.privacy_view import spent_epsilon

    spent = spent_epsilon(PrivacyLedger.from_json(ledger_json))
    if spent is None:
        return []
    if spent.user_level:
        return [("fedveil_user_epsilon", "User-level ε the federation has spent so far.", spent.epsilon),
                ("fedveil_user_delta", "The δ of fedveil_user_epsilon.", spent.delta)]
    return [("fedveil_site_epsilon_max", "The largest sample-level ε a site has spent so far (local DP, as the "
             "sites reported it).", spent.epsilon),
            ("fedveil_site_delta_max", "The largest δ of the sites' sample-level guarantees.", spent.delta)]


class JobMetrics:
    """A job listener keeping the server's metrics (see the module docstring)."""

    def __init__(self, *, traffic: TrafficCounter | None = None, connected: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_started = Counter("fedveil_rounds_started", "Round attempts announced to a cohort.",
                                      ["purpose"], registry=r)
        self.rounds_completed = Counter("fedveil_rounds_completed",
                                        "Training rounds released (aggregate applied to the global model).",
                                        registry=r)
        self.rounds_rejected = Counter("fedveil_rounds_rejected",
                                       "Rounds whose unmasked sum was rejected (skipped, model unchanged).",
                                       registry=r)
        self.rounds_aborted = Counter("fedveil_round_attempts_aborted",
                                      "Round attempts aborted without a release, by the stage they ended at.",
                                      ["stage"], registry=r)
        self.dropouts = Counter("fedveil_dropouts", "Sites that dropped out of a round, by stage.", ["stage"],
                                registry=r)
        self.round_duration = Histogram("fedveil_round_duration_seconds",
                                        "Wall time of released training rounds, from announcement to release.",
                                        buckets=ROUND_BUCKETS, registry=r)
        self.stage_duration = Histogram("fedveil_stage_duration_seconds",
                                        "Time from a stage's opening to its close.", ["stage"],
                                        buckets=STAGE_BUCKETS, registry=r)
        self.model_version = Gauge("fedveil_model_version",
                                   "Version of the global model (rounds completed or skipped).", registry=r)
        self.current_round = Gauge("fedveil_current_round", "The round the job is running (0 between jobs).",
                                   registry=r)
        self.evaluation = Gauge("fedveil_evaluation",
                                "The latest securely summed evaluation of the global model, per metric.",
                                ["metric"], registry=r)
        self.job_running = Gauge("fedveil_job_running", "1 while the job runs, 0 once it has ended.", registry=r)
        self.connected = Gauge("fedveil_connected_sites", "Sites connected to the server now.", registry=r)
        if connected is not None:
            self.connected.set_function(lambda: float(connected()))
        self._epsilon = _EpsilonCollector()
        r.register(self._epsilon)
        if traffic is not None:
            r.register(_TrafficCollector(traffic))

    def resume_from(self, model_version: int, ledger_json: str | None) -> None:
        """Start from a resumed run's state (its model version and the ledger so far)."""
        self.model_version.set(model_version)
        self._epsilon.update(ledger_json)

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, RoundStarted):
            self.rounds_started.labels(purpose=event.purpose).inc()
            self.current_round.set(event.round)
            self.job_running.set(1)
        elif isinstance(event, StageClosed):
            self.stage_duration.labels(stage=event.stage).observe(max(0.0, event.duration_s))
            for stage in event.dropped.values():
                self.dropouts.labels(stage=stage).inc()
        elif isinstance(event, RoundCompleted):
            self.rounds_completed.inc()
            self.model_version.set(event.round)
            duration = event.stats.get("duration_s")
            if isinstance(duration, (int, float)):
                self.round_duration.observe(float(duration))
            self._epsilon.update(event.ledger_json)
        elif isinstance(event, RoundRejected):
            self.rounds_rejected.inc()
            self.model_version.set(event.round)
        elif isinstance(event, RoundAborted):
            self.rounds_aborted.labels(stage=event.stage).inc()
        elif isinstance(event, EvaluationRecorded):
            for name, value in event.metrics.items():
                self.evaluation.labels(metric=name).set(value)
        elif isinstance(event, JobFinished):
            self.job_running.set(0)
            self.current_round.set(0)


class MetricsEndpoint:
    """``/metrics`` over HTTP for one registry (prometheus-client's server, on its own threads)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise MetricsEndpointError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                                       field="metrics_port") from None
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
