"""The mesh's private CA and its certificates (the ``cryptography`` library), for mTLS between mesh processes.

``aimass up`` creates the CA once and a certificate per process; ``aimass certs issue`` makes one by hand (a
replica on another host, the compose init container). A certificate names its holder twice over:

- a SPIFFE ID, ``spiffe://aimass/<role>/<name>`` (URI SAN): the role (``gateway``, ``scheduler``, ``node-agent``,
  ``operator``, or a replica's kind: ``nlp``, ``vision``, ...) decides what the holder may call, the name which
  instances and nodes it may speak for (aimass.runtime.identity);
- a DNS name, ``<role>.aimass.internal``: a caller checks the server it dialled holds the role it expects (a
  gateway dials replicas as ``nlp.aimass.internal``, everyone dials the scheduler as ``scheduler.aimass.internal``),
  whatever address it dialled; addresses change, roles do not.

Private keys are P-256, written owner-only (0600) like the CA's; certificates are public. The CA signs for
``ca_days`` (10 years), processes' certificates for ``cert_days`` (1 year) and are issued again when less than a
month is left, when the CA changed, or when the role differs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN: Final = "aimass"
DNS_SUFFIX: Final = "aimass.internal"
CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
CA_DAYS: Final = 3650
CERT_DAYS: Final = 365
RENEW_BEFORE: Final = datetime.timedelta(days=30)
# Roles and names: what a DNS label and a SPIFFE path segment allow.
NAME_PATTERN: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def spiffe_id(role: str, name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def server_name(role: str) -> str:
    """The DNS name a holder of ``role`` presents as a server, which its callers verify."""
    return f"{role}.{DNS_SUFFIX}"


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """(role, name) of a mesh SPIFFE ID, None for anything else."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not uri.startswith(prefix):
        return None
    role, _, name = uri.removeprefix(prefix).partition("/")
    if not NAME_PATTERN.match(role) or not NAME_PATTERN.match(name):
        return None
    return role, name


def check_name(what: str, value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"{what} {value[:70]!r} is not valid: 1-63 lowercase letters, digits and '-', starting and ending with a "
            "letter or digit"
        )
    return value


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def ca_files(pki_dir: Path) -> CertFiles:
    return CertFiles(pki_dir / CA_CERT, pki_dir / CA_KEY)


def cert_files(pki_dir: Path, name: str) -> CertFiles:
    return CertFiles(pki_dir / f"{name}.crt", pki_dir / f"{name}.key")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only from the first byte (no window where the file exists with wider permissions)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        sink.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(pki_dir: Path) -> CertFiles:
    """Creates the CA in ``pki_dir`` unless it exists (idempotent); the directory is owner-only."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    pki_dir.chmod(0o700)
    files = ca_files(pki_dir)
    if files.cert.exists() and files.key.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    # A random part in the name tells two meshes' CAs apart in error messages.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aimass mesh CA {os.urandom(4).hex()}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.key, _pem_key(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    files = ca_files(pki_dir)
    if not files.key.exists():
        raise FileNotFoundError(
            f"no mesh CA key at {files.key}: certificates are issued where the CA was created (`aimass certs init`)"
        )
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{files.key} is not an EC private key")
    return cert, key


def identity_of(cert: x509.Certificate) -> tuple[str, str] | None:
    """(role, name) from a certificate's SPIFFE ID."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        found = parse_spiffe_id(uri)
        if found is not None:
            return found
    return None


def _current(files: CertFiles, ca: x509.Certificate, role: str, name: str, hosts: Sequence[str]) -> bool:
    """The certificate in ``files`` is usable as it is: same CA, same identity and hosts, not close to expiry."""
    if not (files.cert.exists() and files.key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except ValueError:
        return False
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        cert.issuer == ca.subject
        and identity_of(cert) == (role, name)
        and set(sans) == set(_subject_names(role, name, hosts))
        and cert.not_valid_after_utc - _now() > RENEW_BEFORE
    )


def _subject_names(role: str, name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.DNSName(server_name(role)),
        x509.UniformResourceIdentifier(spiffe_id(role, name)),
    ]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(
    pki_dir: Path, *, role: str, name: str, hosts: Sequence[str] = (), days: int = CERT_DAYS, force: bool = False
) -> CertFiles:
    """A certificate for ``name`` in ``role``, signed by the CA in ``pki_dir``; kept when still current.

    ``hosts`` (addresses or DNS names) are added as subject names, for tools that cannot be told which name to
    expect (k6 dialling a replica at 127.0.0.1, say); mesh processes verify the role's name whatever they dial."""
    check_name("role", role)
    check_name("name", name)
    ca, ca_key = _load_ca(pki_dir)
    files = cert_files(pki_dir, name)
    if not force and _current(files, ca, role, name, hosts):
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(_subject_names(role, name, hosts)),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, _pem_key(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files
