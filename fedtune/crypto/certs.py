"""Trial certificates for TLS and mTLS: a CA, a server certificate and client certificates.

For trials and tests; production deployments bring certificates from their own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`init_certs`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, hosts: list[str] = (),  # type: ignore[assignment]
           usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if hosts:
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def init_certs(out: Path, hosts: list[str], client_names: list[str] | None = None) -> CertPaths:
    """Writes a CA, a server certificate for ``hosts`` and one client certificate per name into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("fedtune trial CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(hosts[0], server_key, ca, ca_key, ca=False, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    pem = serialization.Encoding.PEM
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    _write_key(out / "ca.key", ca_key)
    (out / "server.pem").write_bytes(server.public_bytes(pem))
    _write_key(out / "server.key", server_key)
    for name in client_names or ["client"]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        (out / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        _write_key(out / f"{name}.key", key)
    first = (client_names or ["client"])[0]
    return CertPaths(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key",
                     out / f"{first}.pem", out / f"{first}.key")
