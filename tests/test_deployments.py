"""DeploymentService on the control plane, seen by a real gRPC client: which versions of a tenant's own models serve,
and the replicas told so.

The servicer runs on a real grpc.aio server behind the runtime's request-scope and error interceptors, over a real
SqlStore (SQLite in the test's folder) holding versions with real head artifacts; the caller's tenant arrives as
the gateway sends it (``RequestScope.metadata``). ``ReplicaSync`` pushes each change to the replicas the test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from aimass.local_mesh import free_port
from aimass.runtime.config import NlpConfig
from aimass.runtime.custom_heads import CustomHeads, ModelHostServicer
from aimass.runtime.discovery import Instance
from aimass.runtime.interceptors import ErrorMappingInterceptor, ScopeInterceptor
from aimass.runtime.metadata import ERROR_INFO_KEY, REQUEST_ID_KEY
from aimass.runtime.scope import RequestScope
from aimass.store.blobs import BlobStore
from aimass.store.records import ModelVersionRecord
from aimass.store.sql import SqlStore
from aimass.training.artifact import IMAGE_BACKBONE, IMAGE_TASK, TEXT_BACKBONE, TEXT_TASK, HeadArtifact
from aimass.training.head import HeadSettings, default_settings, train_head
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    deployments_pb2,
    deployments_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    nlp_pb2,
    nlp_pb2_grpc,
    scheduler_pb2,
    training_pb2,
)
from scheduler.lifecycle.deployments import DeploymentServicer
from scheduler.lifecycle.replica_sync import ReplicaSync
from scheduler.service import SchedulerState
from services.nlp.engine import NlpEngine
from services.nlp.servicer import NlpServicer
from tests.eventually import eventually

TEXT = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
IMAGE = datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION
NLP = "aimass.v1.NlpService"
VISION = "aimass.v1.VisionService"
S = deployments_pb2
LABELS = ("billing", "shipping", "technical")


def head(base_model: str, seed: int) -> bytes:
    """A head artifact in the one format replicas load (weights of the right shape for the backbone)."""
    rng = np.random.default_rng(seed)
    dims = 384 if base_model == TEXT_BACKBONE else 1280
    task = TEXT_TASK if base_model == TEXT_BACKBONE else IMAGE_TASK
    return HeadArtifact(
        labels=LABELS,
        weight=rng.normal(size=(len(LABELS), dims)).astype(np.float32),
        bias=np.zeros(len(LABELS), dtype=np.float32),
        base_model=base_model,
        task=task,
        info={"seed": seed},
    ).to_bytes()


def add_version(
    store: SqlStore,
    owner: str,
    name: str,
    *,
    task: datasets_pb2.TrainingTask.ValueType = TEXT,
    seed: int = 0,
    export: bytes = b"",
    artifact: bytes = b"",
) -> ModelVersionRecord:
    base = TEXT_BACKBONE if task == TEXT else IMAGE_BACKBONE
    artifact = artifact or head(base, seed)
    dataset_sha = hashlib.sha256(f"{owner}/{name}/{seed}".encode()).hexdigest()
    return store.add_model_version(
        ModelVersionRecord(
            owner=owner,
            name=name,
            version=0,
            task=task,
            base_model=base,
            job_id=f"job-{name}-{seed}",
            dataset_owner=owner,
            dataset_name="tickets",
            dataset_version=dataset_sha[:12],
            dataset_sha256=dataset_sha,
            labels=LABELS,
            hyperparameters=training_pb2.Hyperparameters(epochs=60, learning_rate=0.01, seed=seed).SerializeToString(),
            evaluation=training_pb2.Evaluation(accuracy=0.9 + seed / 100, macro_f1=0.88).SerializeToString(),
            artifact_sha256=hashlib.sha256(artifact).hexdigest(),
            artifact_bytes=len(artifact),
            export_sha256=hashlib.sha256(export).hexdigest() if export else "",
            export_bytes=len(export),
            code_version="0.test",
        )
    )


@dataclass
class Plane:
    """The control plane's DeploymentService on loopback, its store, and the replicas its sync sees."""

    store: SqlStore
    blobs: BlobStore
    sync: ReplicaSync
    channel: grpc.aio.Channel
    replicas: list[Instance] = field(default_factory=list)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    # The scheduler's state, when heads go through placement.
    state: SchedulerState | None = None

    def stub(self) -> deployments_pb2_grpc.DeploymentServiceAsyncStub:
        return deployments_pb2_grpc.DeploymentServiceStub(self.channel)

    def channel_for(self, instance: Instance) -> grpc.aio.Channel:
        # By address too, as the scheduler's MeshChannels: an instance id back at another address gets a new channel.
        key = f"{instance.instance_id}@{instance.address}"
        if key not in self.channels:
            self.channels[key] = grpc.aio.insecure_channel(instance.address)
        return self.channels[key]


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    """The metadata the gateway sends for a caller of ``tenant``."""
    return RequestScope(tenant=tenant).metadata()


def ref(name: str, version: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = SqlStore.open(f"sqlite:///{tmp_path / 'aimass.db'}")
    yield opened
    opened.close()


@pytest.fixture
async def plane(store: SqlStore, tmp_path: Path) -> AsyncIterator[Plane]:
    async with running_plane(store, tmp_path, None) as running:
        yield running


@pytest.fixture
async def placed_plane(store: SqlStore, tmp_path: Path) -> AsyncIterator[Plane]:
    """The plane as the scheduler runs it: heads go through the scheduler's placement."""
    async with running_plane(store, tmp_path, SchedulerState(report_interval_s=60)) as running:
        yield running


@contextlib.asynccontextmanager
async def running_plane(store: SqlStore, tmp_path: Path, state: SchedulerState | None) -> AsyncIterator[Plane]:
    holder: list[Plane] = []
    sync = ReplicaSync(
        store,
        lambda: holder[0].replicas,
        lambda instance: holder[0].channel_for(instance),
        0.2,
        replica_timeout_s=1,
        placement=state,
    )
    blobs = BlobStore(tmp_path / "blobs")
    server = grpc.aio.server(interceptors=[ScopeInterceptor(), ErrorMappingInterceptor()])
    deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(DeploymentServicer(store, blobs, sync), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    running = Plane(store, blobs, sync, channel, state=state)
    holder.append(running)
    try:
        yield running
    finally:
        await sync.close()
        await channel.close()
        for replica_channel in running.channels.values():
            await replica_channel.close()
        await server.stop(0)


def states(model: deployments_pb2.CustomModel) -> dict[str, str]:
    return {
        v.version: deployments_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_") for v in model.versions
    }


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def reason_of(err: grpc.aio.AioRpcError) -> str:
    trailers = dict(err.trailing_metadata() or ())
    return common_pb2.ErrorInfo.FromString(trailers[ERROR_INFO_KEY]).reason


async def listed(plane: Plane, tenant: str, name: str = "") -> Sequence[deployments_pb2.CustomModel]:
    response = await plane.stub().ListCustomModels(
        S.ListCustomModelsRequest(model=common_pb2.ModelRef(name=name)), metadata=as_tenant(tenant), timeout=5
    )
    return list(response.models)


# -- the state machine -------------------------------------------------------------------------------------------


async def test_deploy_canary_promote_rollback_undeploy(plane: Plane) -> None:
    for seed in range(3):
        add_version(plane.store, "acme", "ticket-router", seed=seed)
    stub, meta = plane.stub(), as_tenant("acme")

    (model,) = await listed(plane, "acme")
    assert states(model) == {"1": "READY", "2": "READY", "3": "READY"}
    assert not model.HasField("deployment")

    # The first deploy becomes the default, whatever percentage it asks.
    first = await stub.DeployModel(
        S.DeployModelRequest(model=ref("ticket-router", "1"), canary_percent=10), metadata=meta
    )
    assert states(first.model) == {"1": "DEFAULT", "2": "READY", "3": "READY"}
    assert first.replicas_applied == 0  # no replica hosts text heads here: recorded all the same
    gen1 = first.model.deployment.generation
    assert gen1 > 0

    canary = await stub.DeployModel(
        S.DeployModelRequest(model=ref("ticket-router", "2"), canary_percent=10), metadata=meta
    )
    assert states(canary.model) == {"1": "DEFAULT", "2": "CANARY", "3": "READY"}
    assert canary.model.deployment.canary_percent == 10
    assert canary.model.deployment.generation > gen1

    promoted = await stub.PromoteModel(S.PromoteModelRequest(model=ref("ticket-router")), metadata=meta)
    assert states(promoted.model) == {"1": "STANDBY", "2": "DEFAULT", "3": "READY"}
    assert promoted.model.deployment.previous_version == "1"
    assert promoted.model.deployment.canary_version == ""
    assert promoted.model.deployment.canary_percent == 0

    # A new canary, then Rollback drops it (the default and its standby stay).
    await stub.DeployModel(S.DeployModelRequest(model=ref("ticket-router", "3"), canary_percent=25), metadata=meta)
    dropped = await stub.RollbackModel(S.RollbackModelRequest(model=ref("ticket-router")), metadata=meta)
    assert states(dropped.model) == {"1": "STANDBY", "2": "DEFAULT", "3": "READY"}
    # No canary left: Rollback returns the default to the version before the promotion.
    back = await stub.RollbackModel(S.RollbackModelRequest(model=ref("ticket-router")), metadata=meta)
    assert states(back.model) == {"1": "DEFAULT", "2": "READY", "3": "READY"}
    assert back.model.deployment.previous_version == ""

    # What a later listing shows is what the changes answered.
    (now,) = await listed(plane, "acme", "ticket-router")
    assert now.deployment == back.model.deployment

    gone = await stub.UndeployModel(S.UndeployModelRequest(model=ref("ticket-router")), metadata=meta)
    assert states(gone.model) == {"1": "READY", "2": "READY", "3": "READY"}
    assert not gone.model.HasField("deployment")
    assert plane.store.get_deployment("acme", "ticket-router") is None
    assert plane.store.deployment_generation() > back.model.deployment.generation


async def test_deploy_at_zero_percent_switches_the_default_and_keeps_the_old_one_on_standby(plane: Plane) -> None:
    for seed in range(3):
        add_version(plane.store, "acme", "router", seed=seed)
    stub, meta = plane.stub(), as_tenant("acme")
    await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
    await stub.DeployModel(S.DeployModelRequest(model=ref("router", "3"), canary_percent=5), metadata=meta)

    switched = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "2"), canary_percent=0), metadata=meta)
    # v2 is the default, v1 (the default it replaced) stands by, and the canary keeps its share.
    assert states(switched.model) == {"1": "STANDBY", "2": "DEFAULT", "3": "CANARY"}
    assert switched.model.deployment.canary_percent == 5

    # Promoting a named version works the same way; the canary promoted stops being a canary.
    promoted = await stub.PromoteModel(S.PromoteModelRequest(model=ref("router", "3")), metadata=meta)
    assert states(promoted.model) == {"1": "READY", "2": "STANDBY", "3": "DEFAULT"}

    # Undeploying the standby leaves the default serving alone; then the default may go by name.
    alone = await stub.UndeployModel(S.UndeployModelRequest(model=ref("router", "2")), metadata=meta)
    assert states(alone.model) == {"1": "READY", "2": "READY", "3": "DEFAULT"}
    last = await stub.UndeployModel(S.UndeployModelRequest(model=ref("router", "3")), metadata=meta)
    assert states(last.model) == {"1": "READY", "2": "READY", "3": "READY"}


async def test_a_request_that_changes_nothing_writes_nothing(plane: Plane) -> None:
    add_version(plane.store, "acme", "router")
    stub, meta = plane.stub(), as_tenant("acme")
    first = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
    again = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
    promote = await stub.PromoteModel(S.PromoteModelRequest(model=ref("router", "1")), metadata=meta)
    assert again.model.deployment == first.model.deployment == promote.model.deployment
    assert plane.store.deployment_generation() == first.model.deployment.generation


async def test_refusals_say_what_was_wrong_and_what_is_allowed(plane: Plane) -> None:
    for seed in range(3):
        add_version(plane.store, "acme", "router", seed=seed)
    stub, meta = plane.stub(), as_tenant("acme")

    def deploy(version: str, percent: int = 0, name: str = "router") -> Any:
        return stub.DeployModel(S.DeployModelRequest(model=ref(name, version), canary_percent=percent), metadata=meta)

    cases: list[tuple[Any, grpc.StatusCode, str, str]] = [
        (deploy("1", 100), grpc.StatusCode.INVALID_ARGUMENT, "BAD_CANARY_PERCENT", "send 1-99"),
        (deploy("1", -1), grpc.StatusCode.INVALID_ARGUMENT, "BAD_CANARY_PERCENT", "or 0 to make"),
        (deploy(""), grpc.StatusCode.INVALID_ARGUMENT, "NO_VERSION", "name the version"),
        (deploy("v2"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_VERSION", "numbered 1, 2"),
        (deploy("7"), grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND", "its versions: 1, 2, 3"),
        (deploy("1", name="nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "no model named 'nope'"),
        (deploy("1", name="Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "lowercase letters"),
        (
            stub.PromoteModel(S.PromoteModelRequest(model=ref("router")), metadata=meta),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOT_DEPLOYED",
            "DeployModel serves a version first",
        ),
        (
            stub.RollbackModel(S.RollbackModelRequest(model=ref("router")), metadata=meta),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOT_DEPLOYED",
            "is not deployed",
        ),
    ]
    for call, code, reason, words in cases:
        err = await refused(call)
        assert (err.code(), reason_of(err)) == (code, reason), err.details()
        assert words in (err.details() or "")

    await deploy("1")
    cases = [
        (
            stub.PromoteModel(S.PromoteModelRequest(model=ref("router")), metadata=meta),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_CANARY",
            "no canary to promote (it serves v1 (default))",
        ),
        (
            stub.RollbackModel(S.RollbackModelRequest(model=ref("router")), metadata=meta),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOTHING_TO_ROLL_BACK",
            "no canary and no previous default",
        ),
        (deploy("1", 10), grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_DEFAULT", "must be another version"),
    ]
    for call, code, reason, words in cases:
        err = await refused(call)
        assert (err.code(), reason_of(err)) == (code, reason), err.details()
        assert words in (err.details() or "")

    await deploy("2", 10)
    err = await refused(stub.UndeployModel(S.UndeployModelRequest(model=ref("router", "1")), metadata=meta))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "also serves v2; undeploy those first, or every version" in (err.details() or "")
    # Nothing refused changed anything.
    (model,) = await listed(plane, "acme")
    assert states(model) == {"1": "DEFAULT", "2": "CANARY", "3": "READY"}


async def test_another_tenants_model_is_not_found_like_one_that_does_not_exist(plane: Plane) -> None:
    add_version(plane.store, "acme", "router")
    add_version(plane.store, "acme", "secret-model")
    add_version(plane.store, "globex", "router", seed=5)
    acme, globex = as_tenant("acme"), as_tenant("globex")
    stub = plane.stub()
    await stub.DeployModel(S.DeployModelRequest(model=ref("secret-model", "1")), metadata=acme)

    # globex sees its own router only, never acme's models.
    (own,) = await listed(plane, "globex")
    assert (own.name, own.owner, states(own)) == ("router", "globex", {"1": "READY"})

    async def answers(tenant: tuple[tuple[str, str], ...], name: str) -> list[tuple[grpc.StatusCode, str]]:
        calls = [
            stub.ListCustomModels(S.ListCustomModelsRequest(model=common_pb2.ModelRef(name=name)), metadata=tenant),
            stub.DeployModel(S.DeployModelRequest(model=ref(name, "1")), metadata=tenant),
            stub.PromoteModel(S.PromoteModelRequest(model=ref(name, "1")), metadata=tenant),
            stub.RollbackModel(S.RollbackModelRequest(model=ref(name)), metadata=tenant),
            stub.UndeployModel(S.UndeployModelRequest(model=ref(name)), metadata=tenant),
        ]
        found = []
        for call in calls:
            err = await refused(call)
            found.append((err.code(), (err.details() or "").replace(name, "<name>")))
        export = stub.ExportModel(S.ExportModelRequest(model=ref(name)), metadata=tenant)
        err = await refused(export.read())
        found.append((err.code(), (err.details() or "").replace(name, "<name>")))
        return found

    # acme's deployed model, to globex, reads exactly like a name nobody has.
    theirs = await answers(globex, "secret-model")
    nobodys = await answers(globex, "no-such-model")
    assert theirs == nobodys
    assert {code for code, _ in theirs} == {grpc.StatusCode.NOT_FOUND}

    # acme's deployment is untouched, and globex's deploy of its own "router" leaves acme's alone.
    await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=globex)
    acme_models = {model.name: model for model in await listed(plane, "acme")}
    assert states(acme_models["secret-model"]) == {"1": "DEFAULT"}
    assert states(acme_models["router"]) == {"1": "READY"}


async def test_a_call_without_a_tenant_is_refused(plane: Plane) -> None:
    add_version(plane.store, "acme", "router")
    err = await refused(plane.stub().ListCustomModels(S.ListCustomModelsRequest()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "through the gateway with an API key" in (err.details() or "")


async def test_listing_shows_lineage_evaluation_and_the_method_that_serves(plane: Plane) -> None:
    text = add_version(plane.store, "acme", "ticket-router", seed=1)
    add_version(plane.store, "acme", "ticket-router", seed=2)
    image = add_version(plane.store, "acme", "parts", task=IMAGE, seed=3)
    models = {model.name: model for model in await listed(plane, "acme")}
    assert list(models) == ["parts", "ticket-router"]

    router = models["ticket-router"]
    assert (router.owner, router.task, router.method) == ("acme", TEXT, "aimass.v1.NlpService/Classify")
    assert [v.version for v in router.versions] == ["1", "2"]
    first = router.versions[0]
    assert first.job_id == text.job_id
    assert (first.dataset.owner, first.dataset.name, first.dataset.version) == ("acme", "tickets", text.dataset_version)
    assert first.dataset_sha256 == text.dataset_sha256
    assert first.base_model == "all-MiniLM-L6-v2"
    assert first.hyperparameters.epochs == 60 and first.hyperparameters.seed == 1
    assert first.evaluation.accuracy == pytest.approx(0.91)
    assert list(first.labels) == list(LABELS)
    assert (first.artifact_sha256, first.artifact_bytes) == (text.artifact_sha256, text.artifact_bytes)
    assert first.code_version == "0.test" and first.created_unix_ms > 0

    parts = models["parts"]
    assert (parts.task, parts.method) == (IMAGE, "aimass.v1.VisionService/Classify")
    assert parts.versions[0].base_model == image.base_model == "efficientnet-lite0"

    err = await refused(
        plane.stub().ListCustomModels(
            S.ListCustomModelsRequest(model=common_pb2.ModelRef(name="nope")), metadata=as_tenant("acme")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


# -- export ------------------------------------------------------------------------------------------------------


def edge_zip(labels: int) -> bytes:
    """A ZIP as the trainer leaves it in the blob store: a head over EfficientNet-Lite0 features and its labels."""
    rng = np.random.default_rng(labels)
    names = tuple(f"part-{index}" for index in range(labels))
    artifact = HeadArtifact(
        labels=names,
        weight=rng.normal(size=(labels, 1280)).astype(np.float32),
        bias=np.zeros(labels, dtype=np.float32),
        base_model=IMAGE_BACKBONE,
        task=IMAGE_TASK,
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("head.npz", artifact.to_bytes())
        archive.writestr("labels.json", json.dumps(list(names)))
    return buffer.getvalue()


async def test_export_streams_the_versions_zip_in_chunks_with_its_name_size_and_checksum(plane: Plane) -> None:
    old, new = edge_zip(10), edge_zip(450)  # the second is past two chunks of 1 MiB
    for data in (old, new):
        await asyncio.to_thread(plane.blobs.put_bytes, data)
    add_version(plane.store, "acme", "parts", task=IMAGE, seed=1, export=old)
    add_version(plane.store, "acme", "parts", task=IMAGE, seed=2, export=new)
    add_version(plane.store, "acme", "parts", task=IMAGE, seed=3)  # trained without an export
    stub, meta = plane.stub(), as_tenant("acme")

    async def export(version: str = "") -> list[deployments_pb2.ExportModelResponse]:
        return [
            chunk async for chunk in stub.ExportModel(S.ExportModelRequest(model=ref("parts", version)), metadata=meta)
        ]

    chunks = await export("2")
    assert len(chunks) == 3 and all(len(chunk.data) <= 1 << 20 for chunk in chunks)
    assert {chunk.total_bytes for chunk in chunks} == {len(new)}
    assert [chunk.filename for chunk in chunks] == ["parts-v2.zip", "", ""]
    assert [chunk.sha256 for chunk in chunks] == ["", "", hashlib.sha256(new).hexdigest()]
    data = b"".join(chunk.data for chunk in chunks)
    assert data == new
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert json.loads(archive.read("labels.json"))[-1] == "part-449"
        assert HeadArtifact.from_bytes(archive.read("head.npz")).weight.shape == (450, 1280)

    # No version named: the default once there is one, else the newest (which has no export here).
    err = await refused(stub.ExportModel(S.ExportModelRequest(model=ref("parts")), metadata=meta).read())
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.NOT_FOUND, "NO_EXPORT")
    assert "version 3 of model 'parts' has no export" in (err.details() or "")
    await stub.DeployModel(S.DeployModelRequest(model=ref("parts", "1")), metadata=meta)
    (only,) = await export()
    assert (only.data, only.filename, only.sha256) == (old, "parts-v1.zip", hashlib.sha256(old).hexdigest())

    err = await refused(
        stub.ExportModel(S.ExportModelRequest(model=ref("parts", "1"), format=7), metadata=meta).read()  # type: ignore[arg-type]
    )
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_EXPORT_FORMAT")


# -- replica sync --------------------------------------------------------------------------------------------------


async def test_sync_sends_each_service_only_its_tasks_heads(plane: Plane) -> None:
    add_version(plane.store, "acme", "router", seed=1)
    add_version(plane.store, "acme", "router", seed=2)
    parts = add_version(plane.store, "acme", "parts", task=IMAGE, seed=3)
    stub, meta = plane.stub(), as_tenant("acme")
    await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
    await stub.DeployModel(S.DeployModelRequest(model=ref("router", "2"), canary_percent=30), metadata=meta)
    await stub.DeployModel(S.DeployModelRequest(model=ref("parts", "1")), metadata=meta)

    desired = await plane.sync.desired()
    assert desired.generation == plane.store.deployment_generation()
    text = desired.for_tasks({TEXT})
    assert [(v.owner, v.name, v.version) for v in text.versions] == [("acme", "router", "1"), ("acme", "router", "2")]
    assert [(r.name, r.default_version, r.canary_version, r.canary_percent) for r in text.routes] == [
        ("router", "1", "2", 30)
    ]
    image = desired.for_tasks({IMAGE})
    assert [(v.name, v.version, v.artifact_sha256) for v in image.versions] == [("parts", "1", parts.artifact_sha256)]
    assert text.generation == image.generation == desired.generation


async def test_a_dead_replica_costs_no_more_than_its_timeout_and_is_logged_once_per_change(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(plane.store, "acme", "router", seed=1)
    add_version(plane.store, "acme", "router", seed=2)
    plane.replicas.append(Instance("nlp-dead", "nlp", (NLP,), f"127.0.0.1:{free_port()}"))  # nothing listens there
    stub, meta = plane.stub(), as_tenant("acme")
    plane.sync.start()
    caplog.set_level(logging.WARNING, logger="scheduler.lifecycle.replica_sync")

    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta, timeout=3)
    assert first.replicas_applied == 0
    assert loop.time() - started < 2.5  # the replica timeout (1 s) bounds the wait, not the call's deadline
    await asyncio.sleep(1.0)  # the loop retries every 0.2 s meanwhile

    second = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "2"), canary_percent=20), metadata=meta)
    assert second.replicas_applied == 0
    await asyncio.sleep(0.5)
    warnings = [r.getMessage() for r in caplog.records if "nlp-dead" in r.getMessage()]
    for generation in (first.model.deployment.generation, second.model.deployment.generation):
        # Once per change, however many rounds retried it.
        about = [message for message in warnings if f"generation {generation}:" in message]
        assert len(about) == 1, warnings
        assert "UNAVAILABLE" in about[0] and "retrying every 0.2 s" in about[0]


# -- a real NLP replica ------------------------------------------------------------------------------------------

# Support messages, written for this test: 12 a label to train on, and messages the heads never saw.
TRAIN: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my subscription this month",
        "Please refund the extra payment on my credit card",
        "My invoice shows the wrong amount",
        "Why did my monthly bill go up?",
        "I need a copy of last year's receipts for my accountant",
        "The payment failed but the money left my account",
        "Can I switch from monthly to annual billing?",
        "You billed me after I cancelled my plan",
        "How do I update the card you charge?",
        "There is a fee on my statement I do not recognise",
        "I want my money back for the unused months",
        "The discount code was not applied to my invoice",
    ],
    "shipping": [
        "My parcel has not arrived after two weeks",
        "The tracking number says the package is lost",
        "Can you deliver to my office address instead?",
        "The courier left the box at the wrong house",
        "How long does delivery to Canada take?",
        "My order shipped without the second item",
        "The package arrived crushed and the contents are broken",
        "I need express shipping for a birthday gift",
        "Tracking has not updated since Monday",
        "Can I change the delivery date of my order?",
        "The delivery driver never rang the bell",
        "Do you ship to post office boxes?",
    ],
    "technical": [
        "The app crashes every time I open the settings page",
        "I cannot log in, it says my password is wrong",
        "The website shows an error 500 when I upload a file",
        "Sync between my phone and laptop stopped working",
        "The export button does nothing in Firefox",
        "After the update the screen stays black on startup",
        "Two-factor authentication codes are rejected",
        "The API returns a timeout for every request",
        "Notifications stopped arriving on Android",
        "The program freezes when I open a large document",
        "I get a certificate warning when connecting",
        "Search returns no results even for exact titles",
    ],
}
UNSEEN = {
    "billing": "I think you overcharged my card, please give me a refund",
    "shipping": "Where is my package? The courier has not delivered it yet",
    "technical": "The app keeps crashing with an error when I log in",
}


@pytest.fixture(scope="module")
def trained_heads(nlp_engine: NlpEngine) -> list[bytes]:
    """Two versions of a support-ticket classifier (seeds 0 and 1) over the replica's own MiniLM features."""
    texts = [text for label in TRAIN for text in TRAIN[label]]
    labels = [label for label in TRAIN for _ in TRAIN[label]]
    features = nlp_engine.encode(texts, normalize=True)
    heads = []
    for seed in (0, 1):
        settings = HeadSettings.from_hyperparameters(
            default_settings(TEXT_TASK, training_pb2.Hyperparameters(seed=seed))
        )
        heads.append(train_head(features, labels, settings, base_model=TEXT_BACKBONE, task=TEXT_TASK).to_bytes())
    return heads


@dataclass
class Replica:
    address: str
    heads: CustomHeads
    server: grpc.aio.Server
    close: Callable[[], Awaitable[None]]
    host: CountingHost


class CountingHost(ModelHostServicer):
    """The replica's own ModelHostService, counting the pushes it was sent."""

    def __init__(self, heads: CustomHeads) -> None:
        super().__init__(heads)
        self.pushes = 0

    async def SyncCustomModels(
        self, request: lifecycle_pb2.SyncCustomModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lifecycle_pb2.SyncCustomModelsResponse:
        self.pushes += 1
        return await super().SyncCustomModels(request, context)


@contextlib.asynccontextmanager
async def replica(blobs: BlobStore, *, base_model: str, engine: NlpEngine | None = None) -> AsyncIterator[Replica]:
    """A replica's custom-head hosting on loopback: ModelHostService over CustomHeads fetching from the control
    plane's blob store, and (with ``engine``) the NLP replica's own NlpService serving them."""

    async def fetch(sha256: str) -> bytes:
        return await asyncio.to_thread(blobs.read_bytes, sha256)

    heads = CustomHeads(fetch, base_models=(base_model,), service="NlpService" if engine else "VisionService")
    server = grpc.aio.server(interceptors=[ScopeInterceptor(), ErrorMappingInterceptor()])
    host = CountingHost(heads)
    lifecycle_pb2_grpc.add_ModelHostServiceServicer_to_server(host, server)
    servicer = None
    if engine is not None:
        servicer = NlpServicer(engine, NlpConfig(), heads)
        await servicer.start()
        nlp_pb2_grpc.add_NlpServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def close() -> None:
        await server.stop(0)
        if servicer is not None:
            await servicer.close()

    try:
        yield Replica(f"127.0.0.1:{port}", heads, server, close, host)
    finally:
        await close()


async def classify(
    channel: grpc.aio.Channel, tenant: str, name: str, text: str, *, version: str = "", request_id: str = ""
) -> nlp_pb2.ClassifyResponse:
    metadata = RequestScope(tenant=tenant).metadata() + (((REQUEST_ID_KEY, request_id),) if request_id else ())
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    return await stub.Classify(
        nlp_pb2.ClassifyRequest(model=ref(name, version), texts=[text]), metadata=metadata, timeout=10
    )


async def test_a_real_nlp_replica_serves_each_change_once_deploy_returns(
    plane: Plane, nlp_engine: NlpEngine, trained_heads: list[bytes]
) -> None:
    for seed, artifact in enumerate(trained_heads):
        await asyncio.to_thread(plane.blobs.put_bytes, artifact)
        add_version(plane.store, "acme", "ticket-router", seed=seed, artifact=artifact)
    parts = edge_zip(3)  # an image model's head: vision replicas get it, NLP replicas never
    image_head = head(IMAGE_BACKBONE, 7)
    await asyncio.to_thread(plane.blobs.put_bytes, image_head)
    add_version(plane.store, "acme", "parts", task=IMAGE, seed=7, artifact=image_head, export=parts)
    stub, meta = plane.stub(), as_tenant("acme")

    async with (
        replica(plane.blobs, base_model=TEXT_BACKBONE, engine=nlp_engine) as nlp,
        replica(plane.blobs, base_model=IMAGE_BACKBONE) as vision,
    ):
        plane.replicas[:] = [
            Instance("nlp-1", "nlp", (NLP,), nlp.address),
            Instance("vision-1", "vision", (VISION,), vision.address),
        ]
        channel = grpc.aio.insecure_channel(nlp.address)
        try:
            deployed = await stub.DeployModel(S.DeployModelRequest(model=ref("ticket-router", "1")), metadata=meta)
            # The NLP replica serves it when the call returns; the vision replica is not counted for a text model.
            assert deployed.replicas_applied == 1
            for label, text in UNSEEN.items():
                answer = await classify(channel, "acme", "ticket-router", text)
                assert (answer.model.name, answer.model.version) == ("ticket-router", "1")
                assert answer.results[0].scores[0].label == label, (text, answer)
                assert {score.label for score in answer.results[0].scores} == set(TRAIN)
            # Another tenant calling the same name: NOT_FOUND, as for a model nobody has.
            err = await refused(classify(channel, "globex", "ticket-router", UNSEEN["billing"]))
            assert err.code() == grpc.StatusCode.NOT_FOUND

            image = await stub.DeployModel(S.DeployModelRequest(model=ref("parts", "1")), metadata=meta)
            assert image.replicas_applied == 1  # the vision replica
            canary = await stub.DeployModel(
                S.DeployModelRequest(model=ref("ticket-router", "2"), canary_percent=30), metadata=meta
            )
            assert canary.replicas_applied == 1
            canary_generation = canary.model.deployment.generation
            # Vision replicas host image heads only; NLP replicas text heads only.
            assert vision.heads.hosted.serving() == ["acme/parts@1"]
            # A change waits for its own service's replicas; the others get its generation on the next round.
            assert vision.heads.generation == image.model.deployment.generation
            plane.sync.start()
            await eventually("vision at the latest generation", lambda: vision.heads.generation == canary_generation)
            assert vision.heads.hosted.serving() == ["acme/parts@1"]
            assert nlp.heads.hosted.serving() == ["acme/ticket-router@1", "acme/ticket-router@2"]
            versions = [
                (
                    await classify(channel, "acme", "ticket-router", UNSEEN["shipping"], request_id=f"req-{i}")
                ).model.version
                for i in range(200)
            ]
            assert 40 <= versions.count("2") <= 80, versions.count("2")  # 30% of 200, give or take 10 points
            again = await classify(channel, "acme", "ticket-router", UNSEEN["shipping"], request_id="req-7")
            assert again.model.version == versions[7]  # a retried request keeps its version

            promoted = await stub.PromoteModel(S.PromoteModelRequest(model=ref("ticket-router")), metadata=meta)
            assert promoted.replicas_applied == 1
            answers = {
                (await classify(channel, "acme", "ticket-router", UNSEEN["billing"], request_id=f"p-{i}")).model.version
                for i in range(20)
            }
            assert answers == {"2"}
            # The old default stands by, callable by version.
            standby = await classify(channel, "acme", "ticket-router", UNSEEN["billing"], version="1")
            assert standby.model.version == "1"

            back = await stub.RollbackModel(S.RollbackModelRequest(model=ref("ticket-router")), metadata=meta)
            assert back.replicas_applied == 1
            assert (await classify(channel, "acme", "ticket-router", UNSEEN["technical"])).model.version == "1"
            err = await refused(classify(channel, "acme", "ticket-router", UNSEEN["technical"], version="2"))
            assert err.code() == grpc.StatusCode.NOT_FOUND  # rolled back: no longer loaded anywhere

            gone = await stub.UndeployModel(S.UndeployModelRequest(model=ref("ticket-router")), metadata=meta)
            assert gone.replicas_applied == 1
            err = await refused(classify(channel, "acme", "ticket-router", UNSEEN["technical"]))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await channel.close()


async def test_a_replica_that_joins_late_or_restarts_catches_up_within_an_interval(
    plane: Plane, nlp_engine: NlpEngine, trained_heads: list[bytes]
) -> None:
    await asyncio.to_thread(plane.blobs.put_bytes, trained_heads[0])
    add_version(plane.store, "acme", "ticket-router", artifact=trained_heads[0])
    stub, meta = plane.stub(), as_tenant("acme")
    # Deployed while no replica runs: recorded, applied by none.
    deployed = await stub.DeployModel(S.DeployModelRequest(model=ref("ticket-router", "1")), metadata=meta)
    assert deployed.replicas_applied == 0
    plane.sync.start()
    generation = deployed.model.deployment.generation

    for attempt in range(2):  # a replica joins; then a fresh one takes its place at the same address
        async with replica(plane.blobs, base_model=TEXT_BACKBONE, engine=nlp_engine) as nlp:
            plane.replicas[:] = [Instance("nlp-1", "nlp", (NLP,), nlp.address)]
            await eventually(
                f"replica {attempt} serves generation {generation}", lambda: nlp.heads.generation == generation
            )
            channel = grpc.aio.insecure_channel(nlp.address)
            try:
                answer = await classify(channel, "acme", "ticket-router", UNSEEN["shipping"])
                assert (answer.model.version, answer.results[0].scores[0].label) == ("1", "shipping")
            finally:
                await channel.close()


async def test_an_idle_replica_is_sent_nothing_until_something_changes(plane: Plane) -> None:
    for seed in range(2):
        add_version(plane.store, "acme", "router", seed=seed)
        await asyncio.to_thread(plane.blobs.put_bytes, head(TEXT_BACKBONE, seed))
    stub, meta = plane.stub(), as_tenant("acme")
    async with replica(plane.blobs, base_model=TEXT_BACKBONE) as nlp:
        plane.replicas[:] = [Instance("nlp-1", "nlp", (NLP,), nlp.address)]
        first = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
        assert first.replicas_applied == 1
        plane.sync.start()  # its first round sends every replica its part (the safety net): once more
        await eventually("the loop's first round", lambda: nlp.host.pushes == 2)
        await asyncio.sleep(1.0)  # five more rounds (every 0.2 s), nothing changed: nothing sent
        assert nlp.host.pushes == 2
        second = await stub.DeployModel(
            S.DeployModelRequest(model=ref("router", "2"), canary_percent=10), metadata=meta
        )
        assert second.replicas_applied == 1 and nlp.host.pushes == 3
        assert nlp.heads.generation == second.model.deployment.generation
        await asyncio.sleep(1.0)
        assert nlp.host.pushes == 3
        await plane.sync.sync_once()  # a full round (every resync_s) sends it again even so
        assert nlp.host.pushes == 4


async def test_concurrent_changes_leave_every_replica_at_the_stores_last_word(plane: Plane) -> None:
    for seed in range(3):
        add_version(plane.store, "acme", "router", seed=seed)
        await asyncio.to_thread(plane.blobs.put_bytes, head(TEXT_BACKBONE, seed))
    stub, meta = plane.stub(), as_tenant("acme")
    async with (
        replica(plane.blobs, base_model=TEXT_BACKBONE) as first,
        replica(plane.blobs, base_model=TEXT_BACKBONE) as second,
    ):
        plane.replicas[:] = [
            Instance("nlp-1", "nlp", (NLP,), first.address),
            Instance("nlp-2", "nlp", (NLP,), second.address),
        ]
        await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
        answers = await asyncio.gather(
            *(
                stub.DeployModel(
                    S.DeployModelRequest(model=ref("router", str(2 + i % 2)), canary_percent=1 + i), metadata=meta
                )
                for i in range(12)
            )
        )
        generations = sorted(answer.model.deployment.generation for answer in answers)
        assert len(set(generations)) == 12  # one generation per change, none lost
        last = max(answers, key=lambda answer: answer.model.deployment.generation).model.deployment
        assert plane.store.deployment_generation() == last.generation
        (listed_now,) = await listed(plane, "acme", "router")
        assert listed_now.deployment == last
        # Pushes to one replica never overtake each other: both end at the last generation and its route.
        for host in (first, second):
            assert host.heads.generation == last.generation
            route = host.heads.hosted.routes[("acme", "router")]
            assert (route.default_version, route.canary_version, route.canary_percent) == (
                "1",
                last.canary_version,
                last.canary_percent,
            )


async def test_a_frozen_replica_holds_a_change_no_longer_than_its_timeout(plane: Plane) -> None:
    add_version(plane.store, "acme", "router")
    await asyncio.to_thread(plane.blobs.put_bytes, head(TEXT_BACKBONE, 0))
    # A peer that accepts connections and never says a word (as a stopped process's socket does).
    silent: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    frozen = await asyncio.start_server(hold, "127.0.0.1", 0)
    frozen_port = frozen.sockets[0].getsockname()[1]
    try:
        async with replica(plane.blobs, base_model=TEXT_BACKBONE) as live:
            plane.replicas[:] = [
                Instance("nlp-frozen", "nlp", (NLP,), f"127.0.0.1:{frozen_port}"),
                Instance("nlp-live", "nlp", (NLP,), live.address),
            ]
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = await plane.stub().DeployModel(
                S.DeployModelRequest(model=ref("router", "1")), metadata=as_tenant("acme"), timeout=10
            )
            took = loop.time() - started
            assert answer.replicas_applied == 1
            assert live.heads.hosted.serving() == ["acme/router@1"]
            assert 0.9 <= took < 3.0, took  # the frozen replica's 1 s timeout, not the call's 10 s deadline
    finally:
        for writer in silent:
            writer.close()
        frozen.close()
        await frozen.wait_closed()


# -- through placement -------------------------------------------------------------------------------------------

GIB = 1 << 30


def read_node(state: SchedulerState, node: str, instance_id: str, *, free: int) -> None:
    """A node agent's reading of ``node``'s CPU (1 GiB, ``free`` of it free), and the NLP replica on it reporting its
    MiniLM loaded there, as they reach the scheduler."""
    device_id = f"{node}/cpu"
    state.record_node(
        scheduler_pb2.ReportNodeRequest(
            node_id=node,
            devices=[
                scheduler_pb2.NodeDevice(
                    device_id=device_id,
                    info=common_pb2.DeviceInfo(
                        kind=common_pb2.DEVICE_KIND_CPU, memory_total_bytes=GIB, memory_used_bytes=GIB - free
                    ),
                )
            ],
        )
    )
    state.record_load(
        scheduler_pb2.ReportLoadRequest(
            instance_id=instance_id,
            node_id=node,
            state=common_pb2.SERVING_STATE_SERVING,
            models=[
                scheduler_pb2.ModelLoad(
                    model=common_pb2.ModelRef(name=TEXT_BACKBONE, version="1"),
                    device_id=device_id,
                    loaded=True,
                    memory_bytes=100 << 20,
                )
            ],
        )
    )


def head_placements(state: SchedulerState) -> list[tuple[str, str, str, str, int]]:
    """The heads in the placement table, as GetPlacement shows them: (model, version, instance, device, bytes)."""
    return [
        (p.model.name, p.model.version, p.instance_id, p.device_id, p.bytes)
        for p in state.table.placements()
        if p.model.name != TEXT_BACKBONE
    ]


async def test_deploying_places_the_head_beside_its_backbone_where_the_readings_leave_room(
    placed_plane: Plane,
) -> None:
    plane, state = placed_plane, placed_plane.state
    assert state is not None
    artifacts = [head(TEXT_BACKBONE, seed) for seed in (1, 2)]
    versions = []
    for seed, artifact in zip((1, 2), artifacts, strict=True):
        await asyncio.to_thread(plane.blobs.put_bytes, artifact)
        versions.append(add_version(plane.store, "acme", "router", seed=seed, artifact=artifact))
    v1, v2 = versions
    stub, meta = plane.stub(), as_tenant("acme")

    async with (
        replica(plane.blobs, base_model=TEXT_BACKBONE) as roomy,
        replica(plane.blobs, base_model=TEXT_BACKBONE) as full,
    ):
        plane.replicas[:] = [
            Instance("nlp-a", "nlp", (NLP,), roomy.address),
            Instance("nlp-b", "nlp", (NLP,), full.address),
        ]
        read_node(state, "a", "nlp-a", free=GIB // 2)
        read_node(state, "b", "nlp-b", free=v1.artifact_bytes // 2)  # too little for a head

        # Only the replica with room is sent the head, and the answer counts only it.
        deployed = await stub.DeployModel(S.DeployModelRequest(model=ref("router", "1")), metadata=meta)
        assert deployed.replicas_applied == 1
        assert roomy.heads.hosted.serving() == ["acme/router@1"]
        assert full.heads.hosted.serving() == []
        # Its memory is in the placement table (LOADED once the replica serves it), so model placement sees it taken.
        assert head_placements(state) == [("acme/router", "1", "nlp-a", "a/cpu", v1.artifact_bytes)]
        (placement,) = state.table.placements(model=common_pb2.ModelRef(name="acme/router"))
        assert placement.state == scheduler_pb2.PLACEMENT_STATE_LOADED
        assert state.is_busy(placement.model, "a/cpu")  # never evicted to make room for a model

        # Node a fills up: no replica has room for v2, so the canary is refused and nothing changes.
        read_node(state, "a", "nlp-a", free=v2.artifact_bytes // 2)
        before = plane.store.get_deployment("acme", "router")
        generation = plane.store.deployment_generation()
        err = await refused(
            stub.DeployModel(S.DeployModelRequest(model=ref("router", "2"), canary_percent=10), metadata=meta)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = common_pb2.ErrorInfo.FromString(dict(err.trailing_metadata() or ())[ERROR_INFO_KEY])
        assert info.reason == "INSUFFICIENT_MEMORY"
        assert info.metadata["required_bytes"] == str(v2.artifact_bytes)
        assert info.metadata["device_id"] in ("a/cpu", "b/cpu")
        assert 0 <= int(info.metadata["largest_free_bytes"]) < v2.artifact_bytes
        assert plane.store.get_deployment("acme", "router") == before
        assert plane.store.deployment_generation() == generation
        assert head_placements(state) == [("acme/router", "1", "nlp-a", "a/cpu", v1.artifact_bytes)]
        # Promoting v2 to the default adds it too: refused alike.
        err = await refused(stub.PromoteModel(S.PromoteModelRequest(model=ref("router", "2")), metadata=meta))
        assert reason_of(err) == "INSUFFICIENT_MEMORY"

        # Room again on node b: the canary goes there only; the model serves where every version it serves is held.
        read_node(state, "b", "nlp-b", free=GIB // 2)
        read_node(state, "a", "nlp-a", free=GIB // 2)
        canary = await stub.DeployModel(
            S.DeployModelRequest(model=ref("router", "2"), canary_percent=10), metadata=meta
        )
        assert canary.replicas_applied == 2
        assert sorted(head_placements(state)) == [
            ("acme/router", "1", "nlp-a", "a/cpu", v1.artifact_bytes),
            ("acme/router", "1", "nlp-b", "b/cpu", v1.artifact_bytes),
            ("acme/router", "2", "nlp-a", "a/cpu", v2.artifact_bytes),
            ("acme/router", "2", "nlp-b", "b/cpu", v2.artifact_bytes),
        ]

        # Rollback drops the canary and its memory; undeploying releases the rest.
        back = await stub.RollbackModel(S.RollbackModelRequest(model=ref("router")), metadata=meta)
        assert back.replicas_applied == 2
        assert sorted(head_placements(state)) == [
            ("acme/router", "1", "nlp-a", "a/cpu", v1.artifact_bytes),
            ("acme/router", "1", "nlp-b", "b/cpu", v1.artifact_bytes),
        ]
        await stub.UndeployModel(S.UndeployModelRequest(model=ref("router")), metadata=meta)
        assert head_placements(state) == []
        assert roomy.heads.hosted.serving() == full.heads.hosted.serving() == []
