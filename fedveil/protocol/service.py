"""The gRPC servicer: a thin adapter from gRPC to a :class:`~fedveil.protocol.transport.FederationService`.

It parses request bytes itself (so garbage gets INVALID_ARGUMENT instead of gRPC's generic
INTERNAL), authenticates the caller (bearer token or mutual-TLS certificate), calls the
service, and turns :class:`~fedveil.protocol.errors.ProtocolError` into the matching status.
Any other exception is a server bug: it is logged with its traceback and answered INTERNAL;
the server keeps serving. Size limits are enforced by gRPC itself
(``grpc.max_receive_message_length``, answered RESOURCE_EXHAUSTED) and concurrency by
``maximum_concurrent_rpcs`` (also RESOURCE_EXHAUSTED), so a flood cannot stall the server.
Chunked uploads are admitted by the rules of :mod:`fedveil.protocol.uploads` (one per site and
stage, slots in arrival order, idle and overall timeouts), so one site cannot stall a round.
Refusals are logged with the client name, peer address, RPC and reason, never with
credentials or payloads.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from fedveil.errors import FedveilError
from fedveil.protocol import SERVICE_NAME, UPLOAD_GRANT_METADATA
from fedveil.protocol import fedveil_pb2 as pb
from fedveil.protocol.auth import Authenticator, bearer_token
from fedveil.protocol.errors import MalformedMessage, ProtocolError, Replayed, StageClosed, Unavailable
from fedveil.protocol.health import ServingHealth
from fedveil.protocol.traffic import TrafficCounter
from fedveil.protocol.transport import FederationService
from fedveil.protocol.uploads import SlotGate, StreamCounter, UploadReservation, UploadWatch, UploadWatchdog

log = logging.getLogger("fedveil.protocol")

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits of the gRPC server.

    ``max_message_bytes`` bounds every inbound message (and outbound, so a server never builds a
    reply its clients cannot take); ``max_concurrent_rpcs`` bounds calls in flight (long polls
    included); ``workers`` is the handler thread pool.
    """

    max_message_bytes: int = 64 * MIB
    max_concurrent_rpcs: int = 256
    workers: int = 64
    max_concurrent_uploads: int = 2
    """Chunked masked-input uploads received at once. The others wait for a slot *before* they send
    their data (the server grants a slot with the ``fedveil-upload-slot`` initial metadata; the
    client sends only the header chunk until then), so upload buffers take
    O(max_concurrent_uploads · m) and a waiting uploader costs the server a constant, not a vector
    sitting in its HTTP/2 receive window."""
    upload_timeout_s: float = 60.0
    """An upload holding a slot longer than this is cancelled (a stalled sender cannot block it)."""
    upload_idle_timeout_s: float = 20.0
    """An upload stream that sends no chunk for this long (its header chunk included, not while it
    waits for a slot) is cancelled; an honest client sends 1 MiB chunks back to back."""
    upload_min_rate_bytes_s: float = 256 * 1024
    """A slot is held at most ``upload_idle_timeout_s + size / upload_min_rate_bytes_s`` (and at most
    ``upload_timeout_s``): a site dripping bytes cannot keep a slot for the whole stage."""
    max_waiting_uploads: int | None = None
    """Uploads that may wait for a slot at once (each holds a worker thread); more are answered
    UNAVAILABLE and retry. ``None``: half the workers."""

    def hold_s(self, nbytes: int) -> float:
        """How long a stream moving ``nbytes`` (an upload holding its slot, a model download) may take."""
        return min(self.upload_timeout_s, self.upload_idle_timeout_s + nbytes / self.upload_min_rate_bytes_s)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024 (got {self.max_message_bytes})")
        if self.max_concurrent_uploads < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1 (got {self.max_concurrent_uploads})")
        for name in ("upload_timeout_s", "upload_idle_timeout_s", "upload_min_rate_bytes_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.max_waiting_uploads is not None and self.max_waiting_uploads < 0:
            raise ValueError(f"max_waiting_uploads must be 0 or more (got {self.max_waiting_uploads})")
        if self.workers < 2 or self.max_concurrent_rpcs < self.workers:
            raise ValueError(
                f"need workers >= 2 and max_concurrent_rpcs >= workers (got {self.workers}, {self.max_concurrent_rpcs})"
            )

    @property
    def waiting_uploads(self) -> int:
        return self.workers // 2 if self.max_waiting_uploads is None else self.max_waiting_uploads


# RPC name -> (request class, service method name)
RPCS: dict[str, tuple[type[Message], str]] = {
    "Join": (pb.JoinRequest, "join"),
    "Poll": (pb.PollRequest, "poll"),
    "RespondToRound": (pb.RoundResponse, "respond_to_round"),
    "RevealContribution": (pb.RevealRequest, "reveal_contribution"),
    "AdvertiseKeys": (pb.AdvertiseKeysRequest, "advertise_keys"),
    "ShareKeys": (pb.ShareKeysRequest, "share_keys"),
    "SubmitMaskedInput": (pb.MaskedInputRequest, "submit_masked_input"),
    "ConfirmSurvivors": (pb.ConfirmSurvivorsRequest, "confirm_survivors"),
    "Unmask": (pb.UnmaskRequest, "unmask"),
    "ComplainAboutShares": (pb.ShareComplaintsRequest, "complain_about_shares"),
    "ReportMetrics": (pb.MetricsReport, "report_metrics"),
}


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason


def _deserializer(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as err:
            return _Malformed(cls.__name__, str(err) or type(err).__name__)

    return parse


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _certificate_name(context: grpc.ServicerContext) -> str | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") if auth else None
    if not names:
        return None
    value = names[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


CHUNK_BYTES = 1 * MIB
MAX_CHUNK_BYTES = 4 * MIB


class FederationServicer:
    """Builds the generic handler for ``fedveil.v3.Federation``."""

    def __init__(
        self,
        service: FederationService,
        authenticator: Authenticator,
        *,
        mutual_tls: bool = False,
        limits: ServerLimits | None = None,
        traffic: TrafficCounter | None = None,
    ) -> None:
        self._service = service
        self._traffic = traffic
        self._auth = authenticator
        self._mutual_tls = mutual_tls
        self._limits = limits = limits or ServerLimits()
        self.upload_slots = SlotGate(limits.max_concurrent_uploads, limits.waiting_uploads)
        self._upload_streams = StreamCounter()
        self._fetch_streams = StreamCounter(rpc="FetchModel", advice="finish or cancel a download first")
        self._watchdog = UploadWatchdog()
        self._refusals_lock = threading.Lock()
        self.upload_refusals: Counter[str] = Counter()
        """Refused or cancelled upload streams per site (the running count the log lines show)."""
        self._model_lock = threading.Lock()
        self._model_chunks: tuple[bytes, list[bytes]] | None = None
        """The current model's ``ModelChunk`` messages, serialized once and shared by every fetch."""

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        token = bearer_token(context.invocation_metadata())
        cert_name = _certificate_name(context) if self._mutual_tls else None
        return self._auth.authenticate(token, cert_name)

    def _handler(self, rpc: str, method_name: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            caller = "<unauthenticated>"
            try:
                caller = self._authenticate(context)
                if isinstance(request, _Malformed):
                    raise MalformedMessage(f"{rpc}: the request is not a valid {request.type_name} ({request.reason})")
                if rpc != "Poll":
                    result: Message = getattr(self._service, method_name)(caller, request)
                    return result
                # A held poll cancelled before it returns means the client's process or connection
                # is gone: tell the service, so it stops counting the client as connected.
                finished = threading.Event()
                session_id = bytes(request.header.session_id)

                def on_end(name: str = caller) -> None:
                    if not finished.is_set():
                        self._service.client_disconnected(name, session_id)

                context.add_callback(on_end)
                try:
                    polled: Message = self._service.poll(caller, request)
                finally:
                    finished.set()
                return polled
            except Exception as err:
                self._refuse(rpc, caller, context, err)
            raise AssertionError("unreachable: context.abort raises")

        return handle

    def _refuse(self, rpc: str, caller: str, context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, ProtocolError):
            if rpc == "UploadMaskedInput":
                self._count_refusal(caller, context, f"refused: {err.code.name}: {err.message}")
            else:
                log.warning("refused %s from %s at %s: %s: %s", rpc, caller, context.peer(), err.code.name,
                            err.message)
            context.abort(err.code, err.message)
        log.exception("internal error in %s from %s", rpc, caller)
        context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal server error (logged on the server)")

    def _upload(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Message:
        """``UploadMaskedInput``: admit the stream (:mod:`fedveil.protocol.uploads`), wait for a slot,
        reassemble the chunks, then hand the vector to the service."""
        rpc, caller = "UploadMaskedInput", "<unauthenticated>"
        reservation: UploadReservation | None = None
        try:
            caller = self._authenticate(context)
            with self._upload_streams.stream(caller), \
                    self._watchdog.watch(context.cancel, self._limits.upload_idle_timeout_s,
                                         self._limits.upload_min_rate_bytes_s) as watch:
                try:
                    first = next(requests, None)
                    _raise_if_cancelled(watch)
                    if first is None:
                        raise MalformedMessage(f"{rpc}: the upload has no chunks")
                    if isinstance(first, _Malformed):
                        raise MalformedMessage(f"{rpc}: chunk 0 is not a valid {first.type_name} ({first.reason})")
                    reservation = self._service.masked_input_size(caller, first.header, context.is_active)
                    expected = reservation.size
                    if first.total_bytes != expected:
                        raise _RefusedStream(
                            f"total_bytes: expected {expected} bytes of masked input, got {first.total_bytes}"
                        )
                    return self._receive_upload(rpc, caller, first, requests, reservation, context, watch)
                except _RefusedStream as err:
                    if reservation is not None and context.is_active():  # its client waits: its own doing
                        reservation.refuse(err.message)
                    raise MalformedMessage(err.message) from None
                except (grpc.RpcError, _Cancelled):  # the stream broke: the client left, or the watchdog cancelled it
                    if watch.reason:
                        self._count_refusal(caller, context, f"cancelled: it {watch.reason}")
                    else:
                        log.warning("%s from %s at %s: the stream ended before the upload completed",
                                    rpc, caller, context.peer())
                    return pb.Ack(detail="cancelled")
        except Exception as err:
            if isinstance(err, Unavailable) and reservation is not None:
                reservation.release(counted=False)  # the server's own limit: not the site's attempt
            self._refuse(rpc, caller, context, err)
        finally:
            if reservation is not None:
                reservation.release()  # no-op once the input was accepted
        raise AssertionError("unreachable: context.abort raises")

    def _receive_upload(
        self, rpc: str, caller: str, first: Any, requests: Iterator[Any], reservation: UploadReservation,
        context: grpc.ServicerContext, watch: UploadWatch,
    ) -> Message:
        """Wait for a slot (sending nothing meanwhile), grant it, then reassemble the chunks (the first
        may carry data: older clients)."""
        watch.pause()
        if not self.upload_slots.acquire(lambda: context.is_active() and reservation.wanted()):
            if context.is_active():
                raise StageClosed(f"{rpc}: the masked-input stage closed while the upload waited for a slot")
            log.warning("%s from %s at %s: the client left while waiting for an upload slot",
                        rpc, caller, context.peer())
            return pb.Ack(detail="cancelled")
        try:
            limits = self._limits
            expected = reservation.size
            watch.resume(limits.hold_s(expected))
            context.send_initial_metadata(((UPLOAD_GRANT_METADATA, "granted"),))
            buffer = bytearray(expected)
            view = memoryview(buffer)
            pos = 0
            for index, chunk in enumerate(itertools.chain([first], requests)):
                if isinstance(chunk, _Malformed):
                    raise _RefusedStream(f"{rpc}: chunk {index} is not a valid {chunk.type_name}")
                n = len(chunk.data)
                watch.touch(n)
                if n > MAX_CHUNK_BYTES or pos + n > expected:
                    raise _RefusedStream(f"chunk {index}.data: {n} bytes at offset {pos} overrun the "
                                         f"{expected}-byte masked input (or exceed {MAX_CHUNK_BYTES})")
                view[pos : pos + n] = chunk.data
                pos += n
            _raise_if_cancelled(watch)  # a stream the server cancelled ends like one the client closed
            if pos != expected:  # not a refusal that drops the site: a broken connection may end the stream
                # this way before gRPC marks the call cancelled (a second review of 1d0cfcf), so it may retry
                raise MalformedMessage(f"{rpc}: the upload ended after {pos} of {expected} bytes")
            watch.pause()  # the data is in: decoding and adding it is the server's time, not the client's
            result: Message = self._service.submit_masked_vector(caller, first.header, buffer, reservation)
            return result
        finally:
            self.upload_slots.release()

    def _count_refusal(self, caller: str, context: grpc.ServicerContext, what: str) -> None:
        """One warning line per refused or cancelled upload stream, with the site's running count."""
        with self._refusals_lock:  # logged under the lock: the running counts appear in order
            self.upload_refusals[caller] += 1
            log.warning("UploadMaskedInput from %s at %s %s (%d refused upload stream(s) from this site)",
                        caller, context.peer(), what, self.upload_refusals[caller])

    def _fetch_model(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``FetchModel``: the current model in chunks, sliced from one shared buffer."""
        rpc, caller = "FetchModel", "<unauthenticated>"
        try:
            caller = self._authenticate(context)
            if isinstance(request, _Malformed):
                raise MalformedMessage(f"{rpc}: the request is not a valid {request.type_name} ({request.reason})")
            data = self._service.fetch_model(caller, request)
        except Exception as err:
            self._refuse(rpc, caller, context, err)
            raise AssertionError("unreachable: context.abort raises") from err
        chunks = self._serialized_chunks(data)
        try:  # at most two downloads per site, whatever ends them (counted before the first chunk)
            self._fetch_streams.open(caller)
        except Replayed as err:
            self._refuse(rpc, caller, context, err)
        if not context.add_callback(lambda: self._fetch_streams.close(caller)):
            self._fetch_streams.close(caller)  # the call already ended: gRPC will not run the callback
        return self._watched_download(rpc, chunks, context)

    def _watched_download(self, rpc: str, chunks: list[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """The chunks, under the upload watchdog's idle, rate and overall bounds: gRPC asks for the next
        chunk only once the last one was sent, so a site that never reads stalls here and is cancelled,
        instead of holding a server thread (review of 2026-12-07: 40 unread streams froze the server)."""
        limits = self._limits
        with self._watchdog.watch(context.cancel, limits.upload_idle_timeout_s,
                                  limits.upload_min_rate_bytes_s) as watch:
            watch.resume(limits.hold_s(sum(len(c) for c in chunks)))
            for chunk in chunks:
                if self._traffic is not None:
                    self._traffic.count_sent(rpc, len(chunk))
                yield chunk
                watch.touch(len(chunk))

    def _serialized_chunks(self, data: bytes) -> list[bytes]:
        """The model's chunks as serialized ``ModelChunk`` messages, built once per model.

        Every client of a round fetches the same model at about the same time; slicing and
        serializing per fetch would hold ~2 chunk copies per concurrent fetch, so the server's
        memory would grow with the cohort. One shared serialized copy is O(m) in all."""
        with self._model_lock:
            if self._model_chunks is None or self._model_chunks[0] is not data:
                self._model_chunks = (data, [m.SerializeToString() for m in _model_chunks(data)])
            return self._model_chunks[1]

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def parser(rpc: str, cls: type[Message]) -> Callable[[bytes], Any]:
            parse = _deserializer(cls)
            return parse if self._traffic is None else self._traffic.counting_parser(rpc, parse)

        def serializer(rpc: str) -> Callable[[Any], bytes]:
            return _serialize if self._traffic is None else self._traffic.counting_serializer(rpc, _serialize)

        handlers = {
            rpc: grpc.unary_unary_rpc_method_handler(
                self._handler(rpc, method),
                request_deserializer=parser(rpc, cls),
                response_serializer=serializer(rpc),
            )
            for rpc, (cls, method) in RPCS.items()
        }
        handlers["UploadMaskedInput"] = grpc.stream_unary_rpc_method_handler(
            self._upload, request_deserializer=parser("UploadMaskedInput", pb.MaskedInputChunk),
            response_serializer=serializer("UploadMaskedInput"),
        )
        handlers["FetchModel"] = grpc.unary_stream_rpc_method_handler(
            self._fetch_model, request_deserializer=parser("FetchModel", pb.FetchModelRequest),
            response_serializer=None,  # the chunks are serialized already (shared, see _serialized_chunks)
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _RefusedStream(MalformedMessage):
    """An upload stream refused after its reservation was made, for what its sender sent."""


class _Cancelled(FedveilError):
    """The upload watchdog cancelled the stream (gRPC then ends its request iterator quietly)."""


def _raise_if_cancelled(watch: UploadWatch) -> None:
    if watch.reason:
        raise _Cancelled(watch.reason)


def _model_chunks(data: bytes) -> Iterator[Message]:
    total = len(data)
    view = memoryview(data)
    for offset in range(0, max(total, 1), CHUNK_BYTES):
        yield pb.ModelChunk(offset=offset, data=bytes(view[offset : offset + CHUNK_BYTES]), total_bytes=total)


def build_server(
    service: FederationService,
    authenticator: Authenticator,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None,
    limits: ServerLimits | None = None,
    mutual_tls: bool = False,
    health: ServingHealth | None = None,
    traffic: TrafficCounter | None = None,
) -> tuple[grpc.Server, int]:
    """Create and start a gRPC server. Returns (server, bound port); ``listen`` may use port 0.

    ``credentials=None`` serves plaintext (``--insecure``, for trials on loopback only).
    ``health`` adds the standard ``grpc.health.v1.Health`` service (:mod:`fedveil.protocol.health`);
    ``traffic`` counts the message bytes of every federation RPC (:mod:`fedveil.protocol.traffic`).
    """
    limits = limits or ServerLimits()
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="fedveil-rpc"),
        options=options,
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    servicer = FederationServicer(service, authenticator, mutual_tls=mutual_tls, limits=limits, traffic=traffic)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    if health is not None:
        health.add_to(server)
    try:
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {listen!r}: {err}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen!r} (address in use or invalid)")
    server.start()
    return server, port
