"""aimass.v1.ModelService at the front door: the mesh's model catalogue, and loads and unloads passed on to the
controller.

ListModels and DescribeModel ask every healthy replica about its models and merge the answers
(aimass.runtime.mesh_catalogue). LoadModel and UnloadModel are the scheduler's to decide and apply
(scheduler/model_loading.py): the gateway, having checked the key's models:admin scope, forwards them to the active
scheduler with the caller's verified scope, as it forwards every call, and relays the answer or the error unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from aimass.runtime.catalogue import select
from aimass.runtime.errors import Unavailable
from aimass.runtime.mesh_catalogue import REPLICA_TIMEOUT_S, MeshCatalogue, ModelHolder
from aimass.runtime.metadata import CALLER_PEER_KEY
from aimass.runtime.replica import MODEL_SERVICE
from aimass.runtime.scope import Metadata, forwarded_metadata, time_remaining
from aimass.v1 import models_pb2, models_pb2_grpc
from gateway.forwarder import relay_error
from gateway.replicas import ReplicaSet

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# How long a load waits for a scheduler to be listed (one restarting registers again within a few heartbeats).
SCHEDULER_WAIT_S = 15.0


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
        found = await self.catalogue.list(
            request, remaining=time_remaining(context), metadata=forwarded_metadata(context)
        )
        return models_pb2.ListModelsResponse(models=select(found, request, loaded=True))

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        model = await self.catalogue.describe(
            request, remaining=time_remaining(context), metadata=forwarded_metadata(context)
        )
        return models_pb2.DescribeModelResponse(model=model)

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
        metadata = (*forwarded_metadata(context), (CALLER_PEER_KEY, context.peer()))
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
