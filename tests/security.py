"""The test session's mesh identity, as `aimass up` would make it: a private CA with a certificate for every role,
a store with an admin key, all in one state directory that every in-process server and tool of the session finds
through AIMASS_STATE_DIR (set by conftest before anything reads settings).

Tests that call a replica directly act as a gateway (the only role a replica serves): ``as_gateway``. Tests that
call a gateway present the admin key (``keyed``; aimass.client finds it by itself) or a tenant's key (``key_for``).
Meshes that tests start with `aimass up` (tests/conftest.start_mesh) share this state directory, so the same keys
and certificates work there; tests/live_mesh.py makes its own, as a user's mesh has.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import grpc

from aimass.bootstrap import ensure_certificates, prepare_store
from aimass.client import keyed_aio_channel
from aimass.runtime.config import Settings
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, mesh_channel, mesh_sync_channel
from aimass.store.sql import SqlStore
from aimass.tenancy import keys

# Every role a process of the suite runs as; the certificate's name is the role.
ROLES: Final = ("gateway", "scheduler", "node-agent", "operator", "nlp", "vision", "speech", "llm")
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
