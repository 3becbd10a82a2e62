"""Why a TLS connection to the server keeps closing: does the server refuse this client's certificate?

A gRPC server that requires a client certificate (``fedveil server --client-ca``) and gets none, or
one it does not accept, completes the TLS 1.3 handshake and then closes the connection without an
alert. gRPC then reports only "Socket closed", as it does for a connection dropped on the way, so a
site with a wrong ``--client-cert`` retried until ``--give-up-after`` (5 min by default) before it
said anything. :func:`client_certificate_refused` asks the question the error cannot answer, with
TLS connections of its own, each verified as the channel verifies the server and sending only the
HTTP/2 connection preface: one presenting no certificate, and one presenting the site's own. The
server refuses the site's certificate when it closes both before its first byte; it answers one it
accepts, so a connection that was merely dropped is not taken for a refusal (review of 2026-12-08:
a probe presenting no certificate alone blamed a valid one for a single dropped connection). Even
so the answer is only a likely cause: the server sends no alert, so a TLS proxy whose backend is
restarting closes connections the same way. The transport puts it in its retry log and its
give-up error, and keeps retrying.

The site's key reaches OpenSSL through an anonymous in-memory file (``memfd_create``), never the
disk; where there is none (not Linux) a site with a certificate is not probed and keeps retrying.
No token goes out.
"""

from __future__ import annotations

import os
import socket
import ssl

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""The client connection preface of RFC 9113 §3.4 and an empty SETTINGS frame: a gRPC server answers
it with its own SETTINGS frame."""


def host_and_port(target: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` of a gRPC target; None for a target with a scheme, or without a
    port in 1-65535."""
    if "://" in target or target.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdecimal()) or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _h2_context(ca_cert_pem: bytes | None) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_cert_pem`` (the system roots without
    one), as the channel does, and offers HTTP/2."""
    context = ssl.create_default_context(cadata=ca_cert_pem.decode("ascii") if ca_cert_pem else None)
    context.set_alpn_protocols(["h2"])
    return context


def _closed_before_answering(context: ssl.SSLContext, host: str, port: int, server_name: str,
                             timeout_s: float) -> bool | None:
    """True: the server closed the verified connection before its first byte; False: it answered;
    None: no verified connection (nothing listening, the handshake failed, a timeout)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(HTTP2_PREFACE)
            try:
                return tls.recv(1) == b""
            except (ssl.SSLError, ConnectionResetError):  # an alert or a reset in place of an answer
                return True
    except OSError:  # ssl.SSLError and timeouts are OSErrors
        return None


def _load_client_certificate(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> bool:
    """Load the site's certificate and key into ``context`` through anonymous in-memory files;
    False where the platform has none."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return False
    descriptors: list[int] = []
    try:
        for data in (cert_pem, key_pem):
            descriptors.append(memfd_create("fedveil-tls-probe", getattr(os, "MFD_CLOEXEC", 0)))
            os.write(descriptors[-1], data)
        # an empty password: an encrypted key fails here instead of OpenSSL asking on the terminal
        context.load_cert_chain(f"/proc/self/fd/{descriptors[0]}", f"/proc/self/fd/{descriptors[1]}", password=b"")
        return True
    finally:
        for fd in descriptors:
            os.close(fd)


def client_certificate_refused(target: str, ca_cert_pem: bytes | None, server_name: str | None = None,
                               client_cert_pem: bytes | None = None, client_key_pem: bytes | None = None,
                               *, timeout_s: float = 5.0) -> bool | None:
    """True when the server at ``target`` requires a client certificate and refuses this client's
    (or it has none): it closes a connection presenting no certificate, and one presenting
    ``client_cert_pem``, before answering. False when the server answers either; None when this
    cannot tell (no such server, a handshake that fails, a target it cannot parse, a certificate it
    cannot load): then the caller keeps its own error."""
    address = host_and_port(target)
    if address is None:
        return None
    host, port = address
    name = server_name or host
    try:
        closed = _closed_before_answering(_h2_context(ca_cert_pem), host, port, name, timeout_s)
        if not closed or client_cert_pem is None or client_key_pem is None:
            return closed
        own = _h2_context(ca_cert_pem)
        if not _load_client_certificate(own, client_cert_pem, client_key_pem):
            return None
    except (OSError, ValueError):  # ssl.SSLError is an OSError: a CA that does not parse, a key that does not fit
        return None
    return _closed_before_answering(own, host, port, name, timeout_s)
