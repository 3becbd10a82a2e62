"""TLS for the federation: server certificates verified by clients, optional mutual TLS.

The server presents ``--tls-cert``/``--tls-key``; clients verify it against ``--ca-cert`` (or
the system roots when none is given). With ``--client-ca`` the server also requires a client
certificate signed by that CA (mutual TLS); its common name identifies the client.

:func:`generate_ca` and :func:`generate_certificate` make certificates with
``cryptography.x509`` (tests, trials); production deployments bring their own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedveil.errors import FedveilError


class TlsConfigError(FedveilError, ValueError):
    """A certificate or key file is missing or not PEM; the message names the file."""


@dataclass(frozen=True)
class PemPair:
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)


def read_pem(path: str | Path, field: str) -> bytes:
    """Read a PEM file; a failure names the path, with ``field`` (the argument that gave it) as its ``.field``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise TlsConfigError(f"cannot read {str(p)!r}: {err.strerror or err}", field=field) from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{str(p)!r} is not a PEM file", field=field)
    # the kind the argument needs: a key given as a CA made the client retry a failing handshake for
    # minutes instead of saying so (review of 2026-12-07)
    if field.endswith("_key"):
        if b"PRIVATE KEY-----" not in data:
            raise TlsConfigError(f"{str(p)!r} holds no private key", field=field)
    else:
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise TlsConfigError(f"{str(p)!r} holds no certificate", field=field) from None
    return data


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _alt_names(hostnames: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def generate_ca(common_name: str = "fedveil test CA", *, days: int = 30) -> PemPair:
    """A self-signed CA certificate (P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def generate_certificate(
    common_name: str,
    ca: PemPair,
    *,
    hostnames: list[str] | None = None,
    client: bool = False,
    days: int = 30,
) -> PemPair:
    """A leaf certificate signed by ``ca``: a server certificate for ``hostnames`` (DNS names or
    IP addresses), or with ``client=True`` a client certificate whose CN names the client."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsConfigError("CA key: expected an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    )
    names = _alt_names(hostnames or ([] if client else ["localhost", "127.0.0.1"]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def server_credentials(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None) -> grpc.ServerCredentials:
    """Server-side TLS; with ``client_ca_pem`` every client must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=client_ca_pem, require_client_auth=client_ca_pem is not None
    )


def channel_credentials(
    ca_cert_pem: bytes | None = None, client_cert_pem: bytes | None = None, client_key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """Client-side TLS: verify the server against ``ca_cert_pem`` (system roots when None)."""
    if (client_cert_pem is None) != (client_key_pem is None):
        raise TlsConfigError("a client certificate needs both the certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_cert_pem, private_key=client_key_pem, certificate_chain=client_cert_pem
    )


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine only: an address in 127.0.0.0/8, ``::1`` (also
    IPv4-mapped or in brackets) or ``localhost``. Other names are not resolved: a DNS answer is
    not evidence that the traffic stays on this machine."""
    name = host.strip().strip("[]").lower().split("%", 1)[0]
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def plaintext_refusal(address: str, override: str) -> str | None:
    """Why plaintext to or on ``address`` (``HOST:PORT``) is refused, or None on loopback.

    Without TLS the bearer tokens in every call, and the masked updates, cross the network in the
    clear: anyone on the path can take a site's token and act as that site. ``override`` names
    the switch that accepts the risk (``--allow-insecure-remote`` or ``allow_insecure_remote=True``)."""
    host = address.rpartition(":")[0] or address
    if is_loopback_host(host):
        return None
    return (f"plaintext (no TLS) on {host!r}, which is not a loopback address (127.0.0.0/8, ::1, localhost): "
            "the bearer tokens and model updates would cross the network unencrypted, so anyone on the path "
            f"could take a site's token; use TLS, or add {override} on a network you trust")
