"""The standard gRPC health-checking service (``grpc.health.v1.Health``) of the federation server.

Load balancers, orchestrators and ``grpc_health_probe`` ask ``Check`` (or ``Watch``) with a
service name: ``""`` for the server as a whole, or :data:`~fedveil.protocol.SERVICE_NAME`. Both
answer ``SERVING`` while the job runs and ``NOT_SERVING`` once it has ended (the server may
linger a few seconds to tell its sites). The health service needs no bearer token: a probe learns
one bit, and nothing about the job. Under mutual TLS the probe needs a client certificate, as
every caller does (the TLS handshake comes first).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedveil.protocol import SERVICE_NAME

HEALTH_SERVICE_NAME = "grpc.health.v1.Health"

SERVICES = ("", SERVICE_NAME)
"""The names the health service answers for: the whole server, and the federation service."""


class ServingHealth:
    """The server's health status, as the standard ``grpc.health.v1`` service serves it.

    It starts ``NOT_SERVING``: the runner marks it serving once the job is about to run.
    """

    def __init__(self) -> None:
        self._servicer = health.HealthServicer()
        self._serving = False
        self._shut_down = False
        self.set_serving(False)

    def add_to(self, server: grpc.Server) -> None:
        """Register the health service on ``server`` (before it starts)."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    @property
    def serving(self) -> bool:
        return self._serving

    def set_serving(self, serving: bool) -> None:
        """``SERVING`` (the job runs) or ``NOT_SERVING`` (not yet, or no longer)."""
        if self._shut_down:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._serving = serving
        for name in SERVICES:
            self._servicer.set(name, status)

    def shut_down(self) -> None:
        """``NOT_SERVING`` for good, and ``Watch`` streams are told so (the server is stopping)."""
        self._serving = False
        self._shut_down = True
        self._servicer.enter_graceful_shutdown()
