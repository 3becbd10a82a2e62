"""Protocol errors: one exception class per gRPC status the federation uses.

The coordinator raises these; the gRPC servicer turns them into status codes with the
exception's message as the details; the gRPC client transport turns status codes back into
the same classes, so client code handles the in-process and the network transports alike.
Messages name the field or stage at fault and never contain tokens, keys, shares or vectors.
"""

from __future__ import annotations

import grpc

from fedveil.errors import FedveilError


class ProtocolError(FedveilError):
    """Base class. ``code`` is the gRPC status the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Unauthenticated(ProtocolError):
    """Missing, unknown or revoked credentials. Fatal for the client."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProtocolError):
    """The authenticated client may not make this request (e.g. not in the round's cohort)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class MalformedMessage(ProtocolError):
    """Unparseable bytes or a field with a wrong length/value; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class MessageTooLarge(ProtocolError):
    """The message exceeds the server's size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Incompatible(ProtocolError):
    """At Join: wrong protocol version or task. Fatal for the client."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfOrder(ProtocolError):
    """The client is out of sync: unknown session, another run, stale round/nonce, or a message
    for a stage that is not open for it. The client should Join again."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    retryable = True


class Replayed(ProtocolError):
    """A sequence number not above the last one seen, or a second submission for a stage."""

    code = grpc.StatusCode.ALREADY_EXISTS


class StageClosed(ProtocolError):
    """The stage's deadline passed (the client is a dropout of the round) or the round aborted."""

    code = grpc.StatusCode.ABORTED
    retryable = True


class Unavailable(ProtocolError):
    """The server is starting, shutting down or unreachable."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class InternalError(ProtocolError):
    code = grpc.StatusCode.INTERNAL


class TlsRefused(Unavailable):
    """The TLS handshake failed for a reason a retry is unlikely to mend: the server's certificate does not
    chain to the client's CA, is not for the address dialled, the server does not speak TLS, or speaks
    no HTTP/2 over it. gRPC reports these as UNAVAILABLE, like a server that is restarting; retried, a
    mistyped ``ca_cert`` cost a site its whole give-up time (5 min by default) before it said anything.
    A site's first Join fails at once on it; later calls (a server renewing its certificate, a proxy in
    maintenance) retry it like any UNAVAILABLE. Only gRPC core's own text for a connection this client
    could not make is read, never details a server or proxy sent (review of 2026-12-07)."""


_TLS_FAILURES: tuple[tuple[str, str], ...] = (
    ("CERTIFICATE_VERIFY_FAILED", "the server's TLS certificate does not verify against this client's CA (ca_cert, "
                                  "--ca-cert on the command line, or the system roots without one)"),
    ("Hostname Verification Check failed", "the server's TLS certificate is not for the address dialled (check the "
                                           "server address, or server_name_override / --server-name)"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (a server started with --insecure takes a plaintext "
                             "client: insecure=True, on loopback)"),
    ("missing selected ALPN property", "the server, or a proxy in front of it, does not speak HTTP/2 over TLS "
                                       "(gRPC needs it end to end)"),
)
"""(what gRPC core's details contain, what it means) for the handshake failures :class:`TlsRefused` covers.
A server that requires a client certificate and refuses this one only closes the socket, which looks
like any dropped connection: :meth:`fedveil.protocol.client.GrpcTransport.join` asks the server
(:mod:`fedveil.protocol.tls_probe`) when a site's Joins keep failing that way."""
LOCAL_CONNECT_FAILURE = "failed to connect to all addresses"
"""How gRPC core's details start when this client could not connect (its own text, never a server's)."""


GRPC_OVERLOADED = "Concurrent RPC limit exceeded"
"""gRPC's own details when a server is at its ``maximum_concurrent_rpcs`` (RESOURCE_EXHAUSTED)."""

_BY_CODE: dict[grpc.StatusCode, type[ProtocolError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: MalformedMessage,
    grpc.StatusCode.RESOURCE_EXHAUSTED: MessageTooLarge,
    grpc.StatusCode.FAILED_PRECONDITION: OutOfOrder,
    grpc.StatusCode.ALREADY_EXISTS: Replayed,
    grpc.StatusCode.ABORTED: StageClosed,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    # a client of this library never cancels its own calls: CANCELLED means the call was cut on the
    # way (a connection the server dropped under load, a server going down), so it is retried
    # like UNAVAILABLE; 7,021 of 10,000 simulated sites otherwise gave up on one dropped connection
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_from_status(code: grpc.StatusCode, details: str | None, *, rpc: str = "") -> ProtocolError:
    """The :class:`ProtocolError` for a status received by a client.

    FAILED_PRECONDITION on ``Join`` means an incompatible client (:class:`Incompatible`);
    elsewhere it means "out of sync, Join again" (:class:`OutOfOrder`).
    """
    cls = _BY_CODE.get(code, ProtocolError)
    if code == grpc.StatusCode.FAILED_PRECONDITION and rpc == "Join":
        cls = Incompatible
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (details or "").startswith(GRPC_OVERLOADED):
        cls = Unavailable  # the server's gRPC refused the call for load, not for its size: retry
    text = details or code.name
    if code == grpc.StatusCode.UNAVAILABLE and text.startswith(LOCAL_CONNECT_FAILURE):
        for marker, meaning in _TLS_FAILURES:
            if marker in text:
                return TlsRefused(f"{meaning}: {text}")
    err = cls(text)
    if cls is ProtocolError:
        err.code = code
    return err
