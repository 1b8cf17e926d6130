"""What the store hands out: immutable records, detached from the database (callers keep them in caches)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Literal

# The tenant fields `SqlStore.set_tenant` changes, with their types; 0 means unlimited (or the configured default).
TENANT_LIMIT_FIELDS: Final[dict[str, type[float] | type[int]]] = {
    "requests_per_second": float,
    "max_concurrent": int,
    "llm_tokens_per_minute": int,
    "llm_tokens_per_day": int,
    "max_priority": int,
    "weight": float,
}
# common_pb2.Priority runs PRIORITY_LOW=1 .. PRIORITY_CRITICAL=4; 0 leaves the cap to the configured default.
MAX_PRIORITY_VALUE: Final = 4

KeyState = Literal["active", "revoked", "expired"]


def now_ms() -> int:
    """Now as the records' ``*_unix_ms`` fields count it."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    requests_per_second: float = 0.0  # 0 = unlimited
    max_concurrent: int = 0  # concurrent requests; 0 = unlimited
    llm_tokens_per_minute: int = 0  # 0 = unlimited
    llm_tokens_per_day: int = 0  # 0 = unlimited
    max_priority: int = 0  # a common_pb2.Priority value 1..4; 0 = the configured default
    weight: float = 0.0  # fair-share weight; 0 = the configured default
    created_unix_ms: int = 0
    updated_unix_ms: int = 0


@dataclass(frozen=True)
class KeyRecord:
    """An API key as the store knows it: everything but the key itself, which is never stored."""

    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    name: str = ""
    created_unix_ms: int = 0
    expires_unix_ms: int = 0  # 0 = never
    revoked_unix_ms: int = 0  # 0 = not revoked
    created_by: str = ""  # key id of the key that created it ("" = bootstrap by `aimass up`)

    def usable(self, now_ms: int) -> bool:
        """Not revoked and not expired at ``now_ms``."""
        return self.state(now_ms) == "active"

    def state(self, now_ms: int) -> KeyState:
        # Revocation wins over expiry: it is the deliberate act, and what an operator wants to see in a listing.
        if self.revoked_unix_ms:
            return "revoked"
        if self.expires_unix_ms and now_ms >= self.expires_unix_ms:
            return "expired"
        return "active"


@dataclass(frozen=True)
class AuditEvent:
    at_unix_ms: int
    # e.g. "keys.create", "keys.revoke", "tenants.set", "models.load", "models.unload", "auth.refused"
    action: str
    # "ok", or the status code name of a refusal or failure, e.g. "UNAUTHENTICATED", "PERMISSION_DENIED"
    outcome: str
    tenant_id: str = ""
    key_id: str = ""  # NEVER the key itself
    target: str = ""  # what it acted on: a key id, a tenant, a model name, the method refused
    detail: str = ""  # human-readable, e.g. "scopes=infer" or "revoked key"
    peer: str = ""  # caller address
    count: int = 1  # identical refusals coalesced into one row
    id: int = 0  # assigned by the store
