"""The gRPC service on 127.0.0.1 with TLS: who may speak — server certificates, tokens, client
certificates (mutual TLS), and the protocol version, task and identity checks at Join.

A real coordinator runs behind a real gRPC server (:mod:`tests.grpc_helpers`); a refused client
must get the documented status code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from fedveil.clients.backoff import BackoffPolicy, GaveUp
from fedveil.protocol.errors import Incompatible, TlsRefused, Unauthenticated, Unavailable
from fedveil.protocol.tls import generate_ca, generate_certificate
from tests.grpc_helpers import TASK, Federation_, join_request, start_tls_job, stop_tls_job
from tests.identity_helpers import secure_federate

pytestmark = pytest.mark.timeout(180)


def test_tls_and_token_authentication(fed: Federation_) -> None:
    t = fed.transport("alice")
    resp = t.join(join_request("alice", fed.task.name))
    assert resp.client_name == "alice" and len(resp.session_id) == 16 and resp.max_message_bytes == fed.limit
    t.close()
    # wrong token, malformed token, no token: UNAUTHENTICATED
    wrong = fed.tokens["alice"][:-4] + ("AAAA" if not fed.tokens["alice"].endswith("AAAA") else "BBBB")
    for token in (wrong, "fvt1.0123456789abcdef.AAAA"):
        bad = fed.transport(None, token=token)
        with pytest.raises(Unauthenticated) as info:
            bad.join(join_request("alice", fed.task.name))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert token not in str(info.value)
        bad.close()
    anonymous = fed.transport(None, token="")
    with pytest.raises(Unauthenticated, match="no credentials"):
        anonymous.join(join_request("alice", fed.task.name))
    anonymous.close()
    # a server certificate from another CA, or no TLS at all, never reaches the service; the first is
    # named at once (a retry cannot mend it), the second looks like a dropped connection to gRPC
    for kwargs, error, message in (({"ca": generate_ca("someone else")}, TlsRefused,
                                    r"^the server's TLS certificate does not verify against this client's CA "
                                    r"\(ca_cert, .*CERTIFICATE_VERIFY_FAILED"),
                                   ({"insecure": True}, Unavailable, "")):
        other = fed.transport("alice", **kwargs)  # type: ignore[arg-type]
        other._timeout = 5.0
        with pytest.raises(error, match=message) as refused:
            other.join(join_request("alice", fed.task.name))
        assert isinstance(refused.value, TlsRefused) is (error is TlsRefused)  # the first Join fails at once on it
        other.close()
    # incompatible protocol version or task: FAILED_PRECONDITION at Join
    t = fed.transport("alice")
    request = join_request("alice", fed.task.name)
    request.protocol_version = 99
    with pytest.raises(Incompatible, match="protocol_version"):
        t.join(request)
    with pytest.raises(Incompatible, match="task_name"):
        t.join(join_request("alice", "another-task"))
    # the secure default: a site without an identity key, or without the authority's credential, is refused
    with pytest.raises(Incompatible, match="identity_public_key: this job runs in active-adversary mode"):
        t.join(join_request(None, fed.task.name))
    request = join_request("alice", fed.task.name)
    request.ClearField("identity_credential")
    with pytest.raises(Incompatible, match="identity_credential"):
        t.join(request)
    t.close()


def test_mutual_tls_identifies_the_client_by_certificate(tmp_path: Path) -> None:
    client_ca = generate_ca("clinics CA")
    fed, server = start_tls_job(tmp_path, rounds=1, client_ca=client_ca)
    try:
        cert = generate_certificate("bob", client_ca, client=True)
        t = fed.transport(None, token="", client=cert)
        assert t.join(join_request("bob", fed.task.name)).client_name == "bob"
        t.close()
        stranger = generate_certificate("eve", client_ca, client=True)
        t = fed.transport(None, token="", client=stranger)
        with pytest.raises(Unauthenticated, match="not enrolled"):
            t.join(join_request("eve", fed.task.name))
        t.close()
        # a token naming a different client than the certificate is refused
        t = fed.transport("alice", client=cert)
        with pytest.raises(Unauthenticated, match="different clients"):
            t.join(join_request("bob", fed.task.name))
        t.close()
        # no client certificate, or one from another CA: the server closes the connection after the TLS
        # handshake, which gRPC reports as a dropped connection. From the second such Join in a row the
        # transport asks the server (tls_probe) and puts the likely cause in the error, still retried
        # (a TLS proxy whose backend restarts closes connections the same way)
        for client, meaning in ((None, r"this client gave none \(client_cert and client_key"),
                                (generate_certificate("bob", generate_ca("another CA"), client=True),
                                 r"it refuses this one \(client_cert, --client-cert")):
            t = fed.transport("alice", client=client)
            t._timeout = 5.0
            with pytest.raises(Unavailable, match=r"^failed to connect to all addresses.*Socket closed$"):
                t.join(join_request("alice", fed.task.name))
            with pytest.raises(Unavailable, match=r"^the server closes every connection right after the TLS "
                               rf"handshake.*{meaning}.*: failed to connect to all addresses") as second:
                t.join(join_request("alice", fed.task.name))
            assert not isinstance(second.value, TlsRefused)  # retried, not fatal
            t.close()
    finally:
        stop_tls_job(fed, server)


def test_federate_and_fedveil_client_take_a_client_certificate_for_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from fedveil.cli import main
    from fedveil.clients import federate

    client_ca = generate_ca("clinics CA")
    fed, server = start_tls_job(tmp_path, rounds=1, client_ca=client_ca)
    try:
        cert = generate_certificate("bob", client_ca, client=True)
        for name, data in (("ca.pem", fed.ca.cert_pem), ("bob.pem", cert.cert_pem), ("bob.key", cert.key_pem)):
            (tmp_path / name).write_bytes(data)
        session = federate(f"127.0.0.1:{fed.port}", task=TASK, ca_cert=tmp_path / "ca.pem",
                           client_cert=tmp_path / "bob.pem", client_key=tmp_path / "bob.key", **secure_federate("bob"))
        assert session.transport.join(
            join_request("bob", fed.task.name)
        ).client_name == "bob"  # identified by its certificate alone (no token)
        session.close()
        # a site whose certificate the server refuses says why in its retry log at once, and in the
        # error it gives up with
        stranger = generate_certificate("bob", generate_ca("another CA"), client=True)
        (tmp_path / "stranger.pem").write_bytes(stranger.cert_pem)
        (tmp_path / "stranger.key").write_bytes(stranger.key_pem)
        refused = federate(f"127.0.0.1:{fed.port}", task=TASK, ca_cert=tmp_path / "ca.pem",
                           client_cert=tmp_path / "stranger.pem", client_key=tmp_path / "stranger.key",
                           backoff=BackoffPolicy(initial_delay_s=0.1, max_delay_s=0.5, give_up_after_s=3.0),
                           **secure_federate("bob"))
        with caplog.at_level(logging.WARNING, logger="fedveil"), \
                pytest.raises(GaveUp, match=r"^gave up after .*it refuses this one \(client_cert, --client-cert"):
            next(iter(refused))
        refused.close()
        retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert len(retries) >= 2 and "it refuses this one (client_cert" in retries[1], retries
        with pytest.raises(ValueError, match="client_cert and client_key together"):
            federate(f"127.0.0.1:{fed.port}", task=TASK, ca_cert=tmp_path / "ca.pem", client_cert=tmp_path / "bob.pem")
    finally:
        stop_tls_job(fed, server)
    base = ["client", "--server", "127.0.0.1:1", "--task", TASK, "--data", str(tmp_path / "none.csv")]
    for extra, flag in ((["--client-cert", str(tmp_path / "bob.pem")], "--client-key"),
                        (["--insecure", "--client-cert", "a", "--client-key", "b"], "--insecure")):
        assert main([*base, *extra]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag}:")
