"""The replica role: what a process that serves models adds to its server, and how a replica process is built.

A replica serves its app's services to gateways only (mesh mTLS), answers ModelService for its own models, names
itself in the ``x-aimass-replica`` trailer, runs each call inside the request scope its gateway sent
(aimass.runtime.scope), registers its models and device, and reports its load to the scheduler. Control-plane
processes (gateway, scheduler) have none of this: they build a ``ServerRunner`` without a ``ReplicaRole``.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import grpc

from aimass.runtime.catalogue import LoadsModelsOnDemand, ReplicaModelServicer, RunsOnOneDevice, default_model_labels
from aimass.runtime.config import SchedulerConfig, ServerConfig, Settings
from aimass.runtime.discovery import make_registry
from aimass.runtime.identity import ROLE_GATEWAY, ROLE_SCHEDULER, MeshCredentials, MeshPolicy, process_credentials
from aimass.runtime.interceptors import ScopeInterceptor
from aimass.runtime.load_report import AdmissionLoad, LoadReporter, ReportsLoad, local_device_id
from aimass.runtime.models import ModelSet
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc

if TYPE_CHECKING:
    from aimass.runtime.server import ServerRunner, ServiceApp

MODEL_SERVICE = "aimass.v1.ModelService"


@runtime_checkable
class ServesTheScheduler(Protocol):
    """An app with services only the scheduler calls (e.g. aimass.v1.ModelHostService: the custom models to host)."""

    scheduler_services: tuple[str, ...]


class ReplicaRole:
    def __init__(
        self,
        app: ServiceApp,
        *,
        scheduler_config: SchedulerConfig,
        credentials: MeshCredentials | None,
        node_id: str = "",
    ) -> None:
        self.app = app
        self.scheduler_config = scheduler_config
        self.credentials = credentials
        # The node agent names its node by the hostname too, so load reports and device readings join on it.
        self.node_id = node_id or scheduler_config.node_id or socket.gethostname()
        self.load_reporter: LoadReporter | None = None
        self._runner: ServerRunner | None = None

    @property
    def policy(self) -> MeshPolicy:
        """Gateways call every method a replica serves but loading and unloading models; the scheduler (the
        controller) reads the catalogue, loads and unloads models, and calls its ``scheduler_services``; nothing else
        inside the mesh calls a replica."""
        rules: dict[str, tuple[str, ...]] = {f"/{service}/": (ROLE_GATEWAY,) for service in self.app.service_names}
        rules[f"/{MODEL_SERVICE}/"] = (ROLE_GATEWAY, ROLE_SCHEDULER)
        rules.update({f"/{MODEL_SERVICE}/{method}": (ROLE_SCHEDULER,) for method in ("LoadModel", "UnloadModel")})
        if isinstance(self.app, ServesTheScheduler):
            rules.update({f"/{service}/": (ROLE_SCHEDULER,) for service in self.app.scheduler_services})
        return MeshPolicy(rules)

    @property
    def model_set(self) -> ModelSet | None:
        return self.app.model_set if isinstance(self.app, LoadsModelsOnDemand) else None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [ScopeInterceptor()]

    def add_to_server(self, runner: ServerRunner, server: grpc.aio.Server) -> tuple[str, ...]:
        """ModelService for this replica's own models; the gateway's gathers them for the whole mesh."""
        self._runner = runner
        models_pb2_grpc.add_ModelServiceServicer_to_server(
            ReplicaModelServicer(self.app, self.describe, self.models_changed), server
        )
        return (MODEL_SERVICE,)

    def describe(self) -> models_pb2.ModelReplica:
        """This process as a holder of its models (ModelService answers)."""
        runner = self._runner
        assert runner is not None, "add_to_server first"
        return models_pb2.ModelReplica(
            instance_id=runner.instance_id,
            address=runner.address,
            node_id=self.node_id,
            state=runner.state,
            loaded=runner.state == common_pb2.SERVING_STATE_SERVING,
        )

    def serving_models(self) -> tuple[str, ...]:
        """The models requests can use here now (the registry's list, which gateways route by)."""
        models = self.model_set
        if models is None:
            return self.app.model_names()
        return tuple(name for name in self.app.model_names() if name not in models.names or name in models.loaded)

    def labels(self) -> dict[str, str]:
        labels = {"node": self.node_id, **default_model_labels(self.app.model_infos())}
        models = self.model_set
        if models is not None:
            labels["device"] = local_device_id(models.device)
        elif isinstance(self.app, RunsOnOneDevice):
            labels["device"] = local_device_id(self.app.device)
        return labels

    async def models_changed(self) -> None:
        """A model was loaded or unloaded: gateways route by the registry's list, the scheduler by load reports."""
        runner = self._runner
        if runner is not None and runner.membership is not None:
            await runner.membership.set_models(self.serving_models())
        if self.load_reporter is not None:
            await self.load_reporter.report()

    async def serve(self, runner: ServerRunner) -> None:
        """Once the models are loaded: load reports to the scheduler (apps with their own figures, such as the LLM
        engine, report those; the others, what admission sees)."""
        if not self.scheduler_config.address:
            return
        source = (
            self.app
            if isinstance(self.app, ReportsLoad)
            else AdmissionLoad(self.app.model_infos(), runner.admission, self.model_set)
        )
        self.load_reporter = LoadReporter(
            source,
            scheduler_address=self.scheduler_config.address,
            credentials=self.credentials,
            instance_id=runner.instance_id,
            node_id=self.node_id,
            interval_s=self.scheduler_config.report_interval_s,
        )
        await self.load_reporter.start()

    async def drain(self) -> None:
        """One last report saying DRAINING, so the scheduler stops routing here at once."""
        if self.load_reporter is not None:
            await self.load_reporter.stop(common_pb2.SERVING_STATE_DRAINING)


def replica_runner(app: ServiceApp, settings: Settings, config: ServerConfig, *, register: bool = True) -> ServerRunner:
    """The server of one replica process: mesh mTLS with the replica policy, its registry and its role."""
    from aimass.runtime.server import ServerRunner, mesh_listener

    credentials = process_credentials(settings, app.kind)
    role = ReplicaRole(app, scheduler_config=settings.scheduler, credentials=credentials)
    return ServerRunner(
        app,
        config,
        registry=make_registry(settings.registry, credentials=credentials) if register else None,
        registry_config=settings.registry,
        listener=mesh_listener(credentials, role.policy),
        replica=role,
        node_id=role.node_id,
    )
