"""How a client reaches the coordinator: over gRPC, or in-process for simulations.

Both transports move the same protobuf message objects (``fedveil.protocol.fedveil_pb2``) and
report failures as one exception type, :class:`RpcFailure`, carrying the gRPC status-code name,
so the client's protocol logic (:mod:`fedveil.clients.session`) is identical over the network
and in a simulation. A transport carries messages; it holds no protocol logic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from fedveil.protocol import AUTH_METADATA_KEY
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol import fedveil_pb2_grpc as pb_grpc

M = TypeVar("M")

# Status codes that mean "the server is (temporarily) not there": retry with backoff.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
# Status codes that no retry can fix.
FATAL_CODES = frozenset({"UNAUTHENTICATED"})


class RpcFailure(Exception):
    """A call failed with a gRPC status (``code`` is the status name, e.g. ``"UNAVAILABLE"``)."""

    def __init__(self, code: str, detail: str, rpc: str = "") -> None:
        where = f"{rpc}: " if rpc else ""
        super().__init__(f"{where}{code}: {detail}")
        self.code = code
        self.detail = detail
        self.rpc = rpc

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


class Transport(Protocol):
    """The eight calls of the ``Federation`` service, on protobuf messages."""

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse: ...
    def poll(self, request: pb.PollRequest, timeout_s: float) -> pb.PollResponse: ...
    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack: ...
    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack: ...
    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack: ...
    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack: ...
    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack: ...
    def report_metrics(self, request: pb.MetricsReport) -> pb.Ack: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to connect: ``HOST:PORT``, TLS (verify the server against ``ca_cert``, or
    the system roots when ``ca_cert`` is None) unless ``insecure``, and the enrolment token."""

    server: str
    token: str | None = None
    ca_cert: Path | None = None
    insecure: bool = False
    server_name_override: str | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    call_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"server: expected HOST:PORT with a port in 1..65535 (got {self.server!r})")
        if self.insecure and self.ca_cert is not None:
            raise ValueError("ca_cert: cannot be combined with insecure (choose TLS or plaintext)")
        if self.ca_cert is not None and not Path(self.ca_cert).is_file():
            raise ValueError(f"ca_cert: no such file {str(self.ca_cert)!r}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes: too small (got {self.max_message_bytes})")


class GrpcTransport:
    """The client end of the gRPC channel: TLS, bearer-token metadata and size limits."""

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # fail fast while the server is down: our own backoff does the waiting
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.enable_retries", 0),
        ]
        if config.server_name_override:
            options.append(("grpc.ssl_target_name_override", config.server_name_override))
        if config.insecure:
            self._channel = grpc.insecure_channel(config.server, options=options)
        else:
            roots = Path(config.ca_cert).read_bytes() if config.ca_cert is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(config.server, credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            ((AUTH_METADATA_KEY, f"Bearer {config.token}"),) if config.token else ()
        )

    def _call(self, name: str, method: Callable[..., M], request: Any, timeout_s: float | None = None) -> M:
        try:
            return method(request, timeout=timeout_s or self.config.call_timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            detail = err.details() if hasattr(err, "details") else str(err)
            raise RpcFailure(code.name if code is not None else "UNKNOWN", str(detail or ""), name) from None

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        return self._call("Join", self._stub.Join, request)

    def poll(self, request: pb.PollRequest, timeout_s: float) -> pb.PollResponse:
        return self._call("Poll", self._stub.Poll, request, timeout_s)

    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        return self._call("AdvertiseKeys", self._stub.AdvertiseKeys, request)

    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack:
        return self._call("ShareKeys", self._stub.ShareKeys, request)

    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack:
        return self._call("SubmitMaskedInput", self._stub.SubmitMaskedInput, request)

    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        return self._call("ConfirmSurvivors", self._stub.ConfirmSurvivors, request)

    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack:
        return self._call("Unmask", self._stub.Unmask, request)

    def report_metrics(self, request: pb.MetricsReport) -> pb.Ack:
        return self._call("ReportMetrics", self._stub.ReportMetrics, request)

    def close(self) -> None:
        self._channel.close()
