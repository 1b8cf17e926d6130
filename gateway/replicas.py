"""The gateway's live view of replicas: one long-lived channel per replica, kept in step with the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from aimass.runtime.discovery import CONTROL_PLANE_KINDS, Instance, Registry
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, mesh_channel

log = logging.getLogger(__name__)

RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


@dataclass(eq=False)
class Replica:
    instance: Instance
    channel: grpc.aio.Channel
    # Requests this gateway has in flight on the replica (routers may use it).
    inflight: int = 0
    # When (time.monotonic()) a call here last failed without an answer from the replica (the connection broke: it
    # died, was killed or cut off); None once it answers again.
    failed_at: float | None = None
    _calls: dict[str, Any] = field(default_factory=dict)

    def mark_down(self, now: float, window_s: float) -> bool:
        """Records that a call's connection broke at ``now``; True when that is news (the replica was not already
        known down within ``window_s``), which the gateway logs once."""
        if self.down_at(now, window_s):
            return False
        self.failed_at = now
        return True

    def answered(self) -> None:
        """The replica answered a call itself (any status): it is up."""
        self.failed_at = None

    def down_at(self, when: float, window_s: float) -> bool:
        """Whether the replica was known down at ``when``: its connection broke at most ``window_s`` before."""
        return self.failed_at is not None and 0 <= when - self.failed_at <= window_s

    def unary_unary(self, method: str) -> RawUnary:
        call = self._calls.get(method)
        if call is None:
            # No (de)serialisers: the request and response stay the bytes the client sent and the replica wrote.
            call = self._calls[method] = self.channel.unary_unary(method)
        return call

    def unary_stream(self, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self.channel.unary_stream(method)

    def stream_unary(self, method: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
        return self.channel.stream_unary(method)

    def stream_stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        return self.channel.stream_stream(method)


class ReplicaSet:
    """Healthy replicas per service, from the registry's watch stream."""

    def __init__(
        self,
        registry: Registry,
        *,
        credentials: MeshCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        close_grace_s: float = 30.0,
        on_change: Callable[[dict[str, list[Replica]]], Any] | None = None,
        skip_kinds: frozenset[str] = CONTROL_PLANE_KINDS,
        control_plane_services: frozenset[str] = frozenset(),
    ) -> None:
        self.registry = registry
        # Replicas are dialled with mesh mTLS, each expected to hold its kind's certificate.
        self.credentials = credentials
        self.channel_options = list(channel_options)
        self.close_grace_s = close_grace_s
        self.on_change = on_change
        self.skip_kinds = skip_kinds
        # Public services the control plane serves itself (datasets, training, deployments): calls to them are
        # forwarded to the active scheduler like to a replica, but it takes part in nothing else replicas do.
        self.control_plane_services = control_plane_services
        self.by_service: dict[str, list[Replica]] = {}
        self._by_instance: dict[str, Replica] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.first_view = asyncio.Event()
        # Set (and replaced) on every new view: waiters for something the view lacks wake up to look again.
        self._changed = asyncio.Event()
        # Gateways serving now (this one included once it has registered): tenants' quotas are shared among them.
        self.gateways = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="replica-set")

    def healthy(self, service: str) -> list[Replica]:
        return self.by_service.get(service, [])

    def all_healthy(self) -> list[Replica]:
        """Every serving replica once, whatever it serves (mesh-wide questions such as the model catalogue); the
        control plane is not one."""
        return sorted(
            (r for r in self._by_instance.values() if r.instance.kind not in self.skip_kinds),
            key=lambda r: r.instance.instance_id,
        )

    def control_plane(self, service: str) -> Replica | None:
        """The control-plane process serving ``service`` now (the active scheduler: one standing by is listed
        NOT_SERVING), or None."""
        return next(
            (
                r
                for r in sorted(self._by_instance.values(), key=lambda r: r.instance.instance_id)
                if r.instance.kind in self.skip_kinds and service in r.instance.services
            ),
            None,
        )

    async def wait_for_control_plane(self, service: str, timeout_s: float) -> Replica | None:
        """``control_plane(service)``, waiting up to ``timeout_s`` for the registry to list one (a scheduler that
        restarts or takes over is listed again within a few heartbeats)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (found := self.control_plane(service)) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return found

    def get(self, instance_id: str) -> Replica | None:
        return self._by_instance.get(instance_id)

    async def _follow(self) -> None:
        async for view in self.registry.watch():
            self.apply(view)
            self.first_view.set()

    def apply(self, view: list[Instance]) -> None:
        self.gateways = sum(1 for i in view if i.serving and i.kind == ROLE_GATEWAY)
        serving = {i.instance_id: i for i in view if i.serving and i.kind not in self.skip_kinds}
        serving |= {
            i.instance_id: i
            for i in view
            if i.serving and i.kind in self.skip_kinds and self.control_plane_services.intersection(i.services)
        }
        for gone in set(self._by_instance) - set(serving):
            replica = self._by_instance.pop(gone)
            log.info("replica %s left; closing its channel after in-flight calls finish", gone)
            # Closing with a grace lets calls already on the channel finish (a draining replica completes them).
            task = asyncio.get_running_loop().create_task(replica.channel.close(self.close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for iid, instance in serving.items():
            current = self._by_instance.get(iid)
            if current is None:
                log.info("replica %s joined at %s serving %s", iid, instance.address, ", ".join(instance.services))
                channel = mesh_channel(
                    instance.address, self.credentials, server_role=instance.kind, options=self.channel_options
                )
                self._by_instance[iid] = Replica(instance, channel)
            else:
                current.instance = instance
        by_service: dict[str, list[Replica]] = {}
        for replica in sorted(self._by_instance.values(), key=lambda r: r.instance.instance_id):
            control_plane = replica.instance.kind in self.skip_kinds
            for service in replica.instance.services:
                if not control_plane or service in self.control_plane_services:
                    by_service.setdefault(service, []).append(replica)
        self.by_service = by_service
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change(by_service)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for replica in self._by_instance.values():
            await replica.channel.close(self.close_grace_s)
        self._by_instance.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
