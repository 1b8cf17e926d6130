"""What the store hands out: immutable records, detached from the database (callers keep them in caches)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aimass.v1 import datasets_pb2, training_pb2

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


# -- the model lifecycle (datasets, model versions, deployments, training jobs)


@dataclass(frozen=True)
class DatasetVersionRecord:
    """One immutable version of a tenant's dataset, addressed by the SHA-256 of its file (the blob's name)."""

    owner: str  # tenant id
    name: str
    version: str  # sha256[:12]
    sha256: str
    size_bytes: int
    rows: int  # rows kept by validation
    task: datasets_pb2.TrainingTask.ValueType
    format: datasets_pb2.DatasetFormat.ValueType
    text_column: str = "text"
    label_column: str = "label"
    # Kept rows per label, most frequent first: ((label, count), ...).
    classes: Sequence[tuple[str, int]] = ()
    report: bytes = b""  # a serialized datasets_pb2.ValidationReport
    created_unix_ms: int = 0

    def __post_init__(self) -> None:
        # A tuple whatever the caller passed, so records compare equal to what the store reads back.
        object.__setattr__(self, "classes", tuple((str(label), int(count)) for label, count in self.classes))


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset as a viewer sees it in a listing: its versions, oldest first."""

    owner: str
    name: str
    task: datasets_pb2.TrainingTask.ValueType
    versions: tuple[DatasetVersionRecord, ...]
    # Tenants it is shared with, sorted; filled for its owner only (empty for a viewer it is shared with).
    shared_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelVersionRecord:
    """One version of a tenant's own model: what a training job produced, with its lineage and evaluation."""

    owner: str
    name: str
    version: int  # 1, 2, ... (shown as "1", "2"); 0 until SqlStore.add_model_version numbers it
    task: datasets_pb2.TrainingTask.ValueType
    base_model: str
    job_id: str
    dataset_owner: str
    dataset_name: str
    dataset_version: str
    dataset_sha256: str
    labels: Sequence[str] = ()
    hyperparameters: bytes = b""  # a serialized training_pb2.Hyperparameters
    evaluation: bytes = b""  # a serialized training_pb2.Evaluation
    artifact_sha256: str = ""
    artifact_bytes: int = 0
    export_sha256: str = ""  # the edge export's ZIP; "" when there is none
    export_bytes: int = 0
    code_version: str = ""
    created_unix_ms: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))


@dataclass(frozen=True)
class DeploymentRecord:
    """Which versions of a model serve. Versions are ModelVersionRecord.version numbers; 0 means none."""

    owner: str
    name: str
    default_version: int = 0
    canary_version: int = 0
    canary_percent: int = 0  # 0-99: the share of unnamed requests the canary answers
    previous_version: int = 0  # the default before the last promotion (rollback's target)
    # The deployments' sync generation this change made (SqlStore.put_deployment sets it).
    generation: int = 0


@dataclass(frozen=True)
class JobRow:
    """A training job as stored: the columns queries need, and the whole job (a serialized training_pb2.TrainingJob)."""

    job_id: str
    owner: str
    state: training_pb2.JobState.ValueType
    created_unix_ms: int
    job: bytes


@dataclass(frozen=True)
class SessionRecord:
    """One of a tenant's assistant conversations: its system prompt and its messages, oldest first."""

    tenant_id: str
    session_id: str
    system_prompt: str
    messages: tuple[tuple[str, str], ...]  # (role "user" or "assistant", content)
    created_unix_ms: int
    updated_unix_ms: int
    expires_unix_ms: int


@dataclass(frozen=True)
class ScenarioRecord:
    """One of a tenant's own scenarios: its YAML source (validated when it was stored)."""

    tenant_id: str
    name: str
    source: str
    created_unix_ms: int = 0
    updated_unix_ms: int = 0
