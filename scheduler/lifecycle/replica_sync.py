"""Keeps every NLP and vision replica serving the custom model versions the store says are deployed.

The store holds one global generation, bumped by every deployment change. ``ReplicaSync`` turns the store's
deployments into one ``SyncCustomModelsRequest`` per task (every default, canary and standby version with its
artifact, and the routes that pick among them) and sends each serving replica the request of the task its service
hosts: text heads to NLP replicas (aimass.v1.NlpService), image heads to vision replicas (aimass.v1.VisionService).
Replicas are idempotent (one already at the generation answers at once), so the whole state is always sent.

- ``apply(generation, deadline)`` pushes at once and waits (until ``deadline`` at most) for the replicas' answers:
  the number of replicas of the changed model's service that answered with the generation or a later one and did
  not fail to load that model.
- A background loop (``start``) re-syncs every ``interval_s``, so a replica that (re)joins or missed a push catches
  up. A round costs one read of the store and no call while nothing changed: a replica is sent its part only when it
  differs from the last one it acknowledged (a new generation, a head placed on it since), when it failed, or when it
  is new to the sync (a restarted process registers under a new instance id: its pid is part of it), or when the
  channel to it is not connected (a process back under the same id and address has its connection broken). Every
  ``resync_s`` a round sends every replica its part even so (a safety net for one that lost its state under the same
  instance id, e.g. a registry that kept the id over a restart). Each replica gets at most ``replica_timeout_s`` a
  push and its own lock, so a slow or dead replica never holds up the others, and pushes to one replica never
  overtake each other (one older than what the replica acknowledged is not sent; ``apply`` skips a replica already
  at its generation).
- A replica that fails (unreachable, or unable to load a version) is logged once per generation and retried on the
  next interval.

With ``placement`` (the scheduler's ``SchedulerState``), heads go through placement: a head runs beside its backbone,
so the candidates for a version are the replicas of its service, and each holds it only with a placement of its
artifact's bytes (a head's in-memory footprint is about its artifact's size) on that replica's device, in the
scheduler's placement table (GetPlacement shows them; model placement sees that memory taken; never evicted for a
model). ``admitting`` places the versions a change adds before it is recorded (RESOURCE_EXHAUSTED
INSUFFICIENT_MEMORY when no replica of the service has room); every round places deployed versions on replicas that
joined since (where they fit) and releases the heads no longer deployed. A replica is sent a model only when it holds
every version the model serves, and counts as serving it only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

import grpc

from aimass.runtime.discovery import CONTROL_PLANE_KINDS, Instance
from aimass.runtime.errors import AimassError
from aimass.runtime.tasks import cancel_and_wait
from aimass.store.records import DeploymentRecord, ModelVersionRecord
from aimass.v1 import common_pb2, datasets_pb2, lifecycle_pb2, lifecycle_pb2_grpc
from scheduler.service import SchedulerState

log = logging.getLogger(__name__)

TEXT: Final = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
IMAGE: Final = datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION
# The service whose replicas host each task's heads.
SERVICE_OF_TASK: Final = {TEXT: "aimass.v1.NlpService", IMAGE: "aimass.v1.VisionService"}
DEFAULT_REPLICA_TIMEOUT_S: Final = 10.0
# Every replica is sent its part this often even when it acknowledged it (see the module docstring).
DEFAULT_RESYNC_S: Final = 60.0

Task: TypeAlias = datasets_pb2.TrainingTask.ValueType


def task_of(record: ModelVersionRecord) -> Task:
    """The version's task (TRAINING_TASK_UNSPECIFIED for a value this version of aimass does not know)."""
    known = record.task in datasets_pb2.TrainingTask.values()
    return datasets_pb2.TrainingTask.ValueType(record.task) if known else datasets_pb2.TRAINING_TASK_UNSPECIFIED


def head_ref(record: ModelVersionRecord) -> common_pb2.ModelRef:
    """The version as the placement table names it: "<owner>/<name>" at its version."""
    return common_pb2.ModelRef(name=f"{record.owner}/{record.name}", version=str(record.version))


class DeploymentSource(Protocol):
    """What ``ReplicaSync`` reads from the store (``SqlStore``'s methods)."""

    def deployments(self) -> tuple[int, list[DeploymentRecord]]: ...

    def get_model_version(self, owner: str, name: str, version: int) -> ModelVersionRecord | None: ...


@dataclass
class Desired:
    """What every replica should serve at ``generation``: one request per task."""

    generation: int
    requests: dict[Task, lifecycle_pb2.SyncCustomModelsRequest]
    # With placement: (owner, name) → the replicas that hold every version the model serves (None: every replica).
    holders: dict[tuple[str, str], frozenset[str]] | None = None

    def holds(self, instance_id: str, model: tuple[str, str]) -> bool:
        return self.holders is None or instance_id in self.holders.get(model, frozenset())

    def for_tasks(self, tasks: Iterable[Task], instance_id: str = "") -> lifecycle_pb2.SyncCustomModelsRequest:
        """What a replica hosting ``tasks`` serves (with placement, only the models ``instance_id`` holds)."""
        request = lifecycle_pb2.SyncCustomModelsRequest(generation=self.generation)
        for task in sorted(tasks):
            part = self.requests.get(task)
            if part is not None:
                request.versions.extend(v for v in part.versions if self.holds(instance_id, (v.owner, v.name)))
                request.routes.extend(r for r in part.routes if self.holds(instance_id, (r.owner, r.name)))
        return request


@dataclass
class ReplicaState:
    """What one replica acknowledged, and what was said about its failures (once per generation)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = -1
    # The request that answer acknowledged (None: none yet): while a round's is the same, nothing is sent.
    acknowledged: lifecycle_pb2.SyncCustomModelsRequest | None = None
    serving: frozenset[str] = frozenset()
    failed: tuple[str, ...] = ()
    # The generation whose failure was last logged (-1: none, or the replica recovered since).
    logged_failure: int = -1


def tasks_of(instance: Instance) -> set[Task]:
    """The tasks whose heads ``instance`` hosts, from the services it serves."""
    return {task for task, service in SERVICE_OF_TASK.items() if service in instance.services}


class ReplicaSync:
    def __init__(
        self,
        store: DeploymentSource,
        replicas: Callable[[], Sequence[Instance]],
        channel_for: Callable[[Instance], grpc.aio.Channel],
        interval_s: float,
        *,
        replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S,
        resync_s: float = DEFAULT_RESYNC_S,
        placement: SchedulerState | None = None,
    ) -> None:
        self.store = store
        self.placement = placement
        self.replicas = replicas
        self.channel_for = channel_for
        self.interval_s = interval_s
        self.replica_timeout_s = replica_timeout_s
        self.resync_s = resync_s
        # The event loop's clock at the last round that sent every replica its part (None: none yet).
        self._last_full: float | None = None
        self.states: dict[str, ReplicaState] = {}
        # Versions never change once trained: their artifact and task are read from the store once.
        self._versions: dict[tuple[str, str, int], ModelVersionRecord] = {}
        self._task: asyncio.Task[None] | None = None
        # Heads placed for changes being recorded now, (name, version) as in the placement table.
        self._admitting: set[tuple[str, str]] = set()

    # -- what replicas should serve ------------------------------------------------------------------------------

    async def desired(self) -> Desired:
        """The store's deployments as one request per task, at the store's generation."""
        generation, deployments = await asyncio.to_thread(self.store.deployments)
        requests = {task: lifecycle_pb2.SyncCustomModelsRequest(generation=generation) for task in SERVICE_OF_TASK}
        holders: dict[tuple[str, str], frozenset[str]] | None = None if self.placement is None else {}
        hosts = self.hosts() if self.placement is not None else []
        # Only what is deployed now stays cached.
        deployed = {(d.owner, d.name, version) for d in deployments for version in _loaded(d)}
        for gone in [key for key in self._versions if key not in deployed]:
            del self._versions[gone]
        for deployment in sorted(deployments, key=lambda record: (record.owner, record.name)):
            records = [await self._version(deployment, version) for version in _loaded(deployment)]
            known = [record for record in records if record is not None]
            if not known:
                continue
            request = requests.get(task_of(known[0]))
            if request is None:
                log.error("deployment %s/%s has a task no replica hosts", deployment.owner, deployment.name)
                continue
            if holders is not None:
                holders[(deployment.owner, deployment.name)] = await self._holders(known, hosts)
            request.versions.extend(
                lifecycle_pb2.HostedVersion(
                    owner=record.owner,
                    name=record.name,
                    version=str(record.version),
                    artifact_sha256=record.artifact_sha256,
                )
                for record in known
            )
            request.routes.append(
                lifecycle_pb2.HostedRoute(
                    owner=deployment.owner,
                    name=deployment.name,
                    default_version=_shown(deployment.default_version),
                    canary_version=_shown(deployment.canary_version),
                    canary_percent=deployment.canary_percent if deployment.canary_version else 0,
                )
            )
        if self.placement is not None:
            kept = {(ref.name, ref.version) for ref in map(head_ref, self._versions.values())}
            # A change being recorded keeps what it placed (the store may not show it yet).
            await self.placement.release_heads(kept | self._admitting)
        return Desired(generation, requests, holders)

    async def _holders(self, records: Sequence[ModelVersionRecord], hosts: Sequence[Instance]) -> frozenset[str]:
        """Places the model's versions on the hosts of their task that joined since (where they fit): the replicas
        that hold all of them."""
        assert self.placement is not None
        held: set[str] | None = None
        for record in records:
            candidates = [i.instance_id for i in hosts if task_of(record) in tasks_of(i)]
            try:
                placed = await self.placement.place_head(head_ref(record), record.artifact_bytes, candidates)
            except AimassError:  # no room anywhere now: the next round tries again
                placed = []
            held = set(placed) if held is None else held & set(placed)
        return frozenset(held or ())

    @contextlib.asynccontextmanager
    async def admitting(self, records: Sequence[ModelVersionRecord]) -> AsyncIterator[None]:
        """Places versions a change is about to add, for as long as it is being recorded, on the replicas of their
        service that have room: RESOURCE_EXHAUSTED INSUFFICIENT_MEMORY, with nothing kept, when some replica's device
        was read and none has room for one of them; released again when recording them fails. Without placement, or
        with no reading yet, there is nothing to account."""
        if self.placement is None or not records:
            yield
            return
        added = {(ref.name, ref.version) for ref in map(head_ref, records)}
        self._admitting |= added
        try:
            hosts = self.hosts()
            for record in records:
                candidates = [i.instance_id for i in hosts if task_of(record) in tasks_of(i)]
                await self.placement.place_head(head_ref(record), record.artifact_bytes, candidates)
            yield
        except BaseException:
            await self.placement.release_heads(self.placement.heads - added)
            raise
        finally:
            self._admitting -= added

    async def _version(self, deployment: DeploymentRecord, version: int) -> ModelVersionRecord | None:
        key = (deployment.owner, deployment.name, version)
        record = self._versions.get(key)
        if record is None:
            record = await asyncio.to_thread(self.store.get_model_version, *key)
            if record is None:
                log.error("deployment %s/%s names version %s, which the store does not have", *key)
                return None
            self._versions[key] = record
        return record

    def hosts(self) -> list[Instance]:
        """The serving replicas that host custom heads (NLP and vision)."""
        return [
            instance
            for instance in self.replicas()
            if instance.serving and instance.kind not in CONTROL_PLANE_KINDS and tasks_of(instance)
        ]

    # -- pushing -------------------------------------------------------------------------------------------------

    async def apply(
        self, generation: int, deadline: float, *, model: tuple[str, str] | None = None, task: Task | None = None
    ) -> int:
        """Pushes the store's state now to the hosts of ``task`` (every host when None) and waits until ``deadline``
        (the event loop's clock) at most: how many of them serve ``generation`` or later (with ``model``, an
        (owner, name), loaded, when given)."""
        desired = await self.desired()
        hosts = [instance for instance in self.hosts() if task is None or task in tasks_of(instance)]
        if not hosts:
            return 0
        await asyncio.gather(*(self._push(instance, desired, until=deadline) for instance in hosts))
        return sum(1 for instance in hosts if self._serves(instance, generation, model, desired))

    def _serves(self, instance: Instance, generation: int, model: tuple[str, str] | None, desired: Desired) -> bool:
        state = self.states.get(instance.instance_id)
        if state is None or state.generation < generation:
            return False
        if model is None:
            return True
        if not desired.holds(instance.instance_id, model):
            return False
        prefix = f"{model[0]}/{model[1]}@"
        return not any(entry.startswith(prefix) for entry in state.failed)

    async def sync_once(self, *, full: bool = True) -> Mapping[str, int]:
        """One round: every host gets the store's state (bounded by ``replica_timeout_s`` each; without ``full``,
        only the hosts whose part changed since they acknowledged it, that failed, or that are new); instance id →
        the generation it acknowledged (-1: none yet)."""
        desired = await self.desired()
        hosts = self.hosts()
        until = asyncio.get_running_loop().time() + self.replica_timeout_s
        await asyncio.gather(*(self._push(instance, desired, until=until, again=full) for instance in hosts))
        self._forget_gone({instance.instance_id for instance in hosts})
        return {instance.instance_id: self.states[instance.instance_id].generation for instance in hosts}

    async def _push(self, instance: Instance, desired: Desired, *, until: float, again: bool = False) -> None:
        """Sends ``instance`` its part of ``desired`` unless it acknowledged a later generation, or that very part
        with every version loaded over a connection still up (``again``: even then, so a replica that lost its state
        is caught); never raises: failures are recorded and logged once per generation."""
        state = self.states.setdefault(instance.instance_id, ReplicaState())
        timeout = min(self.replica_timeout_s, until - asyncio.get_running_loop().time())
        if timeout <= 0:
            return
        request = desired.for_tasks(tasks_of(instance), instance.instance_id)
        try:
            channel = self.channel_for(instance)
            async with asyncio.timeout(timeout):
                async with state.lock:
                    if state.generation > desired.generation or (
                        state.generation == desired.generation
                        and not state.failed
                        and not again
                        and state.acknowledged == request
                        and channel.get_state() == grpc.ChannelConnectivity.READY
                    ):
                        return
                    stub = lifecycle_pb2_grpc.ModelHostServiceStub(channel)
                    response = await stub.SyncCustomModels(request, timeout=timeout)
        except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            self._failed(instance, state, desired.generation, _why(exc))
            return
        if response.generation < desired.generation:
            self._failed(
                instance,
                state,
                desired.generation,
                f"answered generation {response.generation} to generation {desired.generation}",
            )
            return
        state.generation = response.generation
        state.acknowledged = request
        state.serving = frozenset(response.serving)
        state.failed = tuple(response.failed)
        if self.placement is not None:
            await self.placement.confirm_heads(instance.instance_id, map(_served_ref, state.serving))
        if state.failed:
            self._failed(instance, state, response.generation, "could not load " + "; ".join(state.failed))
        elif state.logged_failure >= 0:
            log.info(
                "replica %s (%s) serves custom models at generation %d again",
                instance.instance_id,
                instance.address,
                response.generation,
            )
            state.logged_failure = -1

    def _failed(self, instance: Instance, state: ReplicaState, generation: int, why: str) -> None:
        if state.logged_failure == generation:
            return
        state.logged_failure = generation
        log.warning(
            "replica %s (%s) did not apply custom models generation %d: %s; retrying every %.1f s",
            instance.instance_id,
            instance.address,
            generation,
            why,
            self.interval_s,
        )

    def _forget_gone(self, present: set[str]) -> None:
        for instance_id in [known for known in self.states if known not in present]:
            if not self.states[instance_id].lock.locked():
                del self.states[instance_id]

    # -- the background loop -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts re-syncing every ``interval_s`` (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-sync")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            full = self._last_full is None or loop.time() - self._last_full >= self.resync_s
            try:
                await self.sync_once(full=full)
                if full:
                    self._last_full = loop.time()
            except Exception:  # the store unreachable a moment: the next round tries again
                log.exception("syncing replicas with the deployments failed; retrying in %.1f s", self.interval_s)
            await asyncio.sleep(self.interval_s)


def _served_ref(entry: str) -> common_pb2.ModelRef:
    """A replica's "<owner>/<name>@<version>" as the placement table names it (``head_ref``)."""
    name, _, version = entry.rpartition("@")
    return common_pb2.ModelRef(name=name, version=version)


def _shown(version: int) -> str:
    return str(version) if version else ""


def _loaded(deployment: DeploymentRecord) -> list[int]:
    found = (deployment.default_version, deployment.canary_version, deployment.previous_version)
    return list(dict.fromkeys(version for version in found if version))


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        return f"{code.name if code is not None else 'UNKNOWN'}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"
