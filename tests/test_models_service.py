"""aimass.v1.ModelService: the catalogue rules on their own, the gateway's merge over a live and a dead replica, and
the whole mesh started by `aimass up` answering through the gateway and on a replica directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from aimass.client import error_info
from aimass.local_mesh import LocalMesh, free_port
from aimass.runtime.catalogue import ReplicaModelServicer, describe, merge, model_info, select
from aimass.runtime.discovery import CONTROL_PLANE_SERVICES, InMemoryRegistry, Instance
from aimass.runtime.errors import InvalidArgument, NotFound
from aimass.runtime.interceptors import ErrorMappingInterceptor
from aimass.runtime.metadata import TENANT_KEY, metadata_values
from aimass.runtime.scope import RequestScope, entered
from aimass.tenancy import keys
from aimass.v1 import common_pb2, datasets_pb2, deployments_pb2, deployments_pb2_grpc, models_pb2, models_pb2_grpc
from gateway.model_catalogue import ModelCatalogueServicer
from gateway.replicas import ReplicaSet
from tests.security import as_gateway_sync, credentials, key_for

NLP = "aimass.v1.NlpService"
VISION = "aimass.v1.VisionService"
NLP_MODELS = {
    "all-MiniLM-L6-v2": [f"{NLP}/Embed", f"{NLP}/Classify"],
    "en_core_web_sm": [f"{NLP}/Entities"],
    "vader": [f"{NLP}/Sentiment"],
}
VISION_MODELS = {
    "efficientnet-lite0": [f"{VISION}/Classify"],
    "mtcnn": [f"{VISION}/DetectFaces"],
    "pp-ocr": [f"{VISION}/ReadText"],
}


def ref(name: str, version: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


def held_by(info: models_pb2.ModelInfo, *replicas: models_pb2.ModelReplica) -> models_pb2.ModelInfo:
    entry = models_pb2.ModelInfo()
    entry.CopyFrom(info)
    entry.replicas.extend(replicas)
    return entry


def replica(instance_id: str, version: str = "1") -> models_pb2.ModelReplica:
    return models_pb2.ModelReplica(
        instance_id=instance_id,
        address=f"{instance_id}:1",
        version=version,
        state=common_pb2.SERVING_STATE_SERVING,
        loaded=True,
    )


# -- the catalogue rules ------------------------------------------------------------------------------------------


def test_model_info_expands_short_method_names() -> None:
    info = model_info("m", description="d", modality=models_pb2.MODALITY_TEXT, service="NlpService", methods=["Embed"])
    assert list(info.services) == [NLP] and list(info.methods) == [f"{NLP}/Embed"]
    assert [v.version for v in info.versions] == ["1"] and info.default_version == "1" and info.is_default


def test_merge_joins_two_replicas_entries_for_one_model() -> None:
    text = models_pb2.MODALITY_TEXT
    a = model_info("embed", description="d", modality=text, service=NLP, methods=["Embed"], is_default=False)
    b = model_info("embed", description="d", modality=text, service=NLP, methods=["Embed", "Classify"], version="2")
    b.versions.add(version="1", footprint_bytes=123, footprint_measured=True)
    other = model_info("vader", description="v", modality=text, service=NLP, methods=["Sentiment"])
    merged = merge([held_by(other, replica("r1")), held_by(a, replica("r1")), held_by(b, replica("r2", "2"))])
    assert [m.name for m in merged] == ["embed", "vader"]
    embed = merged[0]
    assert [r.instance_id for r in embed.replicas] == ["r1", "r2"]
    assert list(embed.services) == [NLP] and list(embed.methods) == [f"{NLP}/Embed", f"{NLP}/Classify"]
    assert [v.version for v in embed.versions] == ["1", "2"]
    assert embed.versions[0].footprint_measured and embed.versions[0].footprint_bytes == 123  # measured wins
    assert embed.is_default  # one replica's default is enough
    assert [
        r.instance_id for r in describe(merged, common_pb2.ModelRef(name="embed", version="2"), where="x").replicas
    ] == ["r2"]


def test_select_filters_sorts_and_drops_replicas() -> None:
    infos = [
        held_by(
            model_info("z", description="", modality=models_pb2.MODALITY_TEXT, service=NLP, methods=["Embed"]),
            replica("r"),
        ),
        model_info("a", description="", modality=models_pb2.MODALITY_VISION, service=VISION, methods=["Classify"]),
    ]
    everything = select(infos, models_pb2.ListModelsRequest(), loaded=True)
    assert [m.name for m in everything] == ["a", "z"] and not everything[1].replicas
    assert [m.name for m in select(infos, models_pb2.ListModelsRequest(service=NLP), loaded=True)] == ["z"]
    by_modality = models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_VISION)
    assert [m.name for m in select(infos, by_modality, loaded=True)] == ["a"]
    assert [m.name for m in select(infos, models_pb2.ListModelsRequest(model=ref("z")), loaded=True)] == ["z"]
    assert select(infos, models_pb2.ListModelsRequest(loaded_only=True), loaded=False) == []


def test_describe_explains_missing_name_unknown_model_and_version() -> None:
    entries = [
        model_info("vader", description="", modality=models_pb2.MODALITY_TEXT, service=NLP, methods=["Sentiment"])
    ]
    with pytest.raises(InvalidArgument, match=r"model\.name is required"):
        describe(entries, common_pb2.ModelRef(), where="this replica")
    with pytest.raises(NotFound, match="'nope' is not served by this replica; known models: vader"):
        describe(entries, common_pb2.ModelRef(name="nope"), where="this replica")
    with pytest.raises(NotFound, match="'vader' has no version '9'; versions: 1"):
        describe(entries, common_pb2.ModelRef(name="vader", version="9"), where="this replica")


# -- the gateway's fan-out over a live and a dead replica ---------------------------------------------------------


class FakeContext:
    def time_remaining(self) -> float | None:
        return 5.0

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return ()


class OneModelApp:
    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return (
            model_info("vader", description="", modality=models_pb2.MODALITY_TEXT, service=NLP, methods=["Sentiment"]),
        )


@pytest.fixture
async def live_and_dead() -> AsyncIterator[ReplicaSet]:
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    models_pb2_grpc.add_ModelServiceServicer_to_server(
        ReplicaModelServicer(OneModelApp(), lambda: replica("live")), server
    )
    # As in a mesh: the replica holds its kind's certificate, the gateway dials with its own.
    port = server.add_secure_port("127.0.0.1:0", credentials("nlp").server_credentials())
    await server.start()
    replicas = ReplicaSet(InMemoryRegistry(), credentials=credentials("gateway"), close_grace_s=0)
    replicas.apply(
        [
            Instance("live", "nlp", (NLP,), f"127.0.0.1:{port}"),
            Instance("dead", "nlp", (NLP,), f"127.0.0.1:{free_port()}"),  # nothing listens there
        ]
    )
    yield replicas
    await replicas.close()
    await server.stop(0)


async def test_gateway_leaves_out_a_replica_that_does_not_answer(
    live_and_dead: ReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = ModelCatalogueServicer(live_and_dead, replica_timeout_s=2.0)
    context = cast(Any, FakeContext())
    listed = await servicer.ListModels(models_pb2.ListModelsRequest(), context)
    assert [m.name for m in listed.models] == ["vader"]
    assert "replica dead at 127.0.0.1" in caplog.text
    described = await servicer.DescribeModel(models_pb2.DescribeModelRequest(model=ref("vader")), context)
    assert [r.instance_id for r in described.model.replicas] == ["live"]
    with pytest.raises(NotFound, match="'nope' is not served by any replica; known models: vader"):
        await servicer.DescribeModel(models_pb2.DescribeModelRequest(model=ref("nope")), context)


class OwnModels(deployments_pb2_grpc.DeploymentServiceServicer):
    """The scheduler's DeploymentService as the catalogue asks it: acme's one model, after ``delay`` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.tenants: list[str] = []

    async def ListCustomModels(
        self, request: deployments_pb2.ListCustomModelsRequest, context: Any
    ) -> deployments_pb2.ListCustomModelsResponse:
        tenant = metadata_values(context.invocation_metadata(), (TENANT_KEY,))[TENANT_KEY]
        self.tenants.append(tenant)
        await asyncio.sleep(self.delay)
        if tenant != "acme":
            return deployments_pb2.ListCustomModelsResponse()
        version = deployments_pb2.CustomModelVersion(
            version="1", state=deployments_pb2.VERSION_STATE_DEFAULT, job_id="job-1", artifact_bytes=4096
        )
        return deployments_pb2.ListCustomModelsResponse(
            models=[
                deployments_pb2.CustomModel(
                    name="ticket-router",
                    owner="acme",
                    task=datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
                    method=f"{NLP}/Classify",
                    versions=[version],
                    deployment=deployments_pb2.Deployment(default_version="1"),
                )
            ]
        )


@contextlib.asynccontextmanager
async def with_own_models(live_and_dead: ReplicaSet) -> AsyncIterator[tuple[ReplicaSet, OwnModels]]:
    """The live replicas, and a scheduler (over mTLS, as gateways reach it) whose DeploymentService lists acme's
    ticket-router (OwnModels): what a gateway's catalogue sees."""
    own = OwnModels()  # type: ignore[abstract]  # only ListCustomModels, the catalogue's question
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(own, server)
    port = server.add_secure_port("127.0.0.1:0", credentials("scheduler").server_credentials())
    await server.start()
    replicas = ReplicaSet(
        InMemoryRegistry(),
        credentials=credentials("gateway"),
        close_grace_s=0,
        control_plane_services=CONTROL_PLANE_SERVICES,
    )
    replicas.apply(
        [
            *(replica.instance for replica in live_and_dead.all_healthy()),
            Instance("sched", "scheduler", tuple(sorted(CONTROL_PLANE_SERVICES)), f"127.0.0.1:{port}"),
        ]
    )
    try:
        yield replicas, own
    finally:
        await replicas.close()
        await server.stop(0)


async def test_gateway_lists_the_callers_own_models_and_does_without_a_slow_scheduler(
    live_and_dead: ReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    async with with_own_models(live_and_dead) as (replicas, own):
        servicer = ModelCatalogueServicer(replicas, replica_timeout_s=1.0)
        context = cast(Any, FakeContext())
        trainer = RequestScope(tenant="acme", key_id="k1", scopes=frozenset({keys.SCOPE_MODELS_TRAIN}))
        with entered(trainer):
            listed = (await servicer.ListModels(models_pb2.ListModelsRequest(), context)).models
            assert [m.name for m in listed] == ["ticket-router", "vader"]
            router = listed[0]
            assert router.owner == "acme" and router.custom.versions[0].job_id == "job-1" and not listed[1].owner
            assert router.modality == models_pb2.MODALITY_TEXT and list(router.methods) == [f"{NLP}/Classify"]
            assert [(v.version, v.footprint_bytes) for v in router.versions] == [("1", 4096)]
            assert router.default_version == "1"
            vision = models_pb2.ListModelsRequest(service=VISION)
            assert not (await servicer.ListModels(vision, context)).models
            described = await servicer.DescribeModel(
                models_pb2.DescribeModelRequest(model=ref("ticket-router", "1")), context
            )
            assert described.model.custom.name == "ticket-router"
            with pytest.raises(
                NotFound, match="'nope' is not served by any replica; known models: ticket-router, vader"
            ):
                await servicer.DescribeModel(models_pb2.DescribeModelRequest(model=ref("nope")), context)
            # A scheduler slower than the replica timeout: the mesh's models, and a warning.
            own.delay = 3.0
            listed = (await servicer.ListModels(models_pb2.ListModelsRequest(), context)).models
            assert [m.name for m in listed] == ["vader"]
            assert "did not list tenant acme's own models (DEADLINE_EXCEEDED" in caplog.text
            own.delay = 0.0
        assert own.tenants[0] == "acme"
        # Another tenant, a key without models:train, no tenant at all: none of acme's models.
        asked = len(own.tenants)
        for scope in (
            RequestScope(tenant="beta", key_id="k2", scopes=frozenset({keys.SCOPE_MODELS_TRAIN})),
            RequestScope(tenant="acme", key_id="k3", scopes=frozenset({keys.SCOPE_INFER})),
            RequestScope(),
        ):
            with entered(scope):
                listed = (await servicer.ListModels(models_pb2.ListModelsRequest(), context)).models
                assert [m.name for m in listed] == ["vader"]
                with pytest.raises(
                    NotFound, match=r"'ticket-router' is not served by any replica; known models: vader$"
                ):
                    await servicer.DescribeModel(models_pb2.DescribeModelRequest(model=ref("ticket-router")), context)
        assert own.tenants[asked:] == ["beta", "beta"]  # the others are not asked at all


# -- the mesh, through the gateway --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(mesh: LocalMesh) -> Iterator[grpc.Channel]:
    # The session's admin key: it may read the catalogue (and load and unload models).
    with mesh.channel() as opened:
        yield opened


@pytest.fixture(scope="module")
def models(channel: grpc.Channel) -> models_pb2_grpc.ModelServiceStub:
    return models_pb2_grpc.ModelServiceStub(channel)


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value


def test_list_models_names_every_model_of_the_mesh(models: models_pb2_grpc.ModelServiceStub) -> None:
    listed = models.ListModels(models_pb2.ListModelsRequest(), timeout=10).models
    assert [m.name for m in listed] == sorted(NLP_MODELS | VISION_MODELS)
    by_name = {m.name: m for m in listed}
    for name, methods in NLP_MODELS.items():
        assert list(by_name[name].methods) == methods and list(by_name[name].services) == [NLP]
        assert by_name[name].modality == models_pb2.MODALITY_TEXT
    for name, methods in VISION_MODELS.items():
        assert list(by_name[name].methods) == methods and list(by_name[name].services) == [VISION]
        assert by_name[name].modality == models_pb2.MODALITY_VISION
    assert all(m.description and m.default_version == "1" and m.is_default and not m.replicas for m in listed)


def test_list_models_filters(models: models_pb2_grpc.ModelServiceStub) -> None:
    by_service = models.ListModels(models_pb2.ListModelsRequest(service=VISION), timeout=10).models
    assert [m.name for m in by_service] == sorted(VISION_MODELS)
    by_modality = models.ListModels(models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_TEXT), timeout=10)
    assert [m.name for m in by_modality.models] == sorted(NLP_MODELS)
    loaded = models.ListModels(models_pb2.ListModelsRequest(loaded_only=True, model=ref("vader")), timeout=10)
    assert [m.name for m in loaded.models] == ["vader"]
    assert not models.ListModels(models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_LLM), timeout=10).models


def test_describe_model_shows_the_replica_holding_it(mesh: LocalMesh, models: models_pb2_grpc.ModelServiceStub) -> None:
    described = models.DescribeModel(models_pb2.DescribeModelRequest(model=ref("all-MiniLM-L6-v2")), timeout=10)
    model = described.model
    assert list(model.methods) == NLP_MODELS["all-MiniLM-L6-v2"]
    assert [r.address for r in model.replicas] == mesh.nlp_addresses
    held = model.replicas[0]
    assert held.loaded and held.state == common_pb2.SERVING_STATE_SERVING
    assert held.version == "1" and held.instance_id.startswith("nlp-") and held.node_id
    vision = models.DescribeModel(models_pb2.DescribeModelRequest(model=ref("mtcnn", "1")), timeout=10)
    assert [r.address for r in vision.model.replicas] == mesh.addresses("vision")


def test_describe_model_errors_are_readable(models: models_pb2_grpc.ModelServiceStub) -> None:
    err = rpc_error(models.DescribeModel, models_pb2.DescribeModelRequest(model=ref("gpt-9")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'gpt-9' is not served by any replica; known models: all-MiniLM-L6-v2, efficientnet-lite0" in (
        err.details() or ""
    )
    info = error_info(err)
    assert info is not None and info.reason == "MODEL_NOT_FOUND"
    err = rpc_error(models.DescribeModel, models_pb2.DescribeModelRequest(model=ref("vader", "7")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'vader' has no version '7'" in (err.details() or "")
    err = rpc_error(models.DescribeModel, models_pb2.DescribeModelRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.name is required" in (err.details() or "")


def test_load_and_unload_are_for_admin_keys(mesh: LocalMesh) -> None:
    # A key with the infer scope only, naming itself admin or not (the gateway ignores a tenant the caller names).
    with mesh.channel(key_for("acme")) as opened:
        models = models_pb2_grpc.ModelServiceStub(opened)
        assert models.ListModels(models_pb2.ListModelsRequest(), timeout=10).models  # reading is for every key
        for tenant in ((), (("x-aimass-tenant", "admin"),)):
            with pytest.raises(grpc.RpcError) as caught:
                models.LoadModel(models_pb2.LoadModelRequest(model=ref("vader")), timeout=10, metadata=tenant)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "(tenant 'acme', scopes infer) may not call /aimass.v1.ModelService/LoadModel: it needs one of " in (
                caught.value.details() or ""
            )
            assert "models:admin" in (caught.value.details() or "")
            info = error_info(caught.value)
            assert info is not None and info.reason == "MISSING_SCOPE"
            with pytest.raises(grpc.RpcError) as caught:
                models.UnloadModel(models_pb2.UnloadModelRequest(model=ref("vader")), timeout=10, metadata=tenant)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may not call /aimass.v1.ModelService/UnloadModel" in (caught.value.details() or "")


def services_by_reflection(channel: grpc.Channel) -> list[str]:
    with channel:
        return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_model_service_is_visible_by_reflection(mesh: LocalMesh) -> None:
    # Reflection on the gateway needs no key; a replica answers mesh certificates only (here a gateway's).
    assert "aimass.v1.ModelService" in services_by_reflection(grpc.insecure_channel(mesh.gateway))
    assert "aimass.v1.ModelService" in services_by_reflection(as_gateway_sync(mesh.nlp_addresses[0], "nlp"))


def test_a_replica_answers_for_its_own_models_only(mesh: LocalMesh) -> None:
    with as_gateway_sync(mesh.addresses("vision")[0], "vision") as opened:
        stub = models_pb2_grpc.ModelServiceStub(opened)
        listed = stub.ListModels(models_pb2.ListModelsRequest(), timeout=10)
        assert [m.name for m in listed.models] == sorted(VISION_MODELS)
        err = rpc_error(stub.DescribeModel, models_pb2.DescribeModelRequest(model=ref("vader")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'vader' is not served by this replica; known models: efficientnet-lite0, mtcnn, pp-ocr" in (
        err.details() or ""
    )
