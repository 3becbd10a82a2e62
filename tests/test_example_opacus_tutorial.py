"""The docs' before/after of an Opacus-tutorial script: the changed-line count, and the after script
running unmodified (but for the server's address) as three site processes of a TLS job.

The job is set up as docs/federate-your-loop.md says, with its three commands: ``fedveil init-model``
from the script's own class, ``fedveil enroll`` per site, and the server (here ``fedveil.serve`` in a
thread, the same runner as ``fedveil server``).
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import fedveil
from fedveil.cli import main
from fedveil.protocol.tls import generate_ca, generate_certificate
from fedveil.server.config import ServerConfig
from fedveil.server.store import RunStore
from tests.identity_helpers import TEST_AUTHORITY, secure_job, write_authority

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "opacus_tutorial"
DOC = ROOT / "docs" / "federate-your-loop.md"


def code_lines(path: Path) -> list[str]:
    """The script's non-blank lines after its module docstring."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    first = tree.body[1].lineno if isinstance(tree.body[0], ast.Expr) else 1
    return [line for line in source.splitlines()[first - 1:] if line.strip()]


def changed_lines(before: list[str], after: list[str]) -> int:
    """Lines of ``after`` that are new or modified (a removed line replaced by one counts once)."""
    count = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
        if tag != "equal":
            count += max(i2 - i1, j2 - j1)
    return count


def test_the_docs_state_the_real_changed_line_count_and_it_meets_the_target() -> None:
    count = changed_lines(code_lines(EXAMPLE / "before.py"), code_lines(EXAMPLE / "after.py"))
    stated = re.search(r"\*\*Changed lines: (\d+)\*\*", DOC.read_text(encoding="utf-8"))
    assert stated is not None, "docs/federate-your-loop.md must state the count"
    assert int(stated.group(1)) == count
    assert count <= 8
    assert "make_private_with_epsilon" in (EXAMPLE / "after.py").read_text()  # the site's own Opacus call kept


@pytest.mark.slow
def test_the_after_script_is_one_site_of_a_tls_job_with_local_dp(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE))  # `fedveil init-model --from after:Net`, as the docs say
    try:
        assert main(["init-model", "--from", "after:Net", "--dp", "local", "--out",
                     str(tmp_path / "init.safetensors")]) == 0
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("after", None)
    store = tmp_path / "run.db"
    with RunStore(store) as rs:
        tokens = [rs.enroll(f"site-{i}").token for i in range(3)]
    ca = generate_ca("hub CA")
    generate_certificate("hub", ca, hostnames=["127.0.0.1"]).write(tmp_path / "hub.pem", tmp_path / "hub.key")
    config = ServerConfig.from_flat(
        task="", model=str(tmp_path / "init.safetensors"), rounds=3, clients_per_round=3, min_clients=3,
        cohort_wait=1.0, linger=10.0, poll_wait=1.0, evaluate=False, final_evaluation=False, dp="local",
        dp_local_target_epsilon=8.0, **secure_job())
    port = _free_port()
    out: dict[str, object] = {}

    def serve() -> None:
        try:
            out["summary"] = fedveil.serve(config, store=store, listen=f"127.0.0.1:{port}",
                                           tls_cert=tmp_path / "hub.pem", tls_key=tmp_path / "hub.key",
                                           authority=write_authority(tmp_path / "authority.pub"))
        except BaseException as err:  # surfaced below
            out["error"] = err

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    script = (EXAMPLE / "after.py").read_text(encoding="utf-8").replace("hub.example.org:7000", f"127.0.0.1:{port}")
    sites = []
    for i in range(3):
        folder = tmp_path / f"site-{i}"
        folder.mkdir()
        (folder / "after.py").write_text(script, encoding="utf-8")
        (folder / "site.token").write_text(tokens[i] + "\n")
        (folder / "hub-ca.pem").write_bytes(ca.cert_pem)
        key, credential = TEST_AUTHORITY.identity(f"site-{i}", now=int(time.time()))
        (folder / "site.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / "site.cred").write_bytes(credential.encode())
        write_authority(folder / "authority.pub")
        log = (folder / "site.log").open("w")
        # one torch thread per site, as the process backend gives its sites: three sites of two threads
        # each on a two-core machine spent a quarter of their CPU spinning against each other
        sites.append(subprocess.Popen([sys.executable, "after.py"], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}))
    deadline = time.monotonic() + 240
    for site in sites:
        try:
            site.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            site.kill()
            site.wait()
    outputs = [(tmp_path / f"site-{i}" / "site.log").read_text() for i in range(3)]
    server.join(timeout=60)
    assert "error" not in out, out.get("error")
    for site, output in zip(sites, outputs, strict=True):
        assert site.returncode == 0, output
        rounds = re.findall(r"round (\d+): accuracy ([0-9.]+), ε = ([0-9.]+)", output)
        assert [r[0] for r in rounds] == ["1", "2", "3"], output
        assert 0 < float(rounds[-1][2]) <= 8.0 + 1e-6  # the engine's own ε, within its make_private target
    summary = out["summary"]
    assert getattr(summary, "status") == "completed" and getattr(summary, "completed_rounds") == 3
    assert set(getattr(summary, "site_epsilon")) == {"site-0", "site-1", "site-2"}
    assert getattr(summary, "unverified_sites") == ()  # the engines' reports check out against the job


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
