"""aimass.v1.ModelService LoadModel and UnloadModel, decided and applied by the scheduler, the mesh's controller.

Gateways forward these calls here (with the caller's verified scope) once the key's models:admin scope is checked;
the scheduler answers them whole:

- LoadModel: the model's versions, footprint and modality from the replicas' catalogue (NOT_FOUND for an unknown
  model or version); a placement on the latest readings (``SchedulerState.place``: best fit, evicting
  least-recently-used idle models when short; RESOURCE_EXHAUSTED INSUFFICIENT_MEMORY or FAILED_PRECONDITION when
  nothing fits); the evicted models unloaded from their replicas; LoadModel on the chosen replica, which measures
  the footprint (its next load report marks the placement LOADED). A load that fails drops its reservation and
  relays the replica's error (UNAVAILABLE when the chosen replica is not serving).
- UnloadModel: every replica holding the model (narrowed by the target) unloads it, then the placements go.

Both are audited (models.load, models.unload) in the store under the caller's tenant and key, with the outcome.
The policy (scheduler/placement.py) stays free of I/O; this module is the part that acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from aimass.runtime.catalogue import require_model_name
from aimass.runtime.discovery import Instance
from aimass.runtime.errors import AimassError, Unavailable, Unimplemented, relay_error
from aimass.runtime.mesh_catalogue import REPLICA_TIMEOUT_S, MeshCatalogue, ModelHolder
from aimass.runtime.metadata import CALLER_PEER_KEY, metadata_value
from aimass.runtime.scope import Metadata, current_scope, forwarded_metadata, time_remaining
from aimass.tenancy.audit import AuditLog
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc, scheduler_pb2
from scheduler.service import SchedulerState

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class ModelLoadingServicer(models_pb2_grpc.ModelServiceServicer):
    """LoadModel/UnloadModel for the whole mesh (the catalogue itself is the gateway's to serve)."""

    def __init__(
        self,
        state: SchedulerState,
        replicas: Callable[[], Sequence[Instance]],
        channel_for: Callable[[Instance], grpc.aio.Channel],
        *,
        audit: AuditLog | None = None,
        standby: Callable[[], str] = lambda: "",
        replica_timeout_s: float = REPLICA_TIMEOUT_S,
    ) -> None:
        self.state = state
        self.replicas = replicas
        self.channel_for = channel_for
        self.audit = audit
        self.standby = standby
        self.replica_timeout_s = replica_timeout_s
        self.catalogue = MeshCatalogue(self._holders, replica_timeout_s=replica_timeout_s)

    def _holders(self) -> list[ModelHolder]:
        return [ModelHolder(i.instance_id, i.address, self.channel_for(i)) for i in self.replicas()]

    def _replica(self, instance_id: str) -> models_pb2_grpc.ModelServiceAsyncStub | None:
        instance = next((i for i in self.replicas() if i.instance_id == instance_id), None)
        return None if instance is None else models_pb2_grpc.ModelServiceStub(self.channel_for(instance))

    def _check_active(self) -> None:
        reason = self.standby()
        if reason:
            raise Unavailable(reason, reason="SCHEDULER_STANDBY")

    @contextlib.asynccontextmanager
    async def _audited(self, action: str, model: common_pb2.ModelRef, context: Context) -> AsyncIterator[None]:
        """Audits one load or unload with its outcome: "ok", or the status it failed with. Written before the
        answer: whoever reads the audit log next finds it."""
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
                    # The gateway's caller, as the gateway saw it.
                    peer=metadata_value(context.invocation_metadata(), CALLER_PEER_KEY) or context.peer(),
                    outcome=outcome,
                    detail=detail,
                )
                await self.audit.flush(final=False)

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        raise Unimplemented("the model catalogue is the gateway's to serve; ask a gateway")

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        raise Unimplemented("the model catalogue is the gateway's to serve; ask a gateway")

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        self._check_active()
        async with self._audited("models.load", request.model, context):
            return await self._load(request, context)

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        self._check_active()
        async with self._audited("models.unload", request.model, context):
            return await self._unload(request, context)

    async def _load(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        metadata = forwarded_metadata(context)
        info = await self.catalogue.describe(
            models_pb2.DescribeModelRequest(meta=request.meta, model=request.model),
            remaining=time_remaining(context),
            metadata=metadata,
        )
        model = common_pb2.ModelRef(name=info.name, version=request.model.version or info.default_version)
        footprint = next((v.footprint_bytes for v in info.versions if v.version == model.version), 0)
        placed = await self.state.place(
            scheduler_pb2.PlaceModelRequest(
                model=model,
                # 0: the footprint book (measured per device kind) decides.
                required_bytes=footprint,
                target=request.target,
                allow_eviction=True,
                modality=info.modality,
            )
        )
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
            await self._unload_from(victim.instance_id, victim.model, metadata, reason="evicted to make room")
        replica = self._replica(placement.instance_id)
        try:
            if replica is None:
                raise Unavailable(
                    f"the scheduler placed {model.name} on {placement.instance_id}, which the registry does not list "
                    "serving now; retry in a moment"
                )
            loaded = await replica.LoadModel(
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
            await self.state.evict(
                scheduler_pb2.EvictModelRequest(
                    model=model,
                    target=models_pb2.PlacementTarget(instance_id=placement.instance_id),
                    reason="load failed",
                )
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
        self, instance_id: str, model: common_pb2.ModelRef, metadata: Metadata, *, reason: str
    ) -> models_pb2.UnloadModelResponse | None:
        replica = self._replica(instance_id)
        if replica is None:
            return None
        try:
            answer: models_pb2.UnloadModelResponse = await replica.UnloadModel(
                models_pb2.UnloadModelRequest(model=model, target=models_pb2.PlacementTarget(instance_id=instance_id)),
                timeout=self.replica_timeout_s,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            log.warning("unloading %s from %s (%s) failed: %s", model.name, instance_id, reason, err.details())
            return None
        return answer

    async def _unload(self, request: models_pb2.UnloadModelRequest, context: Context) -> models_pb2.UnloadModelResponse:
        name = require_model_name(request.model)
        target = request.target
        holders = [
            instance
            for instance in self.replicas()
            if name in instance.models and (not target.instance_id or instance.instance_id == target.instance_id)
        ]
        metadata = forwarded_metadata(context)

        async def unload(instance: Instance) -> models_pb2.UnloadModelResponse | grpc.aio.AioRpcError:
            try:
                answer: models_pb2.UnloadModelResponse = await models_pb2_grpc.ModelServiceStub(
                    self.channel_for(instance)
                ).UnloadModel(request, timeout=time_remaining(context), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                return err
            return answer

        answers = await asyncio.gather(*(unload(instance) for instance in holders))
        unloaded = [
            r for answer in answers if isinstance(answer, models_pb2.UnloadModelResponse) for r in answer.unloaded
        ]
        refused = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
        if not unloaded and refused:
            # Nothing was unloaded and a replica said why (a model loaded for the replica's life, a wrong node...).
            await relay_error(context, refused[0])
        await self.state.evict(
            scheduler_pb2.EvictModelRequest(model=request.model, target=target, reason="unloaded by an admin")
        )
        return models_pb2.UnloadModelResponse(unloaded=unloaded, freed_bytes=sum(r.memory_bytes for r in unloaded))
