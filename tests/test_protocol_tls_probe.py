"""The probe that tells a refused client certificate from a dropped connection
(:mod:`fedveil.protocol.tls_probe`), against real gRPC servers on 127.0.0.1: one that requires a
client certificate, one that does not, one without TLS, no server at all, and a relay that cuts one
connection right after its TLS handshake (review of 2026-12-08: a valid certificate was blamed)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedveil.protocol.client import ChannelConfig, GrpcTransport
from fedveil.protocol.errors import Unavailable
from fedveil.protocol.tls import PemPair, generate_ca, generate_certificate
from fedveil.protocol.tls_probe import client_certificate_refused, host_and_port
from tests.grpc_helpers import Federation_, join_request, start_tls_job, stop_tls_job

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("target", "expected"), [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)),
    ("hub.example.org:443", ("hub.example.org", 443)),
    ("[::1]:8443", ("::1", 8443)),
    ("dns:///hub.example.org:443", None),
    ("unix:/tmp/fedveil.sock", None),
    ("hub.example.org", None),
    ("hub.example.org:https", None),
    ("hub.example.org:\u00b2", None),  # a digit to str.isdigit, not a port
    ("hub.example.org:0", None),
    ("hub.example.org:65536", None),
    (":50051", None),
])
def test_host_and_port_of_a_target(target: str, expected: tuple[str, int] | None) -> None:
    assert host_and_port(target) == expected


@contextmanager
def _job(tmp_path: Path, client_ca: PemPair | None) -> Iterator[Federation_]:
    fed, server = start_tls_job(tmp_path, rounds=1, client_ca=client_ca)
    try:
        yield fed
    finally:
        stop_tls_job(fed, server)


def test_the_probe_blames_a_certificate_only_when_the_server_refuses_it(tmp_path: Path) -> None:
    clinics = generate_ca("clinics CA")
    with _job(tmp_path, clinics) as fed:
        target, ca = f"127.0.0.1:{fed.port}", fed.ca.cert_pem
        valid = generate_certificate("bob", clinics, client=True)
        foreign = generate_certificate("bob", generate_ca("another CA"), client=True)
        assert client_certificate_refused(target, ca) is True  # none given: refused
        assert client_certificate_refused(target, ca, None, foreign.cert_pem, foreign.key_pem) is True
        assert client_certificate_refused(target, ca, None, valid.cert_pem, valid.key_pem) is False
        # a key that does not fit the certificate, or a server this client does not trust: cannot tell
        assert client_certificate_refused(target, ca, None, valid.cert_pem, foreign.key_pem) is None
        assert client_certificate_refused(target, generate_ca("other").cert_pem) is None


def test_a_server_that_takes_no_client_certificate_is_never_said_to_refuse_one(tmp_path: Path) -> None:
    with _job(tmp_path, None) as fed:
        cert = generate_certificate("bob", generate_ca("clinics CA"), client=True)
        assert client_certificate_refused(f"127.0.0.1:{fed.port}", fed.ca.cert_pem) is False
        assert client_certificate_refused(f"127.0.0.1:{fed.port}", fed.ca.cert_pem, None, cert.cert_pem,
                                          cert.key_pem) is False


def test_the_probe_cannot_tell_without_a_tls_server() -> None:
    with socket.socket() as listener:  # a port that is listening but never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert client_certificate_refused(f"127.0.0.1:{port}", None, timeout_s=0.5) is None
    assert client_certificate_refused(f"127.0.0.1:{port}", None) is None  # nothing listening now


class _CutsFirstConnections:
    """A TCP relay to ``backend`` that cuts its first ``cuts`` connections once the client has sent its
    second TLS flight (its handshake is complete on its side), as a middlebox or a crashing server
    can; later connections are relayed as they are."""

    def __init__(self, backend: int, cuts: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.backend, self.cuts, self.accepted = backend, cuts, 0
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(("127.0.0.1", self.backend))
            if self.accepted <= self.cuts:
                threading.Thread(target=self._cut_after_handshake, args=(client, server), daemon=True).start()
            else:
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _cut_after_handshake(self, client: socket.socket, server: socket.socket) -> None:
        server.sendall(client.recv(65536))  # ClientHello
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        client.recv(65536)  # the client's certificate and Finished: cut here
        for s in (client, server):
            s.close()


def test_a_connection_cut_after_the_handshake_is_not_taken_for_a_refused_certificate(tmp_path: Path) -> None:
    clinics = generate_ca("clinics CA")
    with _job(tmp_path, clinics) as fed:
        relay = _CutsFirstConnections(fed.port, cuts=1)
        valid = generate_certificate("bob", clinics, client=True)
        config = ChannelConfig(target=f"127.0.0.1:{relay.port}", ca_cert_pem=fed.ca.cert_pem,
                               client_cert_pem=valid.cert_pem, client_key_pem=valid.key_pem)
        transport = GrpcTransport.connect(config, None, rpc_timeout_s=5.0)
        failures: list[Exception] = []
        deadline = time.monotonic() + 30.0
        while True:
            try:
                assert transport.join(join_request("bob", fed.task.name)).client_name == "bob"
                break
            except Unavailable as err:  # the cut connection, and gRPC's reconnect backoff after it
                failures.append(err)
                assert time.monotonic() < deadline, failures
                time.sleep(0.2)
        transport.close()
        relay.listener.close()
    assert failures and str(failures[0]).endswith("Socket closed")
    assert not [f for f in failures if "certificate" in str(f)], failures  # the valid one never blamed
