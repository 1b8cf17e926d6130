"""Loading and unloading models through the gateway's ModelService: the scheduler places, replicas load and measure
footprints (process memory on this CPU machine), placements follow. A mesh of its own: two NLP replicas, so one can
lose a model while the other keeps serving it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from aimass.client import error_info
from aimass.local_mesh import LocalMesh
from aimass.runtime.identity import ROLE_SCHEDULER
from aimass.store.sql import SqlStore
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc, nlp_pb2, nlp_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import start_mesh
from tests.security import as_gateway_sync, settings

MIB = 2**20
ENTITIES = "/aimass.v1.NlpService/Entities"
# Load reports every 100 ms: placements follow a load or unload within a few reports.
REPORT_ENV = {"AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.1"}


@pytest.fixture(scope="module")
def two_nlp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("model-load"), {"nlp": 2}, REPORT_ENV)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def channel(two_nlp: LocalMesh) -> Iterator[grpc.Channel]:
    # The session's admin key: its models:admin scope lets it load and unload models.
    with two_nlp.channel() as opened:
        yield opened


@pytest.fixture(scope="module")
def models(channel: grpc.Channel) -> models_pb2_grpc.ModelServiceStub:
    return models_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def scheduler(two_nlp: LocalMesh) -> Iterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    # The scheduler serves mesh certificates only; an operator's may read placements.
    with two_nlp.scheduler_channel() as opened:
        yield scheduler_pb2_grpc.SchedulerServiceStub(opened)


def ref(name: str, version: str = "") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


def describe(models: models_pb2_grpc.ModelServiceStub, name: str) -> models_pb2.ModelInfo:
    response: models_pb2.DescribeModelResponse = models.DescribeModel(
        models_pb2.DescribeModelRequest(model=ref(name)), timeout=10
    )
    return response.model


def placements_until(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    name: str,
    test: Callable[[list[scheduler_pb2.Placement]], bool],
    timeout_s: float = 10.0,
) -> list[scheduler_pb2.Placement]:
    """The model's placements once ``test`` holds (they follow the replicas' load reports)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = scheduler.GetPlacement(scheduler_pb2.GetPlacementRequest(model=ref(name)), timeout=5)
        placements = list(response.placements)
        if test(placements):
            return placements
        if time.monotonic() > deadline:
            raise AssertionError(f"placements of {name} never satisfied the test: {placements}")
        time.sleep(0.1)


def test_footprints_are_measured_when_models_load(
    models: models_pb2_grpc.ModelServiceStub, scheduler: scheduler_pb2_grpc.SchedulerServiceStub
) -> None:
    info = describe(models, "all-MiniLM-L6-v2")
    (version,) = info.versions
    assert version.footprint_measured and version.footprint_device_kind == common_pb2.DEVICE_KIND_CPU
    # MiniLM's weights alone are ~90 MB; with torch's first allocations its resident footprint is larger.
    assert version.footprint_bytes > 50 * MIB
    assert len(info.replicas) == 2 and all(r.loaded and r.memory_bytes > 50 * MIB for r in info.replicas)
    # Models loaded at start are adopted by the placement table with their measured footprints.
    placements = placements_until(scheduler, "all-MiniLM-L6-v2", lambda found: len(found) == 2)
    assert {p.instance_id for p in placements} == {r.instance_id for r in info.replicas}
    assert all(p.state == scheduler_pb2.PLACEMENT_STATE_LOADED and p.bytes > 50 * MIB for p in placements)
    assert all(p.device_id.endswith("/cpu") for p in placements)


def test_unload_and_load_again_through_placement(
    two_nlp: LocalMesh,
    models: models_pb2_grpc.ModelServiceStub,
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    channel: grpc.Channel,
) -> None:
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    first, second = sorted(r.instance_id for r in describe(models, "en_core_web_sm").replicas)
    on_first = models_pb2.PlacementTarget(instance_id=first)
    try:
        unloaded = models.UnloadModel(
            models_pb2.UnloadModelRequest(model=ref("en_core_web_sm"), target=on_first), timeout=30
        )
        assert [r.instance_id for r in unloaded.unloaded] == [first]
        assert unloaded.freed_bytes > 0 and not unloaded.unloaded[0].loaded
        held = {r.instance_id: r.loaded for r in describe(models, "en_core_web_sm").replicas}
        assert held == {first: False, second: True}
        placements_until(scheduler, "en_core_web_sm", lambda found: [p.instance_id for p in found] == [second])
        # Requests keep working: the gateway sends them to the replica that still holds the model, those that name
        # no model included (it is their default), straight there rather than by a retry.
        retries_before = two_nlp.log_text().count(f"{ENTITIES} unavailable on")
        for named in ("", "en_core_web_sm") * 3:
            answer, call = nlp.Entities.with_call(
                nlp_pb2.EntitiesRequest(texts=["Ada Lovelace lived in London."], model=ref(named)), timeout=30
            )
            assert {e.label for e in answer.documents[0].entities} >= {"PERSON", "GPE"}
            assert dict(call.trailing_metadata() or ())["x-aimass-replica"] == second
        assert two_nlp.log_text().count(f"{ENTITIES} unavailable on") == retries_before
        # Unloading again changes nothing.
        again = models.UnloadModel(
            models_pb2.UnloadModelRequest(model=ref("en_core_web_sm"), target=on_first), timeout=30
        )
        assert not again.unloaded

        loaded = models.LoadModel(models_pb2.LoadModelRequest(model=ref("en_core_web_sm"), target=on_first), timeout=60)
        assert loaded.replica.instance_id == first and loaded.replica.loaded and not loaded.already_loaded
        assert loaded.replica.version == "1" and loaded.replica.memory_bytes > 0
        found = placements_until(
            scheduler,
            "en_core_web_sm",
            lambda found: (
                {p.instance_id for p in found} == {first, second}
                and all(p.state == scheduler_pb2.PLACEMENT_STATE_LOADED for p in found)
            ),
        )
        assert next(p for p in found if p.instance_id == first).bytes == loaded.replica.memory_bytes
        # Loading where it is already loaded is a no-op; without a target the scheduler keeps the model where it is.
        again_loaded = models.LoadModel(
            models_pb2.LoadModelRequest(model=ref("en_core_web_sm"), target=on_first), timeout=30
        )
        assert again_loaded.already_loaded
        anywhere = models.LoadModel(models_pb2.LoadModelRequest(model=ref("en_core_web_sm")), timeout=30)
        assert anywhere.already_loaded and not anywhere.evicted
    finally:
        models.LoadModel(models_pb2.LoadModelRequest(model=ref("en_core_web_sm"), target=on_first), timeout=60)


def rpc_error(call: Callable[..., object], request: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30, **kwargs)
    return caught.value


def test_load_errors_say_what_is_wrong(models: models_pb2_grpc.ModelServiceStub) -> None:
    err = rpc_error(models.LoadModel, models_pb2.LoadModelRequest(model=ref("gpt-9")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "model 'gpt-9' is not served by any replica" in (
        err.details() or ""
    )
    err = rpc_error(models.LoadModel, models_pb2.LoadModelRequest(model=ref("vader", "7")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'vader' has no version '7'" in (err.details() or "")
    err = rpc_error(models.LoadModel, models_pb2.LoadModelRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.name is required" in (err.details() or "")
    nowhere = models_pb2.PlacementTarget(instance_id="nlp-10.9.9.9:1-1")
    err = rpc_error(models.LoadModel, models_pb2.LoadModelRequest(model=ref("vader"), target=nowhere))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no device matches target (instance nlp-10.9.9.9:1-1)" in (err.details() or "")
    on_gpu = models_pb2.PlacementTarget(device_kind=common_pb2.DEVICE_KIND_GPU)
    err = rpc_error(models.UnloadModel, models_pb2.UnloadModelRequest(model=ref("vader"), target=on_gpu))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not on the device asked for" in (err.details() or "")
    info = error_info(err)
    assert info is not None


def test_a_model_loaded_nowhere_is_placed_with_its_measured_footprint(
    models: models_pb2_grpc.ModelServiceStub, scheduler: scheduler_pb2_grpc.SchedulerServiceStub
) -> None:
    measured = describe(models, "vader").versions[0].footprint_bytes
    try:
        everywhere = models.UnloadModel(models_pb2.UnloadModelRequest(model=ref("vader")), timeout=30)
        assert len(everywhere.unloaded) == 2
        placements_until(scheduler, "vader", lambda found: not found)
        listed = models.ListModels(models_pb2.ListModelsRequest(loaded_only=True), timeout=10)
        assert "vader" not in [m.name for m in listed.models]
        loaded = models.LoadModel(models_pb2.LoadModelRequest(model=ref("vader")), timeout=60)
        assert not loaded.already_loaded and loaded.replica.loaded
        (placement,) = placements_until(scheduler, "vader", lambda found: len(found) == 1)
        assert placement.instance_id == loaded.replica.instance_id and placement.bytes > 0
        assert measured > 0
    finally:
        for replica in describe(models, "vader").replicas:
            models.LoadModel(
                models_pb2.LoadModelRequest(
                    model=ref("vader"), target=models_pb2.PlacementTarget(instance_id=replica.instance_id)
                ),
                timeout=60,
            )


def test_a_load_logs_where_it_placed_the_model(
    two_nlp: LocalMesh, models: models_pb2_grpc.ModelServiceStub, scheduler: scheduler_pb2_grpc.SchedulerServiceStub
) -> None:
    """An operator reads in the gateway's log where a load put a model: name, version, device and replica."""
    info = describe(models, "vader")
    first = sorted(r.instance_id for r in info.replicas)[0]
    on_first = models_pb2.PlacementTarget(instance_id=first)
    logged_from = len(two_nlp.log_text())
    try:
        models.UnloadModel(models_pb2.UnloadModelRequest(model=ref("vader"), target=on_first), timeout=30)
        placements_until(scheduler, "vader", lambda found: first not in {p.instance_id for p in found})
        loaded = models.LoadModel(models_pb2.LoadModelRequest(model=ref("vader"), target=on_first), timeout=60)
        assert loaded.replica.instance_id == first and not loaded.already_loaded
        found = placements_until(
            scheduler,
            "vader",
            lambda found: any(
                p.instance_id == first and p.state == scheduler_pb2.PLACEMENT_STATE_LOADED for p in found
            ),
        )
        device = next(p.device_id for p in found if p.instance_id == first)
        line = f"placing vader:{info.default_version} on {device} ({first})"
        deadline = time.monotonic() + 10
        while line not in two_nlp.log_text()[logged_from:]:
            assert time.monotonic() < deadline, f"the gateway never logged {line!r}"
            time.sleep(0.1)
    finally:
        models.LoadModel(models_pb2.LoadModelRequest(model=ref("vader"), target=on_first), timeout=60)


def test_the_scheduler_places_applies_and_audits_loads_on_its_own(
    two_nlp: LocalMesh, models: models_pb2_grpc.ModelServiceStub, scheduler: scheduler_pb2_grpc.SchedulerServiceStub
) -> None:
    """The scheduler is the controller: an unload and a load sent to it as a gateway forwards them (the gateway's
    certificate, the caller's verified scope, no gateway in between) are placed, applied on the replica and audited
    there under the caller's tenant and key; a replica takes loads and unloads from the scheduler only."""
    info = describe(models, "vader")
    first = sorted(r.instance_id for r in info.replicas)[0]
    address = next(r.address for r in info.replicas if r.instance_id == first)
    on_first = models_pb2.PlacementTarget(instance_id=first)
    scope = (
        ("x-aimass-tenant", "controller-test"),
        ("x-aimass-key-id", "ctl-key-1"),
        ("x-aimass-caller-peer", "ipv4:10.1.2.3:45678"),
    )
    since = int(time.time() * 1000) - 1000
    try:
        with as_gateway_sync(two_nlp.scheduler, ROLE_SCHEDULER) as opened:
            controller = models_pb2_grpc.ModelServiceStub(opened)
            unloaded = controller.UnloadModel(
                models_pb2.UnloadModelRequest(model=ref("vader"), target=on_first), timeout=30, metadata=scope
            )
            assert [r.instance_id for r in unloaded.unloaded] == [first]
            placements_until(scheduler, "vader", lambda found: first not in {p.instance_id for p in found})
            loaded = controller.LoadModel(
                models_pb2.LoadModelRequest(model=ref("vader"), target=on_first), timeout=60, metadata=scope
            )
            assert loaded.replica.instance_id == first and loaded.replica.loaded and not loaded.already_loaded
        placements_until(
            scheduler,
            "vader",
            lambda found: any(
                p.instance_id == first and p.state == scheduler_pb2.PLACEMENT_STATE_LOADED for p in found
            ),
        )
        # Written before the answers: in the store at once, with the caller's tenant, key and address.
        store = SqlStore.open(settings().store_url)
        try:
            events = store.list_audit(since_unix_ms=since, tenant_id="controller-test", action_prefix="models.")
        finally:
            store.close()
        assert [(e.action, e.target, e.outcome, e.key_id, e.peer) for e in reversed(events)] == [
            ("models.unload", "vader", "ok", "ctl-key-1", "10.1.2.3"),
            ("models.load", "vader", "ok", "ctl-key-1", "10.1.2.3"),
        ]
        # A gateway may no longer load on a replica itself.
        with as_gateway_sync(address, "nlp") as opened:
            err = rpc_error(
                models_pb2_grpc.ModelServiceStub(opened).LoadModel,
                models_pb2.LoadModelRequest(model=ref("vader"), target=on_first),
            )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call /aimass.v1.ModelService/LoadModel; it is for scheduler" in (err.details() or "")
    finally:
        models.LoadModel(models_pb2.LoadModelRequest(model=ref("vader"), target=on_first), timeout=60)
