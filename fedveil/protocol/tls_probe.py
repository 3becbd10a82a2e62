"""Why a TLS connection to the server keeps closing: does the server require a client certificate?

A gRPC server that requires a client certificate (``fedveil server --client-ca``) and gets none, or
one it does not accept, completes the TLS 1.3 handshake and then closes the connection without an
alert. gRPC then reports only "Socket closed", as it does for a connection dropped on the way, so a
site with a wrong ``--client-cert`` retried until ``--give-up-after`` (5 min by default) before it
said anything. :func:`server_requires_client_certificate` asks the question the error cannot
answer: it makes one TLS connection of its own, verified as the channel verifies the server, that
presents no certificate and sends only the HTTP/2 connection preface. A server that answers does
not require one; a server that closes the connection before its first byte does. Nothing secret
goes out: no certificate, no key, no token.
"""

from __future__ import annotations

import socket
import ssl

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""The client connection preface of RFC 9113 §3.4 and an empty SETTINGS frame: a gRPC server answers
it with its own SETTINGS frame."""


def host_and_port(target: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` of a gRPC target; None for a target with a scheme or no port."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def server_requires_client_certificate(target: str, ca_cert_pem: bytes | None, server_name: str | None = None,
                                       *, timeout_s: float = 5.0) -> bool | None:
    """True when the server at ``target`` closes a verified TLS connection that presents no client
    certificate before answering its HTTP/2 preface; False when it answers; None when this cannot
    tell (no such server, the handshake fails, a target it cannot parse): then the caller keeps its
    own error."""
    address = host_and_port(target)
    if address is None:
        return None
    host, port = address
    context = ssl.create_default_context(cadata=ca_cert_pem.decode("ascii") if ca_cert_pem else None)
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=server_name or host) as tls:
            tls.sendall(HTTP2_PREFACE)
            try:
                first = tls.recv(1)
            except (ssl.SSLError, ConnectionResetError):  # an alert or a reset in place of an answer
                return True
            return first == b""
    except (OSError, ValueError, UnicodeDecodeError):  # ssl.SSLError and timeouts are OSErrors
        return None
