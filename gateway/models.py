"""aimass.v1.ModelService for the whole mesh: asks every healthy replica about its models and merges the answers,
and loads and unloads models where the scheduler places them.

The catalogue has no store of its own: replicas are the truth about what they hold, so a replica that joins or
leaves shows up here at once. One slow or broken replica is skipped (with a warning), never fatal to the call.

LoadModel: the scheduler chooses a device and replica (SchedulerService.PlaceModel: best fit on the latest
readings, evicting least-recently-used idle models when short), the gateway unloads what it evicted and asks the
chosen replica to load; the replica measures the footprint and its next load report marks the placement LOADED.
UnloadModel asks every replica holding the model (narrowed by the target) and drops the placements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from aimass.runtime.catalogue import describe, merge, require_model_name, select, unknown_model
from aimass.runtime.errors import AimassError, FailedPrecondition, Unavailable
from aimass.runtime.scope import current_scope, time_remaining
from aimass.tenancy.audit import AuditLog
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from gateway.forwarder import Metadata, forwarded_metadata, relay_error
from gateway.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# Catalogue answers come from memory; a replica slower than this is busy or stuck and is left out of the answer.
REPLICA_TIMEOUT_S = 2.0


class MeshModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        replicas: ReplicaSet,
        *,
        replica_timeout_s: float = REPLICA_TIMEOUT_S,
        scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.replicas = replicas
        self.replica_timeout_s = replica_timeout_s
        self.scheduler = scheduler
        self.audit = audit

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
        remaining = time_remaining(context)
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

    # -- load and unload -----------------------------------------------------------------------------------------

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        """The scheduler to place with (the front door already checked the key's models:admin scope)."""
        if self.scheduler is None:
            raise FailedPrecondition(
                "models are loaded and unloaded where the scheduler places them, and this gateway has no scheduler "
                "(scheduler.address); `aimass up` starts one",
                reason="NO_SCHEDULER",
            )
        return self.scheduler

    @contextlib.asynccontextmanager
    async def _audited(self, action: str, model: common_pb2.ModelRef, context: Context) -> AsyncIterator[None]:
        """Audits one load or unload with its outcome: "ok", or the status it failed with."""
        outcome, detail = "ok", ""
        try:
            yield
        except AimassError as err:
            outcome, detail = err.code.name, err.message
            raise
        except grpc.aio.AbortError:
            code = context.code()
            outcome = code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
            detail = context.details() or ""
            raise
        finally:
            if self.audit is not None:
                self.audit.record_action(
                    current_scope(),
                    action,
                    f"{model.name}:{model.version}" if model.version else model.name,
                    peer=context.peer(),
                    outcome=outcome,
                    detail=detail,
                )

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        async with self._audited("models.load", request.model, context):
            return await self._load(request, context)

    async def _load(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        scheduler = self._scheduler()
        described = await self.DescribeModel(
            models_pb2.DescribeModelRequest(meta=request.meta, model=request.model), context
        )
        info = described.model
        model = common_pb2.ModelRef(name=info.name, version=request.model.version or info.default_version)
        footprint = next((v.footprint_bytes for v in info.versions if v.version == model.version), 0)
        metadata = forwarded_metadata(context)
        try:
            placed = await scheduler.PlaceModel(
                scheduler_pb2.PlaceModelRequest(
                    model=model,
                    # 0: the scheduler's footprint book (measured per device kind) decides.
                    required_bytes=footprint,
                    target=request.target,
                    allow_eviction=True,
                    modality=info.modality,
                ),
                timeout=time_remaining(context),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err)
            raise AssertionError("unreachable") from err
        placement = placed.placement
        log.info(
            "placing %s:%s on %s (%s)%s",
            model.name,
            model.version,
            placement.device_id,
            placement.instance_id,
            f"; evicting {', '.join(p.model.name for p in placed.evicted)}" if placed.evicted else "",
        )
        for victim in placed.evicted:
            await self._unload_from(victim.instance_id, victim.model, context, reason="evicted to make room")
        replica = self.replicas.get(placement.instance_id)
        try:
            if replica is None:
                raise Unavailable(
                    f"the scheduler placed {model.name} on {placement.instance_id}, which this gateway does not see "
                    "serving; retry in a moment"
                )
            loaded = await models_pb2_grpc.ModelServiceStub(replica.channel).LoadModel(
                models_pb2.LoadModelRequest(
                    meta=request.meta,
                    model=model,
                    target=models_pb2.PlacementTarget(instance_id=placement.instance_id),
                ),
                timeout=time_remaining(context),
                metadata=metadata,
            )
        except (grpc.aio.AioRpcError, Unavailable) as err:
            # The reservation must not outlive a load that failed.
            await scheduler.EvictModel(
                scheduler_pb2.EvictModelRequest(
                    model=model,
                    target=models_pb2.PlacementTarget(instance_id=placement.instance_id),
                    reason="load failed",
                ),
                timeout=self.replica_timeout_s,
            )
            if isinstance(err, grpc.aio.AioRpcError):
                await relay_error(context, err)
            raise
        return models_pb2.LoadModelResponse(
            replica=loaded.replica,
            already_loaded=loaded.already_loaded,
            evicted=[victim.model for victim in placed.evicted],
        )

    async def _unload_from(
        self, instance_id: str, model: common_pb2.ModelRef, context: Context, *, reason: str
    ) -> models_pb2.UnloadModelResponse | None:
        replica = self.replicas.get(instance_id)
        if replica is None:
            return None
        try:
            return await models_pb2_grpc.ModelServiceStub(replica.channel).UnloadModel(
                models_pb2.UnloadModelRequest(model=model, target=models_pb2.PlacementTarget(instance_id=instance_id)),
                timeout=self.replica_timeout_s,
                metadata=forwarded_metadata(context),
            )
        except grpc.aio.AioRpcError as err:
            log.warning("unloading %s from %s (%s) failed: %s", model.name, instance_id, reason, err.details())
            return None

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        async with self._audited("models.unload", request.model, context):
            return await self._unload(request, context)

    async def _unload(self, request: models_pb2.UnloadModelRequest, context: Context) -> models_pb2.UnloadModelResponse:
        scheduler = self._scheduler()
        name = require_model_name(request.model)
        target = request.target
        holders = [
            replica
            for replica in self.replicas.all_healthy()
            if name in replica.instance.models
            and (not target.instance_id or replica.instance.instance_id == target.instance_id)
        ]
        metadata = forwarded_metadata(context)

        async def unload(replica: Replica) -> models_pb2.UnloadModelResponse | grpc.aio.AioRpcError:
            try:
                return await models_pb2_grpc.ModelServiceStub(replica.channel).UnloadModel(
                    request, timeout=time_remaining(context), metadata=metadata
                )
            except grpc.aio.AioRpcError as err:
                return err

        answers = await asyncio.gather(*(unload(replica) for replica in holders))
        unloaded = [
            r for answer in answers if isinstance(answer, models_pb2.UnloadModelResponse) for r in answer.unloaded
        ]
        refused = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
        if not unloaded and refused:
            # Nothing was unloaded and a replica said why (a model loaded for the replica's life, a wrong node...).
            await relay_error(context, refused[0])
        await scheduler.EvictModel(
            scheduler_pb2.EvictModelRequest(model=request.model, target=target, reason="unloaded by an admin"),
            timeout=time_remaining(context),
            metadata=metadata,
        )
        return models_pb2.UnloadModelResponse(unloaded=unloaded, freed_bytes=sum(r.memory_bytes for r in unloaded))
