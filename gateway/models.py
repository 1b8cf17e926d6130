"""aimass.v1.ModelService for the whole mesh: asks every healthy replica about its models and merges the answers.

The catalogue has no store of its own: replicas are the truth about what they hold, so a replica that joins or
leaves shows up here at once. One slow or broken replica is skipped (with a warning), never fatal to the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from aimass.runtime.catalogue import CatalogueServicer, describe, merge, require_model_name, select, unknown_model
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc
from gateway.forwarder import Metadata, forwarded_metadata
from gateway.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# Catalogue answers come from memory; a replica slower than this is busy or stuck and is left out of the answer.
REPLICA_TIMEOUT_S = 2.0


class MeshModelServicer(CatalogueServicer):
    def __init__(self, replicas: ReplicaSet, *, replica_timeout_s: float = REPLICA_TIMEOUT_S) -> None:
        self.replicas = replicas
        self.replica_timeout_s = replica_timeout_s

    async def _ask_all(
        self,
        what: str,
        call: Callable[[models_pb2_grpc.ModelServiceAsyncStub, float, Metadata], Awaitable[T]],
        context: Context,
        *,
        absent: grpc.StatusCode | None = None,
    ) -> list[T]:
        """``call`` on every healthy replica at once; the answers of those that gave one (``absent``: an expected
        "I don't have it" status, not worth a warning)."""
        remaining = context.time_remaining()
        timeout = self.replica_timeout_s if remaining is None else min(self.replica_timeout_s, remaining)
        # The caller's request id and trace context follow the question to every replica.
        metadata = forwarded_metadata(context)

        async def ask(replica: Replica) -> T | None:
            try:
                return await call(models_pb2_grpc.ModelServiceStub(replica.channel), timeout, metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != absent:
                    log.warning(
                        "%s: replica %s at %s did not answer (%s: %s); leaving it out",
                        what,
                        replica.instance.instance_id,
                        replica.instance.address,
                        err.code().name,
                        err.details(),
                    )
                return None

        answers = await asyncio.gather(*(ask(replica) for replica in self.replicas.all_healthy()))
        return [answer for answer in answers if answer is not None]

    async def _list(self, request: models_pb2.ListModelsRequest, context: Context) -> list[models_pb2.ModelInfo]:
        answers: Sequence[models_pb2.ListModelsResponse] = await self._ask_all(
            "ListModels",
            lambda stub, timeout, metadata: stub.ListModels(request, timeout=timeout, metadata=metadata),
            context,
        )
        return merge(model for answer in answers for model in answer.models)

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        # Replicas apply the filters (loaded_only included, as only they know); applying them again here keeps the
        # answer right whatever a replica sent back.
        return models_pb2.ListModelsResponse(models=select(await self._list(request, context), request, loaded=True))

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        name = require_model_name(request.model)
        # Asked without the version: a replica holding another version is no reason to say "not found" here.
        by_name = models_pb2.DescribeModelRequest(meta=request.meta, model=common_pb2.ModelRef(name=name))
        answers: Sequence[models_pb2.DescribeModelResponse] = await self._ask_all(
            "DescribeModel",
            lambda stub, timeout, metadata: stub.DescribeModel(by_name, timeout=timeout, metadata=metadata),
            context,
            absent=grpc.StatusCode.NOT_FOUND,
        )
        if not answers:
            # The error path only: one more round to name the models the mesh does have.
            known = await self._list(models_pb2.ListModelsRequest(meta=request.meta), context)
            raise unknown_model(name, (entry.name for entry in known), where="any replica")
        merged = merge(answer.model for answer in answers)
        return models_pb2.DescribeModelResponse(model=describe(merged, request.model, where="any replica"))
