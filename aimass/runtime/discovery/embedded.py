"""The embedded registry: an in-memory store with TTLs, served over gRPC by the scheduler process.

``InMemoryRegistry`` is the store (the scheduler uses it directly), ``RegistryServicer`` exposes it as
``aimass.v1.RegistryService`` on the scheduler's mesh-mTLS port, and ``RemoteRegistry`` is the client every other
process uses. With mesh TLS on, an instance belongs to the certificate that registered it: only that identity may
heartbeat, drain or deregister it, and a certificate registers instances of its own role (kind) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc

from aimass.runtime.discovery.base import Instance
from aimass.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from aimass.runtime.identity import (
    ROLE_SCHEDULER,
    MeshCredentials,
    MeshIdentity,
    check_owner,
    mesh_channel,
    peer_identity,
)
from aimass.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

# The reaper wakes this long after the earliest deadline, so that instance is past it (not exactly at it).
REAP_SLACK_S: Final = 0.05


class InMemoryRegistry:
    """``settle_s``: watchers get their first view only this long after the registry started, so after a restart
    of its host the processes still running have registered again (within a heartbeat) before gateways see the
    view, instead of seeing an empty mesh for a moment."""

    def __init__(self, *, settle_s: float = 0.0) -> None:
        self.settle_s = settle_s
        self._started_at = time.monotonic()
        self._instances: dict[str, Instance] = {}
        self._expires_at: dict[str, float] = {}
        self._ttl: dict[str, float] = {}
        # instance id → the mesh identity (certificate name) that registered it.
        self._owners: dict[str, str] = {}
        self._version = 0
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        # Set by a registration (its deadline may come before the one the reaper sleeps until; heartbeats only move
        # deadlines later).
        self._registered = asyncio.Event()
        # Set when the hosting process drains: watches end, so the drain does not wait out its grace for them.
        self._closing = False

    @property
    def version(self) -> int:
        return self._version

    def start(self) -> None:
        self._started_at = time.monotonic()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_expired(), name="registry-reaper")

    async def _publish(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def register(self, instance: Instance, ttl_s: float) -> None:
        self._instances[instance.instance_id] = instance
        self._ttl[instance.instance_id] = ttl_s
        self._expires_at[instance.instance_id] = time.monotonic() + ttl_s
        self._registered.set()
        log.info(
            "registered %s %s at %s (%s)", instance.kind, instance.instance_id, instance.address, instance.state_name
        )
        await self._publish()

    async def heartbeat(self, instance_id: str, state: common_pb2.ServingState.ValueType) -> bool:
        current = self._instances.get(instance_id)
        if current is None:
            return False
        self._expires_at[instance_id] = time.monotonic() + self._ttl[instance_id]
        if current.state != state:
            self._instances[instance_id] = dataclasses.replace(current, state=state)
            log.info("%s is now %s", instance_id, self._instances[instance_id].state_name)
            await self._publish()
        return True

    async def deregister(self, instance_id: str) -> None:
        if self._drop(instance_id):
            log.info("deregistered %s", instance_id)
            await self._publish()

    def owner(self, instance_id: str) -> str | None:
        """The identity that registered ``instance_id`` (None: unknown, or registered with mesh TLS off)."""
        return self._owners.get(instance_id)

    def claim(self, instance_id: str, owner: str) -> bool:
        """Binds ``instance_id`` to ``owner`` unless another identity holds it; True when ``owner`` holds it now."""
        return self._owners.setdefault(instance_id, owner) == owner

    def _drop(self, instance_id: str) -> bool:
        self._expires_at.pop(instance_id, None)
        self._ttl.pop(instance_id, None)
        self._owners.pop(instance_id, None)
        return self._instances.pop(instance_id, None) is not None

    async def list_instances(self, service: str = "") -> list[Instance]:
        return [i for i in self._instances.values() if not service or service in i.services]

    async def watch(self) -> AsyncIterator[list[Instance]]:
        await asyncio.sleep(self._started_at + self.settle_s - time.monotonic())
        seen = -1
        while not self._closing:
            async with self._changed:
                if self._version == seen:
                    await self._changed.wait()
                if self._closing:
                    return
                seen = self._version
                view = list(self._instances.values())
            yield view

    async def end_watches(self) -> None:
        """Ends every watch (the registry's host is draining; watchers reconnect to wherever it comes back)."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()

    async def _reap_expired(self) -> None:
        """Drops instances past their deadline, sleeping until the next deadline (or a registration) in between,
        so an idle registry wakes about once per TTL rather than on a fixed tick."""
        while True:
            self._registered.clear()
            now = time.monotonic()
            expired = [iid for iid, deadline in self._expires_at.items() if deadline < now]
            for iid in expired:
                log.warning("%s missed its heartbeats; dropped from the registry", iid)
                self._drop(iid)
            if expired:
                await self._publish()
            following = min(self._expires_at.values(), default=None)
            wait_s = None if following is None else max(0.0, following - time.monotonic()) + REAP_SLACK_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registered.wait(), timeout=wait_s)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None


Context = grpc.aio.ServicerContext[Any, Any]


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, store: InMemoryRegistry) -> None:
        self.store = store

    def _check_owner(self, caller: MeshIdentity | None, instance_id: str) -> None:
        """With mesh TLS, only the identity that registered an instance may speak for it."""
        check_owner(caller, f"instance {instance_id!r}", self.store.owner(instance_id))

    async def Register(self, request: registry_pb2.RegisterRequest, context: Context) -> registry_pb2.RegisterResponse:
        instance = request.instance
        if not instance.instance_id or not instance.address or not instance.services:
            raise InvalidArgument("instance_id, address and at least one service are required", reason="BAD_INSTANCE")
        caller = peer_identity(context)
        if caller is not None:
            if instance.kind != caller.role:
                raise PermissionDenied(
                    f"a {caller.role} certificate registers {caller.role} instances only, not {instance.kind!r}",
                    reason="WRONG_KIND",
                )
            if not self.store.claim(instance.instance_id, caller.name):
                self._check_owner(caller, instance.instance_id)
        ttl = request.ttl_seconds if request.ttl_seconds > 0 else 5.0
        await self.store.register(Instance.from_proto(instance), ttl)
        return registry_pb2.RegisterResponse()

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: Context
    ) -> registry_pb2.HeartbeatResponse:
        self._check_owner(peer_identity(context), request.instance_id)
        if not await self.store.heartbeat(request.instance_id, request.state):
            raise NotFound(f"instance {request.instance_id!r} is not registered", reason="NOT_REGISTERED")
        return registry_pb2.HeartbeatResponse()

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: Context
    ) -> registry_pb2.DeregisterResponse:
        self._check_owner(peer_identity(context), request.instance_id)
        await self.store.deregister(request.instance_id)
        return registry_pb2.DeregisterResponse()

    async def ListInstances(
        self, request: registry_pb2.ListInstancesRequest, context: Context
    ) -> registry_pb2.ListInstancesResponse:
        found = await self.store.list_instances(request.service)
        return registry_pb2.ListInstancesResponse(instances=[i.to_proto() for i in found])

    async def WatchInstances(
        self, request: registry_pb2.WatchInstancesRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchInstancesResponse]:
        async for view in self.store.watch():
            yield registry_pb2.WatchInstancesResponse(
                instances=[i.to_proto() for i in view], version=self.store.version
            )


class RemoteRegistry:
    """Client of the embedded registry, hosted by the scheduler (mesh mTLS with ``credentials``)."""

    def __init__(self, address: str, credentials: MeshCredentials | None, *, call_timeout_s: float = 2.0) -> None:
        self.address = address
        self.call_timeout_s = call_timeout_s
        # A restarted scheduler is found again within a couple of heartbeats, not after gRPC's default backoff.
        self._channel = mesh_channel(
            address, credentials, server_role=ROLE_SCHEDULER, options=[("grpc.max_reconnect_backoff_ms", 2000)]
        )
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    async def register(self, instance: Instance, ttl_s: float) -> None:
        await self._stub.Register(
            registry_pb2.RegisterRequest(instance=instance.to_proto(), ttl_seconds=ttl_s), timeout=self.call_timeout_s
        )

    async def heartbeat(self, instance_id: str, state: common_pb2.ServingState.ValueType) -> bool:
        try:
            await self._stub.Heartbeat(
                registry_pb2.HeartbeatRequest(instance_id=instance_id, state=state), timeout=self.call_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def deregister(self, instance_id: str) -> None:
        await self._stub.Deregister(
            registry_pb2.DeregisterRequest(instance_id=instance_id), timeout=self.call_timeout_s
        )

    async def list_instances(self, service: str = "") -> list[Instance]:
        reply = await self._stub.ListInstances(
            registry_pb2.ListInstancesRequest(service=service), timeout=self.call_timeout_s
        )
        return [Instance.from_proto(i) for i in reply.instances]

    async def watch(self) -> AsyncIterator[list[Instance]]:
        backoff = 0.1
        while True:
            try:
                async for update in self._stub.WatchInstances(registry_pb2.WatchInstancesRequest()):
                    backoff = 0.1
                    yield [Instance.from_proto(i) for i in update.instances]
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "registry watch at %s broke (%s); keeping the last view and retrying", self.address, err.code()
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        await self._channel.close()
