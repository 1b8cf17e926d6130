"""The gateway process: hosts the embedded registry (or follows Consul), watches it, and forwards aimass.v1 calls
to replicas."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime import tracing
from aimass.runtime.config import GatewayConfig, Settings
from aimass.runtime.discovery import InMemoryRegistry, Registry, RegistryServicer, make_registry
from aimass.runtime.server import NOT_SERVING, SERVING, ServerRunner, serve_process, server_options
from aimass.v1 import models_pb2, models_pb2_grpc, registry_pb2_grpc, scheduler_pb2_grpc
from gateway.forwarder import Forwarder
from gateway.models import MeshModelServicer
from gateway.replicas import Replica, ReplicaSet
from gateway.router import make_router
from gateway.view import LoadView, ViewWatcher

log = logging.getLogger(__name__)

REGISTRY_SERVICE = "aimass.v1.RegistryService"
MODEL_SERVICE = "aimass.v1.ModelService"
INTERNAL_SERVICES = frozenset({"aimass.v1.SchedulerService"})


def replica_channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """The gateway's channels to replicas: message limits as the server's, keepalive pings to notice a host that
    vanished, and a short reconnect backoff so a replica that comes back is used again quickly."""
    options = server_options(config.server)
    if config.keepalive_s:
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return [*options, ("grpc.min_reconnect_backoff_ms", 1000), ("grpc.max_reconnect_backoff_ms", 5000)]


class GatewayApp:
    kind = "gateway"
    # Served here, not forwarded: replicas serve ModelService too, but only for their own models.
    service_names: tuple[str, ...] = (REGISTRY_SERVICE, MODEL_SERVICE)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The embedded registry lives here; with Consul the gateway registers and watches like everyone else.
        self.embedded: InMemoryRegistry | None = None
        self.registry: Registry
        if settings.registry.backend == "embedded":
            self.registry = self.embedded = InMemoryRegistry()
        else:
            self.registry = make_registry(settings.registry)
            self.service_names = (MODEL_SERVICE,)
        self.replicas = ReplicaSet(
            self.registry,
            channel_options=replica_channel_options(settings.gateway),
            close_grace_s=settings.gateway.server.drain_grace_s,
            on_change=self._on_change,
        )
        self.view = LoadView()
        self.view_watcher = (
            ViewWatcher(settings.scheduler.address, self.view, subscriber_id=f"gateway-{os.getpid()}")
            if settings.scheduler.address
            else None
        )
        self.forwarder = Forwarder(
            self.replicas,
            make_router(settings.gateway.router, self.view),
            local_services=frozenset(self.service_names),
            # The scheduler's contract is for mesh processes only.
            internal_services=INTERNAL_SERVICES,
            retry_unavailable=settings.gateway.retry_unavailable,
            router_name=settings.gateway.router,
            tracer=tracing.tracer(),
        )
        self._scheduler_channel: grpc.aio.Channel | None = None
        self._health: health.aio.HealthServicer | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def forwarded_services(self) -> tuple[str, ...]:
        return tuple(sorted(self.forwarder.forwarded_services))

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        self._health = health_servicer
        if self.embedded is not None:
            registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(self.embedded), server)
        scheduler = None
        if self.settings.scheduler.address:
            self._scheduler_channel = grpc.aio.insecure_channel(self.settings.scheduler.address)
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._scheduler_channel)
        models_pb2_grpc.add_ModelServiceServicer_to_server(
            MeshModelServicer(
                self.replicas,
                scheduler=scheduler,
                admin_tenants=frozenset(self.settings.gateway.admin_tenants),
            ),
            server,
        )
        # Added last: gRPC consults registered services (health, reflection, registry) before generic handlers.
        server.add_generic_rpc_handlers((self.forwarder,))

    async def load(self) -> None:
        if self.embedded is not None:
            self.embedded.start()
        self.replicas.start()
        if self.view_watcher is not None:
            self.view_watcher.start()
        self._on_change({})

    async def end_streams(self) -> None:
        # Replicas and the scheduler watch the embedded registry for as long as the gateway lives; their streams
        # end here so the drain finishes in-flight calls without waiting out its grace for them.
        if self.embedded is not None:
            await self.embedded.end_watches()

    def _on_change(self, by_service: dict[str, list[Replica]]) -> None:
        # Health per forwarded service: SERVING while at least one healthy replica serves it.
        if self._health is None:
            return
        for service in self.forwarded_services:
            status = SERVING if by_service.get(service) else NOT_SERVING
            task = asyncio.get_running_loop().create_task(self._health.set(service, status))
            self._health_updates.add(task)
            task.add_done_callback(self._health_updates.discard)

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return ()  # the gateway holds no models; its ModelService asks the replicas

    async def close(self) -> None:
        # The runner closes the registry itself (it is this process's Registry too).
        if self.view_watcher is not None:
            await self.view_watcher.close()
        if self._scheduler_channel is not None:
            await self._scheduler_channel.close()
        await self.replicas.close()


def build_runner(settings: Settings) -> ServerRunner:
    app = GatewayApp(settings)
    return ServerRunner(
        app,
        settings.gateway.server,
        registry=app.registry,
        registry_config=settings.registry,
        reflection_extra=app.forwarded_services,
        # Replicas echo the request id; the gateway only fills one in (see forwarder) and relays their trailers.
        echo_request_id=False,
    )


def main() -> None:
    serve_process("gateway", build_runner)
