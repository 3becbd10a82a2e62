"""Plaintext only on loopback: ``--insecure`` (server and client) and ``federate(insecure=True)``
refuse an address that is not loopback unless the risk is accepted explicitly, and refuse it
before any connection is made. Nothing here connects anywhere: 192.0.2.0/24 is TEST-NET-1,
which no machine may use, so a refusal that came after a connection attempt would hang or fail
differently."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedveil.cli import main
from fedveil.clients.api import federate
from fedveil.protocol.tls import is_loopback_host, plaintext_refusal
from fedveil.tasks.synthetic import write_site_csv
from tests.identity_helpers import secure_federate, write_authority

REMOTE = "192.0.2.7:7000"
SERVER_ARGS = ["--store", "{store}", "--task", "fedveil.tasks.synthetic:task", "--rounds", "1",
               "--clients-per-round", "2", "--insecure"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
     ("localhost", True), ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("[::]", False),
     ("10.0.0.1", False), ("192.0.2.7", False), ("128.0.0.1", False), ("example.com", False),
     ("127.0.0.1.nip.io", False), ("localhost.example.com", False), ("", False), ("ipv4:127.0.0.1", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    refusal = plaintext_refusal(f"{host}:7000", "--allow-insecure-remote")
    assert (refusal is None) is loopback
    if refusal is not None:
        assert "--allow-insecure-remote" in refusal and "token" in refusal


def _server(tmp_path: Path, listen: str, *extra: str) -> list[str]:
    args = [a.replace("{store}", str(tmp_path / "run.db")) for a in SERVER_ARGS]
    return ["server", "--listen", listen, *args, *extra]


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", REMOTE, "hub.example.org:7000"])
def test_server_refuses_insecure_on_a_non_loopback_address(tmp_path: Path, capsys: Any, listen: str) -> None:
    assert main(_server(tmp_path, listen)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --insecure: plaintext (no TLS) on ") and "not a loopback address" in err
    assert "--allow-insecure-remote" in err
    assert not (tmp_path / "run.db").exists()  # refused before the store (or a port) was opened


@pytest.mark.slow
def test_allow_insecure_remote_is_warned_about_at_each_start(tmp_path: Path, capsys: Any) -> None:
    """Accepted with --allow-insecure-remote, with a WARNING; the listen address is TEST-NET, so
    the server then fails to bind (that is how this test avoids listening beyond loopback)."""
    authority = str(write_authority(tmp_path / "authority.pub"))  # the secure default needs it
    proc = subprocess.run([sys.executable, "-m", "fedveil.cli", *_server(tmp_path, "192.0.2.7:0",
                                                                          "--allow-insecure-remote",
                                                                          "--authority", authority)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "WARNING" in proc.stderr and "--allow-insecure-remote" in proc.stderr and "unencrypted" in proc.stderr
    assert "error: --listen:" in proc.stderr.strip().splitlines()[-1]  # it went on to try, and could not bind
    assert main(["server", "--listen", "127.0.0.1:0", *[a.replace("{store}", str(tmp_path / "x.db"))
                                                         for a in SERVER_ARGS if a != "--insecure"],
                 "--tls-cert", "c.pem", "--tls-key", "k.pem", "--allow-insecure-remote"]) == 2
    assert capsys.readouterr().err.strip() == "error: --allow-insecure-remote: only applies together with --insecure"


def test_client_refuses_insecure_to_a_non_loopback_server_before_connecting(tmp_path: Path, capsys: Any) -> None:
    data = write_site_csv(tmp_path / "site.csv", 0, 2, 1)
    base = ["client", "--task", "fedveil.tasks.synthetic", "--data", str(data), "--insecure",
            "--give-up-after", "300"]
    started = time.monotonic()
    assert main([*base, "--server", REMOTE]) == 2
    assert time.monotonic() - started < 30  # no connection attempts (they would retry for 300 s)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --insecure: plaintext (no TLS) on '192.0.2.7'") and "--allow-insecure-remote" in err
    assert main(["client", "--server", "127.0.0.1:7000", "--task", "fedveil.tasks.synthetic", "--data", str(data),
                 "--allow-insecure-remote"]) == 2
    assert capsys.readouterr().err.strip().endswith("only applies together with --insecure")


def test_federate_refuses_insecure_to_a_non_loopback_address_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"^insecure: plaintext .*allow_insecure_remote=True"):
        federate(REMOTE, task="fedveil.tasks.synthetic", insecure=True)
    with pytest.raises(ValueError, match=r"^insecure: "):
        federate("[::]:7000", task="fedveil.tasks.synthetic", insecure=True)
    # loopback, and a remote address with the risk accepted, build a federation (gRPC connects lazily)
    for server, allow in (("127.0.0.1:7000", False), ("localhost:7000", False), (REMOTE, True)):
        fed = federate(server, task="fedveil.tasks.synthetic", insecure=True, allow_insecure_remote=allow,
                       **secure_federate("site-0"))  # the secure default needs the site's identity and authority
        fed.close()
