"""One training job, start to finish: the engine behind TrainerService.RunJob.

``run_job`` fetches the dataset blob (BlobCache), parses it, splits it (stratified, seeded), computes the frozen
backbone's features, trains the head, evaluates it on the held-out part, stores the artifact and the edge export as
blobs and ends with a ``TrainedHead``. The blocking parts run in threads; what they report goes through
``JobProgress``, which the async side turns into RunJobResponse updates (stage changes at once, the rest at most
``UPDATES_PER_S`` a second). ``progress`` spans the whole job: each stage owns a share of 0..1 (``STAGE_SPANS``).

Stopping: the caller closing the stream (the gRPC call cancelled) sets the job's stop event; feature extraction and
training check it between batches and end, and ``run_job`` returns only once the worker thread has let go.

Backbones are loaded once per process (``backbone``) and shared by every job after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt

import aimass
from aimass.datasets.parsing import DatasetError, ParsedDataset, ZipImages, parse_dataset
from aimass.datasets.split import stratified_split
from aimass.runtime.blob_cache import BlobCache
from aimass.runtime.errors import AimassError, FailedPrecondition, InvalidArgument, Unavailable
from aimass.store.blobs import check_sha256
from aimass.training.artifact import (
    IMAGE_BACKBONE,
    IMAGE_TASK,
    TASK_OF_BACKBONE,
    TEXT_BACKBONE,
    TEXT_TASK,
    HeadArtifact,
)
from aimass.training.backbones import ImageBackbone, TextBackbone, load_backbone
from aimass.training.evaluation import compare, evaluate
from aimass.training.export import export_zip
from aimass.training.head import HeadSettings, TrainingCancelled, default_settings, train_head
from aimass.v1 import datasets_pb2, lifecycle_pb2, training_pb2

log = logging.getLogger(__name__)

Put = Callable[[bytes], Awaitable[str]]
Features = npt.NDArray[np.float32]

STAGE_FETCHING: Final = "fetching data"
STAGE_FEATURES: Final = "extracting features"
STAGE_TRAINING: Final = "training"
STAGE_EVALUATING: Final = "evaluating"
STAGE_SAVING: Final = "saving"
# Where each stage starts and ends on the job's 0..1 progress.
STAGE_SPANS: Final = {
    STAGE_FETCHING: (0.0, 0.05),
    STAGE_FEATURES: (0.05, 0.55),
    STAGE_TRAINING: (0.55, 0.9),
    STAGE_EVALUATING: (0.9, 0.93),
    STAGE_SAVING: (0.93, 1.0),
}
UPDATES_PER_S: Final = 4.0
TASKS: Final = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: TEXT_TASK,
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: IMAGE_TASK,
}
DEFAULT_BACKBONE: Final = {TEXT_TASK: TEXT_BACKBONE, IMAGE_TASK: IMAGE_BACKBONE}
# Features are computed this many examples at a time: the stop event and progress are checked between batches.
FEATURE_BATCH: Final = {TEXT_TASK: 64, IMAGE_TASK: 16}
# The export is named after the version the job will produce; the scheduler numbers versions only once it succeeds.
UNNUMBERED_VERSION: Final = "next"


class JobStopped(AimassError):
    """The job's stop event was set (the call was cancelled): the worker thread ended between two batches."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "JOB_CANCELLED"


_backbones: dict[tuple[str, str], TextBackbone | ImageBackbone] = {}
_backbones_lock = threading.Lock()


def backbone(base_model: str, device: str) -> TextBackbone | ImageBackbone:
    """The process's one instance of ``base_model`` on ``device``, loaded on first use (blocking: call in a thread)."""
    with _backbones_lock:
        loaded = _backbones.get((base_model, device))
        if loaded is None:
            loaded = _backbones[(base_model, device)] = load_backbone(base_model, device)
        return loaded


def read_rss_bytes() -> int:
    """The process's resident memory now (Linux /proc; elsewhere its high-water mark from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rusage_peak_bytes()


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _read_hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark (VmHWM), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Restarts the kernel's RSS high-water mark from the current RSS (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The process's RSS high-water mark over one job. With the job alone in the process the kernel's mark is reset
    at its start and read at its end (nothing escapes it); with others running it is not touched (that would hide
    their peaks) and RSS is sampled at every progress report instead."""

    def __init__(self, *, alone: bool) -> None:
        self._kernel = alone and _reset_hwm()
        self.peak = read_rss_bytes()

    def sample(self) -> None:
        self.peak = max(self.peak, read_rss_bytes())

    def result(self) -> int:
        self.sample()
        hwm = _read_hwm_bytes() if self._kernel else None
        return max(self.peak, hwm or 0)


@dataclass
class JobProgress:
    """What the worker thread is doing, handed to the event loop: ``report`` is thread-safe and never blocks."""

    loop: asyncio.AbstractEventLoop
    stop: threading.Event
    memory: PeakMemory
    updates: asyncio.Queue[lifecycle_pb2.RunJobResponse] = field(default_factory=asyncio.Queue)
    epochs: int = 0
    # The last epoch done and its mean loss: kept in every update after it (evaluating, saving, the result).
    epoch: int = 0
    loss: float = 0.0
    # Every epoch's mean loss so far (at most MAX_EPOCHS), sent whole with each update.
    losses: list[float] = field(default_factory=list)
    _training_started: float = 0.0

    def check(self) -> None:
        if self.stop.is_set():
            raise JobStopped("the job was cancelled")

    def report(self, stage: str, fraction: float, *, eta_seconds: float = 0.0) -> None:
        """``fraction`` (0..1) of ``stage`` done."""
        low, high = STAGE_SPANS[stage]
        update = lifecycle_pb2.RunJobResponse(
            stage=stage,
            progress=low + (high - low) * min(max(fraction, 0.0), 1.0),
            epoch=self.epoch,
            loss=self.loss,
            eta_seconds=max(eta_seconds, 0.0),
            epoch_losses=self.losses,
        )
        self.memory.sample()
        with contextlib.suppress(RuntimeError):  # the loop already closed (the process is stopping): nobody listens
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)

    def training_started(self, epochs: int) -> None:
        self.epochs = epochs
        self._training_started = time.monotonic()
        self.report(STAGE_TRAINING, 0.0)

    def on_epoch(self, epoch: int, loss: float) -> None:
        """After each epoch: the seconds left from the epochs' pace so far."""
        elapsed = time.monotonic() - self._training_started
        eta = elapsed / epoch * (self.epochs - epoch)
        self.epoch, self.loss = epoch, loss
        self.losses.append(loss)
        self.report(STAGE_TRAINING, epoch / self.epochs, eta_seconds=eta)


def task_of(job: training_pb2.TrainingJob) -> tuple[str, str]:
    """(task, base model) of a job; InvalidArgument when they are unknown or do not fit."""
    task = TASKS.get(job.task)
    if task is None:
        raise InvalidArgument(
            f"job {job.job_id} has task {job.task}; a trainer runs text-classification (1) or image-classification (2)"
        )
    base_model = job.base_model or DEFAULT_BACKBONE[task]
    if TASK_OF_BACKBONE.get(base_model) != task:
        known = ", ".join(f"{model} ({kind})" for model, kind in TASK_OF_BACKBONE.items())
        raise InvalidArgument(f"base model {base_model!r} does not fit a {task} job; known: {known}")
    return task, base_model


def extract_features(
    extractor: TextBackbone | ImageBackbone,
    dataset_path: Path,
    parsed: ParsedDataset,
    task: str,
    progress: JobProgress,
) -> Features:
    """The features of every example in order, a batch at a time (images are decoded per batch, never all at once)."""
    examples = parsed.examples
    total = len(examples)
    step = FEATURE_BATCH[task]
    parts: list[Features] = []
    with contextlib.ExitStack() as stack:
        images = stack.enter_context(ZipImages(dataset_path)) if isinstance(extractor, ImageBackbone) else None
        for start in range(0, total, step):
            progress.check()
            batch = examples[start : start + step]
            if isinstance(extractor, ImageBackbone):
                assert images is not None
                parts.append(extractor.features([images.open(example.text) for example in batch]))
            else:
                parts.append(extractor.features([example.text for example in batch]))
            progress.report(STAGE_FEATURES, (start + len(batch)) / total)
    if not parts:
        return np.zeros((0, extractor.dims), dtype=np.float32)
    return np.concatenate(parts)


@dataclass(frozen=True)
class Trained:
    head: HeadArtifact
    evaluation: training_pb2.Evaluation


def _take(items: Sequence[str], indices: Sequence[int]) -> list[str]:
    return [items[i] for i in indices]


def train_and_evaluate(
    request: lifecycle_pb2.RunJobRequest,
    dataset_path: Path,
    device: str,
    progress: JobProgress,
) -> Trained:
    """The blocking part of a job (run in a thread): parse, split, features, head, evaluation."""
    job = request.job
    task, base_model = task_of(job)
    hyper = default_settings(task, job.hyperparameters)
    progress.report(STAGE_FETCHING, 0.5)
    parsed = parse_dataset(
        dataset_path,
        task=job.task,
        fmt=request.dataset_format,
        text_column=request.text_column or "text",
        label_column=request.label_column or "label",
    )
    labels = [example.label for example in parsed.examples]
    holdout = float(f"{hyper.holdout_fraction:.7g}")  # float32 on the wire: 0.2, not 0.20000000298
    train_idx, eval_idx = stratified_split(labels, holdout, hyper.seed)
    progress.report(STAGE_FETCHING, 1.0)
    progress.check()

    progress.report(STAGE_FEATURES, 0.0)
    extractor = backbone(base_model, device)
    features = extract_features(extractor, dataset_path, parsed, task, progress)

    settings = HeadSettings.from_hyperparameters(hyper)
    progress.training_started(settings.epochs)
    train_labels = _take(labels, train_idx)
    head = train_head(
        features[np.asarray(train_idx, dtype=np.int64)],
        train_labels,
        settings,
        base_model=base_model,
        task=task,
        on_epoch=progress.on_epoch,
        should_stop=progress.stop.is_set,
        info={
            "seed": hyper.seed,
            "dataset_sha256": request.dataset_sha256,
            "code_version": aimass.__version__,
            "hyperparameters": {
                "epochs": hyper.epochs,
                "learning_rate": settings.learning_rate,
                "batch_size": hyper.batch_size,
                "weight_decay": settings.weight_decay,
                "holdout_fraction": holdout,
                "seed": hyper.seed,
            },
        },  # nothing about the job itself (id, name, times): the same seed, data and code give the same bytes
    )

    progress.report(STAGE_EVALUATING, 0.0)
    evaluation = evaluate(
        head,
        features[np.asarray(eval_idx, dtype=np.int64)],
        _take(labels, eval_idx),
        train_rows=len(train_idx),
    )
    previous = request.previous if request.HasField("previous") and request.previous_version else None
    compare(evaluation, previous, request.previous_version)
    progress.report(STAGE_EVALUATING, 1.0)
    return Trained(head, evaluation)


async def run_job(
    request: lifecycle_pb2.RunJobRequest,
    *,
    cache: BlobCache,
    put: Put,
    device: str,
    export_cache_dir: Path,
    stop: threading.Event | None = None,
    alone: bool = True,
) -> AsyncGenerator[lifecycle_pb2.RunJobResponse, None]:
    """The job's progress updates, then one with ``result``. Closing the iterator (the call cancelled) stops the job;
    it returns once the worker thread has stopped. ``stop``: the job's stop event (set here when the job is
    cancelled; setting it stops the job, which then ends CANCELLED). ``alone``: no other job runs in this process
    (the RSS high-water mark may be reset for this one). Errors: InvalidArgument for data that cannot train a model
    (the message says what is wrong), NotFound for a dataset blob the control plane no longer has, AimassError
    (INTERNAL) for anything unexpected (logged with its traceback)."""
    job = request.job
    try:
        check_sha256(request.dataset_sha256)
    except ValueError:
        raise InvalidArgument(
            f"dataset_sha256 {request.dataset_sha256[:80]!r} is not a SHA-256: send the dataset blob's 64 lowercase "
            "hex digits"
        ) from None
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else threading.Event()
    progress = JobProgress(loop=loop, stop=stop, memory=PeakMemory(alone=alone))
    worker: asyncio.Task[lifecycle_pb2.TrainedHead] = loop.create_task(
        _produce(request, cache=cache, put=put, device=device, export_cache_dir=export_cache_dir, progress=progress),
        name=f"job-{job.job_id}",
    )
    log.info("job %s: training %s on %s (%s)", job.job_id, job.model_name, request.dataset_sha256[:12], device)
    try:
        async for update in _throttled(progress.updates, worker):
            yield update
        result = await worker
    finally:
        if not worker.done():
            progress.stop.set()
            worker.cancel()
            log.info("job %s: cancelled; stopping it", job.job_id)
            # The worker thread stops between two batches; the job's slot is free only once it has.
            with contextlib.suppress(BaseException):
                await asyncio.shield(worker)
            log.info("job %s: stopped %.1f s after it started", job.job_id, time.monotonic() - started)
    result.peak_memory_bytes = progress.memory.result()
    log.info(
        "job %s: done in %.1f s, accuracy %.3f on %d held-out rows, peak RSS %.0f MiB",
        job.job_id,
        time.monotonic() - started,
        result.evaluation.accuracy,
        result.evaluation.eval_rows,
        result.peak_memory_bytes / 2**20,
    )
    yield lifecycle_pb2.RunJobResponse(
        stage=STAGE_SAVING,
        progress=1.0,
        epoch=progress.epoch,
        loss=progress.loss,
        result=result,
        epoch_losses=progress.losses,
    )


async def _throttled(
    updates: asyncio.Queue[lifecycle_pb2.RunJobResponse], worker: asyncio.Task[Any]
) -> AsyncIterator[lifecycle_pb2.RunJobResponse]:
    """The worker's updates until it ends: a new stage at once (after the last update held back in the stage before),
    otherwise at most UPDATES_PER_S a second, each the latest (an update superseded within the interval is dropped;
    so is what is left when the worker ends)."""
    interval = 1.0 / UPDATES_PER_S
    last_sent = -interval
    last_stage = ""
    pending: lifecycle_pb2.RunJobResponse | None = None
    while not worker.done():
        timeout = None if pending is None else max(0.0, last_sent + interval - time.monotonic())
        getter = asyncio.ensure_future(updates.get())
        try:
            done, _ = await asyncio.wait({getter, worker}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            update = getter.result()
            if update.stage != last_stage:
                # A stage's last word (the last epoch and its loss) before the next stage's first.
                if pending is not None:
                    yield pending
                pending = None
                last_sent, last_stage = time.monotonic(), update.stage
                yield update
            elif time.monotonic() - last_sent >= interval:
                pending = None
                last_sent = time.monotonic()
                yield update
            else:
                pending = update
        elif not done and pending is not None:
            last_sent = time.monotonic()
            yield pending
            pending = None


async def _stored(put: Put, data: bytes, what: str) -> str:
    """``put(data)``; the blob service's refusals as errors that say whether another try can succeed."""
    try:
        return await put(data)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
            raise FailedPrecondition(
                f"the control plane's blob store refused {what} ({len(data):,} bytes): {e.details()}"
            ) from None
        raise Unavailable(
            f"could not store {what} in the control plane's blob store: {e.code().name}: {e.details()}"
        ) from None


async def _produce(
    request: lifecycle_pb2.RunJobRequest,
    *,
    cache: BlobCache,
    put: Put,
    device: str,
    export_cache_dir: Path,
    progress: JobProgress,
) -> lifecycle_pb2.TrainedHead:
    job = request.job
    try:
        progress.report(STAGE_FETCHING, 0.0)
        dataset_path = await cache.path(request.dataset_sha256)
        thread = asyncio.ensure_future(asyncio.to_thread(train_and_evaluate, request, dataset_path, device, progress))
        try:
            trained = await asyncio.shield(thread)
        except asyncio.CancelledError:
            # Cancelling cannot stop a thread: the stop event does, between two batches; this returns once it has.
            progress.stop.set()
            with contextlib.suppress(BaseException):
                await thread
            raise

        progress.report(STAGE_SAVING, 0.0)
        artifact = trained.head.to_bytes()
        artifact_sha256 = await _stored(put, artifact, "the trained head")
        progress.report(STAGE_SAVING, 0.3)
        version = job.model_version or UNNUMBERED_VERSION
        export = await asyncio.to_thread(
            export_zip,
            trained.head,
            model_name=job.model_name or "model",
            version=version,
            cache_dir=export_cache_dir,
        )
        progress.report(STAGE_SAVING, 0.8)
        export_sha256 = await _stored(put, export, "the edge export")
        progress.report(STAGE_SAVING, 1.0)
    except (JobStopped, TrainingCancelled):
        raise JobStopped(f"job {job.job_id} was cancelled") from None
    except DatasetError as e:
        log.info("job %s: the dataset cannot train a model: %s", job.job_id, e)
        raise InvalidArgument(f"dataset {request.dataset_sha256[:12]} cannot train a model: {e}") from None
    except AimassError as e:
        log.info("job %s failed: %s: %s", job.job_id, e.code.name, e.message)
        raise
    except Exception as e:
        log.exception("job %s failed", job.job_id)
        raise AimassError(f"training job {job.job_id} failed in the trainer: {type(e).__name__}: {str(e)[:200]}") from e
    return lifecycle_pb2.TrainedHead(
        artifact_sha256=artifact_sha256,
        artifact_bytes=len(artifact),
        labels=list(trained.head.labels),
        evaluation=trained.evaluation,
        export_sha256=export_sha256,
        export_bytes=len(export),
    )
