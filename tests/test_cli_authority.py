"""``fedveil authority`` and ``fedveil identity``: the consortium set-up end to end, and every bad input.

Bad input is one line ``error: --flag: ...`` and exit status 2, never a traceback; a rejected
credential in ``verify`` is exit status 1; no command prints a private key or a passphrase.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedveil.cli import main
from fedveil.protocol.identity_files import (
    PASSPHRASE_ENV,
    IdentityFileError,
    load_authority_public,
    load_credential,
    load_revocations,
)
from fedveil.secagg.identity import fingerprint, issue_credential, verify_credential, verify_revocations

PASSPHRASE = "correct horse battery staple"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], flag: str, *args: str | Path) -> str:
    """Run a command that must fail with one ``error: FLAG: ...`` line and exit status 2."""
    code, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith(f"error: {flag}: "), err
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture(autouse=True)
def no_env_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def authority(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", tmp_path / "auth")
    assert code == 0, err
    return tmp_path / "auth"


def make_site(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> tuple[Path, Path]:
    """``fedveil identity create``; the printed hex line saved as the site's public key file."""
    key = tmp_path / f"{name}.key"
    code, out, err = run(capsys, "identity", "create", "--out", key)
    assert code == 0, err
    hex_file = tmp_path / f"{name}.pub.hex"
    hex_file.write_text(out.strip().splitlines()[-1] + "\n")
    return key, hex_file


def issue(capsys: pytest.CaptureFixture[str], auth: Path, site: str, public: Path, out: Path) -> dict:
    code, stdout, err = run(capsys, "authority", "issue", "--authority", auth, "--site", site,
                            "--identity-public-key", public, "--out", out)
    assert code == 0, err
    return json.loads(stdout.strip().splitlines()[-1])


def test_consortium_set_up_issue_show_revoke_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   authority: Path) -> None:
    pinned = load_authority_public(authority / "authority.pub")
    assert pinned.consortium == "eu-cardio"
    site_key, site_hex = make_site(tmp_path, capsys, "hospital-a")
    issued = issue(capsys, authority, "hospital-a", site_hex, tmp_path / "a.cred")

    cred = load_credential(tmp_path / "a.cred")
    assert (tmp_path / "a.cred").read_text().startswith("-----BEGIN FEDVEIL SITE CREDENTIAL-----\n")
    private = serialization.load_pem_private_key(site_key.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert cred.identity_public_key == private.public_key().public_bytes_raw()
    assert cred.site_name == "hospital-a" and cred.serial_hex == issued["serial"]
    assert cred.not_after - cred.not_before == 365 * 86400
    verify_credential(pinned.public_key, cred, consortium="eu-cardio", now=cred.not_before,
                      revocations=load_revocations(authority / "revocations.bin"))

    code, out, _ = run(capsys, "authority", "show", tmp_path / "a.cred")
    assert code == 0 and "'hospital-a'" in out and cred.serial_hex in out
    assert fingerprint(cred.identity_public_key) in out
    code, out, _ = run(capsys, "authority", "verify", "--authority", authority / "authority.pub",
                       "--credential", tmp_path / "a.cred", "--site", "hospital-a")
    assert code == 0 and out.startswith("accepted:") and "version 0" in out

    code, out, err = run(capsys, "authority", "revoke", "--authority", authority, "--credential", tmp_path / "a.cred")
    assert code == 0, err
    revocations = load_revocations(authority / "revocations.bin")
    assert revocations.version == 1 and revocations.revoked == {cred.serial}
    verify_revocations(pinned.public_key, revocations, consortium="eu-cardio")
    code, out, err = run(capsys, "authority", "verify", "--authority", authority / "authority.pub",
                         "--credential", tmp_path / "a.cred")
    assert code == 1 and err.strip() == f"error: --credential: rejected: serial: {cred.serial_hex} is revoked " \
        "(revocation list version 1)"

    # revoking again changes nothing; revoking by serial bumps the version
    code, out, _ = run(capsys, "authority", "revoke", "--authority", authority, "--serial", cred.serial_hex)
    assert code == 0 and "already revoked" in out and load_revocations(authority / "revocations.bin").version == 1
    code, _, _ = run(capsys, "authority", "revoke", "--authority", authority, "--serial", "ab" * 16)
    after = load_revocations(authority / "revocations.bin")
    assert code == 0 and after.version == 2 and after.revoked == {cred.serial, bytes.fromhex("ab" * 16)}
    code, out, _ = run(capsys, "authority", "show", authority / "revocations.bin")
    assert code == 0 and "version 2" in out and cred.serial_hex in out and "ab" * 16 in out


def test_init_writes_a_0600_key_a_pinnable_public_file_and_an_empty_signed_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "authority", "init", "--consortium", "c1", "--out", tmp_path / "a")
    assert code == 0 and "NOT encrypted" in err
    key_file = tmp_path / "a" / "authority.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    pinned = load_authority_public(tmp_path / "a")
    assert pinned.public_key.raw == key.public_key().public_bytes_raw()
    assert f"fingerprint: {pinned.public_key.fingerprint}" in out
    revocations = load_revocations(tmp_path / "a" / "revocations.bin")
    assert revocations.version == 0 and not revocations.revoked
    verify_revocations(pinned.public_key, revocations, consortium="c1")
    code, out, _ = run(capsys, "authority", "show", tmp_path / "a" / "authority.pub")
    assert code == 0 and pinned.public_key.fingerprint in out


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path) -> None:
    before = {p.name: p.read_bytes() for p in authority.iterdir()}
    line = usage_error(capsys, "--out", "authority", "init", "--consortium", "eu-cardio", "--out", authority)
    assert "refusing to overwrite" in line
    assert {p.name: p.read_bytes() for p in authority.iterdir()} == before
    (tmp_path / "file").write_text("x")
    usage_error(capsys, "--out", "authority", "init", "--consortium", "c", "--out", tmp_path / "file")
    usage_error(capsys, "--consortium", "authority", "init", "--consortium", "bad name", "--out", tmp_path / "n")


def test_passphrase_from_environment_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    code, out, err = run(capsys, "authority", "init", "--consortium", "c1", "--out", tmp_path / "a")
    assert code == 0 and "NOT encrypted" not in err and PASSPHRASE not in out + err
    pem = (tmp_path / "a" / "authority.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, password=None)
    _, site_hex = make_site(tmp_path, capsys, "s1")
    issue(capsys, tmp_path / "a", "s1", site_hex, tmp_path / "s1.cred")

    # the passphrase from a file (first line) takes precedence over the environment
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    code, out, err = run(capsys, "authority", "issue", "--authority", tmp_path / "a", "--site", "s2",
                         "--identity-public-key", site_hex, "--out", tmp_path / "s2.cred",
                         "--passphrase-file", tmp_path / "pass")
    assert code == 0, err

    line = usage_error(capsys, PASSPHRASE_ENV, "authority", "revoke", "--authority", tmp_path / "a",
                       "--credential", tmp_path / "s1.cred")
    assert "does not decrypt" in line and "wrong" not in line
    (tmp_path / "bad").write_text("not it\n")
    code, out, err = run(capsys, "authority", "revoke", "--authority", tmp_path / "a", "--credential",
                         tmp_path / "s1.cred", "--passphrase-file", tmp_path / "bad")
    assert code == 2 and err.startswith("error: --passphrase-file: ") and "not it" not in out + err
    monkeypatch.delenv(PASSPHRASE_ENV)
    line = usage_error(capsys, "--passphrase-file", "authority", "revoke", "--authority", tmp_path / "a",
                       "--serial", "00" * 16)
    assert "is encrypted" in line
    (tmp_path / "empty").write_text("")
    usage_error(capsys, "--passphrase-file", "authority", "revoke", "--authority", tmp_path / "a",
                "--serial", "00" * 16, "--passphrase-file", tmp_path / "empty")
    assert load_revocations(tmp_path / "a" / "revocations.bin").version == 0


def test_issue_accepts_pem_public_and_private_keys_and_hex(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          authority: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes_raw()
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "priv.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    issue(capsys, authority, "s-pem", tmp_path / "pub.pem", tmp_path / "1.cred")
    code, _, err = run(capsys, "authority", "issue", "--authority", authority, "--site", "s-priv",
                         "--identity-public-key", tmp_path / "priv.pem", "--out", tmp_path / "2.cred")
    assert code == 0 and "PRIVATE key" in err and "never leave the site" in err
    code, _, err = run(capsys, "authority", "issue", "--authority", authority, "--site", "s-hex",
                       "--identity-public-key", raw.hex(), "--out", tmp_path / "3.cred")
    assert code == 0, err
    for name in ("1", "2", "3"):
        assert load_credential(tmp_path / f"{name}.cred").identity_public_key == raw


@pytest.mark.parametrize("weak", ["01" + "00" * 31, "ec" + "ff" * 30 + "7f", "02" + "00" * 31])
def test_issue_refuses_small_order_or_invalid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   authority: Path, weak: str) -> None:
    for value in (weak, tmp_path / "weak.hex"):
        (tmp_path / "weak.hex").write_text(weak + "\n")
        line = usage_error(capsys, "--identity-public-key", "authority", "issue", "--authority", authority,
                           "--site", "s", "--identity-public-key", value, "--out", tmp_path / "s.cred")
        assert "small order" in line or "does not encode a point" in line
    assert not (tmp_path / "s.cred").exists()


def test_issue_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path) -> None:
    _, site_hex = make_site(tmp_path, capsys, "s")
    base = ["authority", "issue", "--authority", authority, "--site", "s", "--identity-public-key", site_hex]
    out = tmp_path / "s.cred"
    usage_error(capsys, "--authority", "authority", "issue", "--authority", tmp_path / "nowhere", "--site", "s",
                "--identity-public-key", site_hex, "--out", out)
    line = usage_error(capsys, "--identity-public-key", *base[:-1], tmp_path / "missing.pem", "--out", out)
    assert "missing.pem" in line and "cannot read" in line
    usage_error(capsys, "--site", *base[:4], "--site", "no spaces", *base[6:], "--out", out)
    usage_error(capsys, "--valid-days", *base, "--valid-days", "0", "--out", out)
    out.write_text("keep me")
    line = usage_error(capsys, "--out", *base, "--out", out)
    assert "refusing to overwrite" in line and out.read_text() == "keep me"
    # the authority's own key is not a site identity
    line = usage_error(capsys, "--identity-public-key", *base[:-1], authority / "authority.key",
                       "--out", tmp_path / "x.cred")
    assert "authority's own key" in line
    # authority.pub that does not belong to authority.key
    other = tmp_path / "other"
    run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", other)
    (authority / "authority.pub").write_bytes((other / "authority.pub").read_bytes())
    line = usage_error(capsys, "--authority", *base, "--out", tmp_path / "y.cred")
    assert "not one key pair" in line


@pytest.mark.parametrize("kind", ["rsa-public", "rsa-private", "ec-public", "ec-private"])
def test_non_ed25519_keys_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path,
                                      kind: str) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind.startswith("rsa") \
        else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo) \
        if kind.endswith("public") else private.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption())
    (tmp_path / "k.pem").write_bytes(pem)
    line = usage_error(capsys, "--identity-public-key", "authority", "issue", "--authority", authority, "--site", "s",
                       "--identity-public-key", tmp_path / "k.pem", "--out", tmp_path / "s.cred")
    assert "not an Ed25519 key" in line
    if kind.endswith("private"):  # a non-Ed25519 authority key is refused too
        (authority / "authority.key").write_bytes(pem)
        line = usage_error(capsys, "--authority", "authority", "revoke", "--authority", authority,
                           "--serial", "00" * 16)
        assert "not an Ed25519 key" in line


def test_a_private_key_given_as_the_authority_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         authority: Path) -> None:
    _, site_hex = make_site(tmp_path, capsys, "s")
    issue(capsys, authority, "s", site_hex, tmp_path / "s.cred")
    secret_lines = (authority / "authority.key").read_text().splitlines()[1:-1]
    code, out, err = run(capsys, "authority", "verify", "--authority", authority / "authority.key",
                         "--credential", tmp_path / "s.cred")
    assert code == 2 and "holds a private key" in err and err.startswith("error: --authority: ")
    assert not any(line in out + err for line in secret_lines)
    line = usage_error(capsys, "FILE", "authority", "show", authority / "authority.key")
    assert "private key" in line


def test_verify_rejects_a_credential_from_a_server_made_authority(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path
) -> None:
    rogue = tmp_path / "rogue"
    run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", rogue)
    _, site_hex = make_site(tmp_path, capsys, "s")
    issue(capsys, rogue, "invented-site", site_hex, tmp_path / "forged.cred")
    code, _, err = run(capsys, "authority", "verify", "--authority", authority, "--credential",
                       tmp_path / "forged.cred")
    assert code == 1 and "rejected: signature: does not verify under the pinned authority key" in err
    # nor can the real authority revoke (or be confused by) a credential it did not issue
    line = usage_error(capsys, "--credential", "authority", "revoke", "--authority", authority,
                       "--credential", tmp_path / "forged.cred")
    assert "not issued by this authority" in line
    # a site name other than the expected one is rejected too
    issue(capsys, authority, "s", site_hex, tmp_path / "s.cred")
    code, _, err = run(capsys, "authority", "verify", "--authority", authority, "--credential", tmp_path / "s.cred",
                       "--site", "someone-else")
    assert code == 1 and "site_name" in err


def test_revoke_errors_and_a_forged_revocation_list(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   authority: Path) -> None:
    base = ["authority", "revoke", "--authority", authority]
    usage_error(capsys, "--serial", *base)
    (tmp_path / "c").write_text("x")
    usage_error(capsys, "--serial", *base, "--serial", "00" * 16, "--credential", tmp_path / "c")
    usage_error(capsys, "--serial", *base, "--serial", "zz" * 16)
    usage_error(capsys, "--serial", *base, "--serial", "00" * 15)
    line = usage_error(capsys, "--credential", *base, "--credential", tmp_path / "c")
    assert "not a valid site credential" in line or "neither" in line
    # a revocation list swapped for one signed by another key is refused, not extended
    rogue = tmp_path / "rogue"
    run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", rogue)
    (authority / "revocations.bin").write_bytes((rogue / "revocations.bin").read_bytes())
    line = usage_error(capsys, "--authority", *base, "--serial", "00" * 16)
    assert "not this authority's list" in line


def test_show_and_verify_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path) -> None:
    usage_error(capsys, "FILE", "authority", "show", tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"\x00\x01junk")
    usage_error(capsys, "FILE", "authority", "show", tmp_path / "junk")
    (tmp_path / "cut.cred").write_text("-----BEGIN FEDVEIL SITE CREDENTIAL-----\nRlZJRAEB\n"
                                       "-----END FEDVEIL SITE CREDENTIAL-----\n")
    line = usage_error(capsys, "FILE", "authority", "show", tmp_path / "cut.cred")
    assert "truncated" in line
    pub = json.loads((authority / "authority.pub").read_text())
    pub["public_key_hex"] = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    (tmp_path / "tampered.pub").write_text(json.dumps(pub))
    line = usage_error(capsys, "--authority", "authority", "verify", "--authority", tmp_path / "tampered.pub",
                       "--credential", tmp_path / "cut.cred")
    assert "fingerprint" in line
    with pytest.raises(IdentityFileError, match="fingerprint"):
        load_authority_public(tmp_path / "tampered.pub")
    pub["public_key_hex"] = "01" + "00" * 31  # the identity point: anyone could sign as the authority
    (tmp_path / "weak.pub").write_text(json.dumps(pub))
    with pytest.raises(IdentityFileError, match="small order"):
        load_authority_public(tmp_path / "weak.pub")


def test_verify_refuses_an_expired_credential(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              authority: Path) -> None:
    key = serialization.load_pem_private_key((authority / "authority.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    site = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    old = issue_credential(key, "eu-cardio", "s", site, not_before=1_000, not_after=2_000)
    (tmp_path / "old.cred").write_bytes(old.encode())  # the raw binary form loads too
    code, _, err = run(capsys, "authority", "verify", "--authority", authority, "--credential", tmp_path / "old.cred")
    assert code == 1 and "rejected: not_after: expired" in err


def test_identity_create_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedveil.clients.api import load_identity_key

    key_path = tmp_path / "site.key"
    code, out, _ = run(capsys, "identity", "create", "--out", key_path)
    assert code == 0 and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_identity_key(key_path)  # the client reads what the command wrote
    raw = key.public_key().public_bytes_raw()
    lines = out.strip().splitlines()
    assert lines[-1] == raw.hex() and f"fingerprint: {fingerprint(raw)}" in out
    assert "PRIVATE" not in out and key_path.read_text().splitlines()[1] not in out
    code, shown, _ = run(capsys, "identity", "show", key_path)
    assert code == 0 and shown.strip().splitlines()[-1] == raw.hex()
    before = key_path.read_bytes()
    line = usage_error(capsys, "--out", "identity", "create", "--out", key_path)
    assert "refusing to overwrite" in line and key_path.read_bytes() == before
    usage_error(capsys, "--out", "identity", "create", "--out", tmp_path / "no" / "dir.key")
    usage_error(capsys, "FILE", "identity", "show", tmp_path / "missing.key")


def test_roster_signs_issued_credentials_shows_them_and_a_client_pins_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], authority: Path) -> None:
    from fedveil.clients.policy import SitePolicy
    from fedveil.commands.client import _site_policy
    from fedveil.protocol.identity_files import load_signed_roster
    from fedveil.secagg.signed_roster import verify_signed_roster

    creds = []
    for name in ("hospital-a", "hospital-b"):
        _, public = make_site(tmp_path, capsys, name)
        issue(capsys, authority, name, public, tmp_path / f"{name}.cred")
        creds.append(tmp_path / f"{name}.cred")
    out = tmp_path / "roster.bin"
    code, stdout, err = run(capsys, "authority", "roster", "--authority", authority, "--credential", creds[0],
                            "--credential", creds[1], "--version", "3", "--out", out)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1]) == {"credentials": 2, "version": 3, "out": str(out)}
    roster = load_signed_roster(out)
    pinned = load_authority_public(authority / "authority.pub")
    marks = verify_signed_roster(pinned.public_key, roster, consortium="eu-cardio")
    assert len(marks) == 2
    code, stdout, _ = run(capsys, "authority", "show", out)
    assert code == 0 and "signed roster of consortium 'eu-cardio', version 3" in stdout
    assert "hospital-a" in stdout and "hospital-b" in stdout
    # a client pins it with the authority; the policy holds its checked entries
    policy = _site_policy(None, authority / "authority.pub", None, out)
    assert isinstance(policy, SitePolicy) and policy.roster_marks == marks
    # never over an existing file; only credentials this authority issued
    usage_error(capsys, "--out", "authority", "roster", "--authority", authority, "--credential", creds[0],
                "--out", out)
    other = tmp_path / "other"
    assert run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", other)[0] == 0
    line = usage_error(capsys, "--credential", "authority", "roster", "--authority", other, "--credential", creds[0],
                       "--out", tmp_path / "r2.bin")
    assert "not issued by this authority" in line and not (tmp_path / "r2.bin").exists()


def test_the_client_names_the_roster_flag_when_it_is_unusable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             authority: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("x\n")
    base = ["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data),
            "--insecure"]
    not_a_roster = tmp_path / "junk.bin"
    not_a_roster.write_bytes(b"FVID\x01\x03junk")
    usage_error(capsys, "--roster", *base, "--trust-server", "--roster", not_a_roster)  # no --authority
    usage_error(capsys, "--roster", *base, "--authority", authority / "authority.pub", "--roster", not_a_roster)
    # a roster another authority signed: refused before the client connects anywhere
    other = tmp_path / "other"
    assert run(capsys, "authority", "init", "--consortium", "eu-cardio", "--out", other)[0] == 0
    _, public = make_site(tmp_path, capsys, "hospital-c")
    issue(capsys, other, "hospital-c", public, tmp_path / "c.cred")
    assert run(capsys, "authority", "roster", "--authority", other, "--credential", tmp_path / "c.cred",
               "--out", tmp_path / "theirs.bin")[0] == 0
    line = usage_error(capsys, "--roster", *base, "--authority", authority / "authority.pub",
                       "--roster", tmp_path / "theirs.bin")
    assert "not vouched for by this site's authority" in line
    # a readable roster with no authority to check it against
    line = usage_error(capsys, "--roster", *base, "--trust-server", "--roster", tmp_path / "theirs.bin")
    assert "needs the authority's public key" in line
