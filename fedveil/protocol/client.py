"""Client side of the gRPC transport: channels (TLS or plaintext) and :class:`GrpcTransport`.

``GrpcTransport`` implements :class:`~fedveil.protocol.transport.Transport` over a channel: it
adds the bearer token to every call, applies per-call deadlines (a poll gets its long-poll wait
plus a margin), and turns gRPC statuses into :mod:`fedveil.protocol.errors` exceptions.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from fedveil.protocol import SERVICE_NAME, UPLOAD_GRANT_METADATA
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import bearer_metadata
from fedveil.protocol.errors import LOCAL_CONNECT_FAILURE, MalformedMessage, Unavailable, error_from_status
from fedveil.protocol.tls import channel_credentials
from fedveil.protocol.tls_probe import client_certificate_refused

MIB = 1024 * 1024
R = TypeVar("R", bound=Message)
SETTLE_GRACE_S = 30.0
"""How long past its own deadline a call may take to report that it ended before it is cancelled
(gRPC ends a call at its deadline; this only guards against a completion that never arrives)."""
STREAM_ABOVE_BYTES = 64 * 1024
"""A masked input larger than this goes over ``UploadMaskedInput`` and waits for an upload slot,
so what a client can have in flight to the server without a slot is a constant, not O(m)."""
CONNECTION_CLOSED = "Socket closed"
"""How gRPC core's details end when the server closed the connection (after a TLS handshake, too)."""
JOINS_CLOSED_BEFORE_PROBE = 2
"""Consecutive Joins failed on a closed connection before the transport asks why: one may be a
connection dropped on the way; a site whose certificate the server refuses fails every time."""


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach a server. ``insecure`` must be explicit to go without TLS."""

    target: str
    ca_cert_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    insecure: bool = False
    max_message_bytes: int = 512 * MIB
    server_name_override: str | None = None
    own_connection: bool = False
    """Open this channel's own TCP connection even when the process has another channel to the same
    target (gRPC shares one by default): many simulated sites in one process then load the server
    as many machines would."""


def open_channel(config: ChannelConfig) -> grpc.Channel:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.enable_retries", 0),
    ]
    if config.own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if config.insecure:
        return grpc.insecure_channel(config.target, options=options)
    if config.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    creds = channel_credentials(config.ca_cert_pem, config.client_cert_pem, config.client_key_pem)
    return grpc.secure_channel(config.target, creds, options=options)


class GrpcTransport:
    """A :class:`~fedveil.protocol.transport.Transport` over a gRPC channel."""

    def __init__(
        self, channel: grpc.Channel, token: str | None = None, *, rpc_timeout_s: float = 120.0,
        chunk_bytes: int = 1024 * 1024, owns_channel: bool = True,
    ) -> None:
        """``owns_channel=False``: the channel is shared (the simulated sites of one process use one)
        and :meth:`close` leaves it open for the others."""
        self._channel = channel
        self._owns_channel = owns_channel
        self._chunk_bytes = chunk_bytes
        self._upload = channel.stream_unary(
            f"/{SERVICE_NAME}/UploadMaskedInput",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.Ack.FromString,
        )
        self._fetch = channel.unary_stream(
            f"/{SERVICE_NAME}/FetchModel",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelChunk.FromString,
        )
        self._metadata = bearer_metadata(token) if token else ()
        self._timeout = rpc_timeout_s
        self.channel_config: ChannelConfig | None = None
        """How :meth:`connect` opened the channel (None for a channel given): lets a Join that keeps
        failing on a closed connection ask whether the server wants a client certificate."""
        self._joins_closed = 0
        self.expected_model_bytes: int | None = None
        """The size of every model this site accepts, in bytes (float32): from the job's model spec at
        Join (:meth:`join`), or set by the site from its own model. A model of any other size is
        refused before a byte of it is fetched or allocated (None: not known yet)."""
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        for rpc, response_cls in (
            ("Join", pb.JoinResponse),
            ("Poll", pb.PollResponse),
            ("RespondToRound", pb.Ack),
            ("RevealContribution", pb.Ack),
            ("AdvertiseKeys", pb.Ack),
            ("ShareKeys", pb.Ack),
            ("SubmitMaskedInput", pb.Ack),
            ("ConfirmSurvivors", pb.Ack),
            ("Unmask", pb.Ack),
            ("ComplainAboutShares", pb.Ack),
            ("ReportMetrics", pb.Ack),
        ):
            self._calls[rpc] = channel.unary_unary(
                f"/{SERVICE_NAME}/{rpc}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,
            )

    @classmethod
    def connect(
        cls, config: ChannelConfig, token: str | None = None, *, rpc_timeout_s: float = 120.0,
        chunk_bytes: int = 1024 * 1024,
    ) -> GrpcTransport:
        transport = cls(open_channel(config), token, rpc_timeout_s=rpc_timeout_s, chunk_bytes=chunk_bytes)
        transport.channel_config = config
        return transport

    def _call(self, rpc: str, request: Message, timeout: float | None = None) -> Any:
        deadline_s = timeout or self._timeout
        try:
            call = self._calls[rpc].future(request, metadata=self._metadata, timeout=deadline_s)
            return settled(call, deadline_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = err.details() if hasattr(err, "details") else str(err)
            raise error_from_status(code, details, rpc=rpc) from None
        except grpc.FutureCancelledError:
            raise error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no answer {deadline_s + SETTLE_GRACE_S:g} s after the call", rpc=rpc) from None

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        """Join; the job's model spec, when the server announces one, fixes the size of every model this
        site will fetch (the site refuses the job unless its own model fits that spec)."""
        try:
            result: pb.JoinResponse = self._call("Join", request)
        except Unavailable as err:
            text = str(err)  # gRPC core's own text for a connection it could not make, never a server's
            closed = text.startswith(LOCAL_CONNECT_FAILURE) and text.endswith(CONNECTION_CLOSED)
            self._joins_closed = self._joins_closed + 1 if closed else 0
            diagnosis = self._client_certificate_refusal() if self._joins_closed >= JOINS_CLOSED_BEFORE_PROBE else None
            if diagnosis is not None:  # still retried: a TLS proxy whose backend restarts looks the same
                raise Unavailable(f"{diagnosis}: {err}") from None
            raise
        self._joins_closed = 0
        if len(result.job.model):
            self.expected_model_bytes = model_spec_bytes(result.job.model)
        return result

    def _client_certificate_refusal(self) -> str | None:
        """The likely cause, for the retry log and the give-up error, when the server closes every
        connection right after the TLS handshake, with this client's certificate and without one
        (:mod:`fedveil.protocol.tls_probe`); None when it answers either.

        Only a likely cause: a server that refuses a certificate sends no alert, so a TLS proxy whose
        backend is restarting looks the same on the wire (review of 2026-12-08). The Join is
        therefore retried as before, and the operator reads the cause in the first seconds of the
        log instead of after the give-up time."""
        config = self.channel_config
        if config is None or config.insecure:
            return None
        if not client_certificate_refused(config.target, config.ca_cert_pem, config.server_name_override,
                                          config.client_cert_pem, config.client_key_pem):
            return None
        if config.client_cert_pem is None:
            return ("the server closes every connection right after the TLS handshake: if it requires client "
                    "certificates (fedveil server --client-ca), this client gave none (client_cert and client_key, "
                    "--client-cert and --client-key on the command line)")
        return ("the server closes every connection right after the TLS handshake, with this client's certificate "
                "too: if it requires client certificates (fedveil server --client-ca), it refuses this one "
                "(client_cert, --client-cert on the command line): not signed by the CA it trusts, not a client "
                "certificate, or expired")

    def poll(self, request: pb.PollRequest) -> pb.PollResponse:
        """Poll; a model sent without its data (the server's default over gRPC) is fetched in
        chunks with ``FetchModel`` and filled in, so callers always get ``Model.data``."""
        result: pb.PollResponse = self._call("Poll", request, timeout=request.max_wait_ms / 1000.0 + self._timeout)
        kind = result.WhichOneof("instruction")
        model = result.round_start.model if kind == "round_start" else result.evaluate.model if kind == "evaluate" \
            else None
        if model is not None and not model.data and model.size_bytes:
            self.check_model_size(int(model.size_bytes))
            model.data = self.fetch_model(pb.FetchModelRequest(header=request.header, version=model.version),
                                          model.size_bytes)
        return result

    def check_model_size(self, size_bytes: int) -> None:
        """Refuse a model whose announced size is not the job's (:attr:`expected_model_bytes`), before
        anything is fetched: the server's number would otherwise size the site's receive buffer."""
        expected = self.expected_model_bytes
        if expected is not None and size_bytes != expected:
            raise MalformedMessage(f"model.size_bytes: {size_bytes} bytes, but the job's model is {expected} bytes "
                                   f"({expected // 4} float32 values, announced at Join)")

    def fetch_model(self, request: pb.FetchModelRequest, size_bytes: int) -> bytes:
        """The model's ``size_bytes`` bytes, reassembled from the stream's chunks in order. A model
        that comes in one chunk is returned as that chunk's bytes, without a copy.

        ``size_bytes`` is the server's number: it is checked against the job's model
        (:meth:`check_model_size`), and the buffer grows only by the bytes that arrive, so a server
        announcing more than it sends costs the site no more memory than it sent."""
        self.check_model_size(size_bytes)
        buffer: bytearray | None = None
        whole: bytes | None = None
        received = 0
        try:
            for chunk in self._fetch(request, metadata=self._metadata, timeout=self._timeout):
                data = chunk.data
                end = chunk.offset + len(data)
                if chunk.total_bytes != size_bytes or end > size_bytes or chunk.offset != received:
                    raise MalformedMessage(f"FetchModel: chunk at offset {chunk.offset} does not fit the "
                                           f"{size_bytes}-byte model")
                if received == 0 and end == size_bytes:
                    whole = data
                elif data:
                    if buffer is None:
                        buffer = bytearray()
                    buffer += data  # in order: chunk.offset == received == len(buffer)
                received = end
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details(), rpc="FetchModel") from None  # type: ignore[attr-defined]
        if received != size_bytes:
            raise MalformedMessage(f"FetchModel: received {received} of {size_bytes} bytes")
        if whole is not None:
            return whole
        return bytes(buffer) if buffer is not None else b""

    def respond_to_round(self, request: pb.RoundResponse) -> pb.Ack:
        result: pb.Ack = self._call("RespondToRound", request)
        return result

    def reveal_contribution(self, request: pb.RevealRequest) -> pb.Ack:
        result: pb.Ack = self._call("RevealContribution", request)
        return result

    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> pb.Ack:
        result: pb.Ack = self._call("AdvertiseKeys", request)
        return result

    def share_keys(self, request: pb.ShareKeysRequest) -> pb.Ack:
        result: pb.Ack = self._call("ShareKeys", request)
        return result

    def submit_masked_input(self, request: pb.MaskedInputRequest) -> pb.Ack:
        """Send the masked input: in chunks over ``UploadMaskedInput`` when it is large.

        The first chunk carries only the header and ``total_bytes``; the data follows once the
        server grants an upload slot (initial metadata ``fedveil-upload-slot``), so while other
        clients upload this one's bytes wait here, not in the server's receive buffers."""
        data = request.masked_vector
        if len(data) <= min(self._chunk_bytes, STREAM_ABOVE_BYTES):
            result: pb.Ack = self._call("SubmitMaskedInput", request)
            return result
        view = memoryview(data)
        calls: list[grpc.Future] = []
        call_made = threading.Event()

        def chunks() -> Iterator[pb.MaskedInputChunk]:
            yield pb.MaskedInputChunk(header=request.header, total_bytes=len(data))
            call_made.wait()
            if not calls:
                return
            metadata = calls[0].initial_metadata() or ()  # type: ignore[attr-defined]
            if not any(key == UPLOAD_GRANT_METADATA for key, _value in metadata):
                return  # the call ended (refused, cancelled) without a slot: its status says why
            for offset in range(0, len(data), self._chunk_bytes):
                yield pb.MaskedInputChunk(data=bytes(view[offset : offset + self._chunk_bytes]))

        try:
            calls.append(self._upload.future(chunks(), metadata=self._metadata, timeout=self._timeout))
            call_made.set()
            ack: pb.Ack = settled(calls[0], self._timeout)
            return ack
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details(), rpc="UploadMaskedInput") from None  # type: ignore[attr-defined]
        finally:
            call_made.set()

    def confirm_survivors(self, request: pb.ConfirmSurvivorsRequest) -> pb.Ack:
        result: pb.Ack = self._call("ConfirmSurvivors", request)
        return result

    def unmask(self, request: pb.UnmaskRequest) -> pb.Ack:
        result: pb.Ack = self._call("Unmask", request)
        return result

    def complain_about_shares(self, request: pb.ShareComplaintsRequest) -> pb.Ack:
        result: pb.Ack = self._call("ComplainAboutShares", request)
        return result

    def report_metrics(self, request: pb.MetricsReport) -> pb.Ack:
        result: pb.Ack = self._call("ReportMetrics", request)
        return result

    def call_raw(self, rpc: str, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Send arbitrary bytes as an RPC's request (tests of the server's input validation)."""
        raw = self._channel.unary_unary(f"/{SERVICE_NAME}/{rpc}", request_serializer=None, response_deserializer=None)
        try:
            result: bytes = raw(payload, metadata=self._metadata, timeout=timeout or self._timeout)
            return result
        except grpc.RpcError as err:
            raise error_from_status(err.code(), err.details(), rpc=rpc) from None  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()


def model_spec_bytes(tensors: Iterable[pb.TensorSpec]) -> int:
    """Bytes of the float32 ``Model.data`` of a model with these tensors (``JobInfo.model``)."""
    return 4 * sum(math.prod(int(d) for d in t.shape) for t in tensors)


def settled(future: grpc.Future, deadline_s: float) -> Any:
    """The call's result, once the call has ended: the caller sleeps on an event that the call's
    completion sets.

    gRPC's blocking call and ``Future.result()`` wake every 100–200 ms to look for signals. A Ray
    worker hosts thousands of sites, each blocked in a held poll for most of the job, and those
    wake-ups alone cost about 5% of a core per 600 sites. Here the caller does not wake until the
    call ends; on a channel shared by a process's sites, one gRPC polling thread delivers every
    completion (``benchmarks``: 600 held calls cost 0.1% of a core, against 5%). A signal still
    interrupts the wait, and the call is then cancelled.
    """
    done = threading.Event()
    future.add_done_callback(lambda _call: done.set())
    try:
        if not done.wait(deadline_s + SETTLE_GRACE_S):
            future.cancel()
    except BaseException:
        future.cancel()
        raise
    return future.result()
