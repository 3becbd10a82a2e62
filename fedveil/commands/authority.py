"""``fedveil authority``: run the consortium authority that vouches for each site's identity key.

The authority is held by the consortium, not by the aggregation server, and its key belongs on an
offline machine (see docs/trust.md)::

    fedveil authority init --consortium NAME --out DIR       # authority.key, authority.pub, revocations.bin
    fedveil authority issue --authority DIR --site NAME --identity-public-key FILE --out site.cred
    fedveil authority revoke --authority DIR (--serial HEX | --credential FILE)
    fedveil authority roster --authority DIR --credential FILE [--credential FILE ...] --out roster.bin
    fedveil authority show FILE                               # a credential, revocation list or authority.pub
    fedveil authority verify --authority PUB --credential FILE [--revocations FILE] [--site NAME]

The authority key is encrypted with the passphrase from ``--passphrase-file`` or the
``FEDVEIL_AUTHORITY_PASSPHRASE`` environment variable; the passphrase is never echoed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from fedveil.commands.common import fail, print_json_last_line

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedveil.protocol.identity_files import PinnedAuthority
    from fedveil.secagg.identity import SiteCredential

MAX_VALID_DAYS = 3650
T = TypeVar("T")


def register(group: click.Group) -> None:
    group.add_command(authority_group)


@click.group("authority")
def authority_group() -> None:
    """The consortium authority: vouches for each site's identity key (never run it on the server)."""


_PASSPHRASE_FILE = click.option(
    "--passphrase-file", type=click.Path(path_type=Path), default=None,
    help="File whose first line is the authority key's passphrase [default: $FEDVEIL_AUTHORITY_PASSPHRASE].",
)


@authority_group.command("init")
@click.option("--consortium", required=True, help="The consortium id (letters, digits, '.', '_', '-').")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for authority.key, authority.pub and revocations.bin (created if missing).")
@_PASSPHRASE_FILE
def init_command(consortium: str, out_dir: Path, passphrase_file: Path | None) -> None:
    """Create the authority key pair and an empty signed revocation list."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedveil.protocol import identity_files as files
    from fedveil.secagg.identity import CONSORTIUM_PATTERN, AuthorityPublicKey, issue_revocations

    if not CONSORTIUM_PATTERN.fullmatch(consortium):
        fail("--consortium", f"use letters, digits, '.', '_', '-' (at most 128, starting with a letter or digit), "
             f"got {consortium[:80]!r}")
    if out_dir.exists() and not out_dir.is_dir():
        fail("--out", f"{str(out_dir)!r} exists and is not a directory")
    paths = [out_dir / name for name in (files.AUTHORITY_KEY_FILE, files.AUTHORITY_PUBLIC_FILE, files.REVOCATIONS_FILE)]
    for path in paths:
        if path.exists():
            fail("--out", f"{str(path)!r} already exists; refusing to overwrite an authority")
    passphrase = _passphrase(passphrase_file)
    key = Ed25519PrivateKey.generate()
    pinned = files.PinnedAuthority(consortium, AuthorityPublicKey.of(key))
    revocations = issue_revocations(key, consortium, version=0, issued_at=int(time.time()), revoked=())
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        files.write_new_file(paths[0], files.private_key_pem(key, passphrase), mode=0o600)
        files.write_new_file(paths[1], files.authority_public_text(pinned).encode())
        files.write_new_file(paths[2], revocations.encode())
    except OSError as err:
        fail("--out", f"cannot write to {str(out_dir)!r}: {err.strerror}")
    if passphrase is None:
        click.echo(f"warning: {files.AUTHORITY_KEY_FILE} is NOT encrypted (give --passphrase-file or set "
                   f"{files.PASSPHRASE_ENV}); keep it on an offline machine", err=True)
    click.echo(f"created the authority of consortium {consortium!r} in {str(out_dir)!r}")
    click.echo(f"  {paths[0].name}: private key, mode 0600, {'encrypted' if passphrase else 'unencrypted'}; "
               "keep it offline, never on the aggregation server")
    click.echo(f"  {paths[1].name}: give it to every site (they pin it); {paths[2].name}: revocation list, version 0")
    click.echo(f"fingerprint: {pinned.public_key.fingerprint}  (read it to each site out of band)")


@authority_group.command("issue")
@click.option("--authority", "authority_dir", required=True, type=click.Path(path_type=Path),
              help="The authority directory made by 'fedveil authority init'.")
@click.option("--site", required=True, help="The site's enrolled client name.")
@click.option("--identity-public-key", "identity_file", required=True,
              help="The site's public key: a PEM public key, a PEM private key (only its public half is used), "
                   "a file with the hex line printed by 'fedveil identity create', or those 64 hex digits.")
@click.option("--valid-days", type=int, default=365, show_default=True, help="Validity from now, in days.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="The credential file to write.")
@_PASSPHRASE_FILE
def issue_command(
    authority_dir: Path, site: str, identity_file: str, valid_days: int, out_path: Path, passphrase_file: Path | None,
) -> None:
    """Sign a credential that vouches for one site's identity key."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.errors import CredentialError
    from fedveil.secagg.identity import NAME_PATTERN, fingerprint, issue_credential

    if not NAME_PATTERN.fullmatch(site):
        fail("--site", f"use letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit), "
             f"got {site[:80]!r}")
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        fail("--valid-days", f"expected 1..{MAX_VALID_DAYS} (got {valid_days})")
    if out_path.exists():
        fail("--out", f"{str(out_path)!r} already exists; refusing to overwrite")
    identity_key = _identity_public_key(identity_file)
    pinned, key = _open_authority(authority_dir, passphrase_file)
    if identity_key == pinned.public_key.raw:
        fail("--identity-public-key", "is the authority's own key; a site needs its own identity key")
    now = int(time.time())
    try:
        credential = issue_credential(key, pinned.consortium, site, identity_key, not_before=now,
                                      not_after=now + valid_days * 86400)
    except CredentialError as err:
        fail("--identity-public-key" if err.field == "identity_public_key" else "--valid-days", str(err))
    try:
        files.write_new_file(out_path, files.armor(credential.encode(), files.CREDENTIAL_LABEL).encode())
    except OSError as err:
        fail("--out", f"cannot write {str(out_path)!r}: {err.strerror}")
    click.echo(f"issued a credential for site {site!r} in consortium {pinned.consortium!r} to {str(out_path)!r}")
    click.echo(f"  identity key {fingerprint(identity_key)}, serial {credential.serial_hex}, "
               f"valid {_when(credential.not_before)} .. {_when(credential.not_after)}")
    print_json_last_line({"site": site, "serial": credential.serial_hex, "not_after": credential.not_after,
                          "out": str(out_path)})


@authority_group.command("revoke")
@click.option("--authority", "authority_dir", required=True, type=click.Path(path_type=Path),
              help="The authority directory made by 'fedveil authority init'.")
@click.option("--serial", default=None, help="The credential's serial (32 hex digits).")
@click.option("--credential", "credential_path", type=click.Path(path_type=Path), default=None,
              help="The credential file to revoke.")
@_PASSPHRASE_FILE
def revoke_command(authority_dir: Path, serial: str | None, credential_path: Path | None,
                   passphrase_file: Path | None) -> None:
    """Add a credential to the revocation list (new version, re-signed)."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.errors import CredentialError
    from fedveil.secagg.identity import SERIAL_BYTES, issue_revocations, verify_revocations

    if (serial is None) == (credential_path is None):
        fail("--serial", "give exactly one of --serial and --credential")
    if serial is not None:
        try:
            serial_bytes = bytes.fromhex(serial)
        except ValueError:
            fail("--serial", f"not hexadecimal (got {serial[:40]!r})")
        if len(serial_bytes) != SERIAL_BYTES:
            fail("--serial", f"expected {2 * SERIAL_BYTES} hex digits (got {len(serial.strip())})")
    pinned, key = _open_authority(authority_dir, passphrase_file)
    if credential_path is not None:
        credential = _load(files.load_credential, credential_path, "--credential")
        _check_issued_here(pinned, credential)
        serial_bytes = credential.serial
    rev_path = authority_dir / files.REVOCATIONS_FILE
    current = _load(files.load_revocations, rev_path, "--authority")
    try:
        verify_revocations(pinned.public_key, current, consortium=pinned.consortium)
    except CredentialError as err:
        fail("--authority", f"{str(rev_path)!r} is not this authority's list ({err})")
    if serial_bytes in current.revoked:
        click.echo(f"serial {serial_bytes.hex()} is already revoked; list unchanged (version {current.version})")
        return
    updated = issue_revocations(
        key, pinned.consortium, version=current.version + 1, issued_at=max(int(time.time()), current.issued_at),
        revoked=current.revoked | {serial_bytes},
    )
    try:
        files.replace_file(rev_path, updated.encode())
    except OSError as err:
        fail("--authority", f"cannot write {str(rev_path)!r}: {err.strerror}")
    click.echo(f"revoked serial {serial_bytes.hex()}; {rev_path.name} is now version {updated.version} "
               f"({len(updated.revoked)} revoked). Give the new list to every site and the server.")


@authority_group.command("roster")
@click.option("--authority", "authority_dir", required=True, type=click.Path(path_type=Path),
              help="The authority directory made by 'fedveil authority init'.")
@click.option("--credential", "credential_paths", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A credential this authority issued (repeat, one per site).")
@click.option("--version", "roster_version", type=int, default=1, show_default=True,
              help="The roster's version (raise it for each new roster).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="The roster file to write.")
@_PASSPHRASE_FILE
def roster_command(authority_dir: Path, credential_paths: tuple[Path, ...], roster_version: int, out_path: Path,
                   passphrase_file: Path | None) -> None:
    """Sign a roster of issued credentials: sites check it once, instead of each credential in a round."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.errors import CredentialError
    from fedveil.secagg.identity import MAX_TIME
    from fedveil.secagg.signed_roster import issue_signed_roster

    if not 0 <= roster_version <= MAX_TIME:
        fail("--version", f"expected 0..2**63-1 (got {roster_version})")
    if out_path.exists():
        fail("--out", f"{str(out_path)!r} already exists; refusing to overwrite")
    pinned, key = _open_authority(authority_dir, passphrase_file)
    credentials = [_load(files.load_credential, path, "--credential") for path in credential_paths]
    try:  # lists only credentials this authority issued, in its consortium
        roster = issue_signed_roster(key, pinned.consortium, credentials, version=roster_version,
                                     issued_at=int(time.time()))
    except CredentialError as err:
        where = str(credential_paths[err.index]) if err.index is not None else "a credential"
        fail("--credential", f"{where}: {err.detail}")
    try:
        files.write_new_file(out_path, files.armor(roster.encode(), files.SIGNED_ROSTER_LABEL).encode())
    except OSError as err:
        fail("--out", f"cannot write {str(out_path)!r}: {err.strerror}")
    click.echo(f"signed a roster of {len(roster.credentials)} credentials (version {roster_version}) of consortium "
               f"{pinned.consortium!r} to {str(out_path)!r}; give it to every site (fedveil client --roster)")
    print_json_last_line({"credentials": len(roster.credentials), "version": roster_version, "out": str(out_path)})


@authority_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def show_command(file: Path) -> None:
    """Print a credential, a revocation list, a signed roster or an authority.pub (never a secret)."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.errors import CredentialError
    from fedveil.secagg.identity import KIND_REVOCATIONS, KIND_SIGNED_ROSTER, MAGIC, decode_credential, fingerprint

    try:
        head = file.read_bytes()[:4096]
    except OSError as err:
        fail("FILE", f"cannot read {str(file)!r}: {err.strerror}")
    if b"PRIVATE KEY" in head:
        fail("FILE", f"{str(file)!r} is a private key; 'show' prints only public files")
    if head.lstrip().startswith(b"{"):
        pinned = _load(files.load_authority_public, file, "FILE")
        click.echo(f"authority of consortium {pinned.consortium!r}")
        click.echo(f"  public key:  {pinned.public_key.raw.hex()}")
        click.echo(f"  fingerprint: {pinned.public_key.fingerprint}")
        return
    if files.REVOCATIONS_LABEL.encode() in head or (head.startswith(MAGIC) and head[5:6] == bytes([KIND_REVOCATIONS])):
        rl = _load(files.load_revocations, file, "FILE")
        click.echo(f"revocation list of consortium {rl.consortium!r}, version {rl.version}, "
                   f"issued {_when(rl.issued_at)}")
        click.echo(f"  revoked serials ({len(rl.revoked)}):")
        for serial in sorted(rl.revoked):
            click.echo(f"    {serial.hex()}")
        return
    if files.SIGNED_ROSTER_LABEL.encode() in head or (head.startswith(MAGIC)
                                                       and head[5:6] == bytes([KIND_SIGNED_ROSTER])):
        roster = _load(files.load_signed_roster, file, "FILE")
        click.echo(f"signed roster of consortium {roster.consortium!r}, version {roster.version}, "
                   f"issued {_when(roster.issued_at)}")
        click.echo(f"  credentials ({len(roster.credentials)}):")
        for i, entry in enumerate(roster.credentials):
            try:
                listed = decode_credential(entry)
            except CredentialError as err:
                click.echo(f"    credentials[{i}] does not decode: {err}")
                continue
            key = fingerprint(listed.identity_public_key)
            click.echo(f"    {listed.site_name}  serial {listed.serial_hex}  key {key}")
        return
    credential = _load(files.load_credential, file, "FILE")
    click.echo(f"site credential for {credential.site_name!r} in consortium {credential.consortium!r}")
    click.echo(f"  identity key: {credential.identity_public_key.hex()}")
    click.echo(f"  fingerprint:  {fingerprint(credential.identity_public_key)}")
    click.echo(f"  serial:       {credential.serial_hex}")
    click.echo(f"  valid:        {_when(credential.not_before)} .. {_when(credential.not_after)}")
    click.echo("  (signature not checked; use 'fedveil authority verify' with the pinned authority.pub)")


@authority_group.command("verify")
@click.option("--authority", "authority_path", required=True, type=click.Path(path_type=Path),
              help="The pinned authority.pub (or the authority directory).")
@click.option("--credential", "credential_path", required=True, type=click.Path(path_type=Path))
@click.option("--revocations", "revocations_path", type=click.Path(path_type=Path), default=None,
              help="The latest revocation list [default: revocations.bin beside authority.pub, if present].")
@click.option("--site", default=None, help="Also require the credential to name this site.")
def verify_command(authority_path: Path, credential_path: Path, revocations_path: Path | None,
                   site: str | None) -> None:
    """Check a credential as a site would: exit 0 if accepted, 1 (with the reason) if rejected."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.errors import CredentialError
    from fedveil.secagg.identity import verify_credential

    pinned = _load(files.load_authority_public, authority_path, "--authority")
    credential = _load(files.load_credential, credential_path, "--credential")
    if revocations_path is None:
        beside = (authority_path if authority_path.is_dir() else authority_path.parent) / files.REVOCATIONS_FILE
        revocations_path = beside if beside.exists() else None
    revocations = None if revocations_path is None else _load(files.load_revocations, revocations_path, "--revocations")
    try:
        verify_credential(pinned.public_key, credential, consortium=pinned.consortium, now=int(time.time()),
                          revocations=revocations, expected_name=site)
    except CredentialError as err:
        raise click.ClickException(f"--credential: rejected: {err}") from None
    checked = "no revocation list" if revocations is None else f"revocation list version {revocations.version}"
    click.echo(f"accepted: {credential.site_name!r} in consortium {pinned.consortium!r}, serial "
               f"{credential.serial_hex}, valid until {_when(credential.not_after)} ({checked})")


def _open_authority(authority_dir: Path, passphrase_file: Path | None) -> tuple[PinnedAuthority, Ed25519PrivateKey]:
    """The authority's pinned public file and its private key, checked to be one pair."""
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.identity import AuthorityPublicKey

    if not authority_dir.is_dir():
        fail("--authority", f"{str(authority_dir)!r} is not a directory made by 'fedveil authority init'")
    pinned = _load(files.load_authority_public, authority_dir / files.AUTHORITY_PUBLIC_FILE, "--authority")
    key_path = authority_dir / files.AUTHORITY_KEY_FILE
    passphrase = _passphrase(passphrase_file)
    try:
        key = files.load_authority_private(key_path, passphrase)
    except files.PassphraseRequired:
        passphrase = _prompt_passphrase(key_path)
        try:
            key = files.load_authority_private(key_path, passphrase)
        except files.IdentityFileError as err:
            fail("--passphrase-file", str(err))
    except files.WrongPassphrase as err:
        fail("--passphrase-file" if passphrase_file is not None else files.PASSPHRASE_ENV, str(err))
    except files.IdentityFileError as err:
        fail("--authority", str(err))
    if AuthorityPublicKey.of(key) != pinned.public_key:
        fail("--authority", f"{files.AUTHORITY_KEY_FILE} and {files.AUTHORITY_PUBLIC_FILE} in {str(authority_dir)!r} "
             "are not one key pair")
    return pinned, key


def _passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase from the file (its first line) or the environment; None when neither is given."""
    from fedveil.protocol.identity_files import PASSPHRASE_ENV

    if passphrase_file is not None:
        try:
            lines = passphrase_file.read_bytes().splitlines()
        except OSError as err:
            fail("--passphrase-file", f"cannot read {str(passphrase_file)!r}: {err.strerror}")
        if not lines or not lines[0]:
            fail("--passphrase-file", f"{str(passphrase_file)!r} is empty; its first line is the passphrase")
        return lines[0]
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        fail(PASSPHRASE_ENV, "is set but empty")
    return value.encode()


def _prompt_passphrase(key_path: Path) -> bytes:
    if not sys.stdin.isatty():
        fail("--passphrase-file", f"{str(key_path)!r} is encrypted; give --passphrase-file or set "
             "FEDVEIL_AUTHORITY_PASSPHRASE")
    value: str = click.prompt(f"passphrase for {key_path}", hide_input=True, err=True)
    return value.encode()


def _identity_public_key(value: str) -> bytes:
    from fedveil.protocol import identity_files as files
    from fedveil.secagg.keys import ed25519_public_key_problem

    path = Path(value)
    if not path.exists() and files.HEX_KEY.fullmatch(value.strip()):
        key = bytes.fromhex(value.strip())
        problem = ed25519_public_key_problem(key)
        if problem is not None:
            fail("--identity-public-key", f"the key {problem}")
        return key
    try:
        key, from_private = files.read_identity_public_key(path)
    except files.IdentityFileError as err:
        fail("--identity-public-key", str(err))
    if from_private:
        click.echo(f"warning: {str(path)!r} is a PRIVATE key; only its public half was used. A site's private "
                   "key should never leave the site: send the public key next time", err=True)
    return key


def _check_issued_here(pinned: PinnedAuthority, credential: SiteCredential) -> None:
    if credential.consortium != pinned.consortium or not pinned.public_key.verifies(
        credential.signature, credential.signed_payload()
    ):
        fail("--credential", f"not issued by this authority (consortium {pinned.consortium!r}, "
             f"key {pinned.public_key.fingerprint})")


def _load(loader: Callable[[Path], T], path: Path, param: str) -> T:
    """``loader(path)``, with its IdentityFileError turned into a one-line usage error for ``param``."""
    from fedveil.protocol.identity_files import IdentityFileError

    try:
        return loader(path)
    except IdentityFileError as err:
        fail(param, str(err))


def _when(unix: int) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

