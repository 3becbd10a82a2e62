"""No DP: the site relies on secure aggregation alone (each release is the exact sum)."""

from __future__ import annotations

from fedveil.clients.mechanisms.base import ClientMechanism


class NoPrivacy(ClientMechanism):
    name = "none"
