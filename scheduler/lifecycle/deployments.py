"""aimass.v1.DeploymentService: which versions of a tenant's own models serve, and how unnamed requests pick one.

Served by the control plane (the scheduler), reached through the gateway, which attests the caller's tenant; every
method sees only the caller's own models (another tenant's model is NOT_FOUND, exactly like a name that does not
exist). The state of one model is a ``DeploymentRecord``:

- ``default_version`` serves every unnamed request (``DEFAULT``), except ``canary_percent`` of them that go to
  ``canary_version`` (``CANARY``); ``previous_version``, the default before the last change of default, stays loaded
  and callable by version (``STANDBY``) so that Rollback is instant. Every other version is ``READY``.
- DeployModel: a model with no default takes the version as its default; with one, ``canary_percent`` 1-99 makes the
  version the canary (replacing any canary) and 0 makes it the default directly (the old default becomes
  ``previous_version``).
- PromoteModel: the canary (or the version named) becomes the default; the default it replaces becomes
  ``previous_version``.
- RollbackModel: drops the canary if there is one, else makes ``previous_version`` the default again (the version it
  replaces stops serving).
- UndeployModel: stops serving the version named (the canary or the standby; the default only when it serves alone),
  or every version when none is named.

A change that adds a version to serve first goes through placement (``ReplicaSync.admitting``): each replica of the
model's service that has room on its device for the head takes it, and the change is refused with RESOURCE_EXHAUSTED
INSUFFICIENT_MEMORY, with nothing recorded, when none has. Each change is written to the store (which gives it the
next global generation) and pushed to the replicas of the model's service that hold it by ``ReplicaSync``; the call
returns once they applied it or its deadline (less a margin to answer) has passed, with the number that did. A
change with no replica to apply it (or no reading of their devices yet) is still recorded: replicas that join later
catch up. Requests that change nothing write nothing and report the replicas that serve the current state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from aimass.runtime.scope import current_scope, deadline_of
from aimass.store.records import DeploymentRecord, ModelVersionRecord
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    deployments_pb2,
    deployments_pb2_grpc,
    training_pb2,
)
from scheduler.lifecycle.names import check_name
from scheduler.lifecycle.replica_sync import DeploymentSource, ReplicaSync, task_of

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

MAX_CANARY_PERCENT: Final = 99
# ExportModel's chunk size.
EXPORT_CHUNK_BYTES: Final = 1 << 20
# Time kept back from the call's deadline to answer after waiting for replicas.
ANSWER_MARGIN_S: Final = 0.25
# How long a change waits for replicas when its caller set no deadline.
DEFAULT_APPLY_WAIT_S: Final = 30.0
# The service and method that serve a custom model, by task.
METHOD_OF_TASK: Final = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: "aimass.v1.NlpService/Classify",
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: "aimass.v1.VisionService/Classify",
}


class DeploymentStore(DeploymentSource, Protocol):
    """What the servicer reads and writes in the store (``SqlStore``'s methods)."""

    def model_versions(self, owner: str, name: str | None = None) -> list[ModelVersionRecord]: ...

    def get_deployment(self, owner: str, name: str) -> DeploymentRecord | None: ...

    def put_deployment(self, record: DeploymentRecord) -> DeploymentRecord: ...

    def delete_deployment(self, owner: str, name: str) -> int | None: ...

    def deployment_generation(self) -> int: ...


class ExportBlobs(Protocol):
    """Where the exports' bytes lie (``BlobStore``'s method)."""

    def path(self, sha256: str) -> Path: ...


# A change to one model's deployment: (its versions, the deployment now) -> the deployment wanted (None: undeployed).
Change = Callable[[Sequence[ModelVersionRecord], DeploymentRecord | None], DeploymentRecord | None]


def version_states(deployment: DeploymentRecord | None) -> dict[int, deployments_pb2.VersionState.ValueType]:
    """Version → its state for the versions ``deployment`` serves (any other version is READY)."""
    if deployment is None:
        return {}
    states: dict[int, deployments_pb2.VersionState.ValueType] = {}
    if deployment.previous_version:
        states[deployment.previous_version] = deployments_pb2.VERSION_STATE_STANDBY
    if deployment.canary_version:
        states[deployment.canary_version] = deployments_pb2.VERSION_STATE_CANARY
    if deployment.default_version:
        states[deployment.default_version] = deployments_pb2.VERSION_STATE_DEFAULT
    return states


def serving_versions(deployment: DeploymentRecord) -> list[int]:
    """The versions ``deployment`` keeps loaded: default, canary, standby (each once, in that order)."""
    found = (deployment.default_version, deployment.canary_version, deployment.previous_version)
    return list(dict.fromkeys(version for version in found if version))


def describe_serving(deployment: DeploymentRecord | None) -> str:
    """E.g. "v2 (default), v3 (canary, 10%), v1 (standby)", or "nothing" for what people read in errors."""
    if deployment is None or not deployment.default_version:
        return "nothing"
    parts = [f"v{deployment.default_version} (default)"]
    if deployment.canary_version:
        parts.append(f"v{deployment.canary_version} (canary, {deployment.canary_percent}%)")
    if deployment.previous_version:
        parts.append(f"v{deployment.previous_version} (standby)")
    return ", ".join(parts)


def custom_model_version(
    record: ModelVersionRecord, state: deployments_pb2.VersionState.ValueType
) -> deployments_pb2.CustomModelVersion:
    return deployments_pb2.CustomModelVersion(
        version=str(record.version),
        state=state,
        job_id=record.job_id,
        dataset=datasets_pb2.DatasetRef(
            name=record.dataset_name, owner=record.dataset_owner, version=record.dataset_version
        ),
        dataset_sha256=record.dataset_sha256,
        base_model=record.base_model,
        hyperparameters=training_pb2.Hyperparameters.FromString(record.hyperparameters or b""),
        evaluation=training_pb2.Evaluation.FromString(record.evaluation or b""),
        labels=list(record.labels),
        created_unix_ms=record.created_unix_ms,
        artifact_sha256=record.artifact_sha256,
        artifact_bytes=record.artifact_bytes,
        code_version=record.code_version,
    )


def custom_model(
    owner: str, name: str, versions: Sequence[ModelVersionRecord], deployment: DeploymentRecord | None
) -> deployments_pb2.CustomModel:
    """The model as ListCustomModels and every change show it: versions oldest first, each with its state."""
    ordered = sorted(versions, key=lambda record: record.version)
    states = version_states(deployment)
    task = task_of(ordered[-1]) if ordered else datasets_pb2.TRAINING_TASK_UNSPECIFIED
    model = deployments_pb2.CustomModel(
        name=name,
        owner=owner,
        task=task,
        method=METHOD_OF_TASK.get(task, ""),
        versions=[
            custom_model_version(record, states.get(record.version, deployments_pb2.VERSION_STATE_READY))
            for record in ordered
        ],
    )
    if deployment is not None:
        model.deployment.CopyFrom(
            deployments_pb2.Deployment(
                default_version=_shown(deployment.default_version),
                canary_version=_shown(deployment.canary_version),
                canary_percent=deployment.canary_percent,
                previous_version=_shown(deployment.previous_version),
                generation=deployment.generation,
            )
        )
    return model


class DeploymentServicer(deployments_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, store: DeploymentStore, blobs: ExportBlobs, sync: ReplicaSync) -> None:
        self.store = store
        self.blobs = blobs
        self.sync = sync
        # Changes are read-modify-write on one model's record: one at a time (never across the wait for replicas).
        self._changing = asyncio.Lock()

    # -- reads ---------------------------------------------------------------------------------------------------

    async def ListCustomModels(
        self, request: deployments_pb2.ListCustomModelsRequest, context: Context
    ) -> deployments_pb2.ListCustomModelsResponse:
        owner = _tenant()
        if request.model.name:
            check_name("model", request.model.name)
        records = await asyncio.to_thread(self.store.model_versions, owner, request.model.name or None)
        if request.model.name and not records:
            raise _no_model(request.model.name)
        by_name: dict[str, list[ModelVersionRecord]] = {}
        for record in records:
            by_name.setdefault(record.name, []).append(record)
        models = []
        for name in sorted(by_name):
            deployment = await asyncio.to_thread(self.store.get_deployment, owner, name)
            models.append(custom_model(owner, name, by_name[name], deployment))
        return deployments_pb2.ListCustomModelsResponse(models=models)

    async def ExportModel(
        self, request: deployments_pb2.ExportModelRequest, context: Context
    ) -> AsyncIterator[deployments_pb2.ExportModelResponse]:
        owner = _tenant()
        if request.format not in (deployments_pb2.EXPORT_FORMAT_UNSPECIFIED, deployments_pb2.EXPORT_FORMAT_ONNX):
            raise InvalidArgument(
                f"format {request.format} is not an export format; send EXPORT_FORMAT_ONNX (1) or leave it unset",
                reason="BAD_EXPORT_FORMAT",
            )
        name = _model_name(request.model)
        versions = await self._versions(owner, name)
        if request.model.version:
            record = _find_version(name, versions, _version_number(request.model.version))
        else:
            deployment = await asyncio.to_thread(self.store.get_deployment, owner, name)
            default = deployment.default_version if deployment is not None else 0
            record = _find_version(name, versions, default) if default else versions[-1]
        if not record.export_sha256:
            raise NotFound(
                f"version {record.version} of model {name!r} has no export (it was trained before exports were made)",
                reason="NO_EXPORT",
            )
        async for chunk in self._export_chunks(name, record):
            yield chunk

    async def _export_chunks(
        self, name: str, record: ModelVersionRecord
    ) -> AsyncIterator[deployments_pb2.ExportModelResponse]:
        sha = record.export_sha256
        try:
            handle = await asyncio.to_thread(self.blobs.path(sha).open, "rb")
        except FileNotFoundError:
            log.error("export %s of %s/%s@%s is missing from the blob store", sha, record.owner, name, record.version)
            raise NotFound(
                f"the export of version {record.version} of model {name!r} is missing from the blob store",
                reason="NO_EXPORT",
            ) from None
        try:
            total = await asyncio.to_thread(lambda: handle.seek(0, 2))
            await asyncio.to_thread(handle.seek, 0)
            digest = hashlib.sha256()
            sent = 0
            first = True
            while True:
                data = await asyncio.to_thread(handle.read, EXPORT_CHUNK_BYTES)
                digest.update(data)
                sent += len(data)
                last = sent >= total
                chunk = deployments_pb2.ExportModelResponse(data=data, total_bytes=total)
                if first:
                    chunk.filename = f"{name}-v{record.version}.zip"
                    first = False
                if last:
                    chunk.sha256 = digest.hexdigest()
                    if chunk.sha256 != sha:
                        log.error(
                            "export blob %s of %s/%s@%s reads back as %s",
                            sha,
                            record.owner,
                            name,
                            record.version,
                            chunk.sha256,
                        )
                yield chunk
                if last or not data:
                    return
        finally:
            await asyncio.to_thread(handle.close)

    # -- changes -------------------------------------------------------------------------------------------------

    async def DeployModel(
        self, request: deployments_pb2.DeployModelRequest, context: Context
    ) -> deployments_pb2.DeployModelResponse:
        owner = _tenant()
        name = _model_name(request.model)
        if not request.model.version:
            raise InvalidArgument(
                "model.version is empty; name the version to deploy (ListCustomModels shows them)",
                reason="NO_VERSION",
            )
        wanted = _version_number(request.model.version)
        percent = request.canary_percent
        if not 0 <= percent <= MAX_CANARY_PERCENT:
            raise InvalidArgument(
                f"canary_percent is {percent}; send 1-{MAX_CANARY_PERCENT} to deploy a canary, or 0 to make the version"
                " the default",
                reason="BAD_CANARY_PERCENT",
            )

        def change(versions: Sequence[ModelVersionRecord], current: DeploymentRecord | None) -> DeploymentRecord:
            version = _find_version(name, versions, wanted).version
            if current is None or not current.default_version:
                return DeploymentRecord(owner=owner, name=name, default_version=version)
            if percent == 0:
                return _with_default(current, version)
            if version == current.default_version:
                raise FailedPrecondition(
                    f"version {version} of model {name!r} is already its default; a canary must be another version",
                    reason="ALREADY_DEFAULT",
                )
            return dataclasses.replace(
                current,
                canary_version=version,
                canary_percent=percent,
                previous_version=0 if current.previous_version == version else current.previous_version,
            )

        model, applied = await self._change(owner, name, change, context)
        return deployments_pb2.DeployModelResponse(model=model, replicas_applied=applied)

    async def PromoteModel(
        self, request: deployments_pb2.PromoteModelRequest, context: Context
    ) -> deployments_pb2.PromoteModelResponse:
        owner = _tenant()
        name = _model_name(request.model)
        wanted = _version_number(request.model.version) if request.model.version else 0

        def change(versions: Sequence[ModelVersionRecord], current: DeploymentRecord | None) -> DeploymentRecord:
            current = _deployed(name, current)
            if wanted:
                version = _find_version(name, versions, wanted).version
            else:
                if not current.canary_version:
                    raise FailedPrecondition(
                        f"model {name!r} has no canary to promote (it serves {describe_serving(current)}); name the"
                        " version to make the default, or deploy one as a canary first",
                        reason="NO_CANARY",
                    )
                version = current.canary_version
            return _with_default(current, version)

        model, applied = await self._change(owner, name, change, context)
        return deployments_pb2.PromoteModelResponse(model=model, replicas_applied=applied)

    async def RollbackModel(
        self, request: deployments_pb2.RollbackModelRequest, context: Context
    ) -> deployments_pb2.RollbackModelResponse:
        owner = _tenant()
        name = _model_name(request.model)
        if request.model.version:
            raise InvalidArgument(
                "model.version is set; Rollback takes no version: it drops the canary, else returns to the previous"
                " default",
                reason="UNEXPECTED_VERSION",
            )

        def change(versions: Sequence[ModelVersionRecord], current: DeploymentRecord | None) -> DeploymentRecord:
            current = _deployed(name, current)
            if current.canary_version:
                return dataclasses.replace(current, canary_version=0, canary_percent=0)
            if current.previous_version:
                return dataclasses.replace(current, default_version=current.previous_version, previous_version=0)
            raise FailedPrecondition(
                f"model {name!r} has nothing to roll back to: no canary and no previous default (it serves"
                f" {describe_serving(current)})",
                reason="NOTHING_TO_ROLL_BACK",
            )

        model, applied = await self._change(owner, name, change, context)
        return deployments_pb2.RollbackModelResponse(model=model, replicas_applied=applied)

    async def UndeployModel(
        self, request: deployments_pb2.UndeployModelRequest, context: Context
    ) -> deployments_pb2.UndeployModelResponse:
        owner = _tenant()
        name = _model_name(request.model)
        wanted = _version_number(request.model.version) if request.model.version else 0

        def change(versions: Sequence[ModelVersionRecord], current: DeploymentRecord | None) -> DeploymentRecord | None:
            if not wanted:
                return None
            version = _find_version(name, versions, wanted).version
            if current is None or version not in serving_versions(current):
                return current
            if version == current.canary_version:
                return dataclasses.replace(current, canary_version=0, canary_percent=0)
            if version == current.previous_version:
                return dataclasses.replace(current, previous_version=0)
            others = [other for other in serving_versions(current) if other != version]
            if others:
                raise FailedPrecondition(
                    f"version {version} is the default of model {name!r}, which also serves"
                    f" {', '.join(f'v{other}' for other in others)}; undeploy those first, or every version (no"
                    " version named)",
                    reason="DEFAULT_NOT_ALONE",
                )
            return None

        model, applied = await self._change(owner, name, change, context)
        return deployments_pb2.UndeployModelResponse(model=model, replicas_applied=applied)

    async def _change(
        self, owner: str, name: str, change: Change, context: Context
    ) -> tuple[deployments_pb2.CustomModel, int]:
        """Applies ``change(versions, current) -> new record or None (undeployed)`` to the model's deployment,
        records it and waits for the replicas: the model as it is now, and how many replicas serve that."""
        deadline = self._apply_deadline(context)
        async with self._changing:
            versions = await self._versions(owner, name)
            current = await asyncio.to_thread(self.store.get_deployment, owner, name)
            target: DeploymentRecord | None = change(versions, current)
            added = set(serving_versions(target) if target else ()) - set(serving_versions(current) if current else ())
            # Refused (INSUFFICIENT_MEMORY) before anything is recorded when no replica has room for what it adds.
            async with self.sync.admitting([record for record in versions if record.version in added]):
                if _same(target, current):
                    updated = current
                    generation = await asyncio.to_thread(self.store.deployment_generation)
                    log.info("deployment of %s/%s unchanged: %s", owner, name, describe_serving(current))
                elif target is None:
                    deleted = await asyncio.to_thread(self.store.delete_deployment, owner, name)
                    updated = None
                    if deleted is None:  # gone meanwhile (another scheduler): the generation that removed it
                        deleted = await asyncio.to_thread(self.store.deployment_generation)
                    generation = deleted
                    log.info("undeployed %s/%s (generation %d)", owner, name, generation)
                else:
                    updated = await asyncio.to_thread(self.store.put_deployment, target)
                    generation = updated.generation
                    log.info(
                        "deployment of %s/%s: %s (generation %d)", owner, name, describe_serving(updated), generation
                    )
        applied = await self.sync.apply(generation, deadline, model=(owner, name), task=task_of(versions[-1]))
        return custom_model(owner, name, versions, updated), applied

    def _apply_deadline(self, context: Context) -> float:
        now = asyncio.get_running_loop().time()
        deadline = deadline_of(context)
        if deadline is None:
            return now + DEFAULT_APPLY_WAIT_S
        return max(now, deadline - ANSWER_MARGIN_S)

    async def _versions(self, owner: str, name: str) -> list[ModelVersionRecord]:
        """The caller's versions of ``name``, oldest first; NOT_FOUND (the same for another tenant's) when none."""
        records = await asyncio.to_thread(self.store.model_versions, owner, name)
        if not records:
            raise _no_model(name)
        return sorted(records, key=lambda record: record.version)


def _tenant() -> str:
    tenant = current_scope().tenant
    if not tenant:
        raise Unauthenticated(
            "the call names no tenant; DeploymentService is reached through the gateway with an API key",
            reason="NO_TENANT",
        )
    return tenant


def _model_name(model: common_pb2.ModelRef) -> str:
    if not model.name:
        raise InvalidArgument("model.name is empty; name one of your models (ListCustomModels shows them)")
    return check_name("model", model.name)


def _no_model(name: str) -> NotFound:
    return NotFound(
        f"you have no model named {name!r}; ListCustomModels shows yours (a model exists once a training job for it"
        " succeeds)",
        reason="MODEL_NOT_FOUND",
    )


def _shown(version: int) -> str:
    """A version number as the API shows it: "1", "2", ...; "" for none (0)."""
    return str(version) if version else ""


def _version_number(text: str) -> int:
    """ModelRef.version ("2") as the store's number; INVALID_ARGUMENT for anything but a positive whole number."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) > 0):
        raise InvalidArgument(
            f"model.version {text[:40]!r} is not a version; versions are numbered 1, 2, ... (ListCustomModels shows"
            " them)",
            reason="BAD_VERSION",
        )
    return int(text)


def _find_version(name: str, versions: Iterable[ModelVersionRecord], version: int) -> ModelVersionRecord:
    known = list(versions)
    for record in known:
        if record.version == version:
            return record
    listed = ", ".join(str(record.version) for record in known)
    raise NotFound(f"model {name!r} has no version {version}; its versions: {listed}", reason="VERSION_NOT_FOUND")


def _deployed(name: str, current: DeploymentRecord | None) -> DeploymentRecord:
    if current is None or not current.default_version:
        raise FailedPrecondition(
            f"model {name!r} is not deployed; DeployModel serves a version first", reason="NOT_DEPLOYED"
        )
    return current


def _with_default(current: DeploymentRecord, version: int) -> DeploymentRecord:
    """``current`` with ``version`` as its default and the default it replaces on standby (a no-op when ``version``
    is the default already)."""
    if version == current.default_version:
        return current
    canary = current.canary_version != version
    return dataclasses.replace(
        current,
        default_version=version,
        previous_version=current.default_version,
        canary_version=current.canary_version if canary else 0,
        canary_percent=current.canary_percent if canary else 0,
    )


def _same(target: DeploymentRecord | None, current: DeploymentRecord | None) -> bool:
    if target is None or current is None:
        return target is None and current is None
    fields = ("default_version", "canary_version", "canary_percent", "previous_version")
    return all(getattr(target, field) == getattr(current, field) for field in fields)
