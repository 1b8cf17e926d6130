"""The scheduler process: serves aimass.v1.SchedulerService, follows the registry, expires silent reporters.

With the Consul registry several schedulers may run: the one holding the Consul leader lock is active, the others
stand by (SchedulerService health NOT_SERVING, listed NOT_SERVING, every call answered UNAVAILABLE) and take over
when the lock is released (a clean shutdown) or its session expires (a crash). With the embedded registry there is
one scheduler and no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health

from aimass.runtime.config import RegistryConfig, SchedulerConfig, Settings
from aimass.runtime.discovery import Registry, make_registry
from aimass.runtime.errors import Unavailable
from aimass.runtime.server import ServerRunner, serve_process
from aimass.v1 import models_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.service import Context, SchedulerServicer, SchedulerState

if TYPE_CHECKING:
    from aimass.runtime.discovery.leader import ConsulLeader

log = logging.getLogger(__name__)


class StandbySchedulerServicer(SchedulerServicer):
    """SchedulerService that answers UNAVAILABLE (safe to retry on the active scheduler) while ``standby()`` gives a
    reason, i.e. while this scheduler stands by."""

    def __init__(self, state: SchedulerState, standby: Callable[[], str]) -> None:
        super().__init__(state)
        self.standby = standby

    def _check_active(self) -> None:
        reason = self.standby()
        if reason:
            raise Unavailable(reason, reason="SCHEDULER_STANDBY")

    async def ReportNode(
        self, request: scheduler_pb2.ReportNodeRequest, context: Context
    ) -> scheduler_pb2.ReportNodeResponse:
        self._check_active()
        return await super().ReportNode(request, context)

    async def ReportLoad(
        self, request: scheduler_pb2.ReportLoadRequest, context: Context
    ) -> scheduler_pb2.ReportLoadResponse:
        self._check_active()
        return await super().ReportLoad(request, context)

    async def WatchView(
        self, request: scheduler_pb2.WatchViewRequest, context: Context
    ) -> AsyncIterator[scheduler_pb2.WatchViewResponse]:
        self._check_active()
        async for response in super().WatchView(request, context):
            yield response

    async def PlaceModel(
        self, request: scheduler_pb2.PlaceModelRequest, context: Context
    ) -> scheduler_pb2.PlaceModelResponse:
        self._check_active()
        return await super().PlaceModel(request, context)

    async def EvictModel(
        self, request: scheduler_pb2.EvictModelRequest, context: Context
    ) -> scheduler_pb2.EvictModelResponse:
        self._check_active()
        return await super().EvictModel(request, context)

    async def GetPlacement(
        self, request: scheduler_pb2.GetPlacementRequest, context: Context
    ) -> scheduler_pb2.GetPlacementResponse:
        self._check_active()
        return await super().GetPlacement(request, context)


class SchedulerApp:
    kind = "scheduler"
    service_names: tuple[str, ...] = ("aimass.v1.SchedulerService",)

    def __init__(
        self, config: SchedulerConfig, registry_config: RegistryConfig, *, registry: Registry | None = None
    ) -> None:
        self.config = config
        self.registry_config = registry_config
        self.state = SchedulerState(
            report_interval_s=config.report_interval_s,
            silent_intervals=config.silent_intervals,
            tenant_weights=config.tenant_weights,
            model_budgets={
                models_pb2.Modality.Value(f"MODALITY_{name.upper()}"): int(size)
                for name, size in config.model_budgets.items()
            },
        )
        # The registry this scheduler follows (the runner may register with the same one).
        self.registry = registry or make_registry(registry_config)
        # Several schedulers against one Consul: the lock decides which one is active.
        self.leader: ConsulLeader | None = None
        if registry_config.backend == "consul":
            # Imported here: the embedded default never loads the Consul client (aiohttp).
            from aimass.runtime.discovery.consul import ConsulRegistry
            from aimass.runtime.discovery.leader import ConsulLeader

            # One Consul client for following and for the lock, so an outage is logged once.
            client = self.registry.client if isinstance(self.registry, ConsulRegistry) else None
            self.leader = ConsulLeader(registry_config.consul, client=client)
        self.active = self.leader is None
        self._tasks: list[asyncio.Task[None]] = []
        self._set_active: Callable[[bool], Awaitable[None]] | None = None

    def standby_reason(self) -> str:
        if self.active or self.leader is None:
            return ""
        holder = self.leader.holder
        return f"this scheduler stands by; the active one is {holder or 'not known yet'}"

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
            StandbySchedulerServicer(self.state, self.standby_reason), server
        )

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_registry(self.registry), name="scheduler-registry"),
            loop.create_task(self._expire(), name="scheduler-expiry"),
        ]

    async def stand_by(self, identity: str, set_active: Callable[[bool], Awaitable[None]]) -> None:
        """Active at once without a lock; with one, from the moment it is held (the runner follows)."""
        if self.leader is None:
            await set_active(True)
            return
        self._set_active = set_active
        self.leader.start(identity, self._leadership_changed)

    async def _leadership_changed(self, leading: bool) -> None:
        self.active = leading
        if leading:
            self.state.closing = False
        else:
            # Gateways watching this scheduler's view reconnect (and find the active one).
            await self.state.close_watches()
        if self._set_active is not None:
            await self._set_active(leading)

    async def _follow_registry(self, registry: Registry) -> None:
        async for instances in registry.watch():
            self.state.set_instances(instances)
            await self.state.changed()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            gone = self.state.expire()
            if gone:
                log.warning("silent for %d intervals, dropped: %s", self.config.silent_intervals, "; ".join(gone))
                await self.state.changed()

    async def end_streams(self) -> None:
        # Draining: hand the lock over first, so a standby takes over while this one finishes.
        if self.leader is not None:
            await self.leader.resign()
        # Gateways watching the view reconnect (to another scheduler, or to this one once restarted).
        await self.state.close_watches()

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return ()  # the scheduler holds no models

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leader is not None:
            await self.leader.resign()
        await self.registry.close()


def build_runner(settings: Settings, *, register: bool = True) -> ServerRunner:
    app = SchedulerApp(settings.scheduler, settings.registry)
    return ServerRunner(
        app,
        settings.scheduler.server,
        # One registry client for following and for registering (closing it twice is harmless).
        registry=app.registry if register else None,
        registry_config=settings.registry,
    )


def main() -> None:
    serve_process("scheduler", build_runner)
