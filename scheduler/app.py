"""The scheduler process: serves aimass.v1.SchedulerService, follows the registry, expires silent reporters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime.config import SchedulerConfig, Settings
from aimass.runtime.discovery import RemoteRegistry
from aimass.runtime.server import ServerRunner, serve_process
from aimass.v1 import models_pb2, scheduler_pb2_grpc
from scheduler.service import SchedulerServicer, SchedulerState

log = logging.getLogger(__name__)


class SchedulerApp:
    kind = "scheduler"
    service_names: tuple[str, ...] = ("aimass.v1.SchedulerService",)

    def __init__(self, config: SchedulerConfig, registry_address: str) -> None:
        self.config = config
        self.registry_address = registry_address
        self.state = SchedulerState(
            report_interval_s=config.report_interval_s,
            silent_intervals=config.silent_intervals,
            tenant_weights=config.tenant_weights,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._registry: RemoteRegistry | None = None

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(self.state), server)

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self._registry = RemoteRegistry(self.registry_address)
        self._tasks = [
            loop.create_task(self._follow_registry(self._registry), name="scheduler-registry"),
            loop.create_task(self._expire(), name="scheduler-expiry"),
        ]

    async def _follow_registry(self, registry: RemoteRegistry) -> None:
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
        if self._registry is not None:
            await self._registry.close()


def build_runner(settings: Settings, *, register: bool = True) -> ServerRunner:
    return ServerRunner(
        SchedulerApp(settings.scheduler, settings.registry.address),
        settings.scheduler.server,
        registry=RemoteRegistry(settings.registry.address) if register else None,
        registry_config=settings.registry,
    )


def main() -> None:
    serve_process("scheduler", build_runner)
