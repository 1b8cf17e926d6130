"""The gateway process, the mesh's front door: verifies every caller's API key, applies its tenant's scopes and
quotas, and forwards aimass.v1 calls to replicas over mesh mTLS (and the control plane's public calls, model loads
included, to the active scheduler); serves the mesh's model catalogue and the AdminService (keys, tenants, audit)
over the shared store."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health

from aimass.runtime import contract, tracing
from aimass.runtime.config import GatewayConfig, Settings
from aimass.runtime.discovery import CONTROL_PLANE_SERVICES, make_registry
from aimass.runtime.identity import ROLE_GATEWAY, process_credentials
from aimass.runtime.server import NOT_SERVING, SERVING, Listener, ServerRunner, message_options, serve_process
from aimass.store.sql import SqlStore
from aimass.tenancy.audit import AuditLog
from aimass.tenancy.quotas import TenantQuotas
from aimass.v1 import (
    admin_pb2_grpc,
    assistant_pb2_grpc,
    cluster_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    scenarios_pb2_grpc,
)
from gateway.admin import AdminServicer
from gateway.assistant.servicer import AssistantServicer
from gateway.assistant.sessions import Sessions
from gateway.auth import ApiKeyInterceptor, KeyVerifier
from gateway.cluster import ClusterServicer
from gateway.composition import Stages
from gateway.forwarder import Forwarder
from gateway.model_catalogue import ModelCatalogueServicer
from gateway.oip.reflection import OIP_SERVICE, reflection_pool
from gateway.oip.servicer import OipServicer
from gateway.replicas import Replica, ReplicaSet
from gateway.router import make_router
from gateway.scenarios.servicer import ScenarioServicer
from gateway.traffic import TrafficInterceptor, TrafficRecorder
from gateway.view import LoadView, ViewWatcher

log = logging.getLogger(__name__)

MODEL_SERVICE = "aimass.v1.ModelService"
ADMIN_SERVICE = "aimass.v1.AdminService"
CLUSTER_SERVICE = "aimass.v1.ClusterService"
ASSISTANT_SERVICE = "aimass.v1.AssistantService"
SCENARIO_SERVICE = "aimass.v1.ScenarioService"
# The control plane's contracts are for mesh processes, on the scheduler's mTLS port: never forwarded.
INTERNAL_SERVICES = frozenset(
    {
        "aimass.v1.SchedulerService",
        "aimass.v1.RegistryService",
        "aimass.v1.BlobService",
        "aimass.v1.TrainerService",
        "aimass.v1.ModelHostService",
    }
)


def replica_channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """The gateway's channels to replicas: message limits as the server's, keepalive pings to notice a host that
    vanished, and a short reconnect backoff so a replica that comes back is used again quickly."""
    options: list[tuple[str, int]] = message_options(config.server)
    if config.keepalive_s:
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            # Without it grpc (1.85) waits 60 s for an unanswered ping: calls on a frozen replica waited out their
            # deadlines instead of failing UNAVAILABLE and being retried on another replica.
            ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return [*options, ("grpc.min_reconnect_backoff_ms", 1000), ("grpc.max_reconnect_backoff_ms", 5000)]


def front_door_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS on the public port when gateway.tls_cert/tls_key are set (no client certificates: callers prove who they
    are with API keys)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    return grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])


class GatewayApp:
    kind = "gateway"
    # Served here, not forwarded: replicas serve ModelService too, but only for their own models.
    # The assistant and scenarios compose forwarded calls here (gateway/composition.py).
    service_names: tuple[str, ...] = (
        MODEL_SERVICE,
        ADMIN_SERVICE,
        CLUSTER_SERVICE,
        ASSISTANT_SERVICE,
        SCENARIO_SERVICE,
    )

    def __init__(self, settings: Settings, *, worker: int | None = None) -> None:
        self.settings = settings
        self.credentials = process_credentials(settings, ROLE_GATEWAY)
        # The registry is the scheduler's (or Consul): the gateway registers there and follows it.
        self.registry = make_registry(settings.registry, credentials=self.credentials)
        self.replicas = ReplicaSet(
            self.registry,
            credentials=self.credentials,
            channel_options=replica_channel_options(settings.gateway),
            close_grace_s=settings.gateway.server.drain_grace_s,
            on_change=self._on_change,
            control_plane_services=CONTROL_PLANE_SERVICES,
        )
        self.view = LoadView()
        self.view_watcher = (
            ViewWatcher(
                settings.scheduler.address,
                self.view,
                subscriber_id=f"gateway-{os.getpid()}",
                credentials=self.credentials,
            )
            if settings.scheduler.address
            else None
        )
        self.forwarder = Forwarder(
            self.replicas,
            make_router(settings.gateway.router, self.view),
            local_services=frozenset(self.service_names),
            internal_services=INTERNAL_SERVICES,
            retry_unavailable=settings.gateway.retry_unavailable,
            router_name=settings.gateway.router,
            tracer=tracing.tracer(),
            config=settings.gateway,
        )
        # Keys, tenants and the audit log live in the store every gateway shares (opened in load()).
        self.store = SqlStore(settings.store_url, busy_timeout_s=settings.store.busy_timeout_s)
        self.audit = AuditLog(self.store, coalesce_s=settings.auth.audit_coalesce_s)
        self.verifier = KeyVerifier(self.store, settings.auth, settings.tenants) if settings.auth.mode == "on" else None
        self.quotas = TenantQuotas(
            gateways=lambda: self.replicas.gateways,
            max_tracked=settings.tenants.max_tracked,
            idle_expiry_s=settings.tenants.idle_expiry_s,
        )
        self.auth = ApiKeyInterceptor(
            self.verifier,
            self.quotas,
            self.audit,
            usage=self.view.tenant_usage,
            tenants=settings.tenants,
            worker=str(worker or 0),
        )
        # What callers got per public service and tenant, for ClusterService (whose own calls are left out).
        self.traffic = TrafficRecorder(
            {*contract.services(), OIP_SERVICE} - INTERNAL_SERVICES - {CLUSTER_SERVICE},
        )
        self._health: health.aio.HealthServicer | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    @property
    def forwarded_services(self) -> tuple[str, ...]:
        return tuple(sorted(self.forwarder.forwarded_services))

    @property
    def listener(self) -> Listener:
        """The public port: API keys on every call (auth.mode "on"), TLS when configured. With mesh TLS on, also the
        adapter listener (gateway.adapter_port): mesh mTLS, where front-door adapters call with their callers' keys
        and the gateway believes the client address they pass on (gateway/auth.py: only adapter roles may call there).
        With mesh TLS off there is none: a plaintext port could not be told apart from the public one (interceptors
        are the server's, not a port's), so adapters call the public port and their callers share their address."""
        config = self.settings.gateway
        credentials = front_door_credentials(config)
        adapters: tuple[tuple[str, grpc.ServerCredentials], ...] = ()
        if self.credentials is not None:
            address = f"{config.server.host}:{config.adapter_port}"
            adapters = ((address, self.credentials.server_credentials()),)
        # Traffic is recorded inside auth: admitted calls, with their verified tenant.
        interceptors = (self.auth, TrafficInterceptor(self.traffic))
        return Listener(credentials, interceptors, "plaintext" if credentials is None else "tls", adapters)

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        self._health = health_servicer
        # The catalogue; loads and unloads go to the scheduler, which decides and applies them.
        catalogue = ModelCatalogueServicer(self.replicas)
        models_pb2_grpc.add_ModelServiceServicer_to_server(catalogue, server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.store, self.verifier, self.audit), server)
        cluster = ClusterServicer(
            self.view, self.traffic, self.replicas, self.verifier, forwarded=lambda: self.forwarded_services
        )
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(cluster, server)
        stages = Stages(self.forwarder, self.auth.stage)
        limits = self.settings.assistant
        sessions = Sessions(
            self.store,
            ttl_s=limits.session_ttl_s,
            max_chars=limits.max_session_chars,
            max_per_tenant=limits.max_sessions_per_tenant,
        )
        assistant_pb2_grpc.add_AssistantServiceServicer_to_server(AssistantServicer(stages, sessions, limits), server)
        scenarios = ScenarioServicer(stages, self.store, self.settings.scenarios)
        scenarios_pb2_grpc.add_ScenarioServiceServicer_to_server(scenarios, server)
        # Added last: gRPC consults registered services (health, reflection, registry) before generic handlers.
        # The OIP's (inference.GRPCInferenceService) before the forwarder, which answers every other method.
        oip_handler = OipServicer(self.forwarder, catalogue, self.settings).generic_handler()
        server.add_generic_rpc_handlers((oip_handler, self.forwarder))

    async def load(self) -> None:
        if self.verifier is None:
            log.warning(
                'AUTH IS OFF (auth.mode = "off"): the gateway takes calls with no API key and trusts the tenant a '
                "caller names in x-aimass-tenant. For throwaway development only."
            )
        # Creates or upgrades the schema (safe when several processes start at once).
        await asyncio.to_thread(self.store.migrate)
        if self.verifier is not None:
            await self.verifier.start()
        self.audit.start()
        self.replicas.start()
        if self.view_watcher is not None:
            self.view_watcher.start()
        self._on_change({})

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
        await self.replicas.close()
        if self.verifier is not None:
            await self.verifier.close()
        await self.audit.close()
        await asyncio.to_thread(self.store.close)


def build_runner(settings: Settings, *, worker: int | None = None) -> ServerRunner:
    """The gateway's server; ``worker``: its index among the workers sharing the ports (gateway/workers.py)."""
    app = GatewayApp(settings, worker=worker)
    return ServerRunner(
        app,
        settings.gateway.server,
        registry=app.registry,
        registry_config=settings.registry,
        listener=app.listener,
        reflection_extra=(*app.forwarded_services, OIP_SERVICE),
        # Reflection shows the OIP under its wire name (gateway/oip/reflection.py).
        reflection_pool=reflection_pool,
        # Replicas echo the request id; the gateway only fills one in (see forwarder) and relays their trailers.
        echo_request_id=False,
        reuse_port=worker is not None,
    )


def main(worker: int | None = None) -> None:
    """Serve one gateway: alone, or as worker ``worker`` of a gateway parent (see gateway/workers.py)."""
    serve_process(
        "gateway",
        lambda settings: build_runner(settings, worker=worker),
        log_name="gateway" if worker is None else f"gateway-{worker}",
    )
