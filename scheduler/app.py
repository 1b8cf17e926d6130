"""The scheduler process, the mesh's control plane: serves aimass.v1.SchedulerService and, with the embedded
registry (the default), aimass.v1.RegistryService; follows the registry; expires silent reporters.

Both services sit behind mesh mTLS (``SCHEDULER_POLICY``): replicas and gateways register themselves, replicas report
their load and node agents their devices (each only for its own identity), gateways watch the view and forward
model loads and unloads (ModelService LoadModel/UnloadModel, which the scheduler places and applies on replicas:
scheduler/model_loading.py), operators read. The registry is never on the public port.

With the Consul registry several schedulers may run: the one holding the Consul leader lock is active, the others
stand by (SchedulerService health NOT_SERVING, listed NOT_SERVING, every call answered UNAVAILABLE) and take over
when the lock is released (a clean shutdown) or its session expires (a crash). With the embedded registry there is
one scheduler and no lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health

from aimass.runtime.config import Settings
from aimass.runtime.discovery import (
    CONTROL_PLANE_SERVICES,
    InMemoryRegistry,
    Instance,
    Registry,
    RegistryServicer,
    make_registry,
)
from aimass.runtime.errors import Unavailable
from aimass.runtime.identity import (
    ANY_REPLICA,
    ROLE_GATEWAY,
    ROLE_NODE_AGENT,
    ROLE_OPERATOR,
    MeshPolicy,
    process_credentials,
)
from aimass.runtime.interceptors import ScopeInterceptor
from aimass.runtime.replica import MODEL_SERVICE
from aimass.runtime.server import Listener, ServerRunner, mesh_listener, serve_process
from aimass.runtime.tasks import cancel_and_wait
from aimass.store.blobs import BlobStore
from aimass.store.records import now_ms
from aimass.store.sql import SqlStore
from aimass.tenancy.audit import AuditLog
from aimass.v1 import (
    datasets_pb2_grpc,
    deployments_pb2_grpc,
    lifecycle_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    training_pb2_grpc,
)
from scheduler.lifecycle.blobs import BlobServicer
from scheduler.lifecycle.channels import MeshChannels
from scheduler.lifecycle.datasets import DatasetServicer
from scheduler.lifecycle.deployments import DeploymentServicer
from scheduler.lifecycle.job_placement import TRAINER_KIND
from scheduler.lifecycle.jobs import JobController, TrainingServicer
from scheduler.lifecycle.replica_sync import ReplicaSync
from scheduler.model_loading import ModelLoadingServicer
from scheduler.service import Context, SchedulerServicer, SchedulerState
from scheduler.xds import XDS_SERVICES, XdsServer

if TYPE_CHECKING:
    from aimass.runtime.discovery.leader import ConsulLeader

log = logging.getLogger(__name__)

REGISTRY_SERVICE = "aimass.v1.RegistryService"
SCHEDULER_SERVICE = "aimass.v1.SchedulerService"
# Who may call what on the scheduler's port. Instances and nodes are also bound to the identity that first spoke
# for them (RegistryServicer, SchedulerServicer).
SCHEDULER_POLICY = MeshPolicy(
    {
        f"/{REGISTRY_SERVICE}/Register": (ROLE_GATEWAY, ANY_REPLICA),
        f"/{REGISTRY_SERVICE}/Heartbeat": (ROLE_GATEWAY, ANY_REPLICA),
        f"/{REGISTRY_SERVICE}/Deregister": (ROLE_GATEWAY, ANY_REPLICA),
        f"/{REGISTRY_SERVICE}/ListInstances": (ROLE_GATEWAY, ROLE_OPERATOR),
        f"/{REGISTRY_SERVICE}/WatchInstances": (ROLE_GATEWAY, ROLE_OPERATOR),
        f"/{SCHEDULER_SERVICE}/ReportLoad": (ANY_REPLICA,),
        f"/{SCHEDULER_SERVICE}/ReportNode": (ROLE_NODE_AGENT,),
        f"/{SCHEDULER_SERVICE}/WatchView": (ROLE_GATEWAY, ROLE_OPERATOR),
        f"/{SCHEDULER_SERVICE}/PlaceModel": (ROLE_GATEWAY,),
        f"/{SCHEDULER_SERVICE}/EvictModel": (ROLE_GATEWAY,),
        f"/{SCHEDULER_SERVICE}/GetPlacement": (ROLE_GATEWAY, ROLE_OPERATOR),
        # xDS (scheduler/xds.py): internal callers dial replicas directly with a gateway certificate (the role
        # replicas serve); operators may read it too.
        **{f"/{service}/": (ROLE_GATEWAY, ROLE_OPERATOR) for service in XDS_SERVICES},
        # Loads and unloads: public calls the gateway forwards (models:admin checked there) with the caller's scope.
        f"/{MODEL_SERVICE}/LoadModel": (ROLE_GATEWAY,),
        f"/{MODEL_SERVICE}/UnloadModel": (ROLE_GATEWAY,),
        # Tenants' own models: public calls the gateway forwards with the caller's verified tenant.
        **{f"/{service}/": (ROLE_GATEWAY,) for service in CONTROL_PLANE_SERVICES},
        # Dataset files and trained heads: trainers fetch datasets and store what they trained; replicas fetch heads.
        "/aimass.v1.BlobService/FetchBlob": (ANY_REPLICA,),
        "/aimass.v1.BlobService/PutBlob": (TRAINER_KIND,),
    }
)


class StandbySchedulerServicer(SchedulerServicer):
    """SchedulerService that answers UNAVAILABLE (safe to retry on the active scheduler) while ``standby()`` gives a
    reason, i.e. while this scheduler stands by."""

    def __init__(
        self, state: SchedulerState, standby: Callable[[], str], *, registry: InMemoryRegistry | None = None
    ) -> None:
        super().__init__(state, registry=registry)
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

    def __init__(self, settings: Settings, *, registry: Registry | None = None) -> None:
        self.settings = settings
        config, registry_config = settings.scheduler, settings.registry
        self.config = config
        self.registry_config = registry_config
        self.configured_weights = dict(settings.tenants.weights)
        self.state = SchedulerState(
            report_interval_s=config.report_interval_s,
            silent_intervals=config.silent_intervals,
            tenant_weights=settings.tenants.weights,
            max_tenants=settings.tenants.max_tracked,
            tenant_idle_expiry_s=settings.tenants.idle_expiry_s,
            model_budgets={
                models_pb2.Modality.Value(f"MODALITY_{name.upper()}"): int(size)
                for name, size in config.model_budgets.items()
            },
        )
        self.credentials = process_credentials(settings, self.kind)
        # The embedded registry lives here (the control plane); with Consul the scheduler follows Consul.
        self.embedded: InMemoryRegistry | None = None
        self.registry: Registry
        if registry is not None:
            self.registry = registry
        elif registry_config.backend == "embedded":
            # Watchers wait two heartbeats after a (re)start: running processes have registered again by then.
            self.registry = self.embedded = InMemoryRegistry(settle_s=2 * registry_config.heartbeat_s)
        else:
            self.registry = make_registry(registry_config, credentials=self.credentials)
        self.service_names: tuple[str, ...] = (
            *((SCHEDULER_SERVICE, REGISTRY_SERVICE) if self.embedded is not None else (SCHEDULER_SERVICE,)),
            MODEL_SERVICE,
            *sorted(CONTROL_PLANE_SERVICES),
        )
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
        # Today's LLM tokens per tenant outlive the process (daily quotas): kept in the store every gateway reads.
        self.store = SqlStore(settings.store_url, busy_timeout_s=settings.store.busy_timeout_s)
        # Admin actions taken here (model loads and unloads), in the audit log every gateway reads.
        self.audit = AuditLog(self.store, coalesce_s=settings.auth.audit_coalesce_s)
        self.usage_save_s = max(config.report_interval_s, 1.0)
        self.audit_retention_ms = settings.auth.audit_retention_days * 86_400_000
        self._tasks: list[asyncio.Task[None]] = []
        self._set_active: Callable[[bool], Awaitable[None]] | None = None
        # Tenants' own models: datasets and heads in the blob store, jobs on trainers, deployments on replicas.
        lifecycle = settings.lifecycle
        self.blobs = BlobStore(settings.blob_dir)
        self.channels = MeshChannels(self.credentials)
        self.datasets = DatasetServicer(self.store, self.blobs, lifecycle)
        self.jobs = JobController(
            self.store,
            lifecycle,
            instances=self.mesh_instances,
            nodes=lambda: self.state.nodes,
            channel_for=self.channels.channel_for,
        )
        self.replica_sync = ReplicaSync(
            self.store,
            self.mesh_instances,
            self.channels.channel_for,
            interval_s=lifecycle.sync_interval_s,
            resync_s=lifecycle.resync_s,
            placement=self.state,
        )
        self.max_blob_bytes = max(int(lifecycle.max_upload_bytes), 1 << 30)
        self.xds = XdsServer(self.state, self.standby_reason)

    def standby_reason(self) -> str:
        if self.active or self.leader is None:
            return ""
        holder = self.leader.holder
        return f"this scheduler stands by; the active one is {holder or 'not known yet'}"

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
            StandbySchedulerServicer(self.state, self.standby_reason, registry=self.embedded), server
        )
        if self.embedded is not None:
            registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(self.embedded), server)
        datasets_pb2_grpc.add_DatasetServiceServicer_to_server(self.datasets, server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(self.jobs, self.datasets, self.settings.lifecycle), server
        )
        deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(
            DeploymentServicer(self.store, self.blobs, self.replica_sync), server
        )
        lifecycle_pb2_grpc.add_BlobServiceServicer_to_server(BlobServicer(self.blobs, self.max_blob_bytes), server)
        self.xds.add_to_server(server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelLoadingServicer(
                self.state,
                self.model_replicas,
                self.channels.channel_for,
                audit=self.audit,
                standby=self.standby_reason,
            ),
            server,
        )

    def mesh_instances(self) -> list[Instance]:
        """Replicas and trainers serving now, as the registry lists them."""
        return [i for i in self.state.instances.values() if i.serving]

    def model_replicas(self) -> list[Instance]:
        """Replicas serving now, the holders of models (trainers hold none)."""
        return [i for i in self.mesh_instances() if i.kind != TRAINER_KIND]

    async def load(self) -> None:
        if self.embedded is not None:
            self.embedded.start()
        await asyncio.to_thread(self.store.migrate)
        self.audit.start()
        await self._load_usage()
        await self.jobs.start()
        self.replica_sync.start()
        self.xds.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_registry(self.registry), name="scheduler-registry"),
            loop.create_task(self._expire(), name="scheduler-expiry"),
            loop.create_task(self._save_usage_periodically(), name="scheduler-usage"),
            loop.create_task(self._prune_audit_hourly(), name="scheduler-audit-retention"),
        ]

    async def _load_usage(self) -> None:
        day = self.state.llm_usage.day
        self.state.llm_usage.load_day(day, await asyncio.to_thread(self.store.llm_usage, day))

    async def _save_usage(self) -> None:
        """Adds the tokens counted since the last save to the store (kept for the next try if it fails)."""
        for day, tokens in self.state.llm_usage.take_unsaved():
            try:
                await asyncio.to_thread(self.store.add_llm_usage, day, tokens)
            except Exception as err:  # the store is away: keep counting in memory, try again next time
                self.state.llm_usage.give_back(day, tokens)
                log.warning("saving LLM token usage to the store failed (%s); will retry", err)

    async def _save_usage_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.usage_save_s)
            if self.active:
                await self._save_usage()
                await self._read_weights()

    async def prune_audit(self) -> int:
        """Deletes audit events older than auth.audit_retention_days; how many went."""
        deleted = await asyncio.to_thread(self.store.prune_audit, now_ms() - self.audit_retention_ms)
        if deleted:
            log.info("audit log: %d events older than the retention deleted", deleted)
        return deleted

    async def _prune_audit_hourly(self) -> None:
        """The active scheduler (one per mesh) keeps the audit log within its retention."""
        while True:
            if self.active:
                try:
                    await self.prune_audit()
                except Exception as err:  # the store is away: next hour
                    log.warning("pruning the audit log failed: %s", err)
            await asyncio.sleep(3600)

    async def _read_weights(self) -> None:
        """Tenants' fair-share weights as the store has them (`aimass tenants set NAME --weight W`), over the
        configured ones: the view's counters divide by them, as the replicas do with the weights gateways send."""
        try:
            tenants = await asyncio.to_thread(self.store.list_tenants)
        except Exception as err:  # the store is away: keep the weights known
            log.debug("reading tenants' weights failed: %s", err)
            return
        self.state.tenant_weights = {
            **self.configured_weights,
            **{tenant.tenant_id: tenant.weight for tenant in tenants if tenant.weight},
        }

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
            # The previous leader saved what it counted: start from the store's totals.
            await self._load_usage()
        else:
            # Gateways watching this scheduler's view reconnect (and find the active one).
            await self.state.close_watches()
        if self._set_active is not None:
            await self._set_active(leading)

    async def _follow_registry(self, registry: Registry) -> None:
        async for instances in registry.watch():
            self.state.set_instances(instances)
            await self.state.changed()
            # A trainer may have joined (queued jobs can start) or left; replicas that joined get the deployments.
            await self.channels.keep(self.mesh_instances())
            self.jobs.wake()

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
        # Gateways watching the view and the registry reconnect (to another scheduler, or to this one restarted).
        await self.state.close_watches()
        await self.xds.end_streams()
        if self.embedded is not None:
            await self.embedded.end_watches()

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return ()  # the scheduler holds no models

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        await self.jobs.close()
        await self.replica_sync.close()
        await self.xds.close()
        await self.channels.close()
        await self.audit.close()
        if self.leader is not None:
            await self.leader.resign()
        await self.registry.close()
        if self.active:
            await self._save_usage()
        await asyncio.to_thread(self.store.close)


def scheduler_listener(app: SchedulerApp) -> Listener:
    """Mesh mTLS with the scheduler's policy; calls forwarded by a gateway run in the scope it sent (the tenant of a
    dataset upload or a training job)."""
    listener = mesh_listener(app.credentials, SCHEDULER_POLICY)
    return dataclasses.replace(listener, interceptors=(*listener.interceptors, ScopeInterceptor()))


def build_runner(settings: Settings, *, register: bool = True) -> ServerRunner:
    app = SchedulerApp(settings)
    return ServerRunner(
        app,
        settings.scheduler.server,
        # It registers with the registry it hosts or follows (closing that twice is harmless).
        registry=app.registry if register else None,
        registry_config=settings.registry,
        listener=scheduler_listener(app),
        node_id=settings.scheduler.node_id,
    )


def main() -> None:
    serve_process("scheduler", build_runner)
