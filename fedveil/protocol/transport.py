"""Transport-independent interfaces: the service the coordinator implements, and the client side.

:class:`FederationService` is what ``fedveil.server.coordinator.Coordinator`` implements: one
method per RPC, taking the authenticated caller's enrolled name and the decoded request (a
protobuf message object). :class:`Transport` is what client code talks to: the same methods
without the caller. :class:`InProcessTransport` calls a service directly (the in-process
simulation); ``fedveil.protocol.client.GrpcTransport`` goes over gRPC. Both raise the
:mod:`fedveil.protocol.errors` exceptions, so client logic cannot tell them apart.

:class:`ClientSession` keeps what every request header needs after Join (session id, run id,
the strictly increasing sequence number).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedveil.protocol import PROTOCOL_VERSION
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.uploads import UploadReservation


class FederationService(Protocol):
    """Server side: one method per RPC; ``caller`` is the authenticated client name."""

    def join(self, caller: str, request: pb.JoinRequest) -> pb.JoinResponse: ...
    def poll(self, caller: str, request: pb.PollRequest) -> pb.PollResponse: ...
    def respond_to_round(self, caller: str, request: pb.RoundResponse) -> pb.Ack: ...
    def reveal_contribution(self, caller: str, request: pb.RevealRequest) -> pb.Ack: ...
    def advertise_keys(self, caller: str, request: pb.AdvertiseKeysRequest) -> pb.Ack: ...
    def share_keys(self, caller: str, request: pb.ShareKeysRequest) -> pb.Ack: ...
    def submit_masked_input(self, caller: str, request: pb.MaskedInputRequest) -> pb.Ack: ...
    def confirm_survivors(self, caller: str, request: pb.ConfirmSurvivorsRequest) -> pb.Ack: ...
    def unmask(self, caller: str, request: pb.UnmaskRequest) -> pb.Ack: ...
    def complain_about_shares(self, caller: str, request: pb.ShareComplaintsRequest) -> pb.Ack: ...
    def report_metrics(self, caller: str, request: pb.MetricsReport) -> pb.Ack: ...
    # Chunked transfers (gRPC): the servicer reassembles uploads and slices downloads.
    def submit_masked_vector(
        self, caller: str, header: pb.RequestHeader, data: bytes | bytearray | memoryview,
        reservation: UploadReservation | None = None,
    ) -> pb.Ack: ...
    def masked_input_size(
        self, caller: str, header: pb.RequestHeader, alive: Callable[[], bool] = ...
    ) -> UploadReservation: ...
    def fetch_model(self, caller: str, request: pb.FetchModelRequest) -> bytes: ...
    def client_disconnected(self, caller: str, session_id: bytes) -> None: ...


class Transport(Protocol):
    """Client side: the RPCs of one authenticated client."""

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse: ...
    def poll(self, request: pb.PollRequest) -> pb.PollResponse: ...
    def respond_to_round(self, request: pb.RoundResponse) -> pb.Ack: ...
    def reveal_contribution(self, request: pb.RevealRequest) -> pb.Ack: ...
    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack: ...
    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack: ...
    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack: ...
    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack: ...
    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack: ...
    def complain_about_shares(self, request: pb.ShareComplaintsRequest) -> pb.Ack: ...
    def report_metrics(self, request: pb.MetricsReport) -> pb.Ack: ...
    def close(self) -> None: ...


class InProcessTransport:
    """A :class:`Transport` that calls a :class:`FederationService` in the same process.

    Messages are passed as objects, not serialized; the coordinator runs exactly the same code
    (validation included) as behind the gRPC servicer.
    """

    def __init__(self, service: FederationService, client_name: str) -> None:
        self._service = service
        self.client_name = client_name

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        return self._service.join(self.client_name, request)

    def poll(self, request: pb.PollRequest) -> pb.PollResponse:
        return self._service.poll(self.client_name, request)

    def respond_to_round(self, request: pb.RoundResponse) -> pb.Ack:
        return self._service.respond_to_round(self.client_name, request)

    def reveal_contribution(self, request: pb.RevealRequest) -> pb.Ack:
        return self._service.reveal_contribution(self.client_name, request)

    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        return self._service.advertise_keys(self.client_name, request)

    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack:
        return self._service.share_keys(self.client_name, request)

    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack:
        return self._service.submit_masked_input(self.client_name, request)

    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        return self._service.confirm_survivors(self.client_name, request)

    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack:
        return self._service.unmask(self.client_name, request)

    def complain_about_shares(self, request: pb.ShareComplaintsRequest) -> pb.Ack:
        return self._service.complain_about_shares(self.client_name, request)

    def report_metrics(self, request: pb.MetricsReport) -> pb.Ack:
        return self._service.report_metrics(self.client_name, request)

    def close(self) -> None:
        return None


@dataclass
class ClientSession:
    """Header state after Join. Thread-safe :meth:`header` (sequence numbers never repeat)."""

    session_id: bytes
    run_id: str
    _sequence: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_join(cls, response: pb.JoinResponse) -> ClientSession:
        return cls(session_id=response.session_id, run_id=response.run_id)

    def header(self, round_number: int = 0, round_nonce: bytes = b"") -> pb.RequestHeader:
        with self._lock:
            self._sequence += 1
            seq = self._sequence
        return pb.RequestHeader(
            protocol_version=PROTOCOL_VERSION,
            session_id=self.session_id,
            run_id=self.run_id,
            round=round_number,
            round_nonce=round_nonce,
            sequence=seq,
        )
