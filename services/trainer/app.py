"""The trainer process: runs the training jobs the scheduler places on it (aimass.v1.TrainerService.RunJob).

A trainer is a mesh process like a replica (kind ``trainer``, registered with the registry, mesh mTLS) that holds no
models: the scheduler sees it in the registry (labels ``device`` and ``max_jobs``) and calls RunJob on it, the only
role allowed to; gateways may ask it ModelService questions like any replica (mesh-wide ListModels), and it answers
with nothing. At most ``trainer.max_jobs`` jobs run at once: one more is refused RESOURCE_EXHAUSTED (the scheduler
queues it again). Dataset blobs are fetched from the scheduler's BlobService into ``trainer_cache_dir``; trained heads
and edge exports are stored there with PutBlob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health

from aimass.runtime.blob_cache import BlobCache, put_blob
from aimass.runtime.config import DeadlineConfig, ServerConfig, Settings
from aimass.runtime.discovery import make_registry
from aimass.runtime.errors import FailedPrecondition, ResourceExhausted
from aimass.runtime.identity import (
    ROLE_GATEWAY,
    ROLE_SCHEDULER,
    MeshCredentials,
    MeshPolicy,
    mesh_channel,
    process_credentials,
)
from aimass.runtime.replica import MODEL_SERVICE, ReplicaRole
from aimass.runtime.server import ServerRunner, mesh_listener, serve_process
from aimass.v1 import lifecycle_pb2, lifecycle_pb2_grpc, models_pb2
from services.trainer.runner import run_job

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

KIND: Final = "trainer"
TRAINER_SERVICE: Final = "aimass.v1.TrainerService"
RUN_JOB: Final = f"/{TRAINER_SERVICE}/RunJob"
# A job runs as long as it needs: the scheduler sets the call's deadline (12 h), not the server's stream default.
RUN_JOB_DEADLINE: Final = DeadlineConfig(default_s=0, max_s=0)
# A job that was cancelled holds its slot until its worker thread stops (between two batches); a new job waits this
# long for such a slot before being refused.
STOPPING_WAIT_S: Final = 30.0
# The scheduler's channel: keepalive notices a control plane that went away; blobs come in 1 MiB chunks.
SCHEDULER_CHANNEL_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.max_send_message_length", 32 << 20),
]


class JobSlots:
    """At most ``capacity`` jobs at once. A job being stopped (its call cancelled) still counts until its thread has
    let go; a new job waits up to ``stopping_wait_s`` for those rather than be refused."""

    def __init__(self, capacity: int, *, stopping_wait_s: float = STOPPING_WAIT_S) -> None:
        self.capacity = capacity
        self.stopping_wait_s = stopping_wait_s
        self.running: dict[str, threading.Event] = {}  # job id -> its stop event (set: being stopped)
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, job_id: str) -> AsyncIterator[threading.Event]:
        """A slot for ``job_id`` and the event that stops it; ResourceExhausted when none is free."""
        async with self._changed:
            if len(self.running) >= self.capacity and any(stop.is_set() for stop in self.running.values()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: len(self.running) < self.capacity), self.stopping_wait_s
                    )
            if len(self.running) >= self.capacity:
                raise ResourceExhausted(
                    f"this trainer runs at most {self.capacity} job(s) at once and is running "
                    f"{', '.join(self.running)}; place job {job_id} on another trainer or wait",
                    reason="TRAINER_FULL",
                    retry_after_ms=1000,
                )
            if job_id in self.running:
                raise FailedPrecondition(f"job {job_id} is already running on this trainer")
            stop = self.running[job_id] = threading.Event()
        try:
            yield stop
        finally:
            async with self._changed:
                del self.running[job_id]
                self._changed.notify_all()


class TrainerServicer(lifecycle_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def RunJob(
        self, request: lifecycle_pb2.RunJobRequest, context: Context
    ) -> AsyncIterator[lifecycle_pb2.RunJobResponse]:
        async for update in self.trainer.run(request):
            yield update


class Trainer:
    """The engine behind TrainerService: job slots, the blob cache and the device, over the scheduler's channel."""

    def __init__(
        self, *, cache: BlobCache, channel: grpc.aio.Channel, device: str, max_jobs: int, work_dir: Path
    ) -> None:
        self.cache = cache
        self.channel = channel
        self.device = device
        self.slots = JobSlots(max_jobs)
        self.export_cache_dir = work_dir / "export"

    async def put(self, data: bytes) -> str:
        return await put_blob(self.channel, data)

    async def run(self, request: lifecycle_pb2.RunJobRequest) -> AsyncIterator[lifecycle_pb2.RunJobResponse]:
        job_id = request.job.job_id or "(no id)"
        async with self.slots.hold(job_id) as stop:
            updates = run_job(
                request,
                cache=self.cache,
                put=self.put,
                device=self.device,
                export_cache_dir=self.export_cache_dir,
                stop=stop,
                alone=len(self.slots.running) == 1,
            )
            try:
                async for update in updates:
                    yield update
            finally:
                await updates.aclose()


class TrainerApp:
    kind = KIND
    service_names: tuple[str, ...] = (TRAINER_SERVICE,)

    def __init__(self, settings: Settings, credentials: MeshCredentials | None) -> None:
        self.settings = settings
        self.credentials = credentials
        self.max_jobs = settings.trainer.max_jobs
        self._device = settings.trainer.device
        self.trainer: Trainer | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def device(self) -> str:
        """The torch device jobs run on ("auto" resolved once loaded)."""
        return self._device

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        lifecycle_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self._ready_trainer()), server)

    def _ready_trainer(self) -> Trainer:
        if self.trainer is None:
            address = self.settings.scheduler.address
            if not address:
                raise FailedPrecondition(
                    "a trainer needs the scheduler's address (scheduler.address, AIMASS_SCHEDULER__ADDRESS): it "
                    "fetches datasets from and stores trained models in the scheduler's blob store"
                )
            self._channel = mesh_channel(
                address, self.credentials, server_role=ROLE_SCHEDULER, options=SCHEDULER_CHANNEL_OPTIONS
            )
            cache_dir = self.settings.trainer_cache_dir
            self.trainer = Trainer(
                cache=BlobCache(cache_dir, self._channel),
                channel=self._channel,
                device=self._device,
                max_jobs=self.max_jobs,
                work_dir=cache_dir,
            )
        return self.trainer

    async def load(self) -> None:
        """Resolves the device ("auto": a GPU when torch sees one). Backbones load with the first job using them."""
        if self._device == "auto":
            from services.vision.engine import pick_device

            self._device = await asyncio.to_thread(pick_device, "auto")
        self._ready_trainer().device = self._device
        log.info("trainer: jobs run on %s, at most %d at once", self._device, self.max_jobs)

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return ()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class TrainerRole(ReplicaRole):
    """A replica's role without models or load reports: the scheduler runs jobs here, gateways may ask ModelService
    (it answers with no models); the registry labels say how many jobs it takes (``max_jobs``)."""

    app: TrainerApp

    @property
    def policy(self) -> MeshPolicy:
        return MeshPolicy({f"/{TRAINER_SERVICE}/": (ROLE_SCHEDULER,), f"/{MODEL_SERVICE}/": (ROLE_GATEWAY,)})

    def labels(self) -> dict[str, str]:
        return {**super().labels(), "max_jobs": str(self.app.max_jobs)}

    async def serve(self, runner: ServerRunner) -> None:
        """No load reports: a trainer serves no models (the scheduler places jobs by the registry and its nodes)."""

    async def drain(self) -> None:
        return None


def trainer_server_config(config: ServerConfig) -> ServerConfig:
    """The trainer's server: RunJob without the server's stream deadline (a config's method_deadlines still win)."""
    return config.model_copy(update={"method_deadlines": {RUN_JOB: RUN_JOB_DEADLINE, **config.method_deadlines}})


def build_runner(settings: Settings, *, register: bool = True) -> ServerRunner:
    credentials = process_credentials(settings, KIND)
    app = TrainerApp(settings, credentials)
    role = TrainerRole(app, scheduler_config=settings.scheduler, credentials=credentials)
    return ServerRunner(
        app,
        trainer_server_config(settings.trainer.server),
        registry=make_registry(settings.registry, credentials=credentials) if register else None,
        registry_config=settings.registry,
        listener=mesh_listener(credentials, role.policy),
        replica=role,
        node_id=role.node_id,
    )


def main() -> None:
    serve_process(KIND, build_runner)
