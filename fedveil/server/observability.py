"""What a running server shows operators: its gRPC health status, and (``--metrics-port``) its
Prometheus metrics.

:class:`ServerObservability` is built by :func:`fedveil.server.runner.serve` for one server. It
owns the standard health service (:class:`~fedveil.protocol.health.ServingHealth`: ``SERVING``
while the job runs, ``NOT_SERVING`` from the job's end), the byte counter of the federation RPCs
and, when a metrics port is given, the job's metrics and their HTTP endpoint
(:mod:`fedveil.server.prometheus_metrics`). Everything it learns about the job comes from the
coordinator's events (:mod:`fedveil.server.events`), so it sees only what the store keeps.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fedveil.errors import FedveilError
from fedveil.protocol.health import ServingHealth
from fedveil.protocol.traffic import TrafficCounter
from fedveil.server.coordinator import Coordinator
from fedveil.server.events import JobEvent, JobFinished
from fedveil.server.prometheus_metrics import JobMetrics, MetricsEndpoint

DEFAULT_METRICS_HOST = "127.0.0.1"


class ObservabilityConfigError(FedveilError, ValueError):
    """A bad metrics setting; ``field`` names it (``metrics_port``, ``metrics_host``)."""


@dataclass(frozen=True)
class ObservabilityConfig:
    """Operator-facing settings of a server's telemetry.

    ``metrics_port`` 0 turns the Prometheus endpoint off (the default); ``metrics_host`` is the
    address it binds (loopback unless the operator says otherwise: the metrics show the job's
    progress and its ε to anyone who can reach the port).
    """

    metrics_port: int = 0
    metrics_host: str = DEFAULT_METRICS_HOST

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ObservabilityConfigError(
                f"must be a TCP port in 1..65535, or 0 for no metrics (got {self.metrics_port})",
                field="metrics_port")
        try:
            ipaddress.ip_address(self.metrics_host)
        except ValueError:
            raise ObservabilityConfigError(
                f"must be an IP address such as 127.0.0.1 or 0.0.0.0 (got {self.metrics_host!r})",
                field="metrics_host") from None


class _HealthOnJobEnd:
    """Turns the health status to ``NOT_SERVING`` when the job ends (before the server lingers)."""

    def __init__(self, health: ServingHealth) -> None:
        self._health = health

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, JobFinished):
            self._health.set_serving(False)


class ServerObservability:
    """The health service, the RPC byte counter and the optional metrics of one server."""

    def __init__(self, config: ObservabilityConfig | None = None) -> None:
        self.config = config or ObservabilityConfig()
        self.health = ServingHealth()
        self.traffic = TrafficCounter()
        self.metrics: JobMetrics | None = None
        self.endpoint: MetricsEndpoint | None = None

    def attach(self, coordinator: Coordinator) -> None:
        """Follow ``coordinator``'s job: its events drive the health status and the metrics, whose
        endpoint starts listening here (raises :class:`MetricsEndpointError` if it cannot)."""
        coordinator.listeners.add(_HealthOnJobEnd(self.health))
        if self.config.metrics_port:
            metrics = JobMetrics(traffic=self.traffic, connected=coordinator.connected_sites)
            ledger = coordinator.model.ledger
            metrics.resume_from(coordinator.completed_rounds,
                                ledger.to_json() if ledger is not None and coordinator.config.user_level_dp else None)
            self.endpoint = MetricsEndpoint(metrics.registry, self.config.metrics_host, self.config.metrics_port)
            self.metrics = metrics
            coordinator.listeners.add(metrics)

    def job_running(self, running: bool) -> None:
        """The job is about to run (``SERVING``), or will not run (a finished run: ``NOT_SERVING``)."""
        self.health.set_serving(running)
        if self.metrics is not None:
            self.metrics.job_running.set(1 if running else 0)

    def close(self) -> None:
        """The server is stopping: ``NOT_SERVING`` for good, and the metrics endpoint closes."""
        self.health.shut_down()
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
