"""The store (aimass.store) against SQLite and a real PostgreSQL server: schema migrations, tenants, keys, the audit
log and LLM token usage, as the gateways, the scheduler and the CLI use them."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, select, text

from aimass.store import AuditEvent, KeyRecord, SqlStore, TenantRecord, schema
from aimass.store.records import ScenarioRecord, SessionRecord, now_ms
from aimass.tenancy import keys
from aimass.v1 import common_pb2
from tests.postgres import create_database, postgres_binaries, postgres_server

ROOT = Path(__file__).resolve().parent.parent
HEAD = "0003"
_databases = itertools.count()


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL server for this module; each test gets a database of its own on it (``url``)."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL 15 binaries (initdb, pg_ctl) not found: not on PATH, nor in /usr/lib/postgresql/*/bin "
            "(Debian: apt-get install postgresql-15)"
        )
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL of an empty database: a SQLite file in a state directory not yet made, or a fresh PostgreSQL
    database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'aimass.db'}"
    server: str = request.getfixturevalue("postgres_url")
    return create_database(server, f"store_{next(_databases)}")


@pytest.fixture
def store(url: str) -> Iterator[SqlStore]:
    opened = SqlStore.open(url)
    yield opened
    opened.close()


def dump(url: str) -> str:
    """Every row of every table, as text: what someone who copied the database would have."""
    engine = create_engine(url)
    try:
        tables = MetaData()
        tables.reflect(engine)
        with engine.connect() as conn:
            return repr(
                {name: [tuple(row) for row in conn.execute(select(table))] for name, table in tables.tables.items()}
            )
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": schema.VERSION_TABLE, "compare_type": True, "compare_server_default": True}
            )
            diff: list[object] = compare_metadata(context, schema.metadata)
            return diff
    finally:
        engine.dispose()


# -- schema and migrations


def test_migrate_is_idempotent_and_logs_only_a_change(url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = SqlStore(url)
    try:
        assert store.schema_revision() is None
        with caplog.at_level(logging.INFO, logger="aimass.store"):
            store.migrate()
        assert store.schema_revision() == HEAD
        assert f"store schema upgraded to {HEAD}" in caplog.text
        store.set_tenant("acme", weight=2)

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aimass.store"):
            store.migrate()
            SqlStore.open(url).close()
        assert "upgraded" not in caplog.text
        assert store.schema_revision() == HEAD
        tenant = store.get_tenant("acme")
        assert tenant is not None and tenant.weight == 2
    finally:
        store.close()


def test_migrated_schema_matches_the_metadata(url: str) -> None:
    store = SqlStore(url)
    try:
        # Not vacuous: before migrating, the comparison sees every table missing.
        missing = {diff[1].name for diff in schema_diff(url) if isinstance(diff, tuple) and diff[0] == "add_table"}
        assert missing == set(schema.metadata.tables)
        store.migrate()
        assert schema_diff(url) == []
    finally:
        store.close()


CHILD = """
import logging, os, pathlib, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from aimass.store import SqlStore
go = pathlib.Path(sys.argv[2])
pathlib.Path(f"{go}.{os.getpid()}.ready").touch()
while not go.exists():
    time.sleep(0.002)
store = SqlStore.open(sys.argv[1])
for _ in range(25):
    store.add_llm_usage("2025-03-01", {"acme": 1})
    store.ensure_tenant("acme")
print(store.schema_revision())
store.close()
"""


def test_processes_migrating_and_writing_one_fresh_database_at_once_all_succeed(url: str, tmp_path: Path) -> None:
    """Gateways, the scheduler and the CLI start together on a new store: they take turns migrating, then write
    without losing an update."""
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        # Released together once all have imported, so their migrations overlap.
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*.ready"))) < len(children):
            assert time.monotonic() < deadline, "the child processes did not start"
            assert all(child.poll() is None for child in children), [child.communicate() for child in children]
            time.sleep(0.01)
        go.touch()
        results = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert out.strip() == HEAD
    # One migrated; the others waited for it and found nothing to do.
    assert sum(err.count(f"store schema upgraded to {HEAD}") for _, err in results) == 1
    store = SqlStore(url)
    try:
        assert store.schema_revision() == HEAD
        assert store.llm_usage("2025-03-01") == {"acme": 25 * len(children)}
    finally:
        store.close()


def test_a_schema_newer_than_this_code_is_refused(url: str) -> None:
    store = SqlStore.open(url)
    try:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '9999'"))
        engine.dispose()
        with pytest.raises(RuntimeError, match=r"9999.*upgrade this one"):
            store.migrate()
    finally:
        store.close()


def test_sqlite_files_are_owner_only_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "aimass.db"
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        store.create_key("acme", [keys.SCOPE_INFER])
        wal = path.with_name("aimass.db-wal")
        assert wal.exists(), "a pooled connection keeps the write-ahead log open"
        for owner_only in (path, wal, path.with_name("aimass.db.migrate.lock")):
            assert stat.S_IMODE(owner_only.stat().st_mode) == 0o600, owner_only
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        engine.dispose()
    finally:
        store.close()


def test_unsupported_urls_are_refused(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory"):
            SqlStore(url)
    with pytest.raises(ValueError, match="not supported"):
        SqlStore("mysql://aimass@127.0.0.1/aimass")


# -- tenants


def test_tenants_are_created_updated_and_listed(store: SqlStore) -> None:
    assert store.get_tenant("acme") is None
    assert store.list_tenants() == []
    before = now_ms()
    created = store.set_tenant("acme", requests_per_second=5, llm_tokens_per_day=2**40)
    assert created == TenantRecord(
        "acme",
        requests_per_second=5.0,
        llm_tokens_per_day=2**40,
        created_unix_ms=created.created_unix_ms,
        updated_unix_ms=created.updated_unix_ms,
    )
    assert before <= created.created_unix_ms == created.updated_unix_ms <= now_ms()

    time.sleep(0.005)
    updated = store.set_tenant("acme", max_priority=common_pb2.PRIORITY_HIGH, weight=2.5, max_concurrent=8)
    # Only the fields given change; the earlier ones stay.
    assert updated == dataclasses.replace(
        created, max_priority=3, weight=2.5, max_concurrent=8, updated_unix_ms=updated.updated_unix_ms
    )
    assert updated.updated_unix_ms > created.updated_unix_ms
    assert store.get_tenant("acme") == updated
    assert store.ensure_tenant("acme") == updated  # present: untouched

    store.set_tenant("zeta", llm_tokens_per_minute=100)
    beta = store.ensure_tenant("beta")
    assert beta == TenantRecord("beta", created_unix_ms=beta.created_unix_ms, updated_unix_ms=beta.created_unix_ms)
    assert [tenant.tenant_id for tenant in store.list_tenants()] == ["acme", "beta", "zeta"]
    store.set_tenant("acme", max_priority=0)  # back to the configured default
    reset = store.get_tenant("acme")
    assert reset is not None and reset.max_priority == 0 and reset.weight == 2.5


@pytest.mark.parametrize(
    ("tenant_id", "limits", "message"),
    [
        ("Acme Corp", {}, "tenant id"),
        ("", {}, "tenant id"),
        ("acme", {"requests_per_minute": 1}, "unknown tenant limit"),
        ("acme", {"max_concurrent": -1}, "0 .* or more"),
        ("acme", {"weight": float("nan")}, "or more"),
        ("acme", {"requests_per_second": float("inf")}, "or more"),
        ("acme", {"max_priority": 5}, "CRITICAL"),
        ("acme", {"max_concurrent": 2.5}, "whole number"),
        ("acme", {"llm_tokens_per_day": True}, "a number"),
    ],
)
def test_bad_tenant_settings_are_refused_and_change_nothing(
    store: SqlStore, tenant_id: str, limits: dict[str, float], message: str
) -> None:
    store.set_tenant("acme", max_concurrent=4)
    before = store.list_tenants()
    with pytest.raises(ValueError, match=message):
        store.set_tenant(tenant_id, **limits)
    assert store.list_tenants() == before


# -- keys


def test_a_new_key_is_found_by_its_hash(store: SqlStore) -> None:
    record, key = store.create_key("acme", [keys.SCOPE_INFER, keys.SCOPE_AUDIT_READ], name="ci", created_by="")
    match = keys.KEY_PATTERN.match(key)
    assert match is not None and match.group(1) == record.key_id == keys.key_id_of(key)
    assert record == KeyRecord(
        record.key_id,
        "acme",
        frozenset({"infer", "audit:read"}),
        name="ci",
        created_unix_ms=record.created_unix_ms,
    )
    assert record.usable(now_ms()) and record.state(now_ms()) == "active"
    assert store.get_tenant("acme") is not None, "the tenant is created with its first key"

    made_by, other = store.create_key("acme", [keys.SCOPE_INFER], created_by=record.key_id)
    assert made_by.created_by == record.key_id
    unknown = keys.hash_key(keys.new_key().key)
    assert store.keys_by_hash([keys.hash_key(key), unknown]) == {keys.hash_key(key): record}
    assert store.keys_by_hash([]) == {}
    # Thousands at once (a gateway refreshing its cache): past one statement's bound parameters.
    many = [secrets.token_hex(32) for _ in range(2500)] + [keys.hash_key(key), keys.hash_key(other)]
    assert store.keys_by_hash(many) == {keys.hash_key(key): record, keys.hash_key(other): made_by}
    assert store.get_key(record.key_id) == record
    assert store.get_key("nosuchkey000") is None


@pytest.mark.parametrize(
    ("tenant_id", "scopes", "message"),
    [
        ("acme", ["infer", "root"], "unknown scopes root"),
        ("acme", [], "at least one scope"),
        ("acme", [" "], "at least one scope"),
        ("ACME", ["infer"], "tenant id"),
    ],
)
def test_bad_keys_are_refused_and_store_nothing(
    store: SqlStore, tenant_id: str, scopes: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.create_key(tenant_id, scopes)
    assert store.list_keys() == [] and store.list_tenants() == []
    with pytest.raises(ValueError, match="expires_unix_ms"):
        store.create_key("acme", ["infer"], expires_unix_ms=-1)


def secret_of(key: str) -> str:
    """The random part of a key: what follows its prefix and id (token_urlsafe may itself hold '_')."""
    assert key.startswith(keys.KEY_PREFIX)
    return key[len(keys.KEY_PREFIX) + keys.KEY_ID_LENGTH + 1 :]


def test_the_key_itself_is_nowhere_in_the_database(store: SqlStore, url: str) -> None:
    made = [store.create_key(tenant, keys.ADMIN_SCOPES, name="k") for tenant in ("acme", "acme", "beta")]
    rows = dump(url)
    for record, key in made:
        secret = secret_of(key)
        assert key not in rows and secret not in rows
        assert keys.hash_key(key) in rows and record.key_id in rows  # the dump does see the keys' rows
    if url.startswith("sqlite"):
        # Nor in the file's bytes, the write-ahead log included.
        path = Path(url.removeprefix("sqlite:///"))
        raw = path.read_bytes() + path.with_name(path.name + "-wal").read_bytes()
        assert keys.hash_key(made[0][1]).encode() in raw
        assert not any(secret_of(key).encode() in raw for _, key in made)


def test_keys_are_listed_per_tenant_or_all(store: SqlStore) -> None:
    first, _ = store.create_key("acme", ["infer"])
    other, _ = store.create_key("beta", ["infer"])
    second, _ = store.create_key("acme", ["keys:admin"], name="admin")
    assert store.list_keys("acme") == [first, second]
    assert store.list_keys("beta") == [other]
    assert store.list_keys("nobody") == []
    assert sorted(store.list_keys(), key=lambda k: k.key_id) == sorted([first, second, other], key=lambda k: k.key_id)


def test_revoking_keeps_to_the_tenant_and_the_first_time(store: SqlStore) -> None:
    mine, key = store.create_key("acme", ["infer"])
    theirs, _ = store.create_key("beta", ["infer"])
    # Another tenant's key: not found, and not revoked.
    assert store.revoke_key(theirs.key_id, tenant_id="acme") is None
    assert store.get_key(theirs.key_id) == theirs
    assert store.revoke_key("nosuchkey000") is None

    revoked = store.revoke_key(mine.key_id, tenant_id="acme")
    assert revoked is not None and revoked.revoked_unix_ms >= mine.created_unix_ms
    assert revoked == dataclasses.replace(mine, revoked_unix_ms=revoked.revoked_unix_ms)
    assert revoked.state(now_ms()) == "revoked" and not revoked.usable(now_ms())
    # A gateway refreshing its cache sees the revocation.
    assert store.keys_by_hash([keys.hash_key(key)])[keys.hash_key(key)] == revoked
    time.sleep(0.005)
    assert store.revoke_key(mine.key_id) == revoked  # twice: the first time stays
    # The operator (no tenant given) may revoke any tenant's key.
    assert store.revoke_key(theirs.key_id) is not None


def test_keys_expire(store: SqlStore) -> None:
    now = now_ms()
    record, key = store.create_key("acme", ["infer"], expires_unix_ms=now + 60_000)
    assert store.keys_by_hash([keys.hash_key(key)])[keys.hash_key(key)].expires_unix_ms == now + 60_000
    assert record.usable(now) and record.state(now + 59_999) == "active"
    assert not record.usable(now + 60_000) and record.state(now + 60_000) == "expired"
    never = KeyRecord("k", "acme", frozenset({"infer"}))
    assert never.usable(2**62) and never.state(2**62) == "active"
    # Revoked wins over expired: it is what was done to the key.
    both = dataclasses.replace(record, revoked_unix_ms=now + 1)
    assert both.state(now + 120_000) == "revoked" and not both.usable(now)


# -- audit


def test_audit_events_are_listed_newest_first_and_filtered_and_pruned(store: SqlStore) -> None:
    created = AuditEvent(
        1000,
        "keys.create",
        "ok",
        tenant_id="acme",
        key_id="adminkey0001",
        target="newkey000001",
        detail="scopes=infer",
        peer="ipv4:10.0.0.7:51234",
    )
    refused = AuditEvent(
        2000, "auth.refused", "UNAUTHENTICATED", target="/aimass.v1.Nlp/Embed", detail="bad key", count=7
    )
    revoked = AuditEvent(3000, "keys.revoke", "ok", tenant_id="beta", target="newkey000002")
    loaded = AuditEvent(3000, "models.load", "PERMISSION_DENIED", tenant_id="acme", target="vision/resnet")
    store.add_audit([created, refused])
    store.add_audit([revoked, loaded])
    store.add_audit([])

    events = store.list_audit()
    # Newest first; at the same millisecond, the later written first.
    assert [event.action for event in events] == ["models.load", "keys.revoke", "auth.refused", "keys.create"]
    assert len({event.id for event in events}) == 4 and all(event.id > 0 for event in events)
    assert events[-1] == dataclasses.replace(created, id=events[-1].id)
    assert events[2] == dataclasses.replace(refused, id=events[2].id)

    assert [event.at_unix_ms for event in store.list_audit(since_unix_ms=2000)] == [3000, 3000, 2000]
    assert {event.action for event in store.list_audit(tenant_id="acme")} == {"keys.create", "models.load"}
    assert [event.action for event in store.list_audit(tenant_id="")] == ["auth.refused"]
    assert [event.action for event in store.list_audit(action_prefix="keys.")] == ["keys.revoke", "keys.create"]
    assert [event.action for event in store.list_audit(action_prefix="keys.", tenant_id="acme")] == ["keys.create"]
    # A prefix is literal and case-sensitive on every backend (no LIKE wildcards).
    assert store.list_audit(action_prefix="keys_") == [] and store.list_audit(action_prefix="KEYS.") == []
    assert [event.action for event in store.list_audit(limit=2)] == ["models.load", "keys.revoke"]
    with pytest.raises(ValueError, match="limit"):
        store.list_audit(limit=0)

    assert store.prune_audit(2000) == 1
    assert [event.at_unix_ms for event in store.list_audit()] == [3000, 3000, 2000]
    assert store.prune_audit(2000) == 0


# -- LLM token usage


def test_llm_usage_adds_deltas_per_tenant_per_day(store: SqlStore) -> None:
    assert store.llm_usage("2025-03-01") == {}
    store.add_llm_usage("2025-03-01", {"acme": 100, "beta": 5})
    store.add_llm_usage("2025-03-01", {"acme": 50, "gamma": 0})
    store.add_llm_usage("2025-03-02", {"acme": 2**40})
    store.add_llm_usage("2025-03-02", {})
    assert store.llm_usage("2025-03-01") == {"acme": 150, "beta": 5}
    assert store.llm_usage("2025-03-02") == {"acme": 2**40}
    for day in ("2025-3-1", "2025-02-30", "today"):
        with pytest.raises(ValueError, match="YYYY-MM-DD"):
            store.add_llm_usage(day, {"acme": 1})
    with pytest.raises(ValueError, match="whole number"):
        store.add_llm_usage("2025-03-01", {"acme": -1})
    assert store.llm_usage("2025-03-01") == {"acme": 150, "beta": 5}


# -- several processes on one store


def test_stores_on_one_url_share_writes_and_concurrent_updates_add_up(store: SqlStore, url: str) -> None:
    # PostgreSQL: also the bare scheme, which means psycopg 3 here.
    other = SqlStore.open(url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        store.set_tenant("acme", weight=3)
        seen = other.get_tenant("acme")
        assert seen is not None and seen.weight == 3
        record, key = other.create_key("acme", ["infer"])
        assert store.keys_by_hash([keys.hash_key(key)]) == {keys.hash_key(key): record}
        store.revoke_key(record.key_id)
        revoked = other.get_key(record.key_id)
        assert revoked is not None and revoked.state(now_ms()) == "revoked"
        other.add_audit([AuditEvent(now_ms(), "tenants.set", "ok", tenant_id="acme")])
        assert [event.action for event in store.list_audit()] == ["tenants.set"]

        # Schedulers and gateways writing at once: no update is lost, no tenant created twice.
        def work(index: int) -> None:
            target = (store, other)[index % 2]
            for round_ in range(20):
                target.add_llm_usage("2025-03-01", {"acme": 1, "beta": 2})
                target.ensure_tenant(f"t{round_ % 5}")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        assert store.llm_usage("2025-03-01") == {"acme": 80, "beta": 160}
        assert [tenant.tenant_id for tenant in other.list_tenants()] == ["acme", "t0", "t1", "t2", "t3", "t4"]
    finally:
        other.close()


def test_assistant_sessions_are_per_tenant_and_expire(store: SqlStore) -> None:
    now = now_ms()
    kept = SessionRecord(
        "acme", "kitchen", "Be brief.", (("user", "Hi"), ("assistant", "Hello!")), now, now, now + 60_000
    )
    store.put_session(kept)
    store.put_session(SessionRecord("acme", "old", "", (), now - 10, now - 10, now - 1))
    store.put_session(SessionRecord("other", "kitchen", "", (), now, now, now + 60_000))
    assert store.get_session("acme", "kitchen", now) == kept
    assert store.get_session("acme", "old", now) is None  # expired
    assert store.get_session("nobody", "kitchen", now) is None
    assert [s.session_id for s in store.list_sessions("acme", now)] == ["kitchen"]
    assert store.count_sessions("acme", now) == 1
    assert store.prune_sessions("acme", now) == 1
    longer = dataclasses.replace(kept, messages=(*kept.messages, ("user", "Again")), updated_unix_ms=now + 5)
    store.put_session(longer)
    assert store.get_session("acme", "kitchen", now) == longer
    assert store.delete_session("acme", "kitchen") and not store.delete_session("acme", "kitchen")
    assert store.get_session("other", "kitchen", now) is not None


def test_scenarios_are_per_tenant_and_keep_their_creation_time(store: SqlStore) -> None:
    first = store.put_scenario(ScenarioRecord("acme", "triage", "name: triage"))
    assert first.created_unix_ms == first.updated_unix_ms > 0
    again = store.put_scenario(ScenarioRecord("acme", "triage", "name: triage\n# v2"))
    assert again.created_unix_ms == first.created_unix_ms and again.source.endswith("v2")
    assert store.get_scenario("acme", "triage") == again
    assert store.get_scenario("other", "triage") is None
    store.put_scenario(ScenarioRecord("acme", "alpha", "name: alpha"))
    assert [s.name for s in store.list_scenarios("acme")] == ["alpha", "triage"] and store.count_scenarios("acme") == 2
    assert store.list_scenarios("other") == []
    assert store.delete_scenario("acme", "alpha") and not store.delete_scenario("acme", "alpha")
