"""The test session's mesh identity, as `aimass up` would make it: a private CA with a certificate for every role,
a store with an admin key, all in one state directory that every in-process server and tool of the session finds
through AIMASS_STATE_DIR (set by conftest before anything reads settings).

Tests that call a replica directly act as a gateway (the only role a replica serves): ``as_gateway``. Tests that
call a gateway present the admin key (``keyed``; aimass.client finds it by itself) or a tenant's key (``key_for``).
Meshes that tests start with `aimass up` (tests/conftest.start_mesh) share this state directory, so the same keys
and certificates work there; tests/live_mesh.py makes its own, as a user's mesh has.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aimass.bootstrap import ensure_certificates, prepare_store
from aimass.client import keyed_aio_channel
from aimass.runtime.config import Settings
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, mesh_channel, mesh_sync_channel
from aimass.store.sql import SqlStore
from aimass.tenancy import keys

# Every role a process of the suite runs as; the certificate's name is the role.
ROLES: Final = ("gateway", "scheduler", "node-agent", "operator", "rest", "nlp", "vision", "speech", "llm", "trainer")
STATE_DIR_ENV: Final = "AIMASS_STATE_DIR"


def prepare_session_state() -> Path:
    """Creates the session's state directory (once per test process) and points AIMASS_STATE_DIR at it."""
    existing = os.environ.get(STATE_DIR_ENV)
    if existing and (Path(existing) / ".aimass-test-session").exists():
        return Path(existing)
    state_dir = Path(tempfile.mkdtemp(prefix="aimass-test-state-"))
    os.environ[STATE_DIR_ENV] = str(state_dir)
    settings = Settings(state_dir=state_dir)
    ensure_certificates(settings, {role: role for role in ROLES})
    prepare_store(settings)
    (state_dir / ".aimass-test-session").touch()
    return state_dir


def settings() -> Settings:
    return Settings()


def admin_key() -> str:
    return settings().admin_key_file.read_text().strip()


def credentials(role: str = ROLE_GATEWAY) -> MeshCredentials:
    return MeshCredentials.load(settings().pki_dir, role)


def as_gateway(address: str, kind: str) -> grpc.aio.Channel:
    """A channel to the replica of ``kind`` at ``address``, as a gateway calls it (mesh mTLS)."""
    return mesh_channel(address, credentials(ROLE_GATEWAY), server_role=kind)


def as_gateway_sync(address: str, kind: str) -> grpc.Channel:
    return mesh_sync_channel(address, credentials(ROLE_GATEWAY), server_role=kind)


def key_for(tenant: str, scopes: Sequence[str] = (keys.SCOPE_INFER,), **limits: float) -> str:
    """A new key of ``tenant`` (created with ``limits`` if given) in the session's store, which every gateway of
    the session reads (in-process ones and `aimass up` meshes started by tests/conftest.start_mesh)."""
    store = SqlStore.open(settings().store_url)
    try:
        if limits:
            store.set_tenant(tenant, **limits)
        return store.create_key(tenant, scopes, name="test")[1]
    finally:
        store.close()


def keyed(address: str, api_key: str | None = None) -> grpc.aio.Channel:
    """A channel to a gateway at ``address`` whose calls carry ``api_key`` (default: the session's admin key)."""
    return keyed_aio_channel(address, api_key or admin_key())


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate (and its key) for 127.0.0.1 and localhost, as an operator might give a gateway's
    front door: no mesh CA involved."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aimass gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "gateway.crt", folder / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
