"""The embedded registry over real gRPC on loopback: TTLs, watch, and replicas re-registering after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from aimass.local_mesh import free_port
from aimass.runtime.discovery import InMemoryRegistry, Instance, Membership, RegistryServicer, RemoteRegistry
from aimass.v1 import common_pb2, registry_pb2_grpc


def instance(name: str, state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_SERVING) -> Instance:
    return Instance(
        instance_id=name,
        kind="nlp",
        services=("aimass.v1.NlpService",),
        address=f"127.0.0.1:{free_port()}",
        models=("all-MiniLM-L6-v2",),
        state=state,
        pid=1,
    )


async def serve_registry(port: int) -> tuple[grpc.aio.Server, InMemoryRegistry]:
    store = InMemoryRegistry()
    store.start()
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(store), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, store


@pytest.fixture
async def remote() -> AsyncIterator[tuple[RemoteRegistry, InMemoryRegistry, int]]:
    port = free_port()
    server, store = await serve_registry(port)
    client = RemoteRegistry(f"127.0.0.1:{port}")
    yield client, store, port
    await client.close()
    await server.stop(0)
    await store.close()


async def test_register_list_and_deregister(remote: tuple[RemoteRegistry, InMemoryRegistry, int]) -> None:
    client, _, _ = remote
    await client.register(instance("a"), ttl_s=5)
    await client.register(instance("b"), ttl_s=5)
    assert sorted(i.instance_id for i in await client.list_instances("aimass.v1.NlpService")) == ["a", "b"]
    assert await client.list_instances("aimass.v1.VisionService") == []
    await client.deregister("a")
    assert [i.instance_id for i in await client.list_instances()] == ["b"]
    listed = (await client.list_instances())[0]
    assert listed.models == ("all-MiniLM-L6-v2",) and listed.serving


async def test_missed_heartbeats_drop_the_instance(remote: tuple[RemoteRegistry, InMemoryRegistry, int]) -> None:
    client, _, _ = remote
    await client.register(instance("short-lived"), ttl_s=0.3)
    assert await client.heartbeat("short-lived", common_pb2.SERVING_STATE_SERVING)
    await asyncio.sleep(1.0)
    assert await client.list_instances() == []
    assert not await client.heartbeat("short-lived", common_pb2.SERVING_STATE_SERVING)


async def test_watch_sends_the_view_then_every_change(remote: tuple[RemoteRegistry, InMemoryRegistry, int]) -> None:
    client, _, _ = remote
    views: list[list[str]] = []

    async def follow() -> None:
        async for view in client.watch():
            views.append(sorted(f"{i.instance_id}:{i.state_name}" for i in view))
            if len(views) == 4:
                return

    watcher = asyncio.ensure_future(follow())
    await asyncio.sleep(0.2)
    await client.register(instance("w"), ttl_s=5)
    await asyncio.sleep(0.1)
    await client.heartbeat("w", common_pb2.SERVING_STATE_DRAINING)
    await asyncio.sleep(0.1)
    await client.deregister("w")
    await asyncio.wait_for(watcher, 5)
    assert views == [[], ["w:SERVING"], ["w:DRAINING"], []]


async def test_membership_survives_a_registry_restart() -> None:
    port = free_port()
    server, store = await serve_registry(port)
    client = RemoteRegistry(f"127.0.0.1:{port}")
    member = Membership(client, instance("survivor"), heartbeat_s=0.1, ttl_s=2)
    member.start()
    try:
        await asyncio.sleep(0.3)
        assert [i.instance_id for i in await store.list_instances()] == ["survivor"]
        await server.stop(0)
        await store.close()
        await asyncio.sleep(0.3)  # heartbeats fail while the registry is gone
        server, store = await serve_registry(port)  # a fresh registry knows nobody...
        for _ in range(50):
            if await store.list_instances():
                break
            await asyncio.sleep(0.1)
        assert [i.instance_id for i in await store.list_instances()] == ["survivor"]  # ...until it re-registers
        await member.set_state(common_pb2.SERVING_STATE_DRAINING)
        assert (await store.list_instances())[0].state == common_pb2.SERVING_STATE_DRAINING
        await member.leave()
        assert await store.list_instances() == []
    finally:
        await member.leave()
        await client.close()
        await server.stop(0)
        await store.close()


async def test_registry_rejects_incomplete_registrations(remote: tuple[RemoteRegistry, InMemoryRegistry, int]) -> None:
    client, _, _ = remote
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.register(Instance("x", "nlp", (), ""), ttl_s=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance_id, address and at least one service are required" in (caught.value.details() or "")
