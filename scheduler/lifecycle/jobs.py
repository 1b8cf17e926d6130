"""TrainingService on the control plane, and the controller that runs jobs on trainers (aimass.v1.TrainingService;
the proto says every rule).

The controller keeps a queue of jobs in the store and places each on a trainer (job_placement: a free slot and the
memory the job needs on its device, from NVML readings), then follows the trainer's RunJob stream: progress goes to
watchers at once and to the store about once a second; the result becomes the model's next version. A stream that
breaks (the trainer died, froze or left) puts the job back in the queue until it has had ``max_attempts`` tries,
then FAILED: no job stays RUNNING without a trainer, across a scheduler restart too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import grpc

import aimass
from aimass.runtime.config import LifecycleConfig
from aimass.runtime.discovery import Instance
from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from aimass.runtime.tasks import cancel_and_wait
from aimass.store.records import ModelVersionRecord, now_ms
from aimass.store.sql import SqlStore
from aimass.training.artifact import IMAGE_BACKBONE, TASK_OF_BACKBONE, TEXT_BACKBONE
from aimass.training.head import default_settings
from aimass.v1 import datasets_pb2, lifecycle_pb2, lifecycle_pb2_grpc, scheduler_pb2, training_pb2, training_pb2_grpc
from scheduler.lifecycle.datasets import TASK_NAMES, DatasetServicer, caller
from scheduler.lifecycle.job_placement import choose_trainer, trainer_slots, why_waiting
from scheduler.lifecycle.names import check_name

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

ACTIVE: Final = (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
FINAL: Final = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)
DEFAULT_BACKBONE: Final = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: TEXT_BACKBONE,
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: IMAGE_BACKBONE,
}
# Errors from a trainer that say the job itself cannot succeed (bad data): FAILED at once, never retried.
JOB_ERRORS: Final = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)
SAVE_EVERY_S: Final = 1.0
DEFAULT_LIST = 50
MAX_LIST = 500
# How long a trainer whose stream broke is passed over (longer than the registry's TTL for a dead one).
LOST_TRAINER_S: Final = 60.0
# A job's RunJob call: long, but not forever.
JOB_TIMEOUT_S: Final = 12 * 3600.0


def state_name(state: int) -> str:
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


class JobController:
    """The queue and the jobs running now. Runs in the active scheduler only."""

    def __init__(
        self,
        store: SqlStore,
        config: LifecycleConfig,
        *,
        instances: Callable[[], Sequence[Instance]],
        nodes: Callable[[], dict[str, scheduler_pb2.NodeView]],
        channel_for: Callable[[Instance], grpc.aio.Channel],
    ) -> None:
        self.store = store
        self.config = config
        self.instances = instances
        self.nodes = nodes
        self.channel_for = channel_for
        # Jobs queued or running, as they are now (the store lags by up to SAVE_EVERY_S for progress).
        self.jobs: dict[str, training_pb2.TrainingJob] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        # trainer instance id -> {job id: expected bytes}
        self._placed: dict[str, dict[str, int]] = {}
        self._cancelled: set[str] = set()
        self._saved_at: dict[str, float] = {}
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Peak bytes measured per base model (what the next job on it is expected to need).
        self._peaks: dict[str, int] = {}
        # Trainers whose stream broke, and when: the registry lists a dead one until its TTL runs out, and a job
        # placed there again would only fail again (a restarted trainer registers under a new instance id).
        self._lost_trainers: dict[str, float] = {}

    # -- life ------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Takes over the store's queue: jobs left RUNNING by a previous scheduler lost their trainer's stream with
        it, so they are queued again (or FAILED past their attempts)."""
        for row in await asyncio.to_thread(self.store.jobs_in_states, ACTIVE):
            job = training_pb2.TrainingJob.FromString(row.job)
            if job.state == training_pb2.JOB_STATE_RUNNING:
                self._lost(job, "the scheduler restarted while it ran")
                await self._save(job, force=True)
            if job.state in ACTIVE:
                self.jobs[job.job_id] = job
        self._task = asyncio.get_running_loop().create_task(self._place_loop(), name="training-jobs")
        self.wake()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        for task in list(self._running.values()):
            await cancel_and_wait(task)

    def wake(self) -> None:
        self._wake.set()

    # -- requests --------------------------------------------------------------------------------------------------

    async def submit(self, job: training_pb2.TrainingJob) -> None:
        await asyncio.to_thread(
            self.store.add_job, job.job_id, job.owner, job.state, job.SerializeToString(), job.created_unix_ms
        )
        self.jobs[job.job_id] = job
        log.info("job %s of %s queued: %s on %s", job.job_id, job.owner, job.model_name, job.dataset.name)
        self.wake()

    async def get(self, owner: str, job_id: str) -> training_pb2.TrainingJob:
        job = self.jobs.get(job_id)
        if job is None:
            row = await asyncio.to_thread(self.store.get_job, job_id) if job_id else None
            job = training_pb2.TrainingJob.FromString(row.job) if row is not None else None
        if job is None or job.owner != owner:
            raise NotFound(f"no training job {job_id!r}; `aimass jobs list` shows yours", reason="JOB_NOT_FOUND")
        return job

    async def cancel(self, owner: str, job_id: str) -> training_pb2.TrainingJob:
        job = await self.get(owner, job_id)
        if job.state in FINAL:
            return job
        self._cancelled.add(job_id)
        task = self._running.get(job_id)
        if task is not None:
            await cancel_and_wait(task)  # its finally records CANCELLED
        else:
            await self._finish(job, training_pb2.JOB_STATE_CANCELLED, "")
        return self.jobs.get(job_id) or await self.get(owner, job_id)

    async def watch(self, owner: str, job_id: str) -> AsyncIterator[training_pb2.TrainingJob]:
        job = await self.get(owner, job_id)
        sent = job.SerializeToString()
        yield job
        while job.state not in FINAL:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._differs, job_id, sent))
            job = await self.get(owner, job_id)
            now = job.SerializeToString()
            if now != sent:
                sent = now
                yield job

    def _differs(self, job_id: str, sent: bytes) -> bool:
        job = self.jobs.get(job_id)
        return job is None or job.SerializeToString() != sent

    # -- placing ---------------------------------------------------------------------------------------------------

    def need_bytes(self, base_model: str) -> int:
        return self._peaks.get(base_model) or int(self.config.job_memory_estimate_bytes)

    async def _place_loop(self) -> None:
        while True:
            # Woken by a change, or while a job waits every second (readings change free memory); with none queued,
            # only a change can give it work (an idle control plane stays asleep). wait_for cancels a wait it ends.
            waiting = any(job.state == training_pb2.JOB_STATE_QUEUED for job in self.jobs.values())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0 if waiting else None)
            self._wake.clear()
            try:
                await self._place_queued()
            except Exception:  # the store is away: next turn
                log.exception("placing training jobs failed; retrying")

    async def _place_queued(self) -> None:
        queued = sorted(
            (j for j in self.jobs.values() if j.state == training_pb2.JOB_STATE_QUEUED),
            key=lambda j: (j.created_unix_ms, j.job_id),
        )
        for job in queued:
            need = self.need_bytes(job.base_model)
            running = {iid: list(jobs.values()) for iid, jobs in self._placed.items()}
            now = time.monotonic()
            self._lost_trainers = {t: at for t, at in self._lost_trainers.items() if now - at < LOST_TRAINER_S}
            instances = [i for i in self.instances() if i.instance_id not in self._lost_trainers]
            slots = trainer_slots(instances, self.nodes(), running)
            slot = choose_trainer(slots, need)
            if slot is None:
                stage = f"queued: {why_waiting(slots, need)}"
                if job.stage != stage:
                    job.stage = stage
                    await self._changed_job(job)
                continue
            trainer = slot.instance
            self._placed.setdefault(trainer.instance_id, {})[job.job_id] = need
            job.state = training_pb2.JOB_STATE_RUNNING
            job.trainer_id = trainer.instance_id
            job.attempt += 1
            job.started_unix_ms = now_ms()
            job.stage = "starting"
            job.error = ""
            await self._save(job, force=True)
            log.info("job %s placed on trainer %s (attempt %d)", job.job_id, trainer.instance_id, job.attempt)
            self._running[job.job_id] = asyncio.get_running_loop().create_task(
                self._run(job, trainer), name=f"job-{job.job_id}"
            )

    # -- running ---------------------------------------------------------------------------------------------------

    async def _request(self, job: training_pb2.TrainingJob) -> lifecycle_pb2.RunJobRequest:
        dataset = await asyncio.to_thread(
            self.store.get_dataset_version, job.owner, job.dataset.owner, job.dataset.name, job.dataset.version
        )
        if dataset is None:
            raise FailedPrecondition(f"dataset {job.dataset.name!r} version {job.dataset.version} was deleted")
        request = lifecycle_pb2.RunJobRequest(
            job=job,
            dataset_sha256=dataset.sha256,
            dataset_format=dataset.format,
            text_column=dataset.text_column,
            label_column=dataset.label_column,
        )
        versions = await asyncio.to_thread(self.store.model_versions, job.owner, job.model_name)
        if versions:
            last = versions[-1]
            request.previous_version = str(last.version)
            request.previous.ParseFromString(last.evaluation)
        return request

    async def _run(self, job: training_pb2.TrainingJob, trainer: Instance) -> None:
        outcome: tuple[int, str] | None = None
        heard = False
        try:
            request = await self._request(job)
            stub = lifecycle_pb2_grpc.TrainerServiceStub(self.channel_for(trainer))
            call = stub.RunJob(request, timeout=JOB_TIMEOUT_S)
            async for update in call:
                heard = True
                if update.epoch_losses:
                    job.epoch_losses[:] = update.epoch_losses
                if update.HasField("result"):
                    await self._succeeded(job, update.result)
                    outcome = (training_pb2.JOB_STATE_SUCCEEDED, "")
                    break
                job.stage, job.progress, job.epoch, job.loss = update.stage, update.progress, update.epoch, update.loss
                job.eta_seconds = update.eta_seconds
                await self._save(job)
            else:
                self._lost(job, f"trainer {trainer.instance_id} ended the job's stream without a result")
        except asyncio.CancelledError:
            outcome = (training_pb2.JOB_STATE_CANCELLED, "")
            raise
        except FailedPrecondition as e:
            outcome = (training_pb2.JOB_STATE_FAILED, e.message)
        except grpc.aio.AioRpcError as e:
            if e.code() in JOB_ERRORS:
                outcome = (training_pb2.JOB_STATE_FAILED, e.details() or e.code().name)
            elif e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                job.attempt -= 1  # the trainer was full (a race with another scheduler's view): not a try
                job.state, job.stage = training_pb2.JOB_STATE_QUEUED, "queued"
            else:
                self._lost_trainers[trainer.instance_id] = time.monotonic()
                if not heard:
                    job.attempt -= 1  # it never started there (the trainer was already gone): not a try
                self._lost(job, f"trainer {trainer.instance_id} was lost ({e.code().name}: {e.details()})")
        except Exception as e:  # a bug or the store: the job ends FAILED, never stuck RUNNING
            log.exception("job %s failed in the control plane", job.job_id)
            outcome = (training_pb2.JOB_STATE_FAILED, f"the control plane failed running it: {e}")
        finally:
            self._placed.get(trainer.instance_id, {}).pop(job.job_id, None)
            self._running.pop(job.job_id, None)
            if job.job_id in self._cancelled:
                outcome = (training_pb2.JOB_STATE_CANCELLED, "")
            if outcome is not None:
                await asyncio.shield(self._finish(job, *outcome))
            else:
                await asyncio.shield(self._save(job, force=True))
            self.wake()

    def _lost(self, job: training_pb2.TrainingJob, why: str) -> None:
        """The job's trainer is gone: queued again while tries remain, else FAILED."""
        if job.attempt < self.config.max_attempts:
            log.warning(
                "job %s: %s; queued again (attempt %d of %d)",
                job.job_id,
                why,
                job.attempt + 1,
                self.config.max_attempts,
            )
            job.state, job.stage, job.error = training_pb2.JOB_STATE_QUEUED, "queued", f"{why}; queued again"
            job.progress, job.epoch, job.loss, job.eta_seconds = 0, 0, 0, 0
            del job.epoch_losses[:]
        else:
            log.warning("job %s: %s; no tries left (%d)", job.job_id, why, job.attempt)
            job.state, job.stage = training_pb2.JOB_STATE_FAILED, "failed"
            job.error = f"{why}; failed after {job.attempt} attempts"
            job.finished_unix_ms = now_ms()

    async def _succeeded(self, job: training_pb2.TrainingJob, result: lifecycle_pb2.TrainedHead) -> None:
        record = await asyncio.to_thread(
            self.store.add_model_version,
            ModelVersionRecord(
                owner=job.owner,
                name=job.model_name,
                version=0,
                task=job.task,
                base_model=job.base_model,
                job_id=job.job_id,
                dataset_owner=job.dataset.owner,
                dataset_name=job.dataset.name,
                dataset_version=job.dataset.version,
                dataset_sha256=job.dataset_sha256,
                labels=list(result.labels),
                hyperparameters=job.hyperparameters.SerializeToString(),
                evaluation=result.evaluation.SerializeToString(),
                artifact_sha256=result.artifact_sha256,
                artifact_bytes=result.artifact_bytes,
                export_sha256=result.export_sha256,
                export_bytes=result.export_bytes,
                code_version=job.code_version,
                created_unix_ms=now_ms(),
            ),
        )
        if result.peak_memory_bytes:
            self._peaks[job.base_model] = result.peak_memory_bytes
        job.model_version = str(record.version)
        job.evaluation.CopyFrom(result.evaluation)
        job.progress = 1.0
        log.info(
            "job %s: %s version %s trained (accuracy %.3f, macro-F1 %.3f)",
            job.job_id,
            job.model_name,
            job.model_version,
            result.evaluation.accuracy,
            result.evaluation.macro_f1,
        )

    async def _finish(self, job: training_pb2.TrainingJob, state: int, error: str) -> None:
        job.state = state  # type: ignore[assignment]
        job.stage = state_name(state).lower()
        job.error = error
        job.eta_seconds = 0
        job.finished_unix_ms = now_ms()
        self._cancelled.discard(job.job_id)
        await self._save(job, force=True)

    async def _save(self, job: training_pb2.TrainingJob, *, force: bool = False) -> None:
        """Tells watchers at once; writes the store at state changes and about once a second for progress."""
        now = time.monotonic()
        if force or now - self._saved_at.get(job.job_id, 0.0) >= SAVE_EVERY_S:
            self._saved_at[job.job_id] = now
            await asyncio.to_thread(self.store.update_job, job.job_id, job.state, job.SerializeToString())
        if job.state in FINAL:
            self.jobs.pop(job.job_id, None)
            self._saved_at.pop(job.job_id, None)
        else:
            self.jobs[job.job_id] = job
        await self._changed_job(job)

    async def _changed_job(self, job: training_pb2.TrainingJob) -> None:
        async with self._changed:
            self._changed.notify_all()


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, controller: JobController, datasets: DatasetServicer, config: LifecycleConfig) -> None:
        self.controller = controller
        self.datasets = datasets
        self.config = config

    async def StartTraining(
        self, request: training_pb2.StartTrainingRequest, context: Context
    ) -> training_pb2.StartTrainingResponse:
        owner = caller()
        dataset = await self.datasets.resolve(owner, request.dataset)
        task = dataset.task
        base_model = request.base_model or DEFAULT_BACKBONE[task]
        if TASK_OF_BACKBONE.get(base_model) != TASK_NAMES[task]:
            fitting = [b for b, t in TASK_OF_BACKBONE.items() if t == TASK_NAMES[task]]
            raise InvalidArgument(
                f"base model {base_model!r} does not fit {TASK_NAMES[task]} data; use {', '.join(fitting)}"
            )
        model_name = check_name("model", request.model_name or dataset.name)
        hyperparameters = default_settings(TASK_NAMES[task], request.hyperparameters)
        active = await asyncio.to_thread(self.controller.store.count_jobs, owner, ACTIVE)
        if active >= self.config.max_jobs_per_tenant:
            raise ResourceExhausted(
                f"the tenant has {active} training jobs queued or running, the most it may have; wait for one to "
                "finish or cancel one (aimass jobs cancel)",
                reason="TOO_MANY_JOBS",
                retry_after_ms=30_000,
                pushback_ms=-1,
            )
        job = training_pb2.TrainingJob(
            job_id=f"job-{secrets.token_hex(6)}",
            owner=owner,
            state=training_pb2.JOB_STATE_QUEUED,
            dataset=datasets_pb2.DatasetRef(name=dataset.name, owner=dataset.owner, version=dataset.version),
            dataset_sha256=dataset.sha256,
            task=task,
            base_model=base_model,
            model_name=model_name,
            hyperparameters=hyperparameters,
            stage="queued",
            epochs=hyperparameters.epochs,
            created_unix_ms=now_ms(),
            code_version=aimass.__version__,
        )
        await self.controller.submit(job)
        return training_pb2.StartTrainingResponse(job=job)

    async def WatchTraining(
        self, request: training_pb2.WatchTrainingRequest, context: Context
    ) -> AsyncIterator[training_pb2.WatchTrainingResponse]:
        async for job in self.controller.watch(caller(), request.job_id):
            yield training_pb2.WatchTrainingResponse(job=job)

    async def CancelTraining(
        self, request: training_pb2.CancelTrainingRequest, context: Context
    ) -> training_pb2.CancelTrainingResponse:
        return training_pb2.CancelTrainingResponse(job=await self.controller.cancel(caller(), request.job_id))

    async def GetTrainingJob(
        self, request: training_pb2.GetTrainingJobRequest, context: Context
    ) -> training_pb2.GetTrainingJobResponse:
        return training_pb2.GetTrainingJobResponse(job=await self.controller.get(caller(), request.job_id))

    async def ListTrainingJobs(
        self, request: training_pb2.ListTrainingJobsRequest, context: Context
    ) -> training_pb2.ListTrainingJobsResponse:
        if not 0 <= request.limit <= MAX_LIST:
            raise InvalidArgument(f"limit is {request.limit}; send 1-{MAX_LIST} (0: {DEFAULT_LIST})")
        owner = caller()
        rows = await asyncio.to_thread(self.controller.store.list_jobs, owner, request.limit or DEFAULT_LIST)
        jobs = []
        for row in rows:
            live = self.controller.jobs.get(row.job_id)
            jobs.append(live if live is not None else training_pb2.TrainingJob.FromString(row.job))
        return training_pb2.ListTrainingJobsResponse(jobs=jobs)
