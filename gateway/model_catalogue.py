"""aimass.v1.ModelService at the front door: the mesh's model catalogue, and loads and unloads passed on to the
controller.

ListModels and DescribeModel ask every healthy replica about its models and merge the answers
(aimass.runtime.mesh_catalogue). LoadModel and UnloadModel are the scheduler's to decide and apply
(scheduler/model_loading.py): the gateway, having checked the key's models:admin scope, forwards them to the active
scheduler with the caller's verified scope, as it forwards every call, and relays the answer or the error unchanged.

The caller's own models (a tenant's trained models) are the scheduler's too: ListModels and DescribeModel ask it
(DeploymentService.ListCustomModels, forwarded with the caller's verified tenant, so it answers with that tenant's
models alone) at the same time as the replicas, and list them beside the mesh's models (``custom_model_info``). A
caller with no tenant, or whose key lacks the models:train scope, sees none; a scheduler that does not answer within
the replica timeout is left out with a warning, like a replica. A mesh model wins a name both use (so do requests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

from aimass.runtime.catalogue import select
from aimass.runtime.errors import Unavailable
from aimass.runtime.mesh_catalogue import REPLICA_TIMEOUT_S, MeshCatalogue, ModelHolder
from aimass.runtime.metadata import CALLER_PEER_KEY
from aimass.runtime.replica import MODEL_SERVICE
from aimass.runtime.scope import Metadata, current_scope, forwarded_metadata, time_remaining
from aimass.runtime.tasks import cancel_and_wait
from aimass.tenancy.keys import SCOPE_MODELS_TRAIN
from aimass.v1 import datasets_pb2, deployments_pb2, deployments_pb2_grpc, models_pb2, models_pb2_grpc
from gateway.auth import caller_peer
from gateway.forwarder import relay_error
from gateway.replicas import ReplicaSet

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# How long a load waits for a scheduler to be listed (one restarting registers again within a few heartbeats).
SCHEDULER_WAIT_S = 15.0
DEPLOYMENT_SERVICE: Final = "aimass.v1.DeploymentService"
MODALITY_OF_TASK: Final = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: models_pb2.MODALITY_TEXT,
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: models_pb2.MODALITY_VISION,
}
KIND_OF_TASK: Final = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: "text",
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: "image",
}

log = logging.getLogger(__name__)


def custom_model_info(model: deployments_pb2.CustomModel) -> models_pb2.ModelInfo:
    """A tenant's own model as the catalogue lists it: owner and custom set, its service and method, versions with
    the trained head's bytes as footprint, and its default version (empty while it serves nothing)."""
    service = model.method.partition("/")[0]
    newest = model.versions[-1] if model.versions else None
    lineage = (
        f", v{newest.version} trained on {newest.dataset.owner}/{newest.dataset.name} v{newest.dataset.version} "
        f"over {newest.base_model} (job {newest.job_id})"
        if newest is not None
        else ""
    )
    kind = KIND_OF_TASK.get(model.task)
    info = models_pb2.ModelInfo(
        name=model.name,
        description=(f"{model.owner}'s own {kind} classifier" if kind else f"{model.owner}'s own model") + lineage,
        modality=MODALITY_OF_TASK.get(model.task, models_pb2.MODALITY_UNSPECIFIED),
        services=[service] if service else [],
        methods=[model.method] if model.method else [],
        versions=[
            models_pb2.ModelVersion(version=version.version, footprint_bytes=version.artifact_bytes)
            for version in model.versions
        ],
        default_version=model.deployment.default_version,
        owner=model.owner,
    )
    info.custom.CopyFrom(model)
    return info


class ModelCatalogueServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, replicas: ReplicaSet, *, replica_timeout_s: float = REPLICA_TIMEOUT_S) -> None:
        self.replicas = replicas
        self.catalogue = MeshCatalogue(self._holders, replica_timeout_s=replica_timeout_s)

    def _holders(self) -> list[ModelHolder]:
        return [
            ModelHolder(replica.instance.instance_id, replica.instance.address, replica.channel)
            for replica in self.replicas.all_healthy()
        ]

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        # Replicas apply the filters (loaded_only included, as only they know); applying them again here keeps the
        # answer right whatever a replica sent back. The caller's request id and trace context follow the question.
        found, own = await asyncio.gather(
            self.catalogue.list(request, remaining=time_remaining(context), metadata=forwarded_metadata(context)),
            self._own_models(context),
        )
        # A custom model is loaded when it serves, i.e. has a default version.
        mesh_names = {info.name for info in found}
        found.extend(
            info for info in own if info.name not in mesh_names and (info.default_version or not request.loaded_only)
        )
        return models_pb2.ListModelsResponse(models=select(found, request, loaded=True))

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        own = asyncio.get_running_loop().create_task(self._own_models(context), name="own-models")
        try:
            model = await self.catalogue.describe(
                request, remaining=time_remaining(context), metadata=forwarded_metadata(context), others=own
            )
        finally:
            await cancel_and_wait(own)
        return models_pb2.DescribeModelResponse(model=model)

    async def _own_models(self, context: Context) -> list[models_pb2.ModelInfo]:
        """The caller's own models as catalogue entries, from the active scheduler; none for a caller with no tenant
        or without the models:train scope (auth off: no key, every scope), or when the scheduler is not there or
        does not answer within the replica timeout (a warning then)."""
        scope = current_scope()
        if not scope.tenant or (scope.key_id and SCOPE_MODELS_TRAIN not in scope.scopes):
            return []
        scheduler = self.replicas.control_plane(DEPLOYMENT_SERVICE)
        if scheduler is None:
            log.warning("model catalogue: no scheduler serves %s; listing the mesh's models only", DEPLOYMENT_SERVICE)
            return []
        remaining = time_remaining(context)
        timeout = (
            self.catalogue.replica_timeout_s if remaining is None else min(self.catalogue.replica_timeout_s, remaining)
        )
        try:
            answer = await deployments_pb2_grpc.DeploymentServiceStub(scheduler.channel).ListCustomModels(
                deployments_pb2.ListCustomModelsRequest(), timeout=timeout, metadata=forwarded_metadata(context)
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "model catalogue: scheduler %s at %s did not list tenant %s's own models (%s: %s); leaving them out",
                scheduler.instance.instance_id,
                scheduler.instance.address,
                scope.tenant,
                err.code().name,
                err.details(),
            )
            return []
        return [custom_model_info(model) for model in answer.models]

    # -- load and unload: the controller's ----------------------------------------------------------------------

    async def _controller(self, context: Context) -> models_pb2_grpc.ModelServiceAsyncStub:
        """The active scheduler, as the registry lists it (one standing by is listed NOT_SERVING); one restarting or
        taking over is waited for a while, within the call's deadline."""
        remaining = time_remaining(context)
        wait_s = SCHEDULER_WAIT_S if remaining is None else min(SCHEDULER_WAIT_S, remaining)
        scheduler = await self.replicas.wait_for_control_plane(MODEL_SERVICE, wait_s)
        if scheduler is None:
            raise Unavailable(
                "models are loaded and unloaded by the scheduler, and no scheduler has served for "
                f"{wait_s:.0f} s (one may be taking over); retry in a moment, or check `aimass status`",
                reason="NO_SCHEDULER",
            )
        return models_pb2_grpc.ModelServiceStub(scheduler.channel)

    async def _on_controller(
        self,
        call: Callable[[models_pb2_grpc.ModelServiceAsyncStub, float | None, Metadata], Awaitable[T]],
        context: Context,
    ) -> T:
        """``call`` on the active scheduler with the caller's verified scope (the scheduler audits under its tenant
        and key) and where the caller called from; its error, trailers included, is the caller's."""
        controller = await self._controller(context)
        metadata = (*forwarded_metadata(context), (CALLER_PEER_KEY, caller_peer(context)))
        try:
            return await call(controller, time_remaining(context), metadata)
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err)
            raise AssertionError("unreachable") from err

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        return await self._on_controller(
            lambda stub, timeout, metadata: stub.LoadModel(request, timeout=timeout, metadata=metadata), context
        )

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        return await self._on_controller(
            lambda stub, timeout, metadata: stub.UnloadModel(request, timeout=timeout, metadata=metadata), context
        )
