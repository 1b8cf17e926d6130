"""The store over SQLAlchemy Core: SQLite embedded (one file every local process shares) or PostgreSQL (shared by
gateways and schedulers on several hosts).

Synchronous by design: every method is one short transaction, and async callers run it with ``asyncio.to_thread``.

SQLite notes. Several processes (gateways, the scheduler, the CLI) open the same file at once, so every connection
runs in WAL mode (readers never wait for the writer) with a busy timeout (a writer waits for another instead of
failing). pysqlite's own transaction handling is switched off: it would run a method's SELECTs outside its
transaction and begin only at the first write. Each transaction begins explicitly instead, a writing one with
``BEGIN IMMEDIATE``: it takes the write lock up front, so it waits its turn under the busy timeout rather than failing
later when a read snapshot cannot be upgraded to a write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, RowMapping, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import ConnectionPoolEntry

from aimass.store import migrations, schema
from aimass.store.records import (
    MAX_PRIORITY_VALUE,
    TENANT_LIMIT_FIELDS,
    AuditEvent,
    DatasetSummary,
    DatasetVersionRecord,
    DeploymentRecord,
    JobRow,
    KeyRecord,
    ModelVersionRecord,
    ScenarioRecord,
    SessionRecord,
    TenantRecord,
    now_ms,
)
from aimass.tenancy.keys import TENANT_PATTERN, check_scopes, check_tenant_id, new_key
from aimass.v1 import datasets_pb2, training_pb2

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(migrations.__file__).resolve().parent
# Any fixed number: every aimass process takes this PostgreSQL advisory lock around its migration.
_PG_MIGRATION_LOCK: Final = 0x61696D617373  # "aimass"
# The first half of the two-key advisory locks that serialize lifecycle writers of one key (a tenant's datasets, one
# model's versions): a key space apart from the one-key migration lock.
_PG_LIFECYCLE_LOCK: Final = 0x61696D61  # "aima"
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
# Values per IN list or multi-row INSERT: far below SQLite's (32766) and PostgreSQL's (65535) bound parameters.
_CHUNK: Final = 1000
_DAY: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Execution option that makes a SQLite transaction begin IMMEDIATE (see the module docstring).
_WRITE: Final = "aimass_write"
# Alembic's `context` and `op` are module-level proxies: one migration at a time per process, whatever the store.
_ALEMBIC_LOCK: Final = threading.Lock()

# Alembic's bookkeeping table, read directly: MigrationContext would log its set-up at INFO on every check.
_version_table = Table(schema.VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True))


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    # No alembic.ini: the script location is this package's directory ('%' escaped for configparser).
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table(schema.VERSION_TABLE):
        return None
    heads = sorted(conn.execute(select(_version_table.c.version_num)).scalars())
    return ",".join(heads) or None


def _sqlite_file(url: URL) -> Path:
    """The database file of a SQLite URL, created owner-only (it holds key hashes) in an owner-only directory."""
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ValueError("an in-memory SQLite store is not supported: every aimass process must share one file")
    path = Path(database)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # SQLite would create it world-readable (umask permitting); its -wal and -shm files copy this file's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    return path


def _switch_to_wal(cursor: sqlite3.Cursor, busy_timeout_s: float) -> Any:
    """The journal mode after asking for WAL, retried while another process holds the file.

    SQLite can answer "database is locked" to this pragma at once, without calling the busy handler, while another
    connection is switching the same fresh file (seen when several processes open a new store together)."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _sqlite_engine(url: URL, busy_timeout_s: float) -> Engine:
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})
    busy_ms = max(1, int(busy_timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        assert isinstance(dbapi_connection, sqlite3.Connection)
        dbapi_connection.isolation_level = None  # we begin transactions ourselves (below)
        cursor = dbapi_connection.cursor()
        try:
            # The busy timeout first: switching a fresh file to WAL may wait for another process doing the same.
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            mode = _switch_to_wal(cursor, busy_timeout_s)
            if mode is None or str(mode[0]).lower() != "wal":
                log.warning("SQLite store %s is not in WAL mode (%s): processes will block each other", url, mode)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def _postgres_engine(url: URL, busy_timeout_s: float) -> Engine:
    if url.drivername == "postgresql":
        # SQLAlchemy's default driver is psycopg2; aimass ships psycopg 3 (the "postgres" extra).
        url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if "options" not in url.query:
        # How long a statement waits for another transaction's lock: the PostgreSQL side of busy_timeout_s.
        connect_args["options"] = f"-c lock_timeout={max(1, int(busy_timeout_s * 1000))}"
    # pre_ping: a pooled connection the server (or a failover) closed is replaced instead of failing a call.
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _check_limits(limits: Mapping[str, float | int]) -> dict[str, float | int]:
    checked: dict[str, float | int] = {}
    for field, value in limits.items():
        kind = TENANT_LIMIT_FIELDS.get(field)
        if kind is None:
            raise ValueError(f"unknown tenant limit {field!r}; known: {', '.join(TENANT_LIMIT_FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{field} must be a number, not {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{field} is {value}; send 0 (unlimited, or the configured default) or more")
        if kind is int:
            if value != int(value):
                raise ValueError(f"{field} is {value}; it must be a whole number")
            value = int(value)
        else:
            value = float(value)
        if field == "max_priority" and value > MAX_PRIORITY_VALUE:
            raise ValueError(
                f"max_priority is {value}; send 0 (the configured default) or a priority from 1 (LOW) to 4 (CRITICAL)"
            )
        checked[field] = value
    return checked


def _check_day(day: str) -> str:
    try:
        if _DAY.match(day) and datetime.date.fromisoformat(day):
            return day
    except ValueError:
        pass
    raise ValueError(f"day {day[:40]!r} is not a date written YYYY-MM-DD")


def _tenant(row: RowMapping) -> TenantRecord:
    return TenantRecord(
        tenant_id=row["tenant_id"],
        requests_per_second=float(row["requests_per_second"]),
        max_concurrent=int(row["max_concurrent"]),
        llm_tokens_per_minute=int(row["llm_tokens_per_minute"]),
        llm_tokens_per_day=int(row["llm_tokens_per_day"]),
        max_priority=int(row["max_priority"]),
        weight=float(row["weight"]),
        created_unix_ms=int(row["created_unix_ms"]),
        updated_unix_ms=int(row["updated_unix_ms"]),
    )


def _key(row: RowMapping) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        tenant_id=row["tenant_id"],
        scopes=frozenset(scope for scope in row["scopes"].split(",") if scope),
        name=row["name"],
        created_unix_ms=int(row["created_unix_ms"]),
        expires_unix_ms=int(row["expires_unix_ms"]),
        revoked_unix_ms=int(row["revoked_unix_ms"]),
        created_by=row["created_by"],
    )


def _event(row: RowMapping) -> AuditEvent:
    return AuditEvent(
        at_unix_ms=int(row["at_unix_ms"]),
        action=row["action"],
        outcome=row["outcome"],
        tenant_id=row["tenant_id"],
        key_id=row["key_id"],
        target=row["target"],
        detail=row["detail"],
        peer=row["peer"],
        count=int(row["count"]),
        id=int(row["id"]),
    )


class QuotaExceeded(ValueError):
    """A dataset version would take its owner past the storage quota; nothing was stored."""

    def __init__(self, used: int, quota: int, wanted: int) -> None:
        super().__init__(
            f"{wanted:,} bytes more would take the tenant past its storage quota: {used:,} of {quota:,} bytes are in "
            "use by its dataset versions"
        )
        self.used = used
        self.quota = quota
        self.wanted = wanted


def _check_name(what: str, name: str) -> str:
    # The tenant id's rule (scheduler.lifecycle.names checks the same for users, with their words).
    if not TENANT_PATTERN.match(name):
        raise ValueError(
            f"{what} name {name[:70]!r} is not valid: 1-63 characters, lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_sha256(what: str, sha256: str, *, optional: bool = False) -> str:
    if not (_SHA256.match(sha256) or (optional and not sha256)):
        raise ValueError(f"{what} {sha256[:70]!r} is not a SHA-256: 64 lowercase hex digits")
    return sha256


def _check_count(what: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is {value!r}; it must be a whole number, 0 or more")
    return value


def _dataset_version(row: RowMapping) -> DatasetVersionRecord:
    return DatasetVersionRecord(
        owner=row["owner"],
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        size_bytes=int(row["size_bytes"]),
        rows=int(row["rows"]),
        task=datasets_pb2.TrainingTask.ValueType(int(row["task"])),
        format=datasets_pb2.DatasetFormat.ValueType(int(row["format"])),
        text_column=row["text_column"],
        label_column=row["label_column"],
        classes=[(label, count) for label, count in json.loads(row["classes"])],
        report=bytes(row["report"]),
        created_unix_ms=int(row["created_unix_ms"]),
    )


def _model_version(row: RowMapping) -> ModelVersionRecord:
    return ModelVersionRecord(
        owner=row["owner"],
        name=row["name"],
        version=int(row["version"]),
        task=datasets_pb2.TrainingTask.ValueType(int(row["task"])),
        base_model=row["base_model"],
        job_id=row["job_id"],
        dataset_owner=row["dataset_owner"],
        dataset_name=row["dataset_name"],
        dataset_version=row["dataset_version"],
        dataset_sha256=row["dataset_sha256"],
        labels=json.loads(row["labels"]),
        hyperparameters=bytes(row["hyperparameters"]),
        evaluation=bytes(row["evaluation"]),
        artifact_sha256=row["artifact_sha256"],
        artifact_bytes=int(row["artifact_bytes"]),
        export_sha256=row["export_sha256"],
        export_bytes=int(row["export_bytes"]),
        code_version=row["code_version"],
        created_unix_ms=int(row["created_unix_ms"]),
    )


def _deployment(row: RowMapping) -> DeploymentRecord:
    return DeploymentRecord(
        owner=row["owner"],
        name=row["name"],
        default_version=int(row["default_version"]),
        canary_version=int(row["canary_version"]),
        canary_percent=int(row["canary_percent"]),
        previous_version=int(row["previous_version"]),
        generation=int(row["generation"]),
    )


def _job(row: RowMapping) -> JobRow:
    return JobRow(
        job_id=row["job_id"],
        owner=row["owner"],
        state=training_pb2.JobState.ValueType(int(row["state"])),
        created_unix_ms=int(row["created_unix_ms"]),
        job=bytes(row["job"]),
    )


def _session(row: RowMapping) -> SessionRecord:
    return SessionRecord(
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        system_prompt=row["system_prompt"],
        messages=tuple((str(role), str(content)) for role, content in json.loads(row["messages"])),
        created_unix_ms=int(row["created_unix_ms"]),
        updated_unix_ms=int(row["updated_unix_ms"]),
        expires_unix_ms=int(row["expires_unix_ms"]),
    )


def _scenario(row: RowMapping) -> ScenarioRecord:
    return ScenarioRecord(
        tenant_id=row["tenant_id"],
        name=row["name"],
        source=row["source"],
        created_unix_ms=int(row["created_unix_ms"]),
        updated_unix_ms=int(row["updated_unix_ms"]),
    )


class SqlStore:
    """Tenants, API keys, the audit log and LLM token usage, in SQLite or PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, *, busy_timeout_s: float = 10.0) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        self._sqlite_path: Path | None = None
        if backend == "sqlite":
            self._sqlite_path = _sqlite_file(parsed)
            self._engine = _sqlite_engine(parsed, busy_timeout_s)
        elif backend == "postgresql":
            self._engine = _postgres_engine(parsed, busy_timeout_s)
        else:
            raise ValueError(
                f"store URL scheme {parsed.drivername!r} is not supported: use sqlite:///PATH or "
                "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        self._postgres = backend == "postgresql"

    @classmethod
    def open(cls, url: str, *, busy_timeout_s: float = 10.0, migrate: bool = True) -> SqlStore:
        store = cls(url, busy_timeout_s=busy_timeout_s)
        if migrate:
            try:
                store.migrate()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self._engine.dispose()

    @contextlib.contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read transaction; ``snapshot``: its statements all see one snapshot (PostgreSQL's READ COMMITTED gives
        each statement its own; a SQLite read transaction is one snapshot anyway)."""
        with self._engine.connect() as conn:
            if snapshot and self._postgres:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that can say ON CONFLICT (both dialects spell it the same)."""
        return postgresql.insert(table) if self._postgres else sqlite.insert(table)

    def _serialize(self, conn: Connection, key: str) -> None:
        """Makes this write transaction wait for any other holding ``key`` (a read-then-write decision stays true
        until commit). PostgreSQL: an advisory lock, released at commit; SQLite's BEGIN IMMEDIATE already serializes
        every writer."""
        if self._postgres:
            conn.execute(select(func.pg_advisory_xact_lock(_PG_LIFECYCLE_LOCK, func.hashtext(key))))

    # -- schema

    def migrate(self) -> None:
        """Upgrades the schema to the newest revision; a no-op when it is there. Safe to run from several processes
        at once: they take turns (a file lock beside a SQLite file, an advisory lock in PostgreSQL)."""
        if self.schema_revision() == _scripts().get_current_head():
            return
        with self._migration_lock(), self._write() as conn:
            if self._postgres:
                # Wait however long another process's migration takes (lock_timeout would give up after the busy
                # timeout); the lock goes with this transaction.
                conn.execute(text("SET LOCAL lock_timeout = 0"))
                conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
            before = _revision(conn)
            known = {script.revision for script in _scripts().walk_revisions()}
            if before is not None and any(head not in known for head in before.split(",")):
                raise RuntimeError(
                    f"the store's schema is at revision {before}, which this aimass does not know (newest: "
                    f"{_scripts().get_current_head()}): a newer aimass migrated it; upgrade this one"
                )
            with _ALEMBIC_LOCK:
                command.upgrade(_alembic_config(conn), "head")
            after = _revision(conn)
        if after != before:
            log.info("store schema upgraded to %s (was %s)", after, before or "empty")

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self._sqlite_path is None:
            yield  # PostgreSQL: the advisory lock in migrate()
            return
        lock_path = self._sqlite_path.with_name(self._sqlite_path.name + ".migrate.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Held until closed, and released by the kernel if this process dies mid-migration.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def schema_revision(self) -> str | None:
        """The schema's Alembic revision; None before the first migration."""
        with self._read() as conn:
            return _revision(conn)

    # -- tenants

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._read() as conn:
            row = conn.execute(select(schema.tenants).where(schema.tenants.c.tenant_id == tenant_id)).mappings().first()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[TenantRecord]:
        with self._read() as conn:
            rows = conn.execute(select(schema.tenants).order_by(schema.tenants.c.tenant_id)).mappings().all()
        return [_tenant(row) for row in rows]

    def set_tenant(self, tenant_id: str, **limits: float | int) -> TenantRecord:
        """Creates the tenant when absent and sets the given limits (``TENANT_LIMIT_FIELDS``), leaving the others."""
        check_tenant_id(tenant_id)
        changes = _check_limits(limits)
        now = now_ms()
        where = schema.tenants.c.tenant_id == tenant_id
        with self._write() as conn:
            self._ensure_tenant(conn, tenant_id, now)
            conn.execute(update(schema.tenants).where(where).values(**changes, updated_unix_ms=now))
            row = conn.execute(select(schema.tenants).where(where)).mappings().one()
        return _tenant(row)

    def ensure_tenant(self, tenant_id: str) -> TenantRecord:
        """The tenant, created with default limits when absent."""
        check_tenant_id(tenant_id)
        with self._write() as conn:
            self._ensure_tenant(conn, tenant_id, now_ms())
            row = conn.execute(select(schema.tenants).where(schema.tenants.c.tenant_id == tenant_id)).mappings().one()
        return _tenant(row)

    def _ensure_tenant(self, conn: Connection, tenant_id: str, now: int) -> None:
        # ON CONFLICT DO NOTHING: two processes creating the same tenant at once both succeed.
        defaults = dataclasses.asdict(TenantRecord(tenant_id, created_unix_ms=now, updated_unix_ms=now))
        conn.execute(
            self._insert(schema.tenants).values(**defaults).on_conflict_do_nothing(index_elements=["tenant_id"])
        )

    # -- keys

    def create_key(
        self,
        tenant_id: str,
        scopes: Iterable[str],
        *,
        name: str = "",
        expires_unix_ms: int = 0,
        created_by: str = "",
    ) -> tuple[KeyRecord, str]:
        """A new key for ``tenant_id`` (created when absent): its record, and the key itself, which exists only in
        this return value (the store keeps its hash)."""
        check_tenant_id(tenant_id)
        wanted = check_scopes(scopes)
        if expires_unix_ms < 0:
            raise ValueError(f"expires_unix_ms is {expires_unix_ms}; send 0 (never) or a time")
        if len(created_by) > schema.KEY_ID_LENGTH:
            raise ValueError(f"created_by {created_by[:40]!r} is not a key id")
        made = new_key()
        now = now_ms()
        record = KeyRecord(
            key_id=made.key_id,
            tenant_id=tenant_id,
            scopes=wanted,
            name=name,
            created_unix_ms=now,
            expires_unix_ms=expires_unix_ms,
            created_by=created_by,
        )
        with self._write() as conn:
            self._ensure_tenant(conn, tenant_id, now)
            conn.execute(
                insert(schema.api_keys).values(
                    key_id=record.key_id,
                    tenant_id=tenant_id,
                    key_hash=made.key_hash,
                    scopes=",".join(sorted(wanted)),
                    name=name,
                    created_unix_ms=now,
                    expires_unix_ms=expires_unix_ms,
                    revoked_unix_ms=0,
                    created_by=created_by,
                )
            )
        return record, made.key

    def keys_by_hash(self, key_hashes: Collection[str]) -> dict[str, KeyRecord]:
        """hash → record for the hashes the store knows (unknown ones are absent); one query per 1000 hashes."""
        wanted = sorted(set(key_hashes))
        found: dict[str, KeyRecord] = {}
        if not wanted:
            return found
        column = schema.api_keys.c.key_hash
        with self._read() as conn:
            for start in range(0, len(wanted), _CHUNK):
                query = select(schema.api_keys).where(column.in_(wanted[start : start + _CHUNK]))
                for row in conn.execute(query).mappings():
                    found[row["key_hash"]] = _key(row)
        return found

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._read() as conn:
            row = conn.execute(select(schema.api_keys).where(schema.api_keys.c.key_id == key_id)).mappings().first()
        return None if row is None else _key(row)

    def list_keys(self, tenant_id: str | None = None) -> list[KeyRecord]:
        """The keys of ``tenant_id`` (None: every tenant's), oldest first, revoked and expired ones included."""
        table = schema.api_keys
        query = select(table).order_by(table.c.created_unix_ms, table.c.key_id)
        if tenant_id is not None:
            query = query.where(table.c.tenant_id == tenant_id)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [_key(row) for row in rows]

    def revoke_key(self, key_id: str, *, tenant_id: str | None = None) -> KeyRecord | None:
        """Revokes the key and returns it; None when there is no such key, or (``tenant_id`` given) it belongs to
        another tenant. A key revoked before keeps its first revocation time."""
        table = schema.api_keys
        where = [table.c.key_id == key_id]
        if tenant_id is not None:
            where.append(table.c.tenant_id == tenant_id)
        with self._write() as conn:
            conn.execute(update(table).where(*where, table.c.revoked_unix_ms == 0).values(revoked_unix_ms=now_ms()))
            row = conn.execute(select(table).where(*where)).mappings().first()
        return None if row is None else _key(row)

    # -- audit

    def add_audit(self, events: Sequence[AuditEvent]) -> None:
        """Writes ``events`` in one transaction; their ``id`` is ignored (the database numbers them)."""
        if not events:
            return
        rows = [{field: value for field, value in dataclasses.asdict(e).items() if field != "id"} for e in events]
        with self._write() as conn:
            for start in range(0, len(rows), _CHUNK):
                conn.execute(insert(schema.audit_events), rows[start : start + _CHUNK])

    def list_audit(
        self,
        *,
        since_unix_ms: int = 0,
        tenant_id: str | None = None,
        action_prefix: str = "",
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Events at or after ``since_unix_ms``, newest first, of ``tenant_id`` (None: every tenant's) whose action
        starts with ``action_prefix``, at most ``limit``."""
        if limit < 1:
            raise ValueError(f"limit is {limit}; it must be 1 or more")
        table = schema.audit_events
        query = select(table).where(table.c.at_unix_ms >= since_unix_ms)
        if tenant_id is not None:
            query = query.where(table.c.tenant_id == tenant_id)
        if action_prefix:
            # Not LIKE: SQLite's is case-insensitive and both treat '_' and '%' specially.
            query = query.where(func.substr(table.c.action, 1, len(action_prefix)) == action_prefix)
        query = query.order_by(table.c.at_unix_ms.desc(), table.c.id.desc()).limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [_event(row) for row in rows]

    def prune_audit(self, before_unix_ms: int) -> int:
        """Deletes the events before ``before_unix_ms``; returns how many."""
        with self._write() as conn:
            deleted = conn.execute(delete(schema.audit_events).where(schema.audit_events.c.at_unix_ms < before_unix_ms))
        return int(deleted.rowcount)

    # -- LLM token usage

    def add_llm_usage(self, day: str, tokens_by_tenant: Mapping[str, int]) -> None:
        """Adds each tenant's tokens to its total for ``day`` (UTC, YYYY-MM-DD)."""
        _check_day(day)
        for tenant_id, tokens in tokens_by_tenant.items():
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"tokens for tenant {tenant_id[:70]!r} are {tokens!r}; send a whole number, 0 or more")
        # Sorted: concurrent writers lock PostgreSQL rows in the same order, so they cannot deadlock.
        rows = [{"tenant_id": t, "day": day, "tokens": n} for t, n in sorted(tokens_by_tenant.items()) if n]
        if not rows:
            return
        table = schema.llm_usage
        with self._write() as conn:
            for start in range(0, len(rows), _CHUNK):
                stmt = self._insert(table).values(rows[start : start + _CHUNK])
                added = table.c.tokens + stmt.excluded.tokens
                stmt = stmt.on_conflict_do_update(
                    index_elements=[table.c.tenant_id, table.c.day], set_={"tokens": added}
                )
                conn.execute(stmt)

    def llm_usage(self, day: str) -> dict[str, int]:
        """tenant → tokens used on ``day`` (UTC, YYYY-MM-DD)."""
        _check_day(day)
        table = schema.llm_usage
        with self._read() as conn:
            rows = conn.execute(select(table.c.tenant_id, table.c.tokens).where(table.c.day == day)).all()
        return {tenant_id: int(tokens) for tenant_id, tokens in rows}

    # -- datasets

    def add_dataset_version(
        self, record: DatasetVersionRecord, *, quota_bytes: int
    ) -> tuple[DatasetVersionRecord, bool]:
        """Records a dataset version; returns it as stored and whether it was there already (the same bytes under
        the same name: nothing changes). Its owner's storage counts each distinct file once (the same bytes under
        two names cost nothing more); past ``quota_bytes`` it raises QuotaExceeded and stores nothing.

        A version's ``created_unix_ms`` (now when 0) is made later than its dataset's others, so "the newest" is
        always one version."""
        check_tenant_id(record.owner)
        _check_name("dataset", record.name)
        _check_sha256("dataset sha256", record.sha256)
        if record.version != record.sha256[:12]:
            raise ValueError(f"dataset version {record.version[:40]!r} is not its sha256's first 12 hex digits")
        for what, value in (("size_bytes", record.size_bytes), ("rows", record.rows), ("quota_bytes", quota_bytes)):
            _check_count(what, value)
        table = schema.dataset_versions
        of_owner = table.c.owner == record.owner
        of_dataset = (of_owner, table.c.name == record.name)
        with self._write() as conn:
            self._serialize(conn, f"datasets/{record.owner}")
            row = conn.execute(select(table).where(*of_dataset, table.c.version == record.version)).mappings().first()
            if row is not None:
                if row["sha256"] != record.sha256:
                    raise ValueError(
                        f"dataset {record.name!r} already has a version {record.version} with other bytes (sha256 "
                        f"{row['sha256']}): two files share the first 12 digits of their SHA-256"
                    )
                return _dataset_version(row), True
            used = self._storage_used(conn, record.owner)
            stored_before = conn.execute(
                select(table.c.sha256).where(of_owner, table.c.sha256 == record.sha256).limit(1)
            ).first()
            if stored_before is None and used + record.size_bytes > quota_bytes:
                raise QuotaExceeded(used, quota_bytes, record.size_bytes)
            newest = conn.execute(select(func.max(table.c.created_unix_ms)).where(*of_dataset)).scalar()
            created = record.created_unix_ms or now_ms()
            if newest is not None and created <= newest:
                created = int(newest) + 1
            stored = dataclasses.replace(record, created_unix_ms=created)
            conn.execute(
                insert(table).values(
                    **{field: value for field, value in dataclasses.asdict(stored).items() if field != "classes"},
                    classes=json.dumps([list(pair) for pair in stored.classes], ensure_ascii=False),
                )
            )
        return stored, False

    def _storage_used(self, conn: Connection, owner: str) -> int:
        table = schema.dataset_versions
        per_file = (
            select(func.max(table.c.size_bytes).label("size"))
            .where(table.c.owner == owner)
            .group_by(table.c.sha256)
            .subquery()
        )
        return int(conn.execute(select(func.coalesce(func.sum(per_file.c.size), 0))).scalar_one())

    def storage_used(self, owner: str) -> int:
        """Bytes of the owner's dataset versions, each distinct file counted once."""
        with self._read() as conn:
            return self._storage_used(conn, owner)

    def dataset_versions(self, owner: str, name: str) -> list[DatasetVersionRecord]:
        """The versions of one dataset, oldest first (no check of who asks: the caller's business)."""
        table = schema.dataset_versions
        query = (
            select(table)
            .where(table.c.owner == owner, table.c.name == name)
            .order_by(table.c.created_unix_ms, table.c.version)
        )
        with self._read() as conn:
            return [_dataset_version(row) for row in conn.execute(query).mappings()]

    def visible_datasets(self, viewer: str) -> list[DatasetSummary]:
        """The viewer's own datasets and those shared with it, by owner then name; ``shared_with`` is filled on the
        viewer's own only."""
        versions, grants = schema.dataset_versions, schema.dataset_grants
        granted = exists().where(
            grants.c.owner == versions.c.owner, grants.c.name == versions.c.name, grants.c.grantee == viewer
        )
        query = (
            select(versions)
            .where(or_(versions.c.owner == viewer, granted))
            .order_by(versions.c.owner, versions.c.name, versions.c.created_unix_ms, versions.c.version)
        )
        with self._read(snapshot=True) as conn:
            rows = conn.execute(query).mappings().all()
            own_grants = conn.execute(
                select(grants.c.name, grants.c.grantee).where(grants.c.owner == viewer).order_by(grants.c.grantee)
            ).all()
        by_dataset: dict[tuple[str, str], list[DatasetVersionRecord]] = {}
        for row in rows:
            by_dataset.setdefault((row["owner"], row["name"]), []).append(_dataset_version(row))
        shared: dict[str, list[str]] = {}
        for name, grantee in own_grants:
            shared.setdefault(name, []).append(grantee)
        return [
            DatasetSummary(
                owner=owner,
                name=name,
                task=records[0].task,
                versions=tuple(records),
                shared_with=tuple(shared.get(name, ())) if owner == viewer else (),
            )
            for (owner, name), records in by_dataset.items()
        ]

    def get_dataset_version(
        self, viewer: str, owner: str, name: str, version: str | None = None
    ) -> DatasetVersionRecord | None:
        """One version (None: the newest) as ``viewer`` may see it: its own, or shared with it. None when there is
        no such version or the viewer may not see it (the caller cannot tell which, and should not say)."""
        versions, grants = schema.dataset_versions, schema.dataset_grants
        query = select(versions).where(versions.c.owner == owner, versions.c.name == name)
        if version is not None:
            query = query.where(versions.c.version == version)
        if viewer != owner:
            query = query.where(
                exists().where(grants.c.owner == owner, grants.c.name == name, grants.c.grantee == viewer)
            )
        query = query.order_by(versions.c.created_unix_ms.desc(), versions.c.version.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _dataset_version(row)

    def delete_dataset(self, owner: str, name: str, version: str | None = None) -> list[DatasetVersionRecord]:
        """Deletes one version (None: every version) and returns what it deleted, oldest first; the grants go with
        the last version. The blobs stay: the caller removes each one ``sha256_referenced`` no longer finds."""
        table, grants = schema.dataset_versions, schema.dataset_grants
        where = [table.c.owner == owner, table.c.name == name]
        if version is not None:
            where.append(table.c.version == version)
        with self._write() as conn:
            self._serialize(conn, f"datasets/{owner}")
            rows = conn.execute(
                select(table).where(*where).order_by(table.c.created_unix_ms, table.c.version)
            ).mappings()
            deleted = [_dataset_version(row) for row in rows]
            if not deleted:
                return []
            conn.execute(delete(table).where(*where))
            left = conn.execute(select(table.c.version).where(table.c.owner == owner, table.c.name == name).limit(1))
            if left.first() is None:
                conn.execute(delete(grants).where(grants.c.owner == owner, grants.c.name == name))
        return deleted

    def sha256_referenced(self, sha256: str) -> bool:
        """Whether any dataset version, model artifact or model export still uses the blob ``sha256``."""
        datasets, models = schema.dataset_versions, schema.model_versions
        uses = (
            select(datasets.c.sha256).where(datasets.c.sha256 == sha256),
            select(models.c.artifact_sha256).where(models.c.artifact_sha256 == sha256),
            select(models.c.export_sha256).where(models.c.export_sha256 == sha256),
        )
        with self._read() as conn:
            return any(conn.execute(use.limit(1)).first() is not None for use in uses)

    def grant_dataset(self, owner: str, name: str, grantee: str) -> bool:
        """Shares the dataset read-only with ``grantee``; True when that is new, False when it was shared already
        or the dataset has no versions (nothing to share)."""
        check_tenant_id(grantee)
        if grantee == owner:
            raise ValueError("a dataset is always its owner's: name another tenant to share it with")
        table, grants = schema.dataset_versions, schema.dataset_grants
        with self._write() as conn:
            self._serialize(conn, f"datasets/{owner}")
            found = conn.execute(select(table.c.version).where(table.c.owner == owner, table.c.name == name).limit(1))
            if found.first() is None:
                return False
            added = conn.execute(
                self._insert(grants)
                .values(owner=owner, name=name, grantee=grantee)
                .on_conflict_do_nothing(index_elements=["owner", "name", "grantee"])
                .returning(grants.c.grantee)
            ).first()
        # RETURNING, not rowcount: what drivers report as the rowcount of an INSERT that did nothing varies.
        return added is not None

    def revoke_dataset(self, owner: str, name: str, grantee: str) -> bool:
        """Withdraws ``grantee``'s read access; False when it had none."""
        grants = schema.dataset_grants
        with self._write() as conn:
            removed = conn.execute(
                delete(grants).where(grants.c.owner == owner, grants.c.name == name, grants.c.grantee == grantee)
            )
        return bool(removed.rowcount)

    def dataset_grants(self, owner: str, name: str) -> list[str]:
        """The tenants the dataset is shared with, sorted."""
        grants = schema.dataset_grants
        where = (grants.c.owner == owner, grants.c.name == name)
        query = select(grants.c.grantee).where(*where).order_by(grants.c.grantee)
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    # -- model versions

    def add_model_version(self, record: ModelVersionRecord) -> ModelVersionRecord:
        """Records a new version of the model, numbered one past its newest (1 for the first; concurrent adds get
        consecutive numbers); ``record.version`` is ignored, ``created_unix_ms`` 0 means now."""
        check_tenant_id(record.owner)
        _check_name("model", record.name)
        _check_sha256("artifact_sha256", record.artifact_sha256)
        _check_sha256("export_sha256", record.export_sha256, optional=True)
        _check_sha256("dataset_sha256", record.dataset_sha256, optional=True)
        _check_count("artifact_bytes", record.artifact_bytes)
        _check_count("export_bytes", record.export_bytes)
        table = schema.model_versions
        with self._write() as conn:
            self._serialize(conn, f"models/{record.owner}/{record.name}")
            newest = conn.execute(
                select(func.max(table.c.version)).where(table.c.owner == record.owner, table.c.name == record.name)
            ).scalar()
            stored = dataclasses.replace(
                record, version=int(newest or 0) + 1, created_unix_ms=record.created_unix_ms or now_ms()
            )
            conn.execute(
                insert(table).values(
                    **{field: value for field, value in dataclasses.asdict(stored).items() if field != "labels"},
                    labels=json.dumps(list(stored.labels), ensure_ascii=False),
                )
            )
        return stored

    def model_versions(self, owner: str, name: str | None = None) -> list[ModelVersionRecord]:
        """The owner's model versions (of one model when ``name`` is given), by name then version."""
        table = schema.model_versions
        query = select(table).where(table.c.owner == owner).order_by(table.c.name, table.c.version)
        if name is not None:
            query = query.where(table.c.name == name)
        with self._read() as conn:
            return [_model_version(row) for row in conn.execute(query).mappings()]

    def get_model_version(self, owner: str, name: str, version: int) -> ModelVersionRecord | None:
        table = schema.model_versions
        query = select(table).where(table.c.owner == owner, table.c.name == name, table.c.version == version)
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _model_version(row)

    # -- deployments

    def _bump_generation(self, conn: Connection) -> int:
        # An upsert: it also takes the row's lock, so concurrent changes get generations in their commit order.
        table = schema.lifecycle_state
        stmt = self._insert(table).values(id=1, deployment_generation=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.id], set_={"deployment_generation": table.c.deployment_generation + 1}
        )
        conn.execute(stmt)
        return int(conn.execute(select(table.c.deployment_generation).where(table.c.id == 1)).scalar_one())

    def _generation(self, conn: Connection) -> int:
        table = schema.lifecycle_state
        found = conn.execute(select(table.c.deployment_generation).where(table.c.id == 1)).scalar()
        return int(found or 0)

    def deployment_generation(self) -> int:
        """The deployments' sync generation: bumped by every put_deployment and delete_deployment."""
        with self._read() as conn:
            return self._generation(conn)

    def get_deployment(self, owner: str, name: str) -> DeploymentRecord | None:
        table = schema.deployments
        with self._read() as conn:
            row = conn.execute(select(table).where(table.c.owner == owner, table.c.name == name)).mappings().first()
        return None if row is None else _deployment(row)

    def put_deployment(self, record: DeploymentRecord) -> DeploymentRecord:
        """Creates or replaces the model's deployment; returns it with ``generation`` the new sync generation,
        bumped in the same transaction."""
        check_tenant_id(record.owner)
        _check_name("model", record.name)
        for field in ("default_version", "canary_version", "previous_version"):
            _check_count(field, getattr(record, field))
        if not 0 <= record.canary_percent <= 99:
            raise ValueError(f"canary_percent is {record.canary_percent}; send 0-99")
        if record.canary_percent and not record.canary_version:
            raise ValueError(f"canary_percent is {record.canary_percent} but there is no canary version")
        table = schema.deployments
        with self._write() as conn:
            stored = dataclasses.replace(record, generation=self._bump_generation(conn))
            stmt = self._insert(table).values(**dataclasses.asdict(stored))
            changed = [field for field in dataclasses.asdict(stored) if field not in ("owner", "name")]
            columns = {field: stmt.excluded[field] for field in changed}
            conn.execute(stmt.on_conflict_do_update(index_elements=["owner", "name"], set_=columns))
        return stored

    def delete_deployment(self, owner: str, name: str) -> int | None:
        """Removes the model's deployment; returns the new sync generation, or None when it had none (nothing
        changed)."""
        table, state = schema.deployments, schema.lifecycle_state
        with self._write() as conn:
            if self._postgres:
                # The generation's row first, as put_deployment takes them: the other order could deadlock with it.
                conn.execute(select(state.c.id).where(state.c.id == 1).with_for_update())
            deleted = conn.execute(delete(table).where(table.c.owner == owner, table.c.name == name))
            if not deleted.rowcount:
                return None
            return self._bump_generation(conn)

    def deployments(self) -> tuple[int, list[DeploymentRecord]]:
        """The sync generation and every deployment (by owner, name), from one snapshot: the list is exactly the
        state that generation names."""
        table = schema.deployments
        with self._read(snapshot=True) as conn:
            generation = self._generation(conn)
            rows = conn.execute(select(table).order_by(table.c.owner, table.c.name)).mappings().all()
        return generation, [_deployment(row) for row in rows]

    # -- training jobs

    def add_job(
        self, job_id: str, owner: str, state: training_pb2.JobState.ValueType, job_bytes: bytes, created_unix_ms: int
    ) -> JobRow:
        """Records a new job; ValueError when the id is taken."""
        if not job_id or len(job_id) > schema.JOB_ID_LENGTH:
            raise ValueError(f"job id {job_id[:80]!r} is not valid: 1-{schema.JOB_ID_LENGTH} characters")
        check_tenant_id(owner)
        row = JobRow(job_id, owner, state, created_unix_ms, bytes(job_bytes))
        try:
            with self._write() as conn:
                conn.execute(insert(schema.training_jobs).values(**dataclasses.asdict(row)))
        except IntegrityError:
            raise ValueError(f"a training job {job_id!r} exists already") from None
        return row

    def update_job(
        self, job_id: str, state: int, job_bytes: bytes, *, expected_states: Collection[int] | None = None
    ) -> bool:
        """Replaces the job's state and bytes; False when there is no such job, or (``expected_states`` given) its
        state is not one of them (e.g. a job cancelled meanwhile is not made SUCCEEDED)."""
        table = schema.training_jobs
        where = [table.c.job_id == job_id]
        if expected_states is not None:
            where.append(table.c.state.in_(sorted(expected_states)))
        with self._write() as conn:
            updated = conn.execute(update(table).where(*where).values(state=state, job=bytes(job_bytes)))
        return bool(updated.rowcount)

    def get_job(self, job_id: str) -> JobRow | None:
        table = schema.training_jobs
        with self._read() as conn:
            row = conn.execute(select(table).where(table.c.job_id == job_id)).mappings().first()
        return None if row is None else _job(row)

    def list_jobs(self, owner: str, limit: int = 50) -> list[JobRow]:
        """The owner's jobs, newest first, at most ``limit``."""
        if limit < 1:
            raise ValueError(f"limit is {limit}; it must be 1 or more")
        table = schema.training_jobs
        query = (
            select(table)
            .where(table.c.owner == owner)
            .order_by(table.c.created_unix_ms.desc(), table.c.job_id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def jobs_in_states(self, states: Collection[int]) -> list[JobRow]:
        """Every tenant's jobs in one of ``states``, oldest first (the order to run queued ones in)."""
        table = schema.training_jobs
        query = select(table).where(table.c.state.in_(sorted(states))).order_by(table.c.created_unix_ms, table.c.job_id)
        with self._read() as conn:
            return [_job(row) for row in conn.execute(query).mappings()]

    def count_jobs(self, owner: str, states: Collection[int]) -> int:
        """How many of the owner's jobs are in one of ``states``."""
        table = schema.training_jobs
        query = select(func.count()).select_from(table).where(table.c.owner == owner, table.c.state.in_(sorted(states)))
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    # -- the assistant's sessions (gateway/assistant/sessions.py)

    def get_session(self, tenant_id: str, session_id: str, now_unix_ms: int) -> SessionRecord | None:
        """The tenant's session, unless it does not exist or expired before ``now_unix_ms``."""
        table = schema.assistant_sessions
        query = select(table).where(
            table.c.tenant_id == tenant_id,
            table.c.session_id == session_id,
            table.c.expires_unix_ms > now_unix_ms,
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _session(row)

    def put_session(self, record: SessionRecord) -> None:
        """Creates or replaces the session."""
        table = schema.assistant_sessions
        values = dataclasses.asdict(record)
        values["messages"] = json.dumps([list(message) for message in record.messages])
        stmt = self._insert(table).values(**values)
        changed = [field for field in values if field not in ("tenant_id", "session_id", "created_unix_ms")]
        with self._write() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id", "session_id"], set_={field: stmt.excluded[field] for field in changed}
                )
            )

    def list_sessions(self, tenant_id: str, now_unix_ms: int) -> list[SessionRecord]:
        """The tenant's sessions that have not expired, most recently used first."""
        table = schema.assistant_sessions
        query = (
            select(table)
            .where(table.c.tenant_id == tenant_id, table.c.expires_unix_ms > now_unix_ms)
            .order_by(table.c.updated_unix_ms.desc(), table.c.session_id)
        )
        with self._read() as conn:
            return [_session(row) for row in conn.execute(query).mappings()]

    def count_sessions(self, tenant_id: str, now_unix_ms: int) -> int:
        table = schema.assistant_sessions
        query = (
            select(func.count())
            .select_from(table)
            .where(table.c.tenant_id == tenant_id, table.c.expires_unix_ms > now_unix_ms)
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_session(self, tenant_id: str, session_id: str) -> bool:
        """Deletes the tenant's session; False when it had none of that id."""
        table = schema.assistant_sessions
        with self._write() as conn:
            result = conn.execute(delete(table).where(table.c.tenant_id == tenant_id, table.c.session_id == session_id))
        return bool(result.rowcount)

    def prune_sessions(self, tenant_id: str, now_unix_ms: int) -> int:
        """Deletes the tenant's sessions that expired before ``now_unix_ms``; how many."""
        table = schema.assistant_sessions
        with self._write() as conn:
            result = conn.execute(
                delete(table).where(table.c.tenant_id == tenant_id, table.c.expires_unix_ms <= now_unix_ms)
            )
        return int(result.rowcount or 0)

    # -- tenants' scenarios (gateway/scenarios)

    def put_scenario(self, record: ScenarioRecord) -> ScenarioRecord:
        """Creates or replaces the tenant's scenario (its creation time kept); returns it as stored."""
        table = schema.scenarios
        now = now_ms()
        with self._write() as conn:
            created = conn.execute(
                select(table.c.created_unix_ms).where(
                    table.c.tenant_id == record.tenant_id, table.c.name == record.name
                )
            ).scalar_one_or_none()
            stored = dataclasses.replace(
                record, created_unix_ms=int(created) if created is not None else now, updated_unix_ms=now
            )
            stmt = self._insert(table).values(**dataclasses.asdict(stored))
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant_id", "name"],
                    set_={"source": stmt.excluded.source, "updated_unix_ms": stmt.excluded.updated_unix_ms},
                )
            )
        return stored

    def get_scenario(self, tenant_id: str, name: str) -> ScenarioRecord | None:
        table = schema.scenarios
        with self._read() as conn:
            row = (
                conn.execute(select(table).where(table.c.tenant_id == tenant_id, table.c.name == name))
                .mappings()
                .first()
            )
        return None if row is None else _scenario(row)

    def list_scenarios(self, tenant_id: str) -> list[ScenarioRecord]:
        """The tenant's scenarios by name."""
        table = schema.scenarios
        with self._read() as conn:
            rows = conn.execute(select(table).where(table.c.tenant_id == tenant_id).order_by(table.c.name)).mappings()
            return [_scenario(row) for row in rows]

    def count_scenarios(self, tenant_id: str) -> int:
        table = schema.scenarios
        with self._read() as conn:
            return int(
                conn.execute(select(func.count()).select_from(table).where(table.c.tenant_id == tenant_id)).scalar_one()
            )

    def delete_scenario(self, tenant_id: str, name: str) -> bool:
        """Deletes the tenant's scenario; False when it had none of that name."""
        table = schema.scenarios
        with self._write() as conn:
            result = conn.execute(delete(table).where(table.c.tenant_id == tenant_id, table.c.name == name))
        return bool(result.rowcount)
