"""Bytes in and out of the federation service, per RPC, for the server's metrics.

The servicer parses every request and serializes every reply itself (see
:mod:`fedveil.protocol.service`), so it can count message bytes where they are already in hand:
the protobuf payloads, without gRPC's framing, HTTP/2 headers or TLS. A malformed request counts
too (it was received). Counting is a lock and two integer additions per message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class TrafficCounter:
    """Running totals of message bytes received and sent, per RPC name (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[str, int] = {}
        self._sent: dict[str, int] = {}

    def count_received(self, rpc: str, size: int) -> None:
        with self._lock:
            self._received[rpc] = self._received.get(rpc, 0) + size

    def count_sent(self, rpc: str, size: int) -> None:
        with self._lock:
            self._sent[rpc] = self._sent.get(rpc, 0) + size

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes received per RPC, bytes sent per RPC), copied under the lock."""
        with self._lock:
            return dict(self._received), dict(self._sent)

    def counting_parser(self, rpc: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        """``parse`` that first counts the request's bytes as received by ``rpc``."""

        def parse_counted(data: bytes) -> Any:
            self.count_received(rpc, len(data))
            return parse(data)

        return parse_counted

    def counting_serializer(self, rpc: str, serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        """``serialize`` that counts the reply's bytes as sent by ``rpc``."""

        def serialize_counted(message: Any) -> bytes:
            data = serialize(message)
            self.count_sent(rpc, len(data))
            return data

        return serialize_counted
