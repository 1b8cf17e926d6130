"""The model catalogue: ``ModelInfo`` entries, the ModelService a replica serves, and the rules the gateway shares.

A replica answers for its own models (its app's ``model_infos`` plus itself as the one replica); the gateway asks
every replica and merges their answers with ``merge``. Filtering, merging and DescribeModel's lookup live here so
both sides apply exactly the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import grpc

from aimass.runtime.contract import PACKAGE
from aimass.runtime.errors import InvalidArgument, NotFound, Unimplemented
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

PLACEMENT_PENDING = (
    "placement-driven {} arrives with the central scheduler; for now every model loads when its replica starts"
)


class ServesModels(Protocol):
    """The part of a ServiceApp this module needs (importing ServiceApp from server.py would be circular)."""

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]: ...


def model_info(
    name: str,
    *,
    description: str,
    modality: models_pb2.Modality.ValueType,
    service: str,
    methods: Sequence[str],
    version: str = "1",
    context_length: int = 0,
    footprint_bytes: int = 0,
    is_default: bool = True,
) -> models_pb2.ModelInfo:
    """One catalogue entry with a single version; ``methods`` are short names ("Embed") of ``service``'s methods."""
    service = service if "." in service else f"{PACKAGE}.{service}"
    return models_pb2.ModelInfo(
        name=name,
        description=description,
        modality=modality,
        services=[service],
        methods=[f"{service}/{method}" for method in methods],
        versions=[
            models_pb2.ModelVersion(version=version, context_length=context_length, footprint_bytes=footprint_bytes)
        ],
        default_version=version,
        is_default=is_default,
    )


def select(
    infos: Iterable[models_pb2.ModelInfo], request: models_pb2.ListModelsRequest, *, loaded: bool
) -> list[models_pb2.ModelInfo]:
    """ListModels' answer: the entries matching the request's filters, sorted by name, replicas left out.

    ``loaded`` says whether the answering side holds the models loaded (a replica: itself; the gateway passes True
    because replicas already applied ``loaded_only`` to their own answers).
    """
    if request.loaded_only and not loaded:
        return []
    chosen = []
    for info in infos:
        if request.model.name and info.name != request.model.name:
            continue
        if request.service and request.service not in info.services:
            continue
        if request.modality and info.modality != request.modality:
            continue
        entry = models_pb2.ModelInfo()
        entry.CopyFrom(info)
        del entry.replicas[:]
        chosen.append(entry)
    return sorted(chosen, key=lambda entry: entry.name)


def merge(entries: Iterable[models_pb2.ModelInfo]) -> list[models_pb2.ModelInfo]:
    """Entries for the same model from several replicas become one, sorted by name.

    Services, methods and versions are unions (a version is known by its string; a measured footprint wins over an
    estimate), replicas are concatenated, and a model is a default when any replica says so.
    """
    merged: dict[str, models_pb2.ModelInfo] = {}
    for entry in entries:
        into = merged.get(entry.name)
        if into is None:
            into = merged[entry.name] = models_pb2.ModelInfo()
            into.CopyFrom(entry)
            continue
        into.description = into.description or entry.description
        into.modality = into.modality or entry.modality
        into.default_version = into.default_version or entry.default_version
        into.is_default = into.is_default or entry.is_default
        into.services.extend(s for s in entry.services if s not in into.services)
        into.methods.extend(m for m in entry.methods if m not in into.methods)
        known = {v.version: v for v in into.versions}
        for version in entry.versions:
            have = known.get(version.version)
            if have is None:
                into.versions.append(version)
                known[version.version] = into.versions[-1]
            elif version.footprint_measured and not have.footprint_measured:
                have.CopyFrom(version)
        into.replicas.extend(entry.replicas)
    return sorted(merged.values(), key=lambda entry: entry.name)


def require_model_name(model: common_pb2.ModelRef) -> str:
    if not model.name:
        raise InvalidArgument("model.name is required; ListModels names every model", reason="NO_MODEL")
    return model.name


def unknown_model(name: str, known: Iterable[str], *, where: str) -> NotFound:
    names = sorted(set(known))
    return NotFound(
        f"model {name!r} is not served by {where}; known models: {', '.join(names) or 'none'}",
        reason="MODEL_NOT_FOUND",
        metadata={"model": name, "available": ",".join(names)},
    )


def describe(
    entries: Sequence[models_pb2.ModelInfo], model: common_pb2.ModelRef, *, where: str
) -> models_pb2.ModelInfo:
    """DescribeModel's answer from merged entries (replicas filled in): the named model, replicas narrowed to
    ``model.version`` when one is given. INVALID_ARGUMENT without a name, NOT_FOUND for an unknown model or version;
    ``where`` names the answering side in the message ("this replica", "any replica")."""
    name = require_model_name(model)
    found = next((entry for entry in entries if entry.name == name), None)
    if found is None:
        raise unknown_model(name, (entry.name for entry in entries), where=where)
    answer = models_pb2.ModelInfo()
    answer.CopyFrom(found)
    if model.version:
        versions = [v.version for v in found.versions]
        if model.version not in versions:
            raise NotFound(
                f"model {name!r} has no version {model.version!r}; versions: {', '.join(versions) or 'none'}",
                reason="VERSION_NOT_FOUND",
                metadata={"model": name, "version": model.version},
            )
        del answer.replicas[:]
        answer.replicas.extend(r for r in found.replicas if r.version == model.version)
    return answer


class CatalogueServicer(models_pb2_grpc.ModelServiceServicer):
    """What a replica's and the gateway's ModelService share: load and unload wait for placement."""

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        raise Unimplemented(PLACEMENT_PENDING.format("loading"))

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        raise Unimplemented(PLACEMENT_PENDING.format("unloading"))


class ReplicaModelServicer(CatalogueServicer):
    """aimass.v1.ModelService on a replica: its own models, itself as their only replica."""

    def __init__(self, app: ServesModels, describe_replica: Callable[[], models_pb2.ModelReplica]) -> None:
        self.app = app
        self.describe_replica = describe_replica

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        loaded = self.describe_replica().loaded
        return models_pb2.ListModelsResponse(models=select(self.app.model_infos(), request, loaded=loaded))

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        me = self.describe_replica()
        entries = []
        for info in self.app.model_infos():
            entry = models_pb2.ModelInfo()
            entry.CopyFrom(info)
            held = entry.replicas.add()
            held.CopyFrom(me)
            held.version = info.default_version
            entries.append(entry)
        return models_pb2.DescribeModelResponse(model=describe(entries, request.model, where="this replica"))
