"""The store's tables, as SQLAlchemy Core metadata.

The migrations in ``migrations/versions`` create the same schema by hand; tests/test_store.py checks with Alembic's
``compare_metadata`` that a migrated database matches this metadata on SQLite and PostgreSQL, so the two cannot drift.
A change here needs a new migration.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table, Text

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

# -- the model lifecycle: tenants' datasets, model versions, deployments and training jobs.
# No foreign keys to tenants: with auth off an owner is whatever the caller's header says ("anonymous" included).

# Dataset and model names: 1-63 characters (scheduler.lifecycle.names); a dataset version is sha256[:12].
LIFECYCLE_NAME_LENGTH: Final = 64
DATASET_VERSION_LENGTH: Final = 16
SHA256_LENGTH: Final = 64
JOB_ID_LENGTH: Final = 64

dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("owner", String(TENANT_ID_LENGTH), primary_key=True),
    Column("name", String(LIFECYCLE_NAME_LENGTH), primary_key=True),
    Column("version", String(DATASET_VERSION_LENGTH), primary_key=True),
    # Indexed: deleting a blob asks whether anything still refers to it.
    Column("sha256", String(SHA256_LENGTH), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("task", Integer, nullable=False),
    Column("format", Integer, nullable=False),
    Column("text_column", Text, nullable=False),
    Column("label_column", Text, nullable=False),
    # JSON: [[label, count], ...], most frequent first.
    Column("classes", Text, nullable=False),
    # A serialized datasets_pb2.ValidationReport.
    Column("report", LargeBinary, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
)

dataset_grants = Table(
    "dataset_grants",
    metadata,
    Column("owner", String(TENANT_ID_LENGTH), primary_key=True),
    Column("name", String(LIFECYCLE_NAME_LENGTH), primary_key=True),
    # Indexed: a tenant's listing asks what is shared with it.
    Column("grantee", String(TENANT_ID_LENGTH), primary_key=True, index=True),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("owner", String(TENANT_ID_LENGTH), primary_key=True),
    Column("name", String(LIFECYCLE_NAME_LENGTH), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("task", Integer, nullable=False),
    Column("base_model", Text, nullable=False),
    Column("job_id", String(JOB_ID_LENGTH), nullable=False),
    # Lineage: the dataset version it was trained on (which may since have been deleted).
    Column("dataset_owner", String(TENANT_ID_LENGTH), nullable=False),
    Column("dataset_name", String(LIFECYCLE_NAME_LENGTH), nullable=False),
    Column("dataset_version", String(DATASET_VERSION_LENGTH), nullable=False),
    Column("dataset_sha256", String(SHA256_LENGTH), nullable=False),
    # JSON: ["label", ...] in the head's output order.
    Column("labels", Text, nullable=False),
    # Serialized training_pb2.Hyperparameters and training_pb2.Evaluation.
    Column("hyperparameters", LargeBinary, nullable=False),
    Column("evaluation", LargeBinary, nullable=False),
    # Blobs; indexed like dataset_versions.sha256.
    Column("artifact_sha256", String(SHA256_LENGTH), nullable=False, index=True),
    Column("artifact_bytes", BigInteger, nullable=False),
    Column("export_sha256", String(SHA256_LENGTH), nullable=False, index=True),
    Column("export_bytes", BigInteger, nullable=False),
    Column("code_version", Text, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
)

deployments = Table(
    "deployments",
    metadata,
    Column("owner", String(TENANT_ID_LENGTH), primary_key=True),
    Column("name", String(LIFECYCLE_NAME_LENGTH), primary_key=True),
    # model_versions.version numbers; 0 = none.
    Column("default_version", Integer, nullable=False),
    Column("canary_version", Integer, nullable=False),
    Column("canary_percent", Integer, nullable=False),
    Column("previous_version", Integer, nullable=False),
    # The sync generation of its last change.
    Column("generation", BigInteger, nullable=False),
)

training_jobs = Table(
    "training_jobs",
    metadata,
    Column("job_id", String(JOB_ID_LENGTH), primary_key=True),
    Column("owner", String(TENANT_ID_LENGTH), nullable=False, index=True),
    Column("state", Integer, nullable=False, index=True),  # training_pb2.JobState
    Column("created_unix_ms", BigInteger, nullable=False),
    # The whole training_pb2.TrainingJob, serialized; the columns above are copies for queries.
    Column("job", LargeBinary, nullable=False),
)

# Global state of the lifecycle, one row (id 1, which the migration inserts).
lifecycle_state = Table(
    "lifecycle_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    # Bumped by every deployment change: replicas report the generation they have applied.
    Column("deployment_generation", BigInteger, nullable=False),
)


# The voice assistant's conversations (gateway/assistant/sessions.py), per tenant. No foreign key to tenants: with
# auth off the tenant is whatever the caller names (or anonymous, "").
assistant_sessions = Table(
    "assistant_sessions",
    metadata,
    Column("tenant_id", String(TENANT_ID_LENGTH), primary_key=True),
    Column("session_id", String(64), primary_key=True),
    Column("system_prompt", Text, nullable=False),
    # JSON: [[role, content], ...], oldest first.
    Column("messages", Text, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("updated_unix_ms", BigInteger, nullable=False),
    Column("expires_unix_ms", BigInteger, nullable=False, index=True),
)

# Tenants' own scenarios (gateway/scenarios): their YAML source, validated when stored.
scenarios = Table(
    "scenarios",
    metadata,
    Column("tenant_id", String(TENANT_ID_LENGTH), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("source", Text, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("updated_unix_ms", BigInteger, nullable=False),
)
