"""The store's tables, as SQLAlchemy Core metadata.

The migrations in ``migrations/versions`` create the same schema by hand; tests/test_store.py checks with Alembic's
``compare_metadata`` that a migrated database matches this metadata on SQLite and PostgreSQL, so the two cannot drift.
A change here needs a new migration.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text

# Alembic's bookkeeping table; not the default name, so the store can share a PostgreSQL database with another
# Alembic-managed application.
VERSION_TABLE: Final = "aimass_schema_version"

# Deterministic constraint and index names: the same on every backend, and nameable by later migrations.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Ids are short by construction (keys.TENANT_PATTERN: 63 characters; key ids: 12); the bounds leave room.
TENANT_ID_LENGTH: Final = 64
KEY_ID_LENGTH: Final = 32

tenants = Table(
    "tenants",
    metadata,
    Column("tenant_id", String(TENANT_ID_LENGTH), primary_key=True),
    Column("requests_per_second", Float, nullable=False),
    Column("max_concurrent", Integer, nullable=False),
    Column("llm_tokens_per_minute", BigInteger, nullable=False),
    Column("llm_tokens_per_day", BigInteger, nullable=False),
    Column("max_priority", Integer, nullable=False),
    Column("weight", Float, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("updated_unix_ms", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(KEY_ID_LENGTH), primary_key=True),
    Column("tenant_id", String(TENANT_ID_LENGTH), ForeignKey("tenants.tenant_id"), nullable=False),
    # SHA-256 hex of the whole key (tenancy.keys.hash_key); the key itself is never stored.
    Column("key_hash", String(64), nullable=False, unique=True, index=True),
    # Sorted, comma-separated.
    Column("scopes", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("expires_unix_ms", BigInteger, nullable=False),
    Column("revoked_unix_ms", BigInteger, nullable=False),
    Column("created_by", String(KEY_ID_LENGTH), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    # SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid, 64-bit there anyway); BIGSERIAL on PostgreSQL.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at_unix_ms", BigInteger, nullable=False, index=True),
    # Unbounded text and no foreign key: a refusal is audited as it came, for a tenant that may have no row (or a
    # malformed id), and one odd value must not fail a whole batch on a backend that enforces lengths.
    Column("tenant_id", Text, nullable=False, index=True),
    Column("key_id", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("peer", Text, nullable=False),
    Column("count", Integer, nullable=False),
)

llm_usage = Table(
    "llm_usage",
    metadata,
    # No foreign key and no length: with auth off a tenant is whatever a caller's header says, its tokens still count,
    # and the scheduler's periodic write must never fail on one odd id.
    Column("tenant_id", Text, primary_key=True),
    Column("day", String(10), primary_key=True),  # UTC, "YYYY-MM-DD"
    Column("tokens", BigInteger, nullable=False),
)
