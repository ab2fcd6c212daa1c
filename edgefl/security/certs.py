"""A fleet's certificate authority and the certificates it issues (X.509, EC P-256).

`init_ca` writes `ca.crt` and `ca.key`; `issue` writes `NAME.crt` and `NAME.key` for a device, the
aggregator, an operator (client certificates whose CN is the name the broker's ACL sees) or the
broker itself (a server certificate whose SAN lists its host names). Private keys are 0600.
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

from edgefl.errors import InputError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ROLES = ("device", "aggregator", "operator", "broker")
CA_DAYS = 3650
CERT_DAYS = 825
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


class CertificateError(InputError):
    """A CA directory is missing or incomplete, or a name or role is invalid."""


@dataclass(frozen=True)
class IssuedCertificate:
    """Where an issued certificate and its key were written."""

    name: str
    role: str
    cert_path: Path
    key_path: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: a key must never be readable by others, even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(out_dir: Path, name: str = "edgefl fleet CA", *, overwrite: bool = False) -> Path:
    """Create a fleet CA: `ca.crt` (self-signed, 10 years) and `ca.key` (0600) in `out_dir`.

    Args:
        out_dir: the directory to write to (created).
        name: the CA's common name.
        overwrite: replace an existing CA (every certificate it issued stops being trusted).

    Returns:
        The path of `ca.crt`.

    Raises:
        CertificateError: a CA exists there already and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if (cert_path.exists() or key_path.exists()) and not overwrite:
        raise CertificateError(f"{out_dir} already holds a CA; refusing to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key that `init_ca` wrote.

    Raises:
        CertificateError: a file is missing or is not an EC CA written by `init_ca`.
    """
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise CertificateError(f"{ca_dir} holds no CA ({CA_CERT} and {CA_KEY}); run certs init")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC private key")
    return cert, key


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    name: str,
    role: str,
    ca_dir: Path,
    out_dir: Path,
    *,
    hosts: tuple[str, ...] = (),
    days: int = CERT_DAYS,
) -> IssuedCertificate:
    """Issue a certificate signed by the CA in `ca_dir`: `NAME.crt` and `NAME.key` in `out_dir`.

    Args:
        name: the common name: the device ID, `aggregator`, `operator-...` (see
            `edgefl.security.broker_config` for how the broker tells roles apart), or the
            broker's name.
        role: "device", "aggregator" or "operator" (client certificates) or "broker" (a server
            certificate).
        ca_dir: where `init_ca` wrote the CA.
        out_dir: where to write (created).
        hosts: the broker's host names and IP addresses (its SAN); required for "broker".
        days: validity.

    Returns:
        Where the certificate and key were written.

    Raises:
        CertificateError: an unknown role, a name the ACL cannot use, a broker without hosts,
            or a CA that cannot be read.
    """
    from edgefl.security.broker_config import check_identity

    if role not in ROLES:
        raise CertificateError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if role == "broker":
        if not hosts:
            raise CertificateError("a broker certificate needs its host names (`hosts`)")
    else:
        check_identity(name, role)
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return IssuedCertificate(name, role, cert_path, key_path)
