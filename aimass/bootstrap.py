"""What a mesh needs before its processes start, made once and kept: the CA and every process's certificate, the
store's schema, and the admin key (`aimass up` runs it; tests that start processes one by one call it too).

Secure by default: the admin key is written owner-only (0600) to ``auth.admin_key_file`` (state_dir/admin.key) and
kept for as long as the store knows it; the CA key never leaves state_dir/pki (0700).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from aimass import pki
from aimass.runtime.config import Settings
from aimass.runtime.identity import ROLE_OPERATOR, MeshCredentials
from aimass.store.records import now_ms
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.v1 import common_pb2

log = logging.getLogger(__name__)

ADMIN_TENANT = "admin"
ADMIN_KEY_NAME = "admin (aimass up)"


# Local processes' certificates also name the loopback address, so tools that cannot be told which name to expect
# (k6) can dial a replica on this host directly, with a gateway certificate.
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def ensure_certificates(settings: Settings, identities: Mapping[str, str]) -> None:
    """The CA and a current certificate for each name → role in ``identities`` (nothing with mesh TLS off)."""
    if settings.mesh.tls == "off":
        return
    pki.init_ca(settings.pki_dir)
    for name, role in identities.items():
        pki.issue(settings.pki_dir, role=role, name=name, hosts=LOCAL_HOSTS)


def operator_credentials(settings: Settings) -> MeshCredentials | None:
    """Credentials for tools on a mesh host (`aimass up`, `aimass status`, tests): the operator certificate, issued
    on first use where the CA is; None with mesh TLS off."""
    if settings.mesh.tls == "off":
        return None
    if pki.ca_files(settings.pki_dir).key.exists():
        pki.issue(settings.pki_dir, role=ROLE_OPERATOR, name=ROLE_OPERATOR)
    return MeshCredentials.load(settings.pki_dir, ROLE_OPERATOR)


def _write_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as sink:
        sink.write(key + "\n")
    tmp.replace(path)


def ensure_admin_key(settings: Settings, store: SqlStore) -> tuple[Path, bool]:
    """The admin key file, and whether a new key was made: kept while the store knows its key as usable, made again
    (tenant "admin", every scope, CRITICAL priority) when the file is missing or its key is not usable."""
    path = settings.admin_key_file
    if path.exists():
        current = path.read_text().strip()
        if keys.key_id_of(current) is not None:
            key_hash = keys.hash_key(current)
            record = store.keys_by_hash([key_hash]).get(key_hash)
            if record is not None and record.usable(now_ms()):
                return path, False
        log.warning("the admin key in %s is not usable in this store; making a new one", path)
    store.set_tenant(ADMIN_TENANT, max_priority=common_pb2.PRIORITY_CRITICAL)
    _, key = store.create_key(ADMIN_TENANT, keys.ADMIN_SCOPES, name=ADMIN_KEY_NAME)
    _write_key(path, key)
    return path, True


def prepare_store(settings: Settings) -> tuple[Path | None, bool]:
    """Migrates the store and (auth on) ensures the admin key: (its file, whether it is new)."""
    store = SqlStore.open(settings.store_url, busy_timeout_s=settings.store.busy_timeout_s)
    try:
        if settings.auth.mode == "off":
            return None, False
        return ensure_admin_key(settings, store)
    finally:
        store.close()
