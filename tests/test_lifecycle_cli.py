"""The lifecycle commands as a user runs them (`aimass datasets|train|jobs|models ...`, a subprocess), against TEST
SERVERS in this process: grpc.aio servers implementing DatasetService, TrainingService and DeploymentService with
small in-memory behaviour, enough to check what the command line sends (the upload's header, chunks and SHA-256, the
arguments), what it prints (reports, progress, evaluations, error lines) and its exit codes. The real services, through
the real gateway, are the end-to-end tests' business.

The catalogue commands (`aimass models list|describe|load|unload`) run against the session's real mesh (``mesh``):
its gateway's ModelService, its NLP replica's models.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import hashlib
import io
import json
import os
import pty
import signal
import struct
import termios
import threading
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass.local_mesh import LocalMesh, free_port
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    datasets_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from tests.conftest import BIN
from tests.security import key_for

# Datasets the test training server trains on without an upload.
SCRIPTED = ("scripted", "doomed", "endless", "flaky")
FINAL_STATES = (training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED)
KEY = "aimass_lifecycletest_" + "K" * 43
QUOTA_BYTES = 8 << 20  # the test server's storage quota
MIB = 1 << 20
Context = grpc.aio.ServicerContext[Any, Any]


# -- the test servers ------------------------------------------------------------------------------------------------


async def refuse_without_key(context: Context) -> None:
    if dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {KEY}":
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key is not one this test server knows")


async def abort_with_reason(
    context: Context,
    code: grpc.StatusCode,
    reason: str,
    message: str,
) -> None:
    context.set_trailing_metadata(((ERROR_INFO_KEY, common_pb2.ErrorInfo(reason=reason).SerializeToString()),))
    await context.abort(code, message)


@dataclass
class Upload:
    header: datasets_pb2.UploadDatasetHeader
    chunk_sizes: list[int] = field(default_factory=list)
    data: bytes = b""


def validate_csv(
    data: bytes, text_column: str, label_column: str
) -> tuple[datasets_pb2.ValidationReport, list[tuple[str, str]]]:
    """A CSV checked the way the contract describes, only far simpler: empty texts and duplicates are dropped."""
    report = datasets_pb2.ValidationReport()
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line, row in enumerate(csv.DictReader(io.StringIO(data.decode())), start=2):
        report.rows_read += 1
        text, label = row.get(text_column or "text", ""), row.get(label_column or "label", "")
        kind = "EMPTY_TEXT" if not text.strip() else "DUPLICATE" if text in seen else ""
        if kind:
            report.issue_counts[kind] = report.issue_counts.get(kind, 0) + 1
            report.issues.add(line=line, kind=kind, detail=f"row {line} dropped")
            continue
        seen.add(text)
        kept.append((text, label))
    report.rows_kept = len(kept)
    report.rows_dropped = report.rows_read - report.rows_kept
    counts: dict[str, int] = {}
    for _, label in kept:
        counts[label] = counts.get(label, 0) + 1
    for label, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        report.classes.add(label=label, count=count)
    return report, kept


class TestDatasetServer(datasets_pb2_grpc.DatasetServiceServicer):
    """Test server: keeps uploads in memory and answers from them."""

    __test__ = False

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.datasets: dict[str, datasets_pb2.DescribeDatasetResponse] = {}
        self.rows: dict[str, list[tuple[str, str]]] = {}

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[datasets_pb2.UploadDatasetRequest],
        context: Context,
    ) -> datasets_pb2.UploadDatasetResponse:
        await refuse_without_key(context)
        first = await anext(aiter(request_iterator))
        upload = Upload(first.header)
        self.uploads.append(upload)
        if upload.header.size_bytes > QUOTA_BYTES:
            await abort_with_reason(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "STORAGE_QUOTA",
                f"the upload is {upload.header.size_bytes} bytes; your tenant has {QUOTA_BYTES} bytes of storage "
                "left: delete datasets or ask for a larger quota",
            )
        parts = []
        async for message in request_iterator:
            upload.chunk_sizes.append(len(message.chunk))
            parts.append(message.chunk)
        upload.data = b"".join(parts)
        sha256 = hashlib.sha256(upload.data).hexdigest()
        if sha256 != upload.header.sha256 or len(upload.data) != upload.header.size_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the file's size or SHA-256 is not the header's")
        report, kept = validate_csv(upload.data, upload.header.text_column, upload.header.label_column)
        version = datasets_pb2.DatasetVersion(
            version=sha256[:12],
            sha256=sha256,
            size_bytes=len(upload.data),
            rows=len(kept),
            classes=report.classes,
            created_unix_ms=1_700_000_000_000,
            format=upload.header.format,
        )
        name = upload.header.name
        if name in self.datasets and self.datasets[name].version.sha256 == sha256:
            existing = self.datasets[name]
            return datasets_pb2.UploadDatasetResponse(
                dataset=existing.dataset, version=existing.version, report=existing.report, already_existed=True
            )
        info = datasets_pb2.DatasetInfo(name=name, owner="acme", task=upload.header.task, versions=[version])
        self.datasets[name] = datasets_pb2.DescribeDatasetResponse(dataset=info, version=version, report=report)
        self.rows[name] = kept
        return datasets_pb2.UploadDatasetResponse(dataset=info, version=version, report=report)

    async def ListDatasets(
        self,
        request: datasets_pb2.ListDatasetsRequest,
        context: Context,
    ) -> datasets_pb2.ListDatasetsResponse:
        await refuse_without_key(context)
        return datasets_pb2.ListDatasetsResponse(datasets=[d.dataset for d in self.datasets.values()])

    async def DescribeDataset(
        self,
        request: datasets_pb2.DescribeDatasetRequest,
        context: Context,
    ) -> datasets_pb2.DescribeDatasetResponse:
        await refuse_without_key(context)
        found = self.datasets.get(request.dataset.name)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset named {request.dataset.name!r}")
            raise AssertionError("unreachable")
        reply = datasets_pb2.DescribeDatasetResponse()
        reply.CopyFrom(found)
        for text, label in self.rows[request.dataset.name][: request.preview_rows or 5]:
            reply.preview.add(text=text, label=label)
        return reply

    async def DeleteDataset(
        self,
        request: datasets_pb2.DeleteDatasetRequest,
        context: Context,
    ) -> datasets_pb2.DeleteDatasetResponse:
        await refuse_without_key(context)
        found = self.datasets.pop(request.dataset.name, None)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset named {request.dataset.name!r}")
            raise AssertionError("unreachable")
        return datasets_pb2.DeleteDatasetResponse(
            deleted_versions=[v.version for v in found.dataset.versions],
            freed_bytes=sum(v.size_bytes for v in found.dataset.versions),
        )

    async def ShareDataset(
        self,
        request: datasets_pb2.ShareDatasetRequest,
        context: Context,
    ) -> datasets_pb2.ShareDatasetResponse:
        await refuse_without_key(context)
        found = self.datasets.get(request.name)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset named {request.name!r}")
            raise AssertionError("unreachable")
        shared = [t for t in found.dataset.shared_with if t != request.tenant]
        if not request.revoke:
            shared.append(request.tenant)
        del found.dataset.shared_with[:]
        found.dataset.shared_with.extend(sorted(shared))
        return datasets_pb2.ShareDatasetResponse(dataset=found.dataset)


EVALUATION = training_pb2.Evaluation(
    accuracy=0.9,
    macro_f1=0.875,
    per_class=[
        training_pb2.ClassMetrics(label="billing", precision=0.95, recall=0.9, f1=0.924, support=20),
        training_pb2.ClassMetrics(label="outage", precision=0.8, recall=0.9, f1=0.847, support=10),
    ],
    labels=["billing", "outage"],
    confusion=[18, 2, 1, 9],
    train_rows=120,
    eval_rows=30,
    previous_version="1",
    accuracy_delta=0.05,
    macro_f1_delta=-0.01,
)


class TestTrainingServer(training_pb2_grpc.TrainingServiceServicer):
    """Test server: a job runs a scripted course while watched (queued, fetching data, N epochs, evaluating), ending
    SUCCEEDED, or FAILED for the dataset "doomed"; the dataset "endless" trains until cancelled; the first watch of a
    job on "flaky" breaks off UNAVAILABLE mid-course."""

    __test__ = False

    def __init__(self, datasets: TestDatasetServer) -> None:
        self.datasets = datasets
        self.jobs: dict[str, training_pb2.TrainingJob] = {}
        self.started: list[training_pb2.StartTrainingRequest] = []
        self.watches = 0
        self.courses: dict[str, Iterator[None]] = {}
        self.dropped: set[str] = set()

    async def StartTraining(
        self,
        request: training_pb2.StartTrainingRequest,
        context: Context,
    ) -> training_pb2.StartTrainingResponse:
        await refuse_without_key(context)
        self.started.append(request)
        hp = training_pb2.Hyperparameters()
        hp.CopyFrom(request.hyperparameters)
        if not 0 <= hp.epochs <= 500:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"epochs is {hp.epochs}; allowed: 1 to 500")
        if request.dataset.name not in self.datasets.datasets and request.dataset.name not in SCRIPTED:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset named {request.dataset.name!r}")
        hp.epochs = hp.epochs or 60
        job = training_pb2.TrainingJob(
            job_id=f"job-{len(self.jobs) + 1}",
            owner="acme",
            state=training_pb2.JOB_STATE_QUEUED,
            dataset=datasets_pb2.DatasetRef(name=request.dataset.name, owner="acme", version="0123456789ab"),
            dataset_sha256="0123456789ab" + "0" * 52,
            task=datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
            base_model=request.base_model or "all-MiniLM-L6-v2",
            model_name=request.model_name or request.dataset.name,
            hyperparameters=hp,
            stage="queued",
            epochs=hp.epochs,
            attempt=1,
            created_unix_ms=1_700_000_000_000,
            code_version="0.14.0",
        )
        self.jobs[job.job_id] = job
        return training_pb2.StartTrainingResponse(job=job)

    async def _job(self, job_id: str, context: Context) -> training_pb2.TrainingJob:
        await refuse_without_key(context)
        if job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no training job {job_id!r}")
        return self.jobs[job_id]

    def _course(self, job: training_pb2.TrainingJob) -> Iterable[None]:
        """Moves the job along one step at a time."""
        job.state, job.stage, job.trainer_id, job.started_unix_ms = (
            training_pb2.JOB_STATE_RUNNING,
            "fetching data",
            "trainer-0",
            1_700_000_001_000,
        )
        yield
        job.stage = "training"
        epoch = 0
        while job.dataset.name == "endless" or epoch < job.epochs:
            epoch += 1
            job.epoch = min(epoch, job.epochs)
            job.loss = 1.0 / epoch
            job.progress = 0.1 + 0.8 * min(epoch, job.epochs) / job.epochs
            job.eta_seconds = 0.05 * (job.epochs - job.epoch)
            yield
        if job.dataset.name == "doomed":
            job.state, job.attempt, job.error = training_pb2.JOB_STATE_FAILED, 2, "the trainer died twice (OOM)"
            return
        job.stage, job.progress = "evaluating", 0.95
        yield
        job.state, job.stage, job.progress, job.model_version = training_pb2.JOB_STATE_SUCCEEDED, "done", 1.0, "2"
        job.evaluation.CopyFrom(EVALUATION)
        job.finished_unix_ms = 1_700_000_060_000

    async def WatchTraining(
        self,
        request: training_pb2.WatchTrainingRequest,
        context: Context,
    ) -> AsyncIterator[training_pb2.WatchTrainingResponse]:
        job = await self._job(request.job_id, context)
        self.watches += 1
        course = self.courses.setdefault(job.job_id, iter(self._course(job)))
        yield training_pb2.WatchTrainingResponse(job=job)
        sent = 1
        while job.state not in FINAL_STATES and next(course, "ended") is None:
            await asyncio.sleep(0.02)
            yield training_pb2.WatchTrainingResponse(job=job)
            sent += 1
            if job.dataset.name == "flaky" and sent == 4 and job.job_id not in self.dropped:
                self.dropped.add(job.job_id)  # once: as a gateway restarting would
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the connection to the control plane was lost")
        yield training_pb2.WatchTrainingResponse(job=job)

    async def CancelTraining(
        self,
        request: training_pb2.CancelTrainingRequest,
        context: Context,
    ) -> training_pb2.CancelTrainingResponse:
        job = await self._job(request.job_id, context)
        if job.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING):
            job.state = training_pb2.JOB_STATE_CANCELLED
        return training_pb2.CancelTrainingResponse(job=job)

    async def GetTrainingJob(
        self,
        request: training_pb2.GetTrainingJobRequest,
        context: Context,
    ) -> training_pb2.GetTrainingJobResponse:
        return training_pb2.GetTrainingJobResponse(job=await self._job(request.job_id, context))

    async def ListTrainingJobs(
        self,
        request: training_pb2.ListTrainingJobsRequest,
        context: Context,
    ) -> training_pb2.ListTrainingJobsResponse:
        await refuse_without_key(context)
        jobs = list(reversed(self.jobs.values()))[: request.limit or 50]
        return training_pb2.ListTrainingJobsResponse(jobs=jobs)


def export_zip() -> bytes:
    """A ZIP shaped like an export (the bytes only matter for the transfer)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", os.urandom(300_000))
        archive.writestr("labels.json", json.dumps(["billing", "outage"]))
        archive.writestr("example.py", "print('hello')\n")
    return buffer.getvalue()


class TestDeploymentServer(deployments_pb2_grpc.DeploymentServiceServicer):
    """Test server: one model, ticket-router, with versions 1 (the default) and 2; exports a ZIP in 64 KiB chunks
    (for the model "damaged", with a SHA-256 that does not match)."""

    __test__ = False

    def __init__(self) -> None:
        self.model = deployments_pb2.CustomModel(
            name="ticket-router",
            owner="acme",
            task=datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
            method="aimass.v1.NlpService/Classify",
            deployment=deployments_pb2.Deployment(default_version="1", generation=3),
        )
        for version, state in (
            ("1", deployments_pb2.VERSION_STATE_DEFAULT),
            ("2", deployments_pb2.VERSION_STATE_READY),
        ):
            self.model.versions.add(
                version=version,
                state=state,
                job_id=f"job-{version}",
                dataset=datasets_pb2.DatasetRef(name="support-tickets", owner="acme", version="0123456789ab"),
                base_model="all-MiniLM-L6-v2",
                evaluation=training_pb2.Evaluation(accuracy=0.85 + 0.05 * int(version), macro_f1=0.8),
                labels=["billing", "outage"],
                created_unix_ms=1_700_000_000_000,
            )
        self.export = export_zip()
        self.requests: list[object] = []

    async def _model(self, ref: common_pb2.ModelRef, context: Context) -> None:
        await refuse_without_key(context)
        if ref.name not in (self.model.name, "damaged"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {ref.name!r}")

    def _states(self) -> None:
        d = self.model.deployment
        for v in self.model.versions:
            v.state = (
                deployments_pb2.VERSION_STATE_DEFAULT
                if v.version == d.default_version
                else deployments_pb2.VERSION_STATE_CANARY
                if v.version == d.canary_version
                else deployments_pb2.VERSION_STATE_STANDBY
                if v.version == d.previous_version
                else deployments_pb2.VERSION_STATE_READY
            )
        d.generation += 1

    async def ListCustomModels(
        self,
        request: deployments_pb2.ListCustomModelsRequest,
        context: Context,
    ) -> deployments_pb2.ListCustomModelsResponse:
        await refuse_without_key(context)
        models = [self.model] if request.model.name in ("", self.model.name) else []
        return deployments_pb2.ListCustomModelsResponse(models=models)

    async def DeployModel(
        self,
        request: deployments_pb2.DeployModelRequest,
        context: Context,
    ) -> deployments_pb2.DeployModelResponse:
        await self._model(request.model, context)
        self.requests.append(request)
        if not 0 <= request.canary_percent <= 99:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"canary_percent is {request.canary_percent}; allowed: 0 to 99"
            )
        d = self.model.deployment
        if request.canary_percent:
            d.canary_version, d.canary_percent = request.model.version, request.canary_percent
        else:
            d.previous_version, d.default_version = d.default_version, request.model.version
        self._states()
        return deployments_pb2.DeployModelResponse(model=self.model, replicas_applied=2)

    async def PromoteModel(
        self,
        request: deployments_pb2.PromoteModelRequest,
        context: Context,
    ) -> deployments_pb2.PromoteModelResponse:
        await self._model(request.model, context)
        self.requests.append(request)
        d = self.model.deployment
        d.previous_version, d.default_version = d.default_version, request.model.version or d.canary_version
        d.canary_version, d.canary_percent = "", 0
        self._states()
        return deployments_pb2.PromoteModelResponse(model=self.model, replicas_applied=2)

    async def RollbackModel(
        self,
        request: deployments_pb2.RollbackModelRequest,
        context: Context,
    ) -> deployments_pb2.RollbackModelResponse:
        await self._model(request.model, context)
        self.requests.append(request)
        d = self.model.deployment
        d.default_version, d.previous_version = d.previous_version, ""
        self._states()
        return deployments_pb2.RollbackModelResponse(model=self.model, replicas_applied=1)

    async def UndeployModel(
        self,
        request: deployments_pb2.UndeployModelRequest,
        context: Context,
    ) -> deployments_pb2.UndeployModelResponse:
        await self._model(request.model, context)
        self.requests.append(request)
        d = self.model.deployment
        d.default_version = d.canary_version = d.previous_version = ""
        d.canary_percent = 0
        self._states()
        return deployments_pb2.UndeployModelResponse(model=self.model, replicas_applied=2)

    async def ExportModel(
        self,
        request: deployments_pb2.ExportModelRequest,
        context: Context,
    ) -> AsyncIterator[deployments_pb2.ExportModelResponse]:
        await self._model(request.model, context)
        self.requests.append(request)
        data, step = self.export, 64 << 10
        sha256 = hashlib.sha256(data if request.model.name != "damaged" else b"other bytes").hexdigest()
        for offset in range(0, len(data), step):
            last = offset + step >= len(data)
            yield deployments_pb2.ExportModelResponse(
                data=data[offset : offset + step],
                total_bytes=len(data),
                sha256=sha256 if last else "",
                filename=f"{request.model.name}-v{request.model.version or '1'}.zip" if offset == 0 else "",
            )


@dataclass
class TestServers:
    __test__ = False

    address: str
    datasets: TestDatasetServer
    training: TestTrainingServer
    deployments: TestDeploymentServer


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[TestServers]:
    datasets = TestDatasetServer()
    training = TestTrainingServer(datasets)
    deployments = TestDeploymentServer()
    server = grpc.aio.server()
    datasets_pb2_grpc.add_DatasetServiceServicer_to_server(datasets, server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
    deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(deployments, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    yield TestServers(address, datasets, training, deployments)
    await server.stop(0)


# -- running the command ---------------------------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def aimass(gateway: str, *args: str, key: str = KEY, tty: bool = False, columns: int = 0) -> Ran:
    """`aimass ARGS --gateway GATEWAY` with the key in $AIMASS_API_KEY; ``tty``: stderr is a terminal (``columns``
    wide, when given)."""
    env = {**os.environ, "AIMASS_API_KEY": key}
    command = [str(BIN / "aimass"), *args, "--gateway", gateway]
    if not tty:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return Ran(process.returncode or 0, out.decode(), err.decode())
    controller, terminal = pty.openpty()
    if columns:
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    received: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the child side is closed
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=terminal
        )
        os.close(terminal)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        await asyncio.to_thread(reader.join, 10)
    finally:
        os.close(controller)
    # The terminal turns "\n" into "\r\n": undo it, leaving the carriage returns the command wrote itself.
    return Ran(process.returncode or 0, out.decode(), b"".join(received).decode().replace("\r\n", "\n"))


def tickets_csv(path: Path, rows: int, *, pad: int = 0, columns: tuple[str, str] = ("text", "label")) -> Path:
    """A labelled text CSV (billing / outage tickets) with one empty text and one duplicate; ``pad`` makes rows
    longer, for a file of several MiB."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for n in range(rows):
            label = "billing" if n % 3 else "outage"
            writer.writerow(
                [f"ticket {n}: {'my invoice is wrong' if n % 3 else 'the site is down'} {'x' * pad}", label]
            )
        writer.writerow(["", "billing"])
        writer.writerow([f"ticket 1: my invoice is wrong {'x' * pad}", "billing"])
    return path


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# -- datasets --------------------------------------------------------------------------------------------------------


async def test_upload_streams_the_header_then_1_mib_chunks_and_prints_the_validation_report(
    servers: TestServers, tmp_path: Path
) -> None:
    path = tickets_csv(tmp_path / "tickets.csv", 1200, pad=2000, columns=("body", "team"))  # about 2.4 MiB
    data = path.read_bytes()
    ran = await aimass(
        servers.address,
        "datasets",
        "upload",
        str(path),
        "--name",
        "support-tickets",
        "--task",
        "text-classification",
        "--text-column",
        "body",
        "--label-column",
        "team",
    )
    assert ran.returncode == 0, ran.stderr
    upload = servers.datasets.uploads[-1]
    # The header: what the user asked, with the format from the extension and the file's size and SHA-256.
    assert upload.header.name == "support-tickets"
    assert upload.header.task == datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
    assert upload.header.format == datasets_pb2.DATASET_FORMAT_CSV
    assert (upload.header.text_column, upload.header.label_column) == ("body", "team")
    assert upload.header.size_bytes == len(data) and upload.header.sha256 == hashlib.sha256(data).hexdigest()
    # Then the file, whole and in order, in 1 MiB chunks.
    assert upload.data == data
    assert upload.chunk_sizes == [MIB, MIB, len(data) - 2 * MIB]
    version = hashlib.sha256(data).hexdigest()[:12]
    assert f"uploaded tickets.csv as support-tickets version {version} (text-classification, csv" in ran.stdout
    assert "rows: 1202 read, 1200 kept, 2 dropped" in ran.stdout
    assert "issues: DUPLICATE 1, EMPTY_TEXT 1" in ran.stdout
    assert "line 1202: EMPTY_TEXT: row 1202 dropped" in ran.stdout
    assert "classes (2): billing 800, outage 400" in ran.stdout
    # Not a terminal: plain progress lines at milestones (40%, 80%, 100% here), never a carriage return.
    progress = [line for line in ran.stderr.splitlines() if line.startswith("uploading tickets.csv")]
    assert 2 <= len(progress) <= 4 and progress[-1].split("]")[1].split()[0] == "100%", ran.stderr
    assert "\r" not in ran.stderr


async def test_upload_progress_is_one_line_rewritten_on_a_terminal(servers: TestServers, tmp_path: Path) -> None:
    path = tickets_csv(tmp_path / "tty.csv", 1000, pad=3000)  # about 3 MiB: several chunks
    ran = await aimass(
        servers.address,
        "datasets",
        "upload",
        str(path),
        "--name",
        "tty",
        "--task",
        "text-classification",
        tty=True,
        columns=52,
    )
    assert ran.returncode == 0, ran.stderr
    progress = ran.stderr[ran.stderr.index("\ruploading") :]
    line, _, rest = progress.partition("\n")
    # One line on screen, cut to the terminal's width (it would wrap otherwise): redrawn after carriage returns,
    # ending on 100% and a newline.
    drawn = line.split("\r")[1:]
    assert len(drawn) >= 2 and all(len(text) == 51 for text in drawn), repr(line)
    assert drawn[-1].startswith("uploading tty.csv [########################] 100%"), repr(line)
    assert "uploading" not in rest
    assert "rows: 1002 read, 1000 kept, 2 dropped" in ran.stdout


async def test_list_describe_share_and_delete_datasets(servers: TestServers, tmp_path: Path) -> None:
    path = tickets_csv(tmp_path / "small.csv", 30)
    uploaded = await aimass(
        servers.address, "datasets", "upload", str(path), "--name", "small", "--task", "text-classification"
    )
    assert uploaded.returncode == 0, uploaded.stderr
    again = await aimass(
        servers.address, "datasets", "upload", str(path), "--name", "small", "--task", "text-classification"
    )
    version = servers.datasets.datasets["small"].version.version
    assert f"small version {version}: the same bytes were uploaded before; nothing new was stored" in again.stdout
    listed = await aimass(servers.address, "datasets", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "OWNER", "TASK", "VERSIONS", "LATEST"]
    small = next(row for row in rows if row.startswith("small "))
    assert small.split()[:6] == [
        "small",
        "acme",
        "text-classification",
        "1",
        servers.datasets.datasets["small"].version.version,
        "30",
    ]
    as_json = json.loads((await aimass(servers.address, "datasets", "list", "--json")).stdout)
    assert {d["name"] for d in as_json["datasets"]} >= {"small"}

    described = await aimass(servers.address, "datasets", "describe", "small", "--preview", "3")
    assert described.returncode == 0, described.stderr
    assert "small (owner acme, text-classification)" in described.stdout
    assert "rows: 32 read, 30 kept, 2 dropped" in described.stdout
    preview = described.stdout.split("preview:\n")[1].split("\n\n")[0].splitlines()
    assert preview[0].split() == ["LABEL", "TEXT"] and len(preview) == 4
    assert preview[1].split()[0] == "outage" and "the site is down" in preview[1]
    described_json = json.loads((await aimass(servers.address, "datasets", "describe", "small", "--json")).stdout)
    assert described_json["version"]["rows"] == "30" and len(described_json["preview"]) == 5

    shared = await aimass(servers.address, "datasets", "share", "small", "--with", "beta")
    assert shared.returncode == 0 and "beta can read small; shared with: beta" in shared.stdout
    revoked = await aimass(servers.address, "datasets", "share", "small", "--with", "beta", "--revoke")
    assert "beta can no longer read small; shared with: nobody" in revoked.stdout

    deleted = await aimass(servers.address, "datasets", "delete", "small")
    version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert deleted.returncode == 0 and f"deleted small: versions {version};" in deleted.stdout
    missing = await aimass(servers.address, "datasets", "describe", "small")
    assert missing.returncode == 1 and missing.stderr.strip() == "NOT_FOUND: no dataset named 'small'"


async def test_an_upload_past_the_quota_prints_the_status_reason_and_message(
    servers: TestServers, tmp_path: Path
) -> None:
    path = tmp_path / "big.csv"
    with path.open("wb") as file:  # sparse: 9 MiB of zeros past a header line, never in memory
        file.write(b"text,label\n")
        file.truncate(QUOTA_BYTES + MIB)
    ran = await aimass(
        servers.address, "datasets", "upload", str(path), "--name", "big", "--task", "text-classification"
    )
    assert ran.returncode == 1
    last = ran.stderr.strip().splitlines()[-1]
    assert last == (
        f"RESOURCE_EXHAUSTED (STORAGE_QUOTA): the upload is {QUOTA_BYTES + MIB} bytes; your tenant has {QUOTA_BYTES} "
        "bytes of storage left: delete datasets or ask for a larger quota"
    )
    assert "big" not in servers.datasets.datasets


async def test_a_missing_file_a_bad_key_and_a_bad_task_are_refused_clearly(
    servers: TestServers, tmp_path: Path
) -> None:
    uploads = len(servers.datasets.uploads)
    missing = await aimass(
        servers.address,
        "datasets",
        "upload",
        str(tmp_path / "nope.csv"),
        "--name",
        "x",
        "--task",
        "text-classification",
    )
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope.csv'}: no such file"
    assert len(servers.datasets.uploads) == uploads  # nothing was sent
    bad_task = await aimass(servers.address, "datasets", "upload", "x.csv", "--name", "x", "--task", "audio")
    assert bad_task.returncode == 2 and "invalid choice: 'audio'" in bad_task.stderr
    unknown = await aimass(servers.address, "datasets", "list", key="aimass_wrong_" + "W" * 43)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "UNAUTHENTICATED: the API key is not one this test server knows"


# -- training jobs ---------------------------------------------------------------------------------------------------


async def test_train_sends_the_hyperparameters_watches_the_job_and_prints_its_evaluation(
    servers: TestServers, tmp_path: Path
) -> None:
    await aimass(
        servers.address, "datasets", "upload", str(tickets_csv(tmp_path / "t.csv", 60)), "--name", "tickets", "--task",
        "text-classification",
    )  # fmt: skip
    ran = await aimass(
        servers.address,
        "train",
        "tickets",
        "--dataset-version",
        "0123456789ab",
        "--base",
        "all-MiniLM-L6-v2",
        "--name",
        "ticket-router",
        "--epochs",
        "5",
        "--learning-rate",
        "0.02",
        "--batch-size",
        "16",
        "--holdout",
        "0.25",
        "--seed",
        "7",
    )
    assert ran.returncode == 0, ran.stderr
    sent = servers.training.started[-1]
    assert (sent.dataset.name, sent.dataset.version, sent.base_model, sent.model_name) == (
        "tickets",
        "0123456789ab",
        "all-MiniLM-L6-v2",
        "ticket-router",
    )
    hp = sent.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.seed) == (5, 16, 7)
    assert hp.learning_rate == pytest.approx(0.02) and hp.holdout_fraction == pytest.approx(0.25)
    assert hp.weight_decay == 0  # left to the server's default
    job_id = list(servers.training.jobs)[-1]
    # The progress: stages, epochs, loss, ETA, as plain lines (not a terminal).
    progress = ran.stderr.splitlines()
    assert f"{job_id} queued    0%  epoch 0/5" in progress
    assert any(line.startswith(f"{job_id} training") and "epoch 3/5  loss 0.3333  ETA" in line for line in progress)
    assert any(line.startswith(f"{job_id} done  100%") for line in progress)
    # Then the evaluation.
    out = ran.stdout
    assert f"job {job_id} SUCCEEDED: ticket-router version 2" in out
    assert "evaluated on 30 held-out rows (trained on 120)" in out
    assert "accuracy 0.900 (+0.050 vs version 1)" in out and "macro-F1 0.875 (-0.010 vs version 1)" in out
    per_class = out.split("LABEL")[1].splitlines()
    assert per_class[0].split() == ["PRECISION", "RECALL", "F1", "SUPPORT"]
    assert per_class[1].split() == ["billing", "0.950", "0.900", "0.924", "20"]
    assert per_class[2].split() == ["outage", "0.800", "0.900", "0.847", "10"]
    confusion = out.split("columns: predicted):\n")[1].splitlines()
    assert confusion[1].split() == ["billing", "18", "2"] and confusion[2].split() == ["outage", "1", "9"]
    assert "serve it: aimass models deploy ticket-router --version 2" in out


async def test_train_progress_is_one_live_line_on_a_terminal(servers: TestServers) -> None:
    ran = await aimass(servers.address, "train", "scripted", "--epochs", "3", tty=True)
    assert ran.returncode == 0, ran.stderr
    # Everything the watch drew is one terminal line, redrawn in place (str.splitlines would split at "\r").
    drawn = next(line for line in ran.stderr.split("\n") if "\r" in line)
    assert drawn.count("\r") >= 2 and "epoch 3/3" in drawn and drawn.rsplit("\r", 1)[1].split()[1] == "done"


async def test_a_failed_job_exits_non_zero_with_its_error(servers: TestServers) -> None:
    ran = await aimass(servers.address, "train", "doomed", "--epochs", "2")
    assert ran.returncode == 1
    job_id = list(servers.training.jobs)[-1]
    assert ran.stderr.strip().splitlines()[-1] == f"job {job_id} FAILED (attempt 2): the trainer died twice (OOM)"
    assert "SUCCEEDED" not in ran.stdout


async def test_a_watch_cut_off_by_the_gateway_picks_up_again(servers: TestServers) -> None:
    watches = servers.training.watches
    ran = await aimass(servers.address, "train", "flaky", "--epochs", "4")
    assert ran.returncode == 0, ran.stderr
    job_id = list(servers.training.jobs)[-1]
    assert job_id in servers.training.dropped and servers.training.watches == watches + 2
    assert f"job {job_id} SUCCEEDED: flaky version 2" in ran.stdout
    epochs = [line.split("epoch ")[1].split()[0] for line in ran.stderr.splitlines() if line.startswith(job_id)]
    assert epochs[-1] == "4/4" and "UNAVAILABLE" not in ran.stderr


async def test_bad_hyperparameters_and_unknown_datasets_print_the_servers_message(servers: TestServers) -> None:
    too_many = await aimass(servers.address, "train", "doomed", "--epochs", "900")
    assert too_many.returncode == 1 and too_many.stderr.strip() == "INVALID_ARGUMENT: epochs is 900; allowed: 1 to 500"
    unknown = await aimass(servers.address, "train", "no-such-data")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "NOT_FOUND: no dataset named 'no-such-data'"
    not_a_number = await aimass(servers.address, "train", "x", "--epochs", "many")
    assert not_a_number.returncode == 2 and "argument --epochs: invalid int value: 'many'" in not_a_number.stderr


async def test_jobs_list_show_cancel_and_a_watch_stopped_by_ctrl_c(servers: TestServers) -> None:
    watches = servers.training.watches
    queued = await aimass(servers.address, "train", "endless", "--name", "forever", "--no-wait")
    assert queued.returncode == 0, queued.stderr
    job_id = list(servers.training.jobs)[-1]
    assert f"job {job_id} QUEUED: forever on endless@0123456789ab with all-MiniLM-L6-v2" in queued.stdout
    assert f"follow it: aimass jobs watch {job_id}" in queued.stdout
    assert servers.training.watches == watches  # --no-wait: not watched

    listed = await aimass(servers.address, "jobs", "list", "--limit", "2")
    header, first, *rest = listed.stdout.splitlines()
    assert header.split()[:3] == ["JOB", "ID", "STATE"] and first.split()[:3] == [job_id, "QUEUED", "forever"]
    assert len(rest) == 1
    shown = await aimass(servers.address, "jobs", "show", job_id)
    assert shown.returncode == 0 and shown.stdout.startswith(f"job {job_id}: QUEUED (stage queued, 0%)")
    assert "hyperparameters: epochs 60," in shown.stdout
    as_json = json.loads((await aimass(servers.address, "jobs", "show", job_id, "--json")).stdout)
    assert as_json["jobId"] == job_id and as_json["state"] == "JOB_STATE_QUEUED"

    # Ctrl-C while watching stops the watch, not the job.
    env = {**os.environ, "AIMASS_API_KEY": KEY}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "aimass"), "jobs", "watch", job_id, "--gateway", servers.address,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    job = servers.training.jobs[job_id]
    for _ in range(500):
        if job.epoch >= 3:
            break
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err.decode()
    assert f"stopped watching; job {job_id} goes on (aimass jobs watch {job_id}" in out.decode()
    assert servers.training.jobs[job_id].state == training_pb2.JOB_STATE_RUNNING

    cancelled = await aimass(servers.address, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {job_id}: CANCELLED"
    watched = await aimass(servers.address, "jobs", "watch", job_id)
    assert watched.returncode == 1 and watched.stderr.strip().splitlines()[-1] == f"job {job_id} CANCELLED"
    missing = await aimass(servers.address, "jobs", "show", "job-404")
    assert missing.returncode == 1 and missing.stderr.strip() == "NOT_FOUND: no training job 'job-404'"


# -- models ----------------------------------------------------------------------------------------------------------


async def test_versions_deploy_canary_promote_rollback_and_undeploy(servers: TestServers) -> None:
    versions = await aimass(servers.address, "models", "versions")
    assert versions.returncode == 0, versions.stderr
    lines = versions.stdout.splitlines()
    assert lines[0] == "ticket-router (owner acme, text-classification, aimass.v1.NlpService/Classify)"
    assert lines[1].split()[:5] == ["VERSION", "STATE", "DATASET", "BASE", "ACCURACY"]
    assert lines[2].split()[:5] == ["1", "DEFAULT", "support-tickets@0123456789ab", "all-MiniLM-L6-v2", "0.900"]
    assert lines[3].split()[:2] == ["2", "READY"]
    assert lines[4] == "ticket-router: default version 1 (generation 3)"
    as_json = json.loads((await aimass(servers.address, "models", "versions", "ticket-router", "--json")).stdout)
    assert [v["version"] for v in as_json["models"][0]["versions"]] == ["1", "2"]
    none = await aimass(servers.address, "models", "versions", "other")
    assert none.stdout.strip() == "no models of your own yet"

    canary = await aimass(servers.address, "models", "deploy", "ticket-router", "--version", "2", "--canary", "10")
    assert canary.returncode == 0, canary.stderr
    request = servers.deployments.requests[-1]
    assert isinstance(request, deployments_pb2.DeployModelRequest)
    assert (request.model.name, request.model.version, request.canary_percent) == ("ticket-router", "2", 10)
    assert canary.stdout.strip() == (
        "ticket-router: default version 1, canary version 2 for 10% of requests (generation 4); "
        "2 replicas applied the change"
    )
    shown = await aimass(servers.address, "models", "versions", "ticket-router")
    assert shown.stdout.splitlines()[3].split()[:3] == ["2", "CANARY", "10%"]

    promoted = await aimass(servers.address, "models", "promote", "ticket-router")
    assert promoted.stdout.strip() == (
        "ticket-router: default version 2, rollback goes to version 1 (generation 5); 2 replicas applied the change"
    )
    rolled = await aimass(servers.address, "models", "rollback", "ticket-router")
    assert rolled.stdout.strip() == "ticket-router: default version 1 (generation 6); 1 replica applied the change"
    undeployed = await aimass(servers.address, "models", "undeploy", "ticket-router")
    assert undeployed.stdout.strip() == "ticket-router: not serving; 2 replicas applied the change"
    request = servers.deployments.requests[-1]
    assert isinstance(request, deployments_pb2.UndeployModelRequest) and request.model.version == ""

    too_much = await aimass(servers.address, "models", "deploy", "ticket-router", "--version", "2", "--canary", "150")
    assert (
        too_much.returncode == 1
        and too_much.stderr.strip() == "INVALID_ARGUMENT: canary_percent is 150; allowed: 0 to 99"
    )
    missing = await aimass(servers.address, "models", "promote", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == "NOT_FOUND: no model named 'nope'"
    no_version = await aimass(servers.address, "models", "deploy", "ticket-router")
    assert no_version.returncode == 2 and "the following arguments are required: --version" in no_version.stderr


async def test_export_writes_the_zip_and_checks_its_sha256(servers: TestServers, tmp_path: Path) -> None:
    target = tmp_path / "ticket-router.zip"
    ran = await aimass(servers.address, "models", "export", "ticket-router", "--version", "2", "-o", str(target))
    assert ran.returncode == 0, ran.stderr
    data = servers.deployments.export
    assert target.read_bytes() == data
    assert zipfile.ZipFile(target).namelist() == ["model.onnx", "labels.json", "example.py"]
    assert f"wrote {target} (" in ran.stdout and f"sha256 {hashlib.sha256(data).hexdigest()} verified" in ran.stdout
    request = servers.deployments.requests[-1]
    assert isinstance(request, deployments_pb2.ExportModelRequest)
    assert request.model.version == "2" and request.format == deployments_pb2.EXPORT_FORMAT_ONNX
    receiving = [line for line in ran.stderr.splitlines() if line.startswith("receiving ticket-router.zip")]
    assert receiving and "100%" in receiving[-1]
    assert names(tmp_path) == ["ticket-router.zip"]  # no partial file left

    # A folder: the server's file name in it.
    folder = tmp_path / "exports"
    folder.mkdir()
    into = await aimass(servers.address, "models", "export", "ticket-router", "-o", str(folder))
    assert into.returncode == 0, into.stderr
    assert (folder / "ticket-router-v1.zip").read_bytes() == data


async def test_a_damaged_export_leaves_no_file(servers: TestServers, tmp_path: Path) -> None:
    target = tmp_path / "damaged.zip"
    ran = await aimass(servers.address, "models", "export", "damaged", "-o", str(target))
    assert ran.returncode == 1
    actual = hashlib.sha256(servers.deployments.export).hexdigest()
    claimed = hashlib.sha256(b"other bytes").hexdigest()
    assert ran.stderr.strip().splitlines()[-1] == (
        f"error: the received file's SHA-256 is {actual}, the server's {claimed}: it was damaged on the way; "
        "no file written, try again"
    )
    assert names(tmp_path) == []


async def test_an_unreachable_gateway_says_where_it_looked() -> None:
    address = f"127.0.0.1:{free_port()}"
    ran = await aimass(address, "jobs", "list")
    assert ran.returncode == 1
    assert ran.stderr.startswith("UNAVAILABLE: ")
    assert ran.stderr.strip().endswith(f"(gateway {address}: is the mesh up? see `aimass status`)")


# -- models: the catalogue, on the session's mesh -------------------------------------------------------------------


def catalogue_rows(stdout: str) -> dict[str, list[str]]:
    """`models list`'s table by model name (OWNER is blank for the mesh's own models: those rows have 5 cells)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODALITY", "VERSIONS", "DEFAULT", "OWNER", "IS_DEFAULT"]
    return {line.split()[0]: line.split() for line in lines[1:]}


def replica_rows(stdout: str) -> list[list[str]]:
    """The replicas table of `models describe` (after its "replicas:" line), split on runs of 2+ spaces."""
    lines = stdout.splitlines()
    start = lines.index("replicas:") + 1
    assert lines[start].split() == ["INSTANCE", "NODE", "DEVICE", "VERSION", "STATE", "LOADED", "MEMORY"]
    return [[cell for cell in line.split("  ") if cell.strip()] for line in lines[start + 1 :] if line.strip()]


async def test_models_list_shows_the_catalogue_with_filters_and_json(mesh: LocalMesh) -> None:
    listed = await aimass(mesh.gateway, "models", "list", key=mesh.api_key)
    assert listed.returncode == 0, listed.stderr
    rows = catalogue_rows(listed.stdout)
    assert rows["vader"] == ["vader", "text", "1", "1", "yes"]
    assert rows["all-MiniLM-L6-v2"] == ["all-MiniLM-L6-v2", "text", "1", "1", "yes"]
    assert rows["efficientnet-lite0"][:2] == ["efficientnet-lite0", "vision"]

    vision = catalogue_rows(
        (await aimass(mesh.gateway, "models", "list", "--service", "vision", key=mesh.api_key)).stdout
    )
    assert set(vision) == {"efficientnet-lite0", "mtcnn", "pp-ocr"}
    text = await aimass(mesh.gateway, "models", "list", "--modality", "text", "--loaded", "--json", key=mesh.api_key)
    assert text.returncode == 0, text.stderr
    models = json.loads(text.stdout)["models"]
    mesh_own = [m for m in models if not m["owner"]]
    assert {m["name"] for m in mesh_own} == {"all-MiniLM-L6-v2", "en_core_web_sm", "vader"}
    assert {m["modality"] for m in models} == {"MODALITY_TEXT"}
    none = await aimass(mesh.gateway, "models", "list", "--modality", "llm", key=mesh.api_key)
    assert none.returncode == 0 and none.stdout.strip() == "no models match"
    bad = await aimass(mesh.gateway, "models", "list", "--modality", "sound", key=mesh.api_key)
    assert bad.returncode == 2 and "invalid choice: 'sound'" in bad.stderr

    # Reading the catalogue is for every key; the existing `models versions` is still there beside it.
    reader = await aimass(mesh.gateway, "models", "list", key=key_for("acme"))
    assert reader.returncode == 0 and "vader" in catalogue_rows(reader.stdout)


async def test_models_describe_shows_the_replicas_and_an_unknown_model_is_not_found(mesh: LocalMesh) -> None:
    described = await aimass(mesh.gateway, "models", "describe", "vader", key=mesh.api_key)
    assert described.returncode == 0, described.stderr
    lines = described.stdout.splitlines()
    assert lines[0] == "vader (text, the mesh's own, default model of its methods)"
    assert "methods: aimass.v1.NlpService/Sentiment" in lines and "default version: 1" in lines
    [replica] = replica_rows(described.stdout)
    instance, node, device, version, state, loaded, memory = replica
    assert instance.startswith("nlp-") and node != "-" and device.startswith("CPU/")
    assert (version, state, loaded) == ("1", "SERVING", "LOADED") and memory.endswith("B")

    as_json = json.loads((await aimass(mesh.gateway, "models", "describe", "vader", "--json", key=mesh.api_key)).stdout)
    assert as_json["model"]["replicas"][0]["loaded"] is True
    assert as_json["model"]["replicas"][0]["device"]["kind"] == "DEVICE_KIND_CPU"

    missing = await aimass(mesh.gateway, "models", "describe", "gpt-9", key=mesh.api_key)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("NOT_FOUND (MODEL_NOT_FOUND): model 'gpt-9' is not served by any replica")
    no_version = await aimass(mesh.gateway, "models", "describe", "vader", "--version", "7", key=mesh.api_key)
    assert no_version.returncode == 1 and no_version.stderr.startswith("NOT_FOUND")
    assert "'vader' has no version '7'" in no_version.stderr


async def test_models_load_and_unload_need_the_admin_scope(mesh: LocalMesh) -> None:
    reader = key_for("acme")
    for command in ("load", "unload"):
        refused = await aimass(mesh.gateway, "models", command, "vader", key=reader)
        assert refused.returncode == 1 and refused.stdout == ""
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("PERMISSION_DENIED (MISSING_SCOPE): ")
        assert f"may not call /aimass.v1.ModelService/{command.capitalize()}Model" in last and "models:admin" in last
    bad_device = await aimass(mesh.gateway, "models", "load", "vader", "--device", "tpu", key=mesh.api_key)
    assert bad_device.returncode == 2 and "'tpu' is not a device: cpu, gpu or gpu:INDEX" in bad_device.stderr


async def test_models_unload_then_load_back_with_the_admin_key(mesh: LocalMesh) -> None:
    described = await aimass(mesh.gateway, "models", "describe", "vader", key=mesh.api_key)
    [[instance, *_]] = replica_rows(described.stdout)
    try:
        unloaded = await aimass(mesh.gateway, "models", "unload", "vader", "--instance", instance, key=mesh.api_key)
        assert unloaded.returncode == 0, unloaded.stderr
        assert unloaded.stderr.splitlines()[0] == "unloading vader…"
        out = unloaded.stdout.splitlines()
        assert out[0].startswith(f"unloaded vader version 1 from {instance}, node ") and "CPU/" in out[0]
        assert out[1].endswith("freed in " + out[1].rsplit(" ", 1)[-1]) and out[1].rsplit(" ", 1)[-1].endswith("s")
        after = await aimass(mesh.gateway, "models", "describe", "vader", key=mesh.api_key)
        assert [row[5] for row in replica_rows(after.stdout)] == ["NOT LOADED"]
        loaded_only = await aimass(mesh.gateway, "models", "list", "--loaded", key=mesh.api_key)
        assert "vader" not in catalogue_rows(loaded_only.stdout)
        again = await aimass(mesh.gateway, "models", "unload", "vader", key=mesh.api_key)
        assert again.returncode == 0 and again.stdout.strip() == "vader was loaded nowhere matching; nothing changed"
    finally:
        loaded = await aimass(
            mesh.gateway, "models", "load", "vader", "--instance", instance, "--timeout", "2m", key=mesh.api_key
        )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr.splitlines()[0] == "loading vader…"
    assert loaded.stdout.startswith(f"loaded vader version 1 on {instance}, node ")
    assert loaded.stdout.strip().endswith("s")
    back = await aimass(mesh.gateway, "models", "describe", "vader", key=mesh.api_key)
    [row] = replica_rows(back.stdout)
    assert (row[0], row[5]) == (instance, "LOADED")
    twice = await aimass(mesh.gateway, "models", "load", "vader", "--instance", instance, key=mesh.api_key)
    assert twice.returncode == 0 and "was already loaded on" in twice.stdout and "nothing changed" in twice.stdout
