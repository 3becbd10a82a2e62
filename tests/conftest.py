"""Fixtures shared by several test modules."""

from tests.dashboard_helpers import board  # noqa: F401 (a dashboard with known hospitals and login token)
