"""Fixtures shared by several test modules."""

from tests.dashboard_helpers import board  # noqa: F401 (a dashboard with known hospitals and login token)
from tests.grpc_helpers import fed, passive_fed  # noqa: F401 (one-round jobs behind gRPC with TLS, active and passive)
