"""The probe that tells a refused client certificate from a dropped connection
(:mod:`fedveil.protocol.tls_probe`), against real gRPC servers on 127.0.0.1: one that requires a
client certificate, one that does not, one without TLS, and no server at all."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedveil.protocol.tls import generate_ca
from fedveil.protocol.tls_probe import host_and_port, server_requires_client_certificate
from tests.grpc_helpers import Federation_, start_tls_job

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("target", "expected"), [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)),
    ("hub.example.org:443", ("hub.example.org", 443)),
    ("[::1]:8443", ("::1", 8443)),
    ("dns:///hub.example.org:443", None),
    ("unix:/tmp/fedveil.sock", None),
    ("hub.example.org", None),
    ("hub.example.org:https", None),
])
def test_host_and_port_of_a_target(target: str, expected: tuple[str, int] | None) -> None:
    assert host_and_port(target) == expected


def _stop(fed: Federation_, server: object) -> None:
    fed.coordinator.stop()
    fed.thread.join(30)
    server.stop(0).wait(5)  # type: ignore[attr-defined]
    fed.coordinator.store.close()


@pytest.mark.parametrize("mutual", [True, False], ids=["client-ca", "server-tls-only"])
def test_the_probe_says_whether_the_server_requires_a_client_certificate(tmp_path: Path, mutual: bool) -> None:
    fed, server = start_tls_job(tmp_path, rounds=1, client_ca=generate_ca("clinics CA") if mutual else None)
    try:
        assert server_requires_client_certificate(f"127.0.0.1:{fed.port}", fed.ca.cert_pem) is mutual
        # a server this client does not trust cannot answer the question: the probe verifies it too
        assert server_requires_client_certificate(f"127.0.0.1:{fed.port}", generate_ca("other").cert_pem) is None
    finally:
        _stop(fed, server)


def test_the_probe_cannot_tell_without_a_tls_server() -> None:
    with socket.socket() as listener:  # a port that is listening but never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert server_requires_client_certificate(f"127.0.0.1:{port}", None, timeout_s=0.5) is None
    assert server_requires_client_certificate(f"127.0.0.1:{port}", None) is None  # nothing listening now
