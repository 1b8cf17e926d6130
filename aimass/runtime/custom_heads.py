"""Tenants' own models on a replica: the trained heads (aimass.training.artifact) it serves, and how a request
picks one (aimass.v1.ModelHostService, called by the scheduler's ReplicaSync).

``CustomHeads`` holds one immutable ``Hosted`` set (heads by owner, name and version; routes by owner and name) and
replaces it in one assignment, so a request sees the set before a sync or the set after it, never a mix: a request
that resolved a head keeps it to the end, however the routes change meanwhile. A sync is idempotent by generation:
a replica already at it answers at once; one behind fetches what it lacks (``fetch``: the replica's BlobCache),
reuses what it holds, swaps, and lets go of what is no longer listed.

Requests name a model; the owner is always the caller's verified tenant (``current_scope().tenant``), so another
tenant's model is as unknown as one that does not exist. An unnamed version is the route's default, or its canary
for ``canary_percent`` of requests, chosen by the request id: a retried request keeps its version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from aimass.runtime.blob_cache import BlobCache
from aimass.runtime.config import Settings
from aimass.runtime.errors import AimassError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel, process_credentials
from aimass.runtime.models import require_loaded
from aimass.runtime.scope import current_scope
from aimass.training.artifact import TASK_OF_BACKBONE, ArtifactError, HeadArtifact
from aimass.v1 import common_pb2, lifecycle_pb2, lifecycle_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# The bytes of a blob by SHA-256 (BlobCache.read_bytes).
Fetch = Callable[[str], Awaitable[bytes]]
# Called with each newly loaded head before it serves (the vision replica loads its backbone for the first one).
Prepare = Callable[[HeadArtifact], Awaitable[None]]
VersionKey = tuple[str, str, str]  # owner, name, version
ModelKey = tuple[str, str]  # owner, name
# Labels quoted in a refusal before "…".
SHOWN_LABELS: Final = 8
MODEL_HOST_SERVICE: Final = "aimass.v1.ModelHostService"
# The scheduler's channel: keepalive notices a control plane that went away; heads come in 1 MiB chunks.
SCHEDULER_CHANNEL_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 32 << 20),
]


@dataclass(frozen=True)
class Route:
    default_version: str
    canary_version: str = ""
    canary_percent: int = 0


@dataclass(frozen=True)
class Hosted:
    """What a replica serves at one generation; never changed, only replaced."""

    generation: int = -1
    heads: Mapping[VersionKey, HeadArtifact] = field(default_factory=dict)
    artifacts: Mapping[VersionKey, str] = field(default_factory=dict)  # the SHA-256 each head was loaded from
    routes: Mapping[ModelKey, Route] = field(default_factory=dict)
    failed: tuple[str, ...] = ()

    def serving(self) -> list[str]:
        return [f"{owner}/{name}@{version}" for owner, name, version in sorted(self.heads)]


def canary_bucket(request_id: str) -> int:
    """0-99, the same for every request with this id (a random one for a request without an id)."""
    if not request_id:
        return random.randrange(100)
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") % 100


def named(key: VersionKey) -> str:
    owner, name, version = key
    return f"{owner}/{name}@{version}"


def quoted_labels(head: HeadArtifact) -> str:
    shown = ", ".join(head.labels[:SHOWN_LABELS])
    return shown + (f", … {len(head.labels) - SHOWN_LABELS} more" if len(head.labels) > SHOWN_LABELS else "")


class CustomHeads:
    """The heads one replica process serves. ``base_models`` are the backbones whose heads it takes (text heads on
    NLP replicas, image heads on vision replicas); ``service`` names it in messages ("NlpService")."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        base_models: Collection[str],
        service: str,
        prepare: Prepare | None = None,
    ) -> None:
        self.fetch = fetch
        self.base_models = frozenset(base_models)
        self.service = service
        self.prepare = prepare
        self.hosted = Hosted()
        self._lock = asyncio.Lock()

    @property
    def generation(self) -> int:
        return self.hosted.generation

    # -- sync ----------------------------------------------------------------------------------------------------

    async def sync(self, request: lifecycle_pb2.SyncCustomModelsRequest) -> lifecycle_pb2.SyncCustomModelsResponse:
        """Serves exactly ``request``'s versions and routes (unless this replica is at a later generation, or at
        this one with nothing left to load): new versions are fetched and parsed first, then the routes switch in
        one step, then what is no longer listed is let go."""
        if request.generation < 0:
            raise InvalidArgument(f"generation is {request.generation}; generations start at 0")
        versions = _checked_versions(request)
        routes = _checked_routes(request)
        async with self._lock:
            current = self.hosted
            if request.generation < current.generation or (
                request.generation == current.generation and not current.failed
            ):
                return self._answer(current)
            heads: dict[VersionKey, HeadArtifact] = {}
            artifacts: dict[VersionKey, str] = {}
            failed: list[str] = []
            wanted = list(versions.items())
            loaded = await asyncio.gather(*(self._load(key, sha256, current) for key, sha256 in wanted))
            for (key, sha256), outcome in zip(wanted, loaded, strict=True):
                if isinstance(outcome, HeadArtifact):
                    heads[key], artifacts[key] = outcome, sha256
                else:
                    failed.append(f"{named(key)}: {outcome}")
            self.hosted = Hosted(request.generation, heads, artifacts, routes, tuple(failed))
        gone = sorted(set(current.heads) - set(heads))
        log.info(
            "%s serves custom models generation %d: %d version(s)%s%s",
            self.service,
            request.generation,
            len(heads),
            f", dropped {', '.join(map(named, gone))}" if gone else "",
            f"; could not load {'; '.join(failed)}" if failed else "",
        )
        return self._answer(self.hosted)

    @staticmethod
    def _answer(hosted: Hosted) -> lifecycle_pb2.SyncCustomModelsResponse:
        return lifecycle_pb2.SyncCustomModelsResponse(
            generation=hosted.generation, serving=hosted.serving(), failed=hosted.failed
        )

    async def _load(self, key: VersionKey, sha256: str, current: Hosted) -> HeadArtifact | str:
        """The head of ``key`` (the one held when its artifact is unchanged), or why it could not be loaded."""
        held = current.heads.get(key)
        if held is not None and current.artifacts.get(key) == sha256:
            return held
        try:
            data = await self.fetch(sha256)
            head = await asyncio.to_thread(HeadArtifact.from_bytes, data)
        except (AimassError, ArtifactError) as error:
            return f"artifact {sha256}: {error}"
        except (grpc.aio.AioRpcError, OSError) as error:
            return f"artifact {sha256} could not be fetched: {error}"
        if head.base_model not in self.base_models:
            served = sorted(self.base_models)
            tasks = ", ".join(TASK_OF_BACKBONE[base] for base in served)
            return (
                f"a {head.task} head on {head.base_model}; this {self.service} replica serves heads on "
                f"{', '.join(served)} ({tasks})"
            )
        if self.prepare is not None:
            try:
                await self.prepare(head)
            except Exception as error:  # a backbone that cannot load is this version's failure, reported upstream
                log.exception("preparing %s for %s failed", head.base_model, named(key))
                return f"its backbone {head.base_model} could not be loaded: {error}"
        return head

    # -- requests ------------------------------------------------------------------------------------------------

    def names(self, owner: str) -> list[str]:
        """``owner``'s models served here (for "available: ..." in refusals), sorted."""
        if not owner:
            return []
        hosted = self.hosted
        return sorted({name for o, name in hosted.routes if o == owner} | {n for o, n, _ in hosted.heads if o == owner})

    def resolve(self, owner: str, name: str, version: str, request_id: str) -> tuple[str, HeadArtifact] | None:
        """The version of ``owner``'s model ``name`` that answers this request, and its head; None when ``owner`` has
        no such model here (another tenant's is no different). NotFound for a version that is not deployed;
        Unavailable for one this replica could not load (another replica may hold it)."""
        if not owner or not name:
            return None
        hosted = self.hosted  # one read: the whole request sees one generation
        route = hosted.routes.get((owner, name))
        versions = sorted((v for o, n, v in hosted.heads if (o, n) == (owner, name)), key=_version_order)
        if route is None and not versions:
            return None
        if not version:
            if route is None or not route.default_version:
                raise NotFound(
                    f"model {name!r} has no default version serving; name one of its versions: {', '.join(versions)}",
                    reason="NO_DEFAULT_VERSION",
                    metadata={"model": name, "versions": ",".join(versions)},
                )
            version = route.default_version
            if route.canary_version and canary_bucket(request_id) < route.canary_percent:
                version = route.canary_version
        head = hosted.heads.get((owner, name, version))
        if head is not None:
            return version, head
        if any(entry.startswith(f"{owner}/{name}@{version}:") for entry in hosted.failed):
            raise Unavailable(
                f"version {version} of model {name!r} could not be loaded on this {self.service} replica; retry "
                "(another replica may serve it)",
                reason="MODEL_VERSION_UNAVAILABLE",
            )
        raise NotFound(
            f"version {version!r} of model {name!r} is not deployed; deployed: {', '.join(versions) or 'none'}",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={"model": name, "version": version, "versions": ",".join(versions)},
        )


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def _checked_versions(request: lifecycle_pb2.SyncCustomModelsRequest) -> dict[VersionKey, str]:
    versions: dict[VersionKey, str] = {}
    for index, hosted in enumerate(request.versions):
        key = (hosted.owner, hosted.name, hosted.version)
        if not all(key) or not hosted.artifact_sha256:
            raise InvalidArgument(
                f"versions[{index}] lacks its owner, name, version or artifact_sha256; every hosted version needs all "
                "four"
            )
        if versions.setdefault(key, hosted.artifact_sha256) != hosted.artifact_sha256:
            raise InvalidArgument(f"versions lists {named(key)} twice with different artifacts")
    return versions


def _checked_routes(request: lifecycle_pb2.SyncCustomModelsRequest) -> dict[ModelKey, Route]:
    routes: dict[ModelKey, Route] = {}
    for index, hosted in enumerate(request.routes):
        if not hosted.owner or not hosted.name:
            raise InvalidArgument(f"routes[{index}] lacks its owner or name")
        if not 0 <= hosted.canary_percent <= 100:
            raise InvalidArgument(f"routes[{index}].canary_percent is {hosted.canary_percent}; send 0 to 100")
        routes[(hosted.owner, hosted.name)] = Route(
            hosted.default_version, hosted.canary_version, hosted.canary_percent if hosted.canary_version else 0
        )
    return routes


class ModelHostServicer(lifecycle_pb2_grpc.ModelHostServiceServicer):
    """aimass.v1.ModelHostService over one replica's ``CustomHeads`` (the mesh policy lets the scheduler alone
    call it)."""

    def __init__(self, heads: CustomHeads) -> None:
        self.heads = heads

    async def SyncCustomModels(
        self, request: lifecycle_pb2.SyncCustomModelsRequest, context: Context
    ) -> lifecycle_pb2.SyncCustomModelsResponse:
        return await self.heads.sync(request)


def custom_model(
    heads: CustomHeads | None,
    requested: common_pb2.ModelRef,
    *,
    builtin: Collection[str],
    served: str,
    where: str,
    loaded: bool,
) -> tuple[common_pb2.ModelRef, HeadArtifact] | None:
    """What a Classify handler asks first: None for the replica's own models (and no name), else the caller's custom
    model's version that answers and its head. NOT_FOUND for any other name, listing ``served`` and the caller's own
    models only, so another tenant's model reads exactly like one that does not exist."""
    name = requested.name
    if not name or name in builtin:
        return None
    require_loaded(loaded, where.partition(".")[0])
    scope = current_scope()
    found = None if heads is None else heads.resolve(scope.tenant, name, requested.version, scope.request_id)
    if found is None:
        own = heads.names(scope.tenant) if heads is not None else []
        raise NotFound(
            f"model {name!r} is not served by {where}; available: {served}"
            + (f"; your models: {', '.join(own)}" if own else ""),
            reason="MODEL_NOT_FOUND",
            metadata={"model": name, "available": ",".join((served, *own))},
        )
    version, head = found
    return common_pb2.ModelRef(name=name, version=version), head


def refuse_labels(model: common_pb2.ModelRef, head: HeadArtifact) -> InvalidArgument:
    return InvalidArgument(
        f"{model.name} is a trained classifier with its own labels ({quoted_labels(head)}); send no labels",
        reason="LABELS_NOT_ALLOWED",
        metadata={"model": model.name, "labels": ",".join(head.labels)},
    )


class SchedulerBlobs:
    """The scheduler's BlobService as a replica's ``Fetch``: a BlobCache in ``cache_dir`` over a mesh channel to
    ``address`` (opened with the first fetch, inside the event loop)."""

    def __init__(self, address: str, credentials: MeshCredentials | None, cache_dir: Path) -> None:
        self.address = address
        self.credentials = credentials
        self.cache_dir = cache_dir
        self._channel: grpc.aio.Channel | None = None
        self._cache: BlobCache | None = None

    @classmethod
    def for_replica(cls, settings: Settings, kind: str) -> SchedulerBlobs:
        """The scheduler of ``settings``, dialled with ``kind``'s mesh certificate; cached under
        ``state_dir/replica-cache/kind``."""
        return cls(
            settings.scheduler.address, process_credentials(settings, kind), settings.state_dir / "replica-cache" / kind
        )

    async def read_bytes(self, sha256: str) -> bytes:
        if self._cache is None:
            if not self.address:
                raise FailedPrecondition(
                    "this replica has no scheduler address (scheduler.address, AIMASS_SCHEDULER__ADDRESS) to fetch "
                    "trained models from"
                )
            self._channel = mesh_channel(
                self.address, self.credentials, server_role=ROLE_SCHEDULER, options=SCHEDULER_CHANNEL_OPTIONS
            )
            self._cache = BlobCache(self.cache_dir, self._channel)
        return await self._cache.read_bytes(sha256)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._cache = None
