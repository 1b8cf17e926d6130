"""The store's model lifecycle (aimass.store): dataset versions with quotas and grants, model versions, deployments
with their sync generation, and training jobs, against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine

from aimass.store import schema
from aimass.store.records import DatasetSummary, DatasetVersionRecord, DeploymentRecord, ModelVersionRecord, now_ms
from aimass.store.sql import QuotaExceeded, SqlStore, _alembic_config
from aimass.v1 import datasets_pb2, training_pb2
from tests.postgres import create_database, postgres_binaries, postgres_server
from tests.test_store import HEAD

TEXT = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
IMAGE = datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    training_pb2.JOB_STATE_QUEUED,
    training_pb2.JOB_STATE_RUNNING,
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
)
_databases = itertools.count()


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL server for this module; each test gets a database of its own on it (``url``)."""
    if postgres_binaries() is None:
        pytest.skip(
            "PostgreSQL 15 binaries (initdb, pg_ctl) not found: not on PATH, nor in /usr/lib/postgresql/*/bin "
            "(Debian: apt-get install postgresql-15)"
        )
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'aimass.db'}"
    server: str = request.getfixturevalue("postgres_url")
    return create_database(server, f"lifecycle_{next(_databases)}")


@pytest.fixture
def store(url: str) -> Iterator[SqlStore]:
    opened = SqlStore.open(url)
    yield opened
    opened.close()


def dataset(
    owner: str,
    name: str,
    content: bytes,
    *,
    task: datasets_pb2.TrainingTask.ValueType = TEXT,
    classes: list[tuple[str, int]] | None = None,
) -> DatasetVersionRecord:
    """A dataset version record as DatasetService makes one: the file's hash, size and validation report."""
    sha256 = hashlib.sha256(content).hexdigest()
    classes = classes if classes is not None else [("billing", 3), ("outage", 2)]
    report = datasets_pb2.ValidationReport(
        rows_read=6,
        rows_kept=sum(count for _, count in classes),
        rows_dropped=1,
        issue_counts={"EMPTY_TEXT": 1},
        issues=[datasets_pb2.RowIssue(line=4, kind="EMPTY_TEXT", detail="the text is empty")],
        classes=[datasets_pb2.ClassCount(label=label, count=count) for label, count in classes],
    )
    return DatasetVersionRecord(
        owner=owner,
        name=name,
        version=sha256[:12],
        sha256=sha256,
        size_bytes=len(content),
        rows=report.rows_kept,
        task=task,
        format=datasets_pb2.DATASET_FORMAT_CSV,
        text_column="text",
        label_column="label",
        classes=classes,
        report=report.SerializeToString(),
    )


def model(owner: str, name: str, source: DatasetVersionRecord, *, artifact: bytes = b"head") -> ModelVersionRecord:
    evaluation = training_pb2.Evaluation(
        accuracy=0.9, macro_f1=0.88, labels=["billing", "outage"], confusion=[9, 1, 1, 9], train_rows=80, eval_rows=20
    )
    return ModelVersionRecord(
        owner=owner,
        name=name,
        version=0,
        task=source.task,
        base_model="all-MiniLM-L6-v2",
        job_id=f"job-{hashlib.sha256(artifact).hexdigest()[:8]}",
        dataset_owner=source.owner,
        dataset_name=source.name,
        dataset_version=source.version,
        dataset_sha256=source.sha256,
        labels=["billing", "outage"],
        hyperparameters=training_pb2.Hyperparameters(epochs=60, learning_rate=0.01, seed=7).SerializeToString(),
        evaluation=evaluation.SerializeToString(),
        artifact_sha256=hashlib.sha256(artifact).hexdigest(),
        artifact_bytes=len(artifact),
        export_sha256=hashlib.sha256(artifact + b".zip").hexdigest(),
        export_bytes=len(artifact) + 4,
        code_version="0.14.0",
    )


# -- datasets


def test_dataset_versions_are_stored_once_per_content_and_ordered(store: SqlStore) -> None:
    first = dataset("acme", "tickets", b"text,label\nrefund please,billing\n")
    before = now_ms()
    stored, existed = store.add_dataset_version(first, quota_bytes=10_000)
    assert not existed
    assert before <= stored.created_unix_ms <= now_ms()
    assert stored == dataclasses.replace(first, created_unix_ms=stored.created_unix_ms)
    # Everything comes back as it went in, the validation report included.
    [read] = store.dataset_versions("acme", "tickets")
    assert read == stored
    report = datasets_pb2.ValidationReport.FromString(read.report)
    assert report.issues[0].kind == "EMPTY_TEXT" and [c.label for c in report.classes] == ["billing", "outage"]
    assert read.classes == (("billing", 3), ("outage", 2))

    # The same bytes again: the same version, nothing new.
    again, existed = store.add_dataset_version(dataclasses.replace(first, created_unix_ms=now_ms()), quota_bytes=10_000)
    assert existed and again == stored
    assert len(store.dataset_versions("acme", "tickets")) == 1

    # Versions uploaded in the same millisecond still have one newest (the later one).
    second = dataclasses.replace(
        dataset("acme", "tickets", b"text,label\nsite down,outage\n"), created_unix_ms=stored.created_unix_ms
    )
    newer, existed = store.add_dataset_version(second, quota_bytes=10_000)
    assert not existed and newer.created_unix_ms > stored.created_unix_ms
    assert [v.version for v in store.dataset_versions("acme", "tickets")] == [first.version, second.version]
    assert store.get_dataset_version("acme", "acme", "tickets") == newer
    assert store.get_dataset_version("acme", "acme", "tickets", first.version) == stored
    assert store.get_dataset_version("acme", "acme", "tickets", "000000000000") is None
    assert store.get_dataset_version("acme", "acme", "nothing") is None


def test_storage_quota_counts_each_file_once(store: SqlStore) -> None:
    content = b"x" * 600
    assert store.storage_used("acme") == 0
    store.add_dataset_version(dataset("acme", "one", content), quota_bytes=1000)
    assert store.storage_used("acme") == 600
    # The same bytes under another name cost nothing more...
    _, existed = store.add_dataset_version(dataset("acme", "two", content), quota_bytes=1000)
    assert not existed
    assert store.storage_used("acme") == 600
    assert [s.name for s in store.visible_datasets("acme")] == ["one", "two"]
    # ...but new bytes past the quota are refused, with the numbers, and nothing is stored.
    with pytest.raises(QuotaExceeded, match="600 of 1,000 bytes") as refused:
        store.add_dataset_version(dataset("acme", "three", b"y" * 401), quota_bytes=1000)
    assert (refused.value.used, refused.value.quota, refused.value.wanted) == (600, 1000, 401)
    assert isinstance(refused.value, ValueError)
    assert store.dataset_versions("acme", "three") == [] and store.storage_used("acme") == 600
    # Exactly up to the quota is allowed; another tenant has its own.
    store.add_dataset_version(dataset("acme", "three", b"y" * 400), quota_bytes=1000)
    assert store.storage_used("acme") == 1000
    store.add_dataset_version(dataset("beta", "one", b"z" * 900), quota_bytes=1000)
    assert store.storage_used("beta") == 900 and store.storage_used("acme") == 1000

    # Deleting one of two names of a file keeps its bytes counted; deleting the last frees them.
    store.delete_dataset("acme", "one")
    assert store.storage_used("acme") == 1000
    store.delete_dataset("acme", "two")
    assert store.storage_used("acme") == 400


def test_concurrent_uploads_never_pass_the_quota(store: SqlStore, url: str) -> None:
    """Uploads racing from two processes' stores: the quota check and the insert are one step."""
    other = SqlStore.open(url)
    try:
        records = [dataset("acme", f"d{i}", bytes([i]) * 100) for i in range(12)]
        barrier = threading.Barrier(len(records))

        def add(index: int) -> bool:
            barrier.wait()
            try:
                (store, other)[index % 2].add_dataset_version(records[index], quota_bytes=550)
            except QuotaExceeded:
                return False
            return True

        with ThreadPoolExecutor(len(records)) as pool:
            accepted = list(pool.map(add, range(len(records))))
        assert sum(accepted) == 5
        assert store.storage_used("acme") == 500
        assert sorted(s.name for s in other.visible_datasets("acme")) == sorted(
            r.name for r, ok in zip(records, accepted, strict=True) if ok
        )
    finally:
        other.close()


def test_tenants_see_only_their_own_datasets_and_those_shared_with_them(store: SqlStore) -> None:
    mine = store.add_dataset_version(dataset("acme", "tickets", b"a"), quota_bytes=100)[0]
    secret = store.add_dataset_version(dataset("acme", "payroll", b"b"), quota_bytes=100)[0]
    theirs = store.add_dataset_version(dataset("beta", "photos", b"c", task=IMAGE), quota_bytes=100)[0]

    assert store.visible_datasets("beta") == [DatasetSummary("beta", "photos", IMAGE, (theirs,))]
    assert store.visible_datasets("gamma") == []
    # Another tenant's dataset reads as absent, by name or by version.
    assert store.get_dataset_version("beta", "acme", "tickets") is None
    assert store.get_dataset_version("beta", "acme", "tickets", mine.version) is None

    assert store.grant_dataset("acme", "tickets", "beta") is True
    assert store.grant_dataset("acme", "tickets", "beta") is False  # already
    assert store.grant_dataset("acme", "tickets", "gamma") is True
    assert store.grant_dataset("acme", "nothing", "beta") is False  # no such dataset: nothing granted
    assert store.dataset_grants("acme", "tickets") == ["beta", "gamma"]
    assert store.dataset_grants("acme", "nothing") == []
    with pytest.raises(ValueError, match="another tenant"):
        store.grant_dataset("acme", "tickets", "acme")
    with pytest.raises(ValueError, match="tenant id"):
        store.grant_dataset("acme", "tickets", "Not A Tenant")

    # The grantee sees it (without the owner's list of grants); the owner sees whom it shared with.
    assert store.visible_datasets("beta") == [
        DatasetSummary("acme", "tickets", TEXT, (mine,)),
        DatasetSummary("beta", "photos", IMAGE, (theirs,)),
    ]
    assert store.visible_datasets("acme") == [
        DatasetSummary("acme", "payroll", TEXT, (secret,)),
        DatasetSummary("acme", "tickets", TEXT, (mine,), shared_with=("beta", "gamma")),
    ]
    assert store.get_dataset_version("beta", "acme", "tickets") == mine
    assert store.get_dataset_version("beta", "acme", "payroll") is None  # one grant shares one dataset

    assert store.revoke_dataset("acme", "tickets", "beta") is True
    assert store.revoke_dataset("acme", "tickets", "beta") is False
    assert store.get_dataset_version("beta", "acme", "tickets") is None
    assert [s.name for s in store.visible_datasets("beta")] == ["photos"]
    assert [s.owner for s in store.visible_datasets("gamma")] == ["acme"]


def test_deleting_versions_and_blob_references(store: SqlStore) -> None:
    one = store.add_dataset_version(dataset("acme", "tickets", b"one"), quota_bytes=100)[0]
    two = store.add_dataset_version(dataset("acme", "tickets", b"two"), quota_bytes=100)[0]
    store.grant_dataset("acme", "tickets", "beta")
    assert store.sha256_referenced(one.sha256) and store.sha256_referenced(two.sha256)

    assert store.delete_dataset("beta", "tickets") == []  # not beta's: nothing happens
    assert store.delete_dataset("acme", "tickets", "ffffffffffff") == []
    assert store.delete_dataset("acme", "tickets", one.version) == [one]
    assert not store.sha256_referenced(one.sha256)
    assert store.dataset_versions("acme", "tickets") == [two]
    assert store.dataset_grants("acme", "tickets") == ["beta"], "grants stay while a version does"

    # A model trained on it keeps its artifact and export referenced after the dataset goes.
    trained = store.add_model_version(model("acme", "router", two))
    assert store.delete_dataset("acme", "tickets") == [two]
    assert store.dataset_grants("acme", "tickets") == [] and store.visible_datasets("beta") == []
    assert not store.sha256_referenced(two.sha256)
    assert store.sha256_referenced(trained.artifact_sha256) and store.sha256_referenced(trained.export_sha256)
    assert not store.sha256_referenced(hashlib.sha256(b"never stored").hexdigest())
    # A new dataset of the same name starts without the old grants.
    store.add_dataset_version(dataset("acme", "tickets", b"three"), quota_bytes=100)
    assert store.get_dataset_version("beta", "acme", "tickets") is None


def test_bad_dataset_records_are_refused(store: SqlStore) -> None:
    good = dataset("acme", "tickets", b"a")
    for change, message in (
        ({"owner": "Acme Corp"}, "tenant id"),
        ({"name": ""}, "dataset name"),
        ({"name": "x" * 64}, "dataset name"),
        ({"sha256": "ABC"}, "not a SHA-256"),
        ({"version": "0123456789ab"}, "first 12 hex digits"),
        ({"size_bytes": -1}, "size_bytes"),
    ):
        with pytest.raises(ValueError, match=message):
            store.add_dataset_version(dataclasses.replace(good, **change), quota_bytes=100)
    assert store.visible_datasets("acme") == [] and store.visible_datasets("") == []


# -- model versions


def test_model_versions_are_numbered_per_model(store: SqlStore) -> None:
    source = store.add_dataset_version(dataset("acme", "tickets", b"a"), quota_bytes=100)[0]
    first = store.add_model_version(model("acme", "router", source, artifact=b"1"))
    assert first.version == 1 and first.created_unix_ms > 0
    second = store.add_model_version(model("acme", "router", source, artifact=b"2"))
    other = store.add_model_version(model("acme", "other", source))
    theirs = store.add_model_version(model("beta", "router", source))
    assert (second.version, other.version, theirs.version) == (2, 1, 1)

    assert store.model_versions("acme") == [other, first, second]
    assert store.model_versions("acme", "router") == [first, second]
    assert store.model_versions("gamma") == []
    read = store.get_model_version("acme", "router", 2)
    assert read == second
    assert read is not None and read.labels == ("billing", "outage")
    assert training_pb2.Evaluation.FromString(read.evaluation).confusion == [9, 1, 1, 9]
    assert training_pb2.Hyperparameters.FromString(read.hyperparameters).seed == 7
    assert store.get_model_version("acme", "router", 3) is None
    assert store.get_model_version("beta", "other", 1) is None

    with pytest.raises(ValueError, match="artifact_sha256"):
        store.add_model_version(dataclasses.replace(first, artifact_sha256=""))
    with pytest.raises(ValueError, match="model name"):
        store.add_model_version(dataclasses.replace(first, name="Router"))


def test_concurrent_model_versions_get_consecutive_numbers(store: SqlStore, url: str) -> None:
    """Two jobs finishing at once in two schedulers' stores: 1..n, no number twice, none lost."""
    other = SqlStore.open(url)
    try:
        source = dataset("acme", "tickets", b"a")
        barrier = threading.Barrier(8)

        def add(index: int) -> int:
            barrier.wait()
            return (store, other)[index % 2].add_model_version(model("acme", "router", source)).version

        with ThreadPoolExecutor(8) as pool:
            numbers = list(pool.map(add, range(8)))
        assert sorted(numbers) == list(range(1, 9))
        assert [v.version for v in store.model_versions("acme", "router")] == list(range(1, 9))
    finally:
        other.close()


# -- deployments


def test_every_deployment_change_bumps_the_generation(store: SqlStore) -> None:
    assert store.deployments() == (0, []) and store.deployment_generation() == 0
    assert store.get_deployment("acme", "router") is None

    deployed = store.put_deployment(DeploymentRecord("acme", "router", default_version=1))
    assert deployed == DeploymentRecord("acme", "router", default_version=1, generation=1)
    canary = store.put_deployment(dataclasses.replace(deployed, canary_version=2, canary_percent=10))
    assert canary.generation == 2
    theirs = store.put_deployment(DeploymentRecord("beta", "router", default_version=3))
    promoted = store.put_deployment(DeploymentRecord("acme", "router", default_version=2, previous_version=1))
    assert (theirs.generation, promoted.generation) == (3, 4)
    assert store.get_deployment("acme", "router") == promoted
    assert store.deployments() == (4, [promoted, theirs])

    assert store.delete_deployment("beta", "router") == 5
    assert store.delete_deployment("beta", "router") is None  # nothing to delete: no change
    assert store.deployments() == (5, [promoted])

    for bad, message in (
        ({"canary_percent": 100, "canary_version": 3}, "0-99"),
        ({"canary_percent": 10}, "no canary version"),
        ({"default_version": -1}, "default_version"),
        ({"name": "Bad Name"}, "model name"),
    ):
        with pytest.raises(ValueError, match=message):
            store.put_deployment(dataclasses.replace(promoted, **bad))
    assert store.deployment_generation() == 5


def test_concurrent_deployment_changes_get_distinct_generations(store: SqlStore, url: str) -> None:
    """Schedulers changing deployments at once: every change its own generation, none lost, no deadlock between
    changes and removals of one model."""
    other = SqlStore.open(url)
    try:

        def put(index: int) -> int:
            record = DeploymentRecord("acme", f"m{index % 3}", default_version=index + 1)
            return (store, other)[index % 2].put_deployment(record).generation

        with ThreadPoolExecutor(6) as pool:
            generations = list(pool.map(put, range(12)))
        assert sorted(generations) == list(range(1, 13))
        generation, records = other.deployments()
        assert generation == 12 and [r.name for r in records] == ["m0", "m1", "m2"]
        # Each model's row is the change with the highest generation among its own.
        for record in records:
            assert record.generation == max(g for i, g in enumerate(generations) if f"m{i % 3}" == record.name)

        def put_or_delete(index: int) -> int | None:
            target = (store, other)[index % 2]
            if index % 3 == 0:
                return target.delete_deployment("acme", "m0")
            return target.put_deployment(DeploymentRecord("acme", "m0", default_version=index)).generation

        with ThreadPoolExecutor(6) as pool:
            changes = [g for g in pool.map(put_or_delete, range(30)) if g is not None]
        assert sorted(changes) == list(range(13, 13 + len(changes)))
        assert store.deployment_generation() == 12 + len(changes)
    finally:
        other.close()


# -- training jobs


def job_bytes(job_id: str, state: training_pb2.JobState.ValueType, stage: str = "") -> bytes:
    return training_pb2.TrainingJob(job_id=job_id, owner="acme", state=state, stage=stage).SerializeToString()


def test_training_jobs(store: SqlStore) -> None:
    assert store.get_job("j1") is None and store.list_jobs("acme") == []
    first = store.add_job("j1", "acme", QUEUED, job_bytes("j1", QUEUED), 1000)
    store.add_job("j2", "acme", QUEUED, job_bytes("j2", QUEUED), 2000)
    store.add_job("j3", "beta", QUEUED, job_bytes("j3", QUEUED), 1500)
    with pytest.raises(ValueError, match="exists already"):
        store.add_job("j1", "acme", QUEUED, b"", 3000)
    with pytest.raises(ValueError, match="tenant id"):
        store.add_job("j9", "", QUEUED, b"", 3000)
    assert store.get_job("j1") == first

    assert store.update_job("j1", RUNNING, job_bytes("j1", RUNNING, "training"))
    assert not store.update_job("nope", RUNNING, b"")
    running = store.get_job("j1")
    assert running is not None and running.state == RUNNING and running.created_unix_ms == 1000
    assert training_pb2.TrainingJob.FromString(running.job).stage == "training"

    # A job cancelled meanwhile is not made SUCCEEDED by a trainer's late result.
    assert store.update_job("j2", CANCELLED, job_bytes("j2", CANCELLED))
    assert not store.update_job("j2", SUCCEEDED, job_bytes("j2", SUCCEEDED), expected_states={QUEUED, RUNNING})
    assert store.update_job("j1", SUCCEEDED, job_bytes("j1", SUCCEEDED), expected_states={QUEUED, RUNNING})
    after = store.get_job("j2")
    assert after is not None and after.state == CANCELLED

    assert [j.job_id for j in store.list_jobs("acme")] == ["j2", "j1"]  # newest first
    assert [j.job_id for j in store.list_jobs("acme", limit=1)] == ["j2"]
    assert [j.job_id for j in store.list_jobs("beta")] == ["j3"]
    with pytest.raises(ValueError, match="limit"):
        store.list_jobs("acme", limit=0)
    store.add_job("j4", "beta", RUNNING, job_bytes("j4", RUNNING), 500)
    assert [j.job_id for j in store.jobs_in_states({QUEUED, RUNNING})] == ["j4", "j3"]  # oldest first
    assert store.jobs_in_states({FAILED}) == []
    assert store.count_jobs("acme", {QUEUED, RUNNING}) == 0
    assert store.count_jobs("beta", {QUEUED, RUNNING}) == 2
    assert store.count_jobs("acme", {SUCCEEDED, CANCELLED}) == 2


# -- migration


def test_a_store_at_the_first_revision_upgrades_with_its_data(url: str) -> None:
    """A store made before the model lifecycle existed: tenants and keys stay, the new tables arrive empty."""
    store = SqlStore(url)  # creates the SQLite file where it should be, owner-only
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0001")
    finally:
        engine.dispose()
    try:
        assert store.schema_revision() == "0001"
        record, _ = store.create_key("acme", ["infer"])
        store.migrate()
        assert store.schema_revision() == HEAD
        assert store.get_key(record.key_id) == record
        assert store.deployments() == (0, [])
        assert store.put_deployment(DeploymentRecord("acme", "router", default_version=1)).generation == 1
        assert set(schema.metadata.tables) >= {"dataset_versions", "model_versions", "training_jobs"}
    finally:
        store.close()
