"""The model catalogue of a whole mesh, gathered from its replicas: the gateway answers ListModels/DescribeModel with
it, the scheduler reads a model's versions, footprint and modality from it before placing a load.

There is no store behind it: replicas are the truth about what they hold, so a replica that joins or leaves shows up
at once. One slow or broken replica is skipped (with a warning), never fatal to the question.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from aimass.runtime.catalogue import describe, merge, require_model_name, unknown_model
from aimass.runtime.scope import Metadata
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
# Catalogue answers come from memory; a replica slower than this is busy or stuck and is left out of the answer.
REPLICA_TIMEOUT_S = 2.0
WHERE = "any replica"


@dataclass(frozen=True, slots=True)
class ModelHolder:
    """A replica to ask about its models: its registry instance id, its address and a channel to it."""

    instance_id: str
    address: str
    channel: grpc.aio.Channel


class MeshCatalogue:
    def __init__(
        self, holders: Callable[[], Iterable[ModelHolder]], *, replica_timeout_s: float = REPLICA_TIMEOUT_S
    ) -> None:
        self.holders = holders
        self.replica_timeout_s = replica_timeout_s

    async def ask_all(
        self,
        what: str,
        call: Callable[[models_pb2_grpc.ModelServiceAsyncStub, float, Metadata], Awaitable[T]],
        *,
        remaining: float | None,
        metadata: Metadata,
        absent: grpc.StatusCode | None = None,
    ) -> list[T]:
        """``call`` on every replica at once, within ``remaining`` (the caller's time left); the answers of those
        that gave one (``absent``: an expected "I don't have it" status, not worth a warning)."""
        timeout = self.replica_timeout_s if remaining is None else min(self.replica_timeout_s, remaining)

        async def ask(holder: ModelHolder) -> T | None:
            try:
                return await call(models_pb2_grpc.ModelServiceStub(holder.channel), timeout, metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != absent:
                    log.warning(
                        "%s: replica %s at %s did not answer (%s: %s); leaving it out",
                        what,
                        holder.instance_id,
                        holder.address,
                        err.code().name,
                        err.details(),
                    )
                return None

        answers = await asyncio.gather(*(ask(holder) for holder in self.holders()))
        return [answer for answer in answers if answer is not None]

    async def list(
        self, request: models_pb2.ListModelsRequest, *, remaining: float | None, metadata: Metadata
    ) -> list[models_pb2.ModelInfo]:
        """Every replica's answer to ``request``, merged (replicas filled in)."""
        answers: Sequence[models_pb2.ListModelsResponse] = await self.ask_all(
            "ListModels",
            lambda stub, timeout, md: stub.ListModels(request, timeout=timeout, metadata=md),
            remaining=remaining,
            metadata=metadata,
        )
        return merge(model for answer in answers for model in answer.models)

    async def describe(
        self,
        request: models_pb2.DescribeModelRequest,
        *,
        remaining: float | None,
        metadata: Metadata,
        others: Awaitable[Sequence[models_pb2.ModelInfo]] | None = None,
    ) -> models_pb2.ModelInfo:
        """The named model as the mesh holds it; INVALID_ARGUMENT without a name, NOT_FOUND (naming the models the
        mesh has) for an unknown model or version. ``others``: models no replica lists (the caller's own), awaited
        only when no replica knows the name; one of them answers then, and the NOT_FOUND names them too."""
        name = require_model_name(request.model)
        # Asked without the version: a replica holding another version is no reason to say "not found" here.
        by_name = models_pb2.DescribeModelRequest(meta=request.meta, model=common_pb2.ModelRef(name=name))
        answers: Sequence[models_pb2.DescribeModelResponse] = await self.ask_all(
            "DescribeModel",
            lambda stub, timeout, md: stub.DescribeModel(by_name, timeout=timeout, metadata=md),
            remaining=remaining,
            metadata=metadata,
            absent=grpc.StatusCode.NOT_FOUND,
        )
        if not answers:
            extra = [] if others is None else list(await others)
            own = [entry for entry in extra if entry.name == name]
            if own:
                return describe(own, request.model, where=WHERE)
            # The error path only: one more round to name the models the mesh does have.
            known = await self.list(
                models_pb2.ListModelsRequest(meta=request.meta), remaining=remaining, metadata=metadata
            )
            raise unknown_model(name, (entry.name for entry in [*known, *extra]), where=WHERE)
        return describe(merge(answer.model for answer in answers), request.model, where=WHERE)
