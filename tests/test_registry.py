"""The embedded registry where it lives, in the scheduler, over real gRPC on loopback with mesh mTLS: TTLs, watch,
replicas re-registering after a scheduler restart, refusals, and who may speak for an instance.

Replicas register, heartbeat and deregister with their own certificate (an NLP one here); operators (and gateways)
read. Every client is the production ``RemoteRegistry``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from aimass import pki
from aimass.local_mesh import free_port
from aimass.runtime.config import Settings
from aimass.runtime.discovery import InMemoryRegistry, Instance, Membership, RemoteRegistry
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from scheduler.app import SchedulerApp
from scheduler.app import build_runner as scheduler_runner
from tests.eventually import eventually
from tests.inprocess_mesh import mesh_settings
from tests.security import credentials, settings

# The registry's heartbeat setting: a (re)started scheduler shows watchers their first view two heartbeats later.
REGISTRY_HEARTBEAT_S = 0.2


def instance(
    name: str, state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_SERVING, kind: str = "nlp"
) -> Instance:
    return Instance(
        instance_id=name,
        kind=kind,
        services=(f"aimass.v1.{kind.capitalize()}Service",),
        address=f"127.0.0.1:{free_port()}",
        models=("all-MiniLM-L6-v2",),
        state=state,
        pid=1,
    )


def scheduler_settings(port: int, heartbeat_s: float = REGISTRY_HEARTBEAT_S) -> Settings:
    base = mesh_settings(port)
    return base.model_copy(update={"registry": base.registry.model_copy(update={"heartbeat_s": heartbeat_s})})


async def start_scheduler(port: int, heartbeat_s: float = REGISTRY_HEARTBEAT_S) -> ServerRunner:
    """The scheduler process's server with its embedded registry, on ``port`` (not registered with itself, so the
    registry lists only what the test registers)."""
    runner = scheduler_runner(scheduler_settings(port, heartbeat_s), register=False)
    await runner.start()
    return runner


def embedded(runner: ServerRunner) -> InMemoryRegistry:
    app = runner.app
    assert isinstance(app, SchedulerApp) and app.embedded is not None
    return app.embedded


def identity(role: str, name: str) -> MeshCredentials:
    """Another certificate of the session's CA: a second process of ``role``."""
    pki.issue(settings().pki_dir, role=role, name=name)
    return MeshCredentials.load(settings().pki_dir, name)


@dataclass
class Hosted:
    scheduler: ServerRunner
    # An NLP replica's client (it registers NLP instances) and an operator's (it reads).
    replica: RemoteRegistry
    operator: RemoteRegistry

    @property
    def address(self) -> str:
        return self.scheduler.address

    @property
    def store(self) -> InMemoryRegistry:
        return embedded(self.scheduler)


@pytest.fixture
async def hosted() -> AsyncIterator[Hosted]:
    scheduler = await start_scheduler(free_port())
    replica = RemoteRegistry(scheduler.address, credentials("nlp"))
    operator = RemoteRegistry(scheduler.address, credentials("operator"))
    try:
        yield Hosted(scheduler, replica, operator)
    finally:
        await replica.close()
        await operator.close()
        await scheduler.drain()


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_register_list_and_deregister(hosted: Hosted) -> None:
    client, reader = hosted.replica, hosted.operator
    await client.register(instance("a"), ttl_s=5)
    await client.register(instance("b"), ttl_s=5)
    assert sorted(i.instance_id for i in await reader.list_instances("aimass.v1.NlpService")) == ["a", "b"]
    assert await reader.list_instances("aimass.v1.VisionService") == []
    await client.deregister("a")
    assert [i.instance_id for i in await reader.list_instances()] == ["b"]
    listed = (await reader.list_instances())[0]
    assert listed.models == ("all-MiniLM-L6-v2",) and listed.serving


async def test_missed_heartbeats_drop_the_instance(hosted: Hosted) -> None:
    client = hosted.replica
    await client.register(instance("short-lived"), ttl_s=0.3)
    assert await client.heartbeat("short-lived", common_pb2.SERVING_STATE_SERVING)
    await asyncio.sleep(1.0)
    assert await hosted.operator.list_instances() == []
    # The registry answers NOT_FOUND for it now: the client reads that as "register again".
    assert not await client.heartbeat("short-lived", common_pb2.SERVING_STATE_SERVING)


async def test_watch_sends_the_view_then_every_change(hosted: Hosted) -> None:
    client = hosted.replica
    views: list[list[str]] = []

    async def follow() -> None:
        async for view in hosted.operator.watch():
            views.append(sorted(f"{i.instance_id}:{i.state_name}" for i in view))
            if len(views) == 4:
                return

    watcher = asyncio.ensure_future(follow())
    try:
        # The first view (empty) comes once the scheduler has settled; then one view per change.
        await eventually("the first view", lambda: len(views) == 1, 5)
        await client.register(instance("w"), ttl_s=5)
        await eventually("the registration", lambda: len(views) == 2, 5)
        await client.heartbeat("w", common_pb2.SERVING_STATE_DRAINING)
        await eventually("the drain", lambda: len(views) == 3, 5)
        await client.deregister("w")
        await asyncio.wait_for(watcher, 5)
    finally:
        watcher.cancel()
    assert views == [[], ["w:SERVING"], ["w:DRAINING"], []]


async def test_membership_survives_a_scheduler_restart() -> None:
    port = free_port()
    # A registry heartbeat setting of 1.5 s makes the restarted scheduler hold its first view back for 3 s: longer than
    # the member (heartbeating every 0.1 s; its channel reconnects within gRPC's backoff, at most 2 s) takes to
    # register again.
    settle_heartbeat_s = 1.5
    scheduler = await start_scheduler(port, settle_heartbeat_s)
    client = RemoteRegistry(f"127.0.0.1:{port}", credentials("nlp"))
    member = Membership(client, instance("survivor"), heartbeat_s=0.1, ttl_s=2)
    member.start()
    try:
        await eventually("registered", lambda: listed_as(embedded(scheduler), ["survivor"]), 5)
        await scheduler.drain()
        await asyncio.sleep(0.3)  # heartbeats fail while the scheduler is gone
        scheduler = await start_scheduler(port, settle_heartbeat_s)  # a fresh registry knows nobody...
        # ...and a gateway or operator watching it sees its first view only once the survivor has registered again.
        async with operator_watch(f"127.0.0.1:{port}") as watch:
            assert [i.instance_id for i in await asyncio.wait_for(anext(watch), 10)] == ["survivor"]
        await member.set_state(common_pb2.SERVING_STATE_DRAINING)
        assert (await embedded(scheduler).list_instances())[0].state == common_pb2.SERVING_STATE_DRAINING
        await member.leave()
        assert await embedded(scheduler).list_instances() == []
    finally:
        await member.leave()
        await client.close()
        await scheduler.drain()


async def listed_as(store: InMemoryRegistry, expected: list[str]) -> bool:
    return sorted(i.instance_id for i in await store.list_instances()) == expected


@contextlib.asynccontextmanager
async def operator_watch(address: str) -> AsyncIterator[AsyncIterator[list[Instance]]]:
    """A new watch of the registry at ``address``, as an operator (or a gateway) opens one."""
    reader = RemoteRegistry(address, credentials("operator"))
    watch = reader.watch()
    try:
        yield watch
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await reader.close()


async def test_the_registry_refuses_incomplete_registrations_and_unknown_heartbeats(hosted: Hosted) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hosted.replica.register(Instance("x", "nlp", (), ""), ttl_s=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance_id, address and at least one service are required" in (caught.value.details() or "")
    async with mesh_channel(hosted.address, credentials("nlp"), server_role=ROLE_SCHEDULER) as channel:
        beat = registry_pb2_grpc.RegistryServiceStub(channel).Heartbeat(
            registry_pb2.HeartbeatRequest(instance_id="nobody", state=common_pb2.SERVING_STATE_SERVING), timeout=5
        )
        error = await error_of(beat)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "instance 'nobody' is not registered" in (error.details() or "")


async def test_an_instance_belongs_to_the_certificate_that_registered_it(hosted: Hosted) -> None:
    owner, reader = hosted.replica, hosted.operator
    other = RemoteRegistry(hosted.address, identity("nlp", "nlp-other"))
    try:
        await owner.register(instance("owned"), ttl_s=30)
        # Another NLP process may not heartbeat (drain), deregister or re-register it.
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: other.heartbeat("owned", common_pb2.SERVING_STATE_DRAINING),
            lambda: other.deregister("owned"),
            lambda: other.register(instance("owned"), ttl_s=30),
        ]
        for call in calls:
            error = await error_of(call())
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "instance 'owned' belongs to mesh identity 'nlp', not 'nlp-other'" in (error.details() or "")
        assert [(i.instance_id, i.state_name) for i in await reader.list_instances()] == [("owned", "SERVING")]
        # A certificate registers instances of its own role (kind) only.
        error = await error_of(owner.register(instance("fake-vision", kind="vision"), ttl_s=30))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a nlp certificate registers nlp instances only, not 'vision'" in (error.details() or "")
        # Once its owner deregistered it, the id is free for whoever registers it next.
        await owner.deregister("owned")
        await other.register(instance("owned"), ttl_s=30)
        assert hosted.store.owner("owned") == "nlp-other"
        # Operators read the registry; they never write it.
        error = await error_of(reader.register(instance("op", kind="operator"), ttl_s=30))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await other.close()
