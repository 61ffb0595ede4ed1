"""A throw-away certificate authority and a server certificate for the local stack's TLS listeners.

The local Kafka SASL_SSL listener and the HTTPS ClickHouse endpoint need a certificate that
clients can verify exactly as they would in production (CA file, host name check), without a
real CA. One CA and one server certificate for ``localhost`` / ``127.0.0.1`` are generated
per stack data dir and reused on later starts, so clients keep trusting the same CA file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
KEYSTORE_FILE = "server-keystore.pem"
VALIDITY = datetime.timedelta(days=825)


class CertificatesUnavailable(RuntimeError):
    """The `cryptography` package is missing (a dependency of the development distribution, deploy/dev)."""


@dataclass(frozen=True)
class ServerCertificate:
    """PEM files: the CA clients trust, the server's certificate chain (leaf, then CA), its unencrypted key,
    and key plus chain in one file (a Kafka `ssl.keystore.type=PEM` keystore)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    keystore_file: Path


def ensure_server_certificate(
    directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> ServerCertificate:
    """The certificate in `directory`, generated on first use (the key files are mode 0600)."""
    paths = ServerCertificate(
        directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE, directory / KEYSTORE_FILE
    )
    if all(p.exists() for p in (paths.ca_file, paths.cert_file, paths.key_file, paths.keystore_file)):
        return paths
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as error:
        raise CertificatesUnavailable(
            "generating TLS certificates needs the `cryptography` package: "
            "pip install ./deploy/dev (deploy/bootstrap.sh does)"
        ) from error

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metering local stack CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    chain_pem = server_cert.public_bytes(pem) + ca_cert.public_bytes(pem)
    write_private(paths.key_file, key_pem)
    write_private(paths.keystore_file, key_pem + chain_pem)
    paths.cert_file.write_bytes(chain_pem)
    paths.ca_file.write_bytes(ca_cert.public_bytes(pem))  # last: its presence means the set is complete
    return paths


def write_private(path: Path, content: bytes) -> None:
    """Created 0600 from the start, so a key or password is never readable by others, even briefly."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
