"""``fedveil identity``: a site's long-term Ed25519 identity key (active-adversary secure aggregation).

    fedveil identity create --out site.key    # PKCS#8 PEM, mode 0600; prints the public key for the authority
    fedveil identity show site.key            # the public key and fingerprint again (never the private key)

The private key stays at the site (``fedveil client --identity-key site.key``); the consortium
authority signs its public key into a credential (``fedveil authority issue``).
"""

from __future__ import annotations

from pathlib import Path

import click

from fedveil.commands.common import fail


def register(group: click.Group) -> None:
    group.add_command(identity_group)


@click.group("identity")
def identity_group() -> None:
    """A site's Ed25519 identity key, vouched for by the consortium authority."""


@identity_group.command("create")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the private key (PKCS#8 PEM, mode 0600; never overwritten).")
def create_command(out_path: Path) -> None:
    """Create this site's identity key; the last line is the public key to give the authority."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedveil.protocol.identity_files import private_key_pem, write_new_file

    if out_path.exists():
        fail("--out", f"{str(out_path)!r} already exists; refusing to overwrite an identity key")
    if not out_path.parent.is_dir():
        fail("--out", f"directory {str(out_path.parent)!r} does not exist")
    key = Ed25519PrivateKey.generate()
    try:
        write_new_file(out_path, private_key_pem(key, None), mode=0o600)
    except OSError as err:
        fail("--out", f"cannot write {str(out_path)!r}: {err.strerror}")
    click.echo(f"wrote this site's identity key to {str(out_path)!r} (mode 0600); it never leaves this site")
    _print_public(key.public_key().public_bytes_raw())


@identity_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def show_command(file: Path) -> None:
    """Print the public key and fingerprint of an identity key file (private or public)."""
    from fedveil.protocol.identity_files import IdentityFileError, read_identity_public_key

    try:
        key, _ = read_identity_public_key(file)
    except IdentityFileError as err:
        fail("FILE", str(err))
    _print_public(key)


def _print_public(public: bytes) -> None:
    from fedveil.secagg.identity import fingerprint

    click.echo(f"fingerprint: {fingerprint(public)}")
    click.echo("public key (give this line to the consortium authority for 'fedveil authority issue'):")
    click.echo(public.hex())
