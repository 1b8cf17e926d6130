"""The trainer process (services/trainer): a real trainer server on loopback, called over mesh mTLS as the scheduler
calls it (TrainerService.RunJob), fetching a real dataset file from a real BlobService (the control plane's blob
store) and storing what it trained there, on the real all-MiniLM-L6-v2 backbone."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass import cli, pki
from aimass.datasets.samples import TICKET_LABELS, digits_zip, tickets_csv
from aimass.runtime.config import RegistryConfig, SchedulerConfig, ServerConfig, Settings, TrainerConfig
from aimass.runtime.discovery import Instance
from aimass.runtime.identity import ANY_REPLICA, MeshPolicy, MeshPolicyInterceptor, mesh_channel
from aimass.runtime.interceptors import ErrorMappingInterceptor
from aimass.runtime.server import ServerRunner
from aimass.store.blobs import BlobStore
from aimass.training.artifact import IMAGE_BACKBONE, TEXT_BACKBONE, HeadArtifact
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    scheduler_pb2,
    training_pb2,
)
from scheduler.lifecycle.blobs import BlobServicer
from scheduler.lifecycle.job_placement import trainer_slots
from services.nlp.engine import NlpEngine
from services.trainer.app import TrainerApp, TrainerRole, build_runner
from services.trainer.runner import PeakMemory, read_rss_bytes
from tests.eventually import eventually
from tests.inprocess_mesh import InProcessMesh, in_process_mesh
from tests.security import credentials, settings

SORTED_LABELS = sorted(TICKET_LABELS)
STAGES = ["fetching data", "extracting features", "training", "evaluating", "saving"]
TICKETS = 300
# What one PutBlob may hold on the scheduler (1 GiB unless uploads may be larger): an edge export is ~90 MB.
MAX_BLOB_BYTES = 1 << 30


class ControlPlane:
    """The scheduler's side of a job: its BlobService (over a real blob store, on mesh mTLS), and its certificate."""

    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root / "blobs")
        self.credentials = credentials("scheduler")
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = grpc.aio.server(
            interceptors=[
                # As the scheduler's listener: any mesh process fetches, only trainers store.
                MeshPolicyInterceptor(
                    MeshPolicy(
                        {
                            "/aimass.v1.BlobService/FetchBlob": (ANY_REPLICA,),
                            "/aimass.v1.BlobService/PutBlob": ("trainer",),
                        }
                    )
                ),
                ErrorMappingInterceptor(),
            ]
        )
        lifecycle_pb2_grpc.add_BlobServiceServicer_to_server(BlobServicer(self.store, MAX_BLOB_BYTES), self.server)
        port = self.server.add_secure_port("127.0.0.1:0", self.credentials.server_credentials())
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture(scope="module")
async def control_plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    await plane.start()
    yield plane
    await plane.stop()


@pytest.fixture(scope="module")
def trainer_identity() -> None:
    """The trainer's mesh certificate (role and name "trainer"), as `aimass certs issue` makes it."""
    pki.issue(settings().pki_dir, role="trainer", name="trainer")


@pytest.fixture(scope="module")
async def trainer(
    control_plane: ControlPlane, trainer_identity: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerRunner]:
    """A trainer process's server (one job at a time), built as `python -m services.trainer` builds it."""
    base = settings()
    quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
    trainer_settings = Settings(
        state_dir=base.state_dir,
        registry=RegistryConfig(address=control_plane.address),
        scheduler=SchedulerConfig(address=control_plane.address),
        trainer=TrainerConfig(
            server=quick, max_jobs=1, device="cpu", cache_dir=tmp_path_factory.mktemp("trainer-cache")
        ),
    )
    runner = build_runner(trainer_settings, register=False)
    await runner.start()
    yield runner
    await runner.drain()


@pytest.fixture(scope="module")
async def scheduler_channel(trainer: ServerRunner) -> AsyncIterator[grpc.aio.Channel]:
    """The trainer as the scheduler dials it: mesh mTLS with the scheduler's certificate, expecting a trainer."""
    channel = mesh_channel(trainer.address, credentials("scheduler"), server_role="trainer")
    yield channel
    await channel.close()


@pytest.fixture(scope="module")
def tickets(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tickets_csv(tmp_path_factory.mktemp("data") / "tickets.csv", rows=TICKETS, seed=1)
    return control_plane.store.put_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def few_tickets(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tickets_csv(tmp_path_factory.mktemp("data") / "few-tickets.csv", rows=80, seed=2)
    return control_plane.store.put_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def digits(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = digits_zip(tmp_path_factory.mktemp("data") / "digits.zip", per_class=12)
    return control_plane.store.put_bytes(path.read_bytes())


def job_request(
    dataset_sha256: str,
    job_id: str,
    *,
    dataset_format: int = datasets_pb2.DATASET_FORMAT_CSV,
    task: int = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
    base_model: str = TEXT_BACKBONE,
    **hyper: Any,
) -> lifecycle_pb2.RunJobRequest:
    return lifecycle_pb2.RunJobRequest(
        job=training_pb2.TrainingJob(
            job_id=job_id,
            owner="acme",
            task=task,  # type: ignore[arg-type]
            base_model=base_model,
            model_name="ticket-router",
            dataset_sha256=dataset_sha256,
            hyperparameters=training_pb2.Hyperparameters(**hyper),
        ),
        dataset_sha256=dataset_sha256,
        dataset_format=dataset_format,  # type: ignore[arg-type]
        text_column="text",
        label_column="label",
    )


def stub(channel: grpc.aio.Channel) -> lifecycle_pb2_grpc.TrainerServiceAsyncStub:
    return lifecycle_pb2_grpc.TrainerServiceStub(channel)


async def run_to_end(
    channel: grpc.aio.Channel, request: lifecycle_pb2.RunJobRequest
) -> tuple[list[tuple[float, lifecycle_pb2.RunJobResponse]], float]:
    """Every update with the time it arrived, and the job's duration."""
    started = time.monotonic()
    updates = [(time.monotonic(), update) async for update in stub(channel).RunJob(request, timeout=300)]
    return updates, time.monotonic() - started


async def test_a_job_streams_its_progress_and_ends_with_a_stored_evaluated_model(
    scheduler_channel: grpc.aio.Channel, control_plane: ControlPlane, tickets: str
) -> None:
    request = job_request(tickets, "job-1", epochs=40, seed=7)
    request.previous.CopyFrom(training_pb2.Evaluation(accuracy=0.5, macro_f1=0.4))
    request.previous_version = "3"
    timed, duration = await run_to_end(scheduler_channel, request)
    updates = [update for _, update in timed]

    *progress, last = updates
    assert last.HasField("result") and not any(u.HasField("result") for u in progress)
    # Every stage, in order; progress over the whole job never goes back; epochs count up to the last one.
    seen = [u.stage for u in progress]
    assert sorted(set(seen), key=STAGES.index) == [s for s in STAGES if s in seen]
    assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s] == [s for s in STAGES if s in seen]
    assert {"fetching data", "extracting features", "training"} <= set(seen)
    fractions = [u.progress for u in updates]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] == pytest.approx(1.0)
    epochs = [u.epoch for u in progress if u.stage == "training" and u.epoch]
    # The last epoch is always told (with its loss) before evaluation starts.
    assert epochs and epochs == sorted(epochs) and set(epochs) <= set(range(1, 41)) and epochs[-1] == 40
    assert all(u.loss > 0 for u in progress if u.epoch)
    # After training, every update keeps the last epoch and its loss.
    after = updates[seen.index("evaluating") :]
    assert all(u.epoch == 40 and u.loss == after[0].loss > 0 for u in after)
    # Every update carries the whole loss curve so far (one per epoch, the last the update's own loss), so a
    # watcher that saw a few updates still has every epoch; the last has all 40.
    assert all(len(u.epoch_losses) == u.epoch and (not u.epoch or u.epoch_losses[-1] == u.loss) for u in updates)
    assert len(last.epoch_losses) == 40 and all(loss > 0 for loss in last.epoch_losses)
    assert all(u.eta_seconds >= 0 for u in progress)
    # At most about 4 updates a second, beside one per stage change.
    assert len(updates) <= 4 * duration + len(STAGES) + 2

    result = last.result
    evaluation = result.evaluation
    # Five classes, the largest a quarter of the tickets: guessing it is right about a quarter of the time.
    assert evaluation.accuracy >= 0.8 and evaluation.macro_f1 >= 0.75
    # 20% of each class held out.
    assert evaluation.eval_rows + evaluation.train_rows == TICKETS and 55 <= evaluation.eval_rows <= 65
    assert list(evaluation.labels) == SORTED_LABELS
    assert sum(evaluation.confusion) == evaluation.eval_rows
    assert evaluation.previous_version == "3"
    assert evaluation.accuracy_delta == pytest.approx(evaluation.accuracy - 0.5)
    assert list(result.labels) == SORTED_LABELS
    assert result.peak_memory_bytes > 100 << 20  # the process with MiniLM loaded holds well over 100 MiB

    # The artifact is in the control plane's blob store and loads as a head of the recorded facts.
    artifact = control_plane.store.read_bytes(result.artifact_sha256)
    assert len(artifact) == result.artifact_bytes and hashlib.sha256(artifact).hexdigest() == result.artifact_sha256
    head = HeadArtifact.from_bytes(artifact)
    assert head.labels == tuple(result.labels) and head.base_model == TEXT_BACKBONE
    assert head.info["seed"] == 7 and head.info["dataset_sha256"] == tickets
    assert head.info["code_version"] and head.info["hyperparameters"]["epochs"] == 40
    assert head.info["hyperparameters"]["learning_rate"] == 0.01 and head.info["hyperparameters"]["batch_size"] == 64

    # So is the edge export, a ZIP with the ONNX model.
    export = control_plane.store.read_bytes(result.export_sha256)
    assert len(export) == result.export_bytes
    with zipfile.ZipFile(io.BytesIO(export)) as archive:
        assert any(name.endswith("model.onnx") for name in archive.namelist())


async def test_the_same_seed_and_data_give_the_same_model(
    scheduler_channel: grpc.aio.Channel, control_plane: ControlPlane, few_tickets: str
) -> None:
    first, _ = await run_to_end(scheduler_channel, job_request(few_tickets, "job-a", epochs=5, seed=3))
    second, _ = await run_to_end(scheduler_channel, job_request(few_tickets, "job-b", epochs=5, seed=3))
    other, _ = await run_to_end(scheduler_channel, job_request(few_tickets, "job-c", epochs=5, seed=4))
    a, b, c = (
        HeadArtifact.from_bytes(control_plane.store.read_bytes(run[-1][1].result.artifact_sha256))
        for run in (first, second, other)
    )
    assert (a.weight == b.weight).all() and (a.bias == b.bias).all()
    # Byte for byte: one blob.
    assert first[-1][1].result.artifact_sha256 == second[-1][1].result.artifact_sha256
    assert not (a.weight == c.weight).all()


async def test_bad_data_is_refused_invalid_argument_with_the_reason(
    scheduler_channel: grpc.aio.Channel, control_plane: ControlPlane, tickets: str
) -> None:
    no_label = control_plane.store.put_bytes(b"text,team\nrefund please,billing\nparcel lost,shipping\n" * 20)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(scheduler_channel, job_request(no_label, "job-bad"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "label" in (caught.value.details() or "")

    # Out-of-range hyperparameters: the message gives the range.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(scheduler_channel, job_request(tickets, "job-range", epochs=501))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "epochs" in (caught.value.details() or "") and "1-500" in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(scheduler_channel, job_request("../../etc/passwd", "job-path"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a SHA-256" in (caught.value.details() or "")

    # A dataset blob the control plane does not have.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(scheduler_channel, job_request("0" * 64, "job-gone"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_one_job_too_many_is_refused_and_a_cancelled_job_stops(
    scheduler_channel: grpc.aio.Channel, trainer: ServerRunner, tickets: str, few_tickets: str
) -> None:
    app = trainer.app
    assert isinstance(app, TrainerApp) and app.trainer is not None
    slots = app.trainer.slots
    # Long: 500 epochs of one-example batches (~100,000 steps).
    call = stub(scheduler_channel).RunJob(job_request(tickets, "job-long", epochs=500, batch_size=1), timeout=300)
    async for update in call:
        if update.stage == "training" and update.epoch >= 1:
            break
    else:
        pytest.fail("the long job ended before training")

    # The trainer runs one job at a time: another is refused at once, and the scheduler queues it again.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(scheduler_channel, job_request(few_tickets, "job-extra", epochs=5))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 1 job" in (caught.value.details() or "")

    cancelled_at = time.monotonic()
    call.cancel()
    # The job stops between two batches and frees its slot: a new job runs right after.
    await eventually("the cancelled job let go of its slot", lambda: not slots.running, timeout_s=10)
    assert time.monotonic() - cancelled_at < 5
    updates, _ = await run_to_end(scheduler_channel, job_request(few_tickets, "job-after"))
    assert updates[-1][1].HasField("result") and updates[-1][1].result.evaluation.eval_rows > 0


async def test_only_the_scheduler_may_run_jobs_and_gateways_see_no_models(trainer: ServerRunner, tickets: str) -> None:
    as_gateway = mesh_channel(trainer.address, credentials("gateway"), server_role="trainer")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run_to_end(as_gateway, job_request(tickets, "job-gw"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The gateway's mesh-wide ModelService asks every process it sees: a trainer answers, with no models.
        listed = await models_pb2_grpc.ModelServiceStub(as_gateway).ListModels(models_pb2.ListModelsRequest())
        assert list(listed.models) == []
    finally:
        await as_gateway.close()
    as_scheduler = mesh_channel(trainer.address, credentials("scheduler"), server_role="trainer")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await models_pb2_grpc.ModelServiceStub(as_scheduler).ListModels(models_pb2.ListModelsRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await as_scheduler.close()


def test_the_registry_labels_tell_the_scheduler_the_device_and_job_slots(trainer: ServerRunner) -> None:
    assert trainer.replica is not None
    labels = trainer.replica.labels()
    assert labels["device"] == "cpu" and labels["max_jobs"] == "1"
    assert trainer.replica.serving_models() == ()


def test_the_peak_memory_of_a_job_counts_what_it_freed_before_the_end() -> None:
    memory = PeakMemory(alone=True)
    before = read_rss_bytes()
    block = bytearray(256 << 20)  # zero-filled: every page touched
    del block
    assert read_rss_bytes() < before + (128 << 20)  # given back...
    assert memory.result() >= before + (250 << 20)  # ...yet the job's peak held it


async def test_an_image_job_trains_on_the_zips_folders(
    scheduler_channel: grpc.aio.Channel, control_plane: ControlPlane, digits: str
) -> None:
    request = job_request(
        digits,
        "job-digits",
        dataset_format=datasets_pb2.DATASET_FORMAT_IMAGE_FOLDERS_ZIP,
        task=datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION,
        base_model=IMAGE_BACKBONE,
        holdout_fraction=0.25,
    )
    updates, _ = await run_to_end(scheduler_channel, request)
    result = updates[-1][1].result
    assert list(result.labels) == [str(digit) for digit in range(10)]
    # Ten digits: chance is 0.1.
    assert result.evaluation.eval_rows == 30 and result.evaluation.accuracy >= 0.5
    head = HeadArtifact.from_bytes(control_plane.store.read_bytes(result.artifact_sha256))
    assert head.base_model == IMAGE_BACKBONE and head.info["hyperparameters"]["epochs"] == 40


def trainers_seen(mesh: InProcessMesh) -> list[Instance]:
    """The trainers the mesh's gateway knows of."""
    return [r.instance for r in mesh.gateway_app().replicas.all_healthy() if r.instance.kind == "trainer"]


async def test_a_trainer_in_the_mesh_leaves_the_model_catalogue_and_status_whole(
    nlp_engine: NlpEngine, trainer_identity: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registered trainer: the scheduler sees it (kind, job slots), the gateway's mesh-wide ListModels still
    answers with every replica's models, and `aimass status` lists it without asking the gateway for its health."""
    async for mesh in in_process_mesh(nlp_engine):
        quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
        runner = build_runner(
            mesh.settings.model_copy(
                update={"trainer": TrainerConfig(server=quick, max_jobs=2, device="cpu", cache_dir=tmp_path)}
            )
        )
        await runner.start()
        try:
            await eventually("the gateway saw the trainer", functools.partial(trainers_seen, mesh))
            trainer = trainers_seen(mesh)[0]
            assert trainer.labels["max_jobs"] == "2" and trainer.labels["device"].endswith("cpu")
            assert trainer.services == ("aimass.v1.TrainerService",) and not trainer.models

            async with mesh.channel() as channel:
                listed = await models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest())
            names = {model.name for model in listed.models}
            assert {"all-MiniLM-L6-v2", "vader"} <= names

            assert mesh.scheduler is not None
            code = await cli.status(argparse.Namespace(registry=mesh.scheduler.address, gateway=mesh.gateway))
            out = capsys.readouterr().out
            assert code == 0
            assert any(line.split()[:1] == ["trainer"] and "TrainerService" in line for line in out.splitlines())
            health = out.split("HEALTH VIA GATEWAY", 1)[1]
            assert "aimass.v1.NlpService  SERVING" in health and "TrainerService" not in health
        finally:
            await runner.drain()


def test_a_gpu_trainer_is_placed_by_its_gpu_memory_from_its_own_labels() -> None:
    """The labels a trainer on a GPU registers with, read by the scheduler's job placement."""
    gib = 1 << 30
    gpu_settings = Settings(
        scheduler=SchedulerConfig(address="127.0.0.1:1", node_id="g"),
        trainer=TrainerConfig(device="cuda", max_jobs=3),
    )
    app = TrainerApp(gpu_settings, credentials=None)
    labels = TrainerRole(app, scheduler_config=gpu_settings.scheduler, credentials=None).labels()
    assert labels == {"node": "g", "device": "gpu:0", "max_jobs": "3"}
    instance = Instance(
        instance_id="trainer-g",
        kind="trainer",
        services=("aimass.v1.TrainerService",),
        address="127.0.0.1:1",
        labels=labels,
        state=common_pb2.SERVING_STATE_SERVING,
    )
    readings = scheduler_pb2.NodeView(
        node_id="g",
        devices=[
            scheduler_pb2.NodeDevice(
                device_id=f"g/{kind_name}",
                info=common_pb2.DeviceInfo(kind=kind, memory_total_bytes=80 * gib, memory_used_bytes=80 * gib - free),
            )
            for kind_name, kind, free in (
                ("cpu", common_pb2.DEVICE_KIND_CPU, 2 * gib),
                ("gpu:0", common_pb2.DEVICE_KIND_GPU, 30 * gib),
            )
        ],
    )
    [slot] = trainer_slots([instance], {"g": readings}, {})
    assert slot.capacity == 3 and slot.free_bytes == 30 * gib
