"""The model catalogue: ``ModelInfo`` entries, the ModelService a replica serves, and the rules the gateway shares.

A replica answers for its own models (its app's ``model_infos`` plus itself as the one replica); the gateway asks
every replica and merges their answers with ``merge``. Filtering, merging and DescribeModel's lookup live here so
both sides apply exactly the same rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import grpc

from aimass.runtime.contract import PACKAGE
from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from aimass.runtime.models import ModelSet
from aimass.v1 import common_pb2, models_pb2, models_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


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


def default_model_label(method: str) -> str:
    """The registry label naming a replica's default model for ``method`` ("aimass.v1.NlpService/Embed", with or
    without the leading slash). Letters, digits and dashes only, so it is also a valid Consul meta key."""
    service, _, name = method.lstrip("/").partition("/")
    return f"default-model-{service.rsplit('.', 1)[-1]}-{name}"


def default_model_labels(infos: Iterable[models_pb2.ModelInfo]) -> dict[str, str]:
    """Label → model for every method a default model of ``infos`` serves: the model a request naming none gets.
    A replica registers them so gateways can route such requests to replicas that still hold their default."""
    labels: dict[str, str] = {}
    for info in infos:
        if info.is_default:
            for method in info.methods:
                labels.setdefault(default_model_label(method), info.name)
    return labels


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


@runtime_checkable
class LoadsModelsOnDemand(Protocol):
    """An app whose engine loads and unloads its models one at a time (optional part of the app protocol); apps
    without it load every model at start and keep them for the process's life."""

    @property
    def model_set(self) -> ModelSet: ...


@runtime_checkable
class RunsOnOneDevice(Protocol):
    """An app whose engine keeps its models on one device it names (torch's names: "cpu", "cuda"), without a
    ModelSet (the LLM engine); optional, for the registry's ``device`` label."""

    @property
    def device(self) -> str: ...


def device_kind(device: str) -> common_pb2.DeviceKind.ValueType:
    """GPU for "cuda[:i]", CPU for anything else (torch's device names)."""
    return common_pb2.DEVICE_KIND_GPU if device.startswith("cuda") else common_pb2.DEVICE_KIND_CPU


def with_footprints(infos: Iterable[models_pb2.ModelInfo], models: ModelSet) -> list[models_pb2.ModelInfo]:
    """Catalogue entries with the footprints measured at their last load here (estimates stay where none was)."""
    entries = []
    for info in infos:
        entry = models_pb2.ModelInfo()
        entry.CopyFrom(info)
        measured = models.footprint_bytes(info.name) if info.name in models.names else 0
        if measured:
            for version in entry.versions:
                version.footprint_bytes = measured
                version.footprint_measured = True
                version.footprint_device_kind = device_kind(models.device)
        entries.append(entry)
    return entries


class ReplicaModelServicer(models_pb2_grpc.ModelServiceServicer):
    """aimass.v1.ModelService on a replica: its own models, itself as their only replica.

    Load and unload act on this process only (the gateway decides where, with the scheduler, and calls the chosen
    replica); ``on_change`` tells the mesh (registry, scheduler) at once when the loaded set changed.
    """

    def __init__(
        self,
        app: ServesModels,
        describe_replica: Callable[[], models_pb2.ModelReplica],
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.describe_replica = describe_replica
        self.on_change = on_change

    @property
    def _model_set(self) -> ModelSet | None:
        return self.app.model_set if isinstance(self.app, LoadsModelsOnDemand) else None

    def _infos(self) -> list[models_pb2.ModelInfo]:
        models = self._model_set
        return list(self.app.model_infos()) if models is None else with_footprints(self.app.model_infos(), models)

    def _held(self, info: models_pb2.ModelInfo) -> models_pb2.ModelReplica:
        """This replica's hold on one of its models."""
        held = self.describe_replica()
        held.version = info.default_version
        models = self._model_set
        if models is not None and info.name in models.names:
            held.loaded = held.loaded and info.name in models.loaded
            held.memory_bytes = models.footprint_bytes(info.name) if held.loaded else 0
            held.device.kind = device_kind(models.device)
        return held

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        infos = self._infos()
        if request.loaded_only:
            infos = [info for info in infos if self._held(info).loaded]
        return models_pb2.ListModelsResponse(models=select(infos, request, loaded=True))

    async def DescribeModel(
        self, request: models_pb2.DescribeModelRequest, context: Context
    ) -> models_pb2.DescribeModelResponse:
        entries = []
        for info in self._infos():
            info.replicas.append(self._held(info))
            entries.append(info)
        return models_pb2.DescribeModelResponse(model=describe(entries, request.model, where="this replica"))

    def _resolve(self, model: common_pb2.ModelRef, target: models_pb2.PlacementTarget) -> tuple[ModelSet, str]:
        """The model set and model name a load/unload request means here, or the error that says why not."""
        name = require_model_name(model)
        infos = {info.name: info for info in self.app.model_infos()}
        info = infos.get(name)
        if info is None:
            raise unknown_model(name, infos, where="this replica")
        if model.version and model.version not in {v.version for v in info.versions}:
            raise NotFound(
                f"model {name!r} has no version {model.version!r} here; versions: "
                + ", ".join(v.version for v in info.versions),
                reason="VERSION_NOT_FOUND",
                metadata={"model": name, "version": model.version},
            )
        me = self.describe_replica()
        if target.instance_id and target.instance_id != me.instance_id:
            raise FailedPrecondition(
                f"this replica is {me.instance_id}, not {target.instance_id}; ask the gateway to load or unload "
                "anywhere in the mesh"
            )
        if target.node_id and target.node_id != me.node_id:
            raise FailedPrecondition(f"this replica runs on node {me.node_id}, not {target.node_id}")
        models = self._model_set
        if models is None or name not in models.names:
            raise FailedPrecondition(
                f"this replica loads {name!r} when it starts and keeps it for its life; start or stop replicas "
                "(aimass up --<kind>-replicas) to change where it runs",
                reason="STATIC_MODEL",
            )
        if target.device_kind and target.device_kind != device_kind(models.device):
            raise FailedPrecondition(f"this replica runs its models on {models.device}, not on the device asked for")
        return models, name

    async def LoadModel(self, request: models_pb2.LoadModelRequest, context: Context) -> models_pb2.LoadModelResponse:
        models, name = self._resolve(request.model, request.target)
        # Loading blocks for seconds; a thread keeps the replica serving meanwhile.
        loaded_now = await asyncio.to_thread(models.load, name)
        if loaded_now and self.on_change is not None:
            await self.on_change()
        info = next(info for info in self.app.model_infos() if info.name == name)
        return models_pb2.LoadModelResponse(replica=self._held(info), already_loaded=not loaded_now)

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: Context
    ) -> models_pb2.UnloadModelResponse:
        models, name = self._resolve(request.model, request.target)
        info = next(info for info in self.app.model_infos() if info.name == name)
        held = self._held(info)
        if not await asyncio.to_thread(models.unload, name):
            return models_pb2.UnloadModelResponse()
        if self.on_change is not None:
            await self.on_change()
        # What it held (memory_bytes: what was freed), as it is now: not loaded.
        held.loaded = False
        return models_pb2.UnloadModelResponse(unloaded=[held], freed_bytes=held.memory_bytes)
