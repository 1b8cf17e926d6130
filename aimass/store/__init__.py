"""The store: tenants and their limits, API keys (hashes only), the audit log and LLM token usage.

One SQL database shared by every gateway, the scheduler and the CLI: a SQLite file in the state directory by default,
PostgreSQL when processes on several hosts share it. The schema is kept by Alembic migrations (``migrations/``).
"""

from __future__ import annotations

from aimass.store.records import TENANT_LIMIT_FIELDS, AuditEvent, KeyRecord, TenantRecord
from aimass.store.sql import SqlStore

__all__ = ["TENANT_LIMIT_FIELDS", "AuditEvent", "KeyRecord", "SqlStore", "TenantRecord"]
