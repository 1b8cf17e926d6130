"""The real scheduler process of a mesh started by `aimass up`: the routing view it pushes (the host's own node agent,
the mesh's replicas), and placement on a simulated GPU fleet reported by a second node agent process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from aimass.client import AsyncClient, error_info
from aimass.local_mesh import LocalMesh
from aimass.runtime.identity import ROLE_SCHEDULER, mesh_channel
from aimass.v1 import common_pb2, models_pb2, nlp_pb2, nlp_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.security import credentials, key_for

GIB = 2**30
SIM_NODE = "sim-node"
SIM_REPLICA = "sim-replica"
# A tenant no other test uses on the shared mesh, so its count is this test's own.
ACCOUNTED = "tenant-accounting-test"
FLEET = """
[[devices]]
name = "L4-24GB"
memory_gib = 24
speed = 1.0

[[devices]]
name = "A100-40GB"
memory_gib = 40
speed = 2.5
"""


@pytest.fixture(scope="module")
def simulated_node(mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    fleet = tmp_path_factory.mktemp("fleet") / "fleet.toml"
    fleet.write_text(FLEET)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.node_agent",
            f"--scheduler={mesh.scheduler}",
            f"--node-id={SIM_NODE}",
            "--reader=simulated",
            f"--simulated-file={fleet}",
        ]
    )
    yield
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=30)


@contextlib.asynccontextmanager
async def scheduler_as(mesh: LocalMesh, role: str) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """The mesh's scheduler, called with the session's certificate of ``role`` (mesh mTLS)."""
    async with mesh_channel(mesh.scheduler, credentials(role), server_role=ROLE_SCHEDULER) as channel:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)


@pytest.fixture
async def stub(mesh: LocalMesh) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """As a gateway: it watches the view and places and evicts models."""
    async with scheduler_as(mesh, "gateway") as found:
        yield found


@pytest.fixture
async def replica_stub(mesh: LocalMesh) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """As a replica (an NLP certificate): only replicas report load."""
    async with scheduler_as(mesh, "nlp") as found:
        yield found


@pytest.fixture
async def node_agent_stub(mesh: LocalMesh) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """As a node agent: only node agents report device readings."""
    async with scheduler_as(mesh, "node-agent") as found:
        yield found


async def view_where(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub, test: Callable[[scheduler_pb2.RoutingView], bool]
) -> scheduler_pb2.RoutingView:
    """The first pushed view that passes ``test`` (views arrive on every change)."""
    versions = []
    async for response in stub.WatchView(scheduler_pb2.WatchViewRequest(subscriber_id="test"), timeout=20):
        versions.append(response.view.version)
        assert versions == sorted(versions), "views arrive in version order"
        if test(response.view):
            return response.view
    raise AssertionError("the view stream ended")


async def test_the_view_holds_the_hosts_cpu_profile_and_the_meshs_replicas(
    mesh: LocalMesh, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
) -> None:
    def complete(view: scheduler_pb2.RoutingView) -> bool:
        cpu_nodes = [n for n in view.nodes if n.source == scheduler_pb2.READING_SOURCE_CPU_PROFILE]
        return bool(cpu_nodes) and {r.address for r in view.replicas} >= {*mesh.addresses("nlp")}

    view = await asyncio.wait_for(view_where(stub, complete), 20)
    (node,) = [n for n in view.nodes if n.source == scheduler_pb2.READING_SOURCE_CPU_PROFILE]
    (cpu,) = node.devices
    assert cpu.device_id == f"{node.node_id}/cpu" and cpu.info.kind == common_pb2.DEVICE_KIND_CPU
    assert 0 < cpu.info.memory_used_bytes < cpu.info.memory_total_bytes
    nlp = [r for r in view.replicas if r.address in mesh.addresses("nlp")]
    assert nlp and all("aimass.v1.NlpService" in r.services for r in nlp)
    assert all(r.services != ["aimass.v1.SchedulerService"] for r in view.replicas)


def gpu(index: int) -> str:
    return f"{SIM_NODE}/gpu:{index}"


async def place(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    replica: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    name: str,
    gib: int,
    *,
    allow_eviction: bool = False,
) -> scheduler_pb2.PlaceModelResponse:
    # The simulated replica on the simulated node, as a replica would report itself (with a replica's certificate);
    # then the gateway (``stub``) asks for the placement.
    await replica.ReportLoad(
        scheduler_pb2.ReportLoadRequest(
            instance_id=SIM_REPLICA,
            node_id=SIM_NODE,
            state=common_pb2.SERVING_STATE_SERVING,
            # It can host the model (not loaded yet) on any of its node's devices (no device named).
            models=[scheduler_pb2.ModelLoad(model=common_pb2.ModelRef(name=name, version="1"))],
        ),
        timeout=5,
    )
    return await stub.PlaceModel(
        scheduler_pb2.PlaceModelRequest(
            model=common_pb2.ModelRef(name=name, version="1"),
            required_bytes=gib * GIB,
            target=models_pb2.PlacementTarget(node_id=SIM_NODE, device_kind=common_pb2.DEVICE_KIND_GPU),
            allow_eviction=allow_eviction,
        ),
        timeout=5,
    )


async def test_placement_on_a_simulated_fleet(
    simulated_node: None,
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    replica_stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    await asyncio.wait_for(view_where(stub, lambda v: any(n.node_id == SIM_NODE for n in v.nodes)), 20)
    # Best fit: the smaller GPU when the model fits there, the bigger one when it does not.
    small = await place(stub, replica_stub, "embedder", 10)
    assert small.placement.device_id == gpu(0) and small.placement.instance_id == SIM_REPLICA
    large = await place(stub, replica_stub, "llm-13b", 28)
    assert large.placement.device_id == gpu(1)
    again = await place(stub, replica_stub, "embedder", 10)
    assert again.already_placed and again.placement.device_id == gpu(0)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await place(stub, replica_stub, "llm-34b", 30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 30" in (refused.value.details() or ""), refused.value.details()
    info = error_info(refused.value)
    assert info is not None and info.reason == "INSUFFICIENT_MEMORY"
    assert info.metadata["required_bytes"] == str(30 * GIB) and info.metadata["device_id"] == gpu(0)

    # With eviction allowed, the idle 28 GiB model makes room on the big GPU.
    evicting = await place(stub, replica_stub, "llm-34b", 30, allow_eviction=True)
    assert evicting.placement.device_id == gpu(1)
    assert [p.model.name for p in evicting.evicted] == ["llm-13b"]

    table = await stub.GetPlacement(scheduler_pb2.GetPlacementRequest(node_id=SIM_NODE), timeout=5)
    assert [(p.device_id, p.model.name) for p in table.placements] == [(gpu(0), "embedder"), (gpu(1), "llm-34b")]
    evicted = await stub.EvictModel(
        scheduler_pb2.EvictModelRequest(model=common_pb2.ModelRef(name="embedder"), reason="test"), timeout=5
    )
    assert evicted.freed_bytes == 10 * GIB


async def test_bad_reports_are_refused(
    node_agent_stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    replica_stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    # From the roles allowed to report, so what refuses them is the report itself, not the caller.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await node_agent_stub.ReportNode(scheduler_pb2.ReportNodeRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "node_id" in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await replica_stub.ReportLoad(scheduler_pb2.ReportLoadRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "instance_id" in (raised.value.details() or "")


def test_fleet_file_is_valid_toml(tmp_path: Path) -> None:
    from scheduler.devices import SimulatedFleet

    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    fleet = SimulatedFleet.from_file(path, SIM_NODE)
    assert [d.device_id for d in fleet.read()] == [gpu(0), gpu(1), f"{SIM_NODE}/cpu"]


async def test_every_replica_reports_its_load(
    mesh: LocalMesh, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
) -> None:
    async with AsyncClient(mesh.gateway) as client:
        await asyncio.gather(*(client.sentiment([f"I like number {i}"]) for i in range(60)))
    # A tenant's requests, with its own key (every modality's replicas account them, not only the LLM's tokens).
    async with mesh.aio_channel(key_for(ACCOUNTED)) as channel:
        nlp = nlp_pb2_grpc.NlpServiceStub(channel)
        for i in range(3):
            await nlp.Sentiment(nlp_pb2.SentimentRequest(texts=[f"tenant call {i}"]), timeout=10)

    def nlp_served(view: scheduler_pb2.RoutingView) -> bool:
        return any(
            load.model.name == "vader" and load.requests_per_second > 0 and load.loaded
            for replica in view.replicas
            if replica.address in mesh.addresses("nlp")
            for load in replica.models
        )

    view = await asyncio.wait_for(view_where(stub, nlp_served), 20)
    (replica,) = [r for r in view.replicas if r.address in mesh.addresses("nlp")]
    assert {m.model.name for m in replica.models} == {"all-MiniLM-L6-v2", "vader", "en_core_web_sm"}
    assert all(m.device_id == f"{replica.node_id}/cpu" and m.queue_capacity > 0 for m in replica.models)
    assert all(m.modality == models_pb2.MODALITY_TEXT for m in replica.models)
    counted = await asyncio.wait_for(
        view_where(stub, lambda v: any(t.tenant_id == ACCOUNTED and t.requests >= 3 for t in v.tenants)), 20
    )
    (usage,) = [t for t in counted.tenants if t.tenant_id == ACCOUNTED]
    assert usage.requests == 3 and usage.prompt_tokens == usage.completion_tokens == 0
