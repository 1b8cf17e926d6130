"""``/v1/models`` and ``/v1/models/{model}``: the models the caller may call (ModelService.ListModels and
DescribeModel through the gateway: the mesh's models and the caller's tenant's own), in OpenAI's shape with
aimass's facts beside (modality, context length, versions)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from aimass.v1 import common_pb2, models_pb2
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, request_meta, upstream

router = APIRouter(tags=["models"])

# ListModels is a catalogue read: it should not wait as long as a generation may.
CATALOGUE_TIMEOUT_S = 30.0


def model_object(info: models_pb2.ModelInfo) -> dict[str, Any]:
    """One model as OpenAI lists it (id, object, created, owned_by), plus aimass's own fields."""
    versions = list(info.versions)
    context = max((v.context_length for v in versions), default=0)
    modality = models_pb2.Modality.Name(info.modality).removeprefix("MODALITY_").lower()
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": info.owner or "aimass",
        "modality": "unspecified" if modality == "unspecified" else modality,
        "context_length": context or None,
        "versions": [v.version for v in versions],
        "default_version": info.default_version,
        "custom": info.HasField("custom"),
    }


def _timeout(request: Request) -> float:
    configured = call_timeout(request)
    return min(configured, CATALOGUE_TIMEOUT_S) if configured else CATALOGUE_TIMEOUT_S


@router.get("/v1/models")
async def list_models(request: Request, mesh: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    reply = await mesh.models.ListModels(
        models_pb2.ListModelsRequest(meta=request_meta(request)),
        metadata=call_metadata(request),
        timeout=_timeout(request),
    )
    return {"object": "list", "data": [model_object(info) for info in reply.models]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request, mesh: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    # NOT_FOUND (unknown, or another tenant's) becomes OpenAI's 404 in errors.py.
    reply = await mesh.models.DescribeModel(
        models_pb2.DescribeModelRequest(meta=request_meta(request), model=common_pb2.ModelRef(name=model)),
        metadata=call_metadata(request),
        timeout=_timeout(request),
    )
    return model_object(reply.model)
