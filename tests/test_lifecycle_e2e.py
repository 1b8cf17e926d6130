"""A tenant's own models end to end on a mesh started by `aimass up` (scheduler, gateway, NLP and vision replicas,
a trainer; real processes and real models): upload, validate, train, evaluate, deploy, call, canary, promote,
rollback, export, and every refusal on the way, through the gateway with tenants' keys."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aimass.datasets.samples import digits_zip, tickets_csv
from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    datasets_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    nlp_pb2,
    nlp_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from tests.eventually import eventually_value
from tests.security import key_for

TRAIN_SCOPES = (keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN)
CHUNK = 1 << 20
JOB_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def acme(mesh: LocalMesh) -> Iterator[grpc.Channel]:
    with mesh.channel(key_for("acme", TRAIN_SCOPES)) as channel:
        yield channel


@pytest.fixture(scope="module")
def beta(mesh: LocalMesh) -> Iterator[grpc.Channel]:
    with mesh.channel(key_for("beta", TRAIN_SCOPES)) as channel:
        yield channel


def upload(
    channel: grpc.Channel, path: Path, name: str, task: int, *, fmt: int = 0, size: int | None = None
) -> datasets_pb2.UploadDatasetResponse:
    data = path.read_bytes()

    def requests() -> Iterator[datasets_pb2.UploadDatasetRequest]:
        yield datasets_pb2.UploadDatasetRequest(
            header=datasets_pb2.UploadDatasetHeader(
                name=name,
                task=task,  # type: ignore[arg-type]
                format=fmt,  # type: ignore[arg-type]
                size_bytes=len(data) if size is None else size,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        for start in range(0, len(data), CHUNK):
            yield datasets_pb2.UploadDatasetRequest(chunk=data[start : start + CHUNK])

    response: datasets_pb2.UploadDatasetResponse = datasets_pb2_grpc.DatasetServiceStub(channel).UploadDataset(
        requests(), timeout=120
    )
    return response


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        if callable(call):
            call()
    assert isinstance(caught.value, grpc.RpcError)
    return caught.value


def train(channel: grpc.Channel, dataset: str, model: str, **hyper: float) -> training_pb2.TrainingJob:
    """Starts a job and watches it to its end; the updates seen, in order, are checked for sense."""
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    started = stub.StartTraining(
        training_pb2.StartTrainingRequest(
            dataset=datasets_pb2.DatasetRef(name=dataset),
            model_name=model,
            hyperparameters=training_pb2.Hyperparameters(**hyper),  # type: ignore[arg-type]
        ),
        timeout=30,
    ).job
    assert started.state == training_pb2.JOB_STATE_QUEUED and started.job_id
    seen: list[training_pb2.TrainingJob] = []
    for update in stub.WatchTraining(training_pb2.WatchTrainingRequest(job_id=started.job_id), timeout=JOB_TIMEOUT_S):
        seen.append(update.job)
    final = seen[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final
    progress = [j.progress for j in seen if j.state == training_pb2.JOB_STATE_RUNNING]
    assert progress == sorted(progress), "progress never goes back"
    assert {"training", "evaluating"} <= {j.stage for j in seen}, [j.stage for j in seen]
    assert max(j.epoch for j in seen) == final.hyperparameters.epochs
    # The finished job keeps its whole loss curve, one point per epoch.
    assert len(final.epoch_losses) == final.hyperparameters.epochs and final.epoch_losses[-1] == final.loss
    return final


def classify_texts(
    channel: grpc.Channel, model: str, texts: list[str], *, version: str = "", request_id: str = ""
) -> nlp_pb2.ClassifyResponse:
    metadata = (("x-request-id", request_id),) if request_id else ()
    response: nlp_pb2.ClassifyResponse = nlp_pb2_grpc.NlpServiceStub(channel).Classify(
        nlp_pb2.ClassifyRequest(texts=texts, model=common_pb2.ModelRef(name=model, version=version)),
        timeout=30,
        metadata=metadata,
    )
    return response


def top_labels(response: nlp_pb2.ClassifyResponse) -> list[str]:
    return [c.scores[0].label for c in response.results]


@pytest.fixture(scope="module")
def tickets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tickets_csv(tmp_path_factory.mktemp("data") / "tickets.csv", rows=1000, seed=1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Texts the model never saw (another seed of the same generator), with their labels."""
    path = tickets_csv(tmp_path_factory.mktemp("data") / "unseen.csv", rows=200, seed=99)
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return [(row["text"], row["label"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ticket_router(acme: grpc.Channel, tickets: Path) -> training_pb2.TrainingJob:
    uploaded = upload(acme, tickets, "support-tickets", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION)
    assert uploaded.report.rows_read == 1000 and uploaded.report.rows_kept >= 900
    assert len(uploaded.report.classes) >= 4
    job = train(acme, "support-tickets", "ticket-router")
    assert job.model_version == "1"
    return job


def test_upload_validates_and_versions_by_content(acme: grpc.Channel, tickets: Path, tmp_path: Path) -> None:
    first = upload(acme, tickets, "tickets-versioned", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION)
    again = upload(acme, tickets, "tickets-versioned", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION)
    assert again.already_existed and again.version.sha256 == first.version.sha256
    assert again.version.version == hashlib.sha256(tickets.read_bytes()).hexdigest()[:12]
    # A file with bad rows: the rows are dropped and reported, the rest kept.
    messy = tmp_path / "messy.csv"
    good = tickets.read_text(encoding="utf-8").splitlines()
    messy.write_text("\n".join([*good[:200], '"",billing', "a text without a label,", good[5]]) + "\n")
    report = upload(acme, messy, "tickets-versioned", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION).report
    assert report.issue_counts["EMPTY_TEXT"] == 1 and report.issue_counts["MISSING_LABEL"] == 1
    assert report.issue_counts["DUPLICATE"] >= 1 and report.rows_dropped >= 3
    described = datasets_pb2_grpc.DatasetServiceStub(acme).DescribeDataset(
        datasets_pb2.DescribeDatasetRequest(dataset=datasets_pb2.DatasetRef(name="tickets-versioned"), preview_rows=3)
    )
    assert len(described.dataset.versions) == 2 and len(described.preview) == 3


def test_bad_datasets_are_refused_and_nothing_is_stored(acme: grpc.Channel, tmp_path: Path) -> None:
    stub = datasets_pb2_grpc.DatasetServiceStub(acme)
    before = stub.ListDatasets(datasets_pb2.ListDatasetsRequest())
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(5000))
    err = refused(lambda: upload(acme, corrupt, "bad-zip", datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "zip" in (err.details() or "").lower()
    no_label = tmp_path / "no-label.csv"
    no_label.write_text("text,category\nhello there,a\n")
    err = refused(lambda: upload(acme, no_label, "no-label", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in (err.details() or "")
    one_class = tmp_path / "one-class.csv"
    one_class.write_text("text,label\n" + "".join(f"ticket number {i},billing\n" for i in range(50)))
    err = refused(lambda: upload(acme, one_class, "one-class", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "two classes" in (err.details() or "")
    # A 2 GB upload past the quota is refused from its header, before a byte of it is sent.
    err = refused(lambda: upload(acme, one_class, "huge", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION, size=2 << 30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ListDatasets(datasets_pb2.ListDatasetsRequest()) == before


def test_a_trained_text_model_serves_by_name_and_beats_chance(
    acme: grpc.Channel, ticket_router: training_pb2.TrainingJob, held_out: list[tuple[str, str]]
) -> None:
    evaluation = ticket_router.evaluation
    classes = len(evaluation.labels)
    assert evaluation.accuracy > 0.8 > 2 / classes and evaluation.macro_f1 > 0.75
    assert sum(evaluation.confusion) == evaluation.eval_rows and evaluation.eval_rows >= 150
    deployments = deployments_pb2_grpc.DeploymentServiceStub(acme)
    deployed = deployments.DeployModel(
        deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="ticket-router", version="1")), timeout=60
    )
    assert deployed.model.deployment.default_version == "1" and deployed.replicas_applied >= 1
    texts = [text for text, _ in held_out]
    response = classify_texts(acme, "ticket-router", texts)
    assert response.model.name == "ticket-router" and response.model.version == "1"
    assert {s.label for s in response.results[0].scores} == set(evaluation.labels)
    correct = sum(p == label for p, (_, label) in zip(top_labels(response), held_out, strict=True))
    assert correct / len(held_out) > 0.8


def test_versions_canary_promote_and_rollback_lose_no_request(
    acme: grpc.Channel, ticket_router: training_pb2.TrainingJob
) -> None:
    second = train(acme, "support-tickets", "ticket-router", seed=7, epochs=30)
    assert second.model_version == "2" and second.evaluation.previous_version == "1"
    deployments = deployments_pb2_grpc.DeploymentServiceStub(acme)
    models = deployments.ListCustomModels(
        deployments_pb2.ListCustomModelsRequest(model=common_pb2.ModelRef(name="ticket-router"))
    ).models
    assert [v.version for v in models[0].versions] == ["1", "2"]
    assert models[0].versions[1].dataset.name == "support-tickets" and models[0].versions[1].job_id == second.job_id
    # Canary: 10 % of requests (by request id) on version 2.
    deployments.DeployModel(
        deployments_pb2.DeployModelRequest(
            model=common_pb2.ModelRef(name="ticket-router", version="2"), canary_percent=10
        ),
        timeout=60,
    )
    answered = Counter(
        classify_texts(acme, "ticket-router", ["my invoice is wrong"], request_id=f"canary-{i}").model.version
        for i in range(1000)
    )
    assert 50 <= answered["2"] <= 150, answered
    again = {classify_texts(acme, "ticket-router", ["x"], request_id="canary-7").model.version for _ in range(5)}
    assert len(again) == 1  # one request id, one version
    assert classify_texts(acme, "ticket-router", ["x"], version="1").model.version == "1"

    # Promote and roll back while calls run: every call is answered, by one version or the other.
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def call_until_stopped() -> None:
        while not stop.is_set():
            try:
                answer = classify_texts(acme, "ticket-router", ["reset my password"]).model.version
            except grpc.RpcError as e:
                answer = e.code().name
            with lock:
                outcomes[answer] += 1

    callers = [threading.Thread(target=call_until_stopped) for _ in range(4)]
    for caller in callers:
        caller.start()
    time.sleep(1)
    deployments.PromoteModel(
        deployments_pb2.PromoteModelRequest(model=common_pb2.ModelRef(name="ticket-router")), timeout=60
    )
    time.sleep(1)
    deployments.RollbackModel(
        deployments_pb2.RollbackModelRequest(model=common_pb2.ModelRef(name="ticket-router")), timeout=60
    )
    time.sleep(1)
    stop.set()
    for caller in callers:
        caller.join()
    assert set(outcomes) <= {"1", "2"} and outcomes["1"] and outcomes["2"], outcomes
    after = deployments.ListCustomModels(
        deployments_pb2.ListCustomModelsRequest(model=common_pb2.ModelRef(name="ticket-router"))
    ).models[0]
    assert after.deployment.default_version == "1" and not after.deployment.canary_version


def export(channel: grpc.Channel, model: str, version: str, path: Path) -> Path:
    chunks = list(
        deployments_pb2_grpc.DeploymentServiceStub(channel).ExportModel(
            deployments_pb2.ExportModelRequest(model=common_pb2.ModelRef(name=model, version=version)), timeout=300
        )
    )
    data = b"".join(c.data for c in chunks)
    assert chunks[0].filename == f"{model}-v{version}.zip" and chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(c.total_bytes == len(data) for c in chunks)
    path.write_bytes(data)
    return path


def run_example(folder: Path, *inputs: str) -> str:
    """The export's example script, run as someone without aimass would: isolated mode, from the export's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AIMASS"))}
    done = subprocess.run(
        [sys.executable, "-I", "example.py", *inputs], cwd=folder, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_export_runs_without_aimass_and_answers_as_served(
    acme: grpc.Channel, ticket_router: training_pb2.TrainingJob, held_out: list[tuple[str, str]], tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime  # type: ignore[import-untyped]
    from tokenizers import Tokenizer

    folder = tmp_path / "export"
    with zipfile.ZipFile(export(acme, "ticket-router", "1", tmp_path / "ticket-router.zip")) as z:
        assert {"model.onnx", "labels.json", "preprocess.json", "tokenizer.json", "example.py"} <= set(z.namelist())
        z.extractall(folder)
    labels = json.loads((folder / "labels.json").read_text())
    spec = json.loads((folder / "preprocess.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(int(spec.get("max_length", 256)))
    tokenizer.enable_padding()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = [text for text, _ in held_out]
    encoded = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
    if any(i.name == "token_type_ids" for i in session.get_inputs()):
        feeds["token_type_ids"] = np.array([e.type_ids for e in encoded], dtype=np.int64)
    probabilities = session.run(None, feeds)[0]
    exported = [labels[i] for i in probabilities.argmax(axis=1)]
    served = top_labels(classify_texts(acme, "ticket-router", texts, version="1"))
    agree = sum(a == b for a, b in zip(exported, served, strict=True)) / len(texts)
    assert agree >= 0.99, agree
    printed = run_example(folder, texts[0], texts[1])
    assert served[0] in printed and served[1] in printed


def test_tenants_see_only_their_own_until_shared(
    acme: grpc.Channel, beta: grpc.Channel, ticket_router: training_pb2.TrainingJob
) -> None:
    theirs = datasets_pb2.DatasetRef(name="support-tickets", owner="acme")
    missing = datasets_pb2.DatasetRef(name="no-such-dataset", owner="acme")
    beta_datasets = datasets_pb2_grpc.DatasetServiceStub(beta)
    assert all(d.owner != "acme" for d in beta_datasets.ListDatasets(datasets_pb2.ListDatasetsRequest()).datasets)
    answers = []
    for ref in (theirs, missing):
        err = refused(lambda ref=ref: beta_datasets.DescribeDataset(datasets_pb2.DescribeDatasetRequest(dataset=ref)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        answers.append(err.details() or "")
    assert answers[0] == answers[1].replace("no-such-dataset", "support-tickets")  # no hint that it exists
    beta_training = training_pb2_grpc.TrainingServiceStub(beta)
    err = refused(lambda: beta_training.StartTraining(training_pb2.StartTrainingRequest(dataset=theirs)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = refused(lambda: beta_training.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=ticket_router.job_id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = refused(lambda: classify_texts(beta, "ticket-router", ["my invoice is wrong"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    beta_deployments = deployments_pb2_grpc.DeploymentServiceStub(beta)
    assert not beta_deployments.ListCustomModels(deployments_pb2.ListCustomModelsRequest()).models
    err = refused(
        lambda: beta_deployments.DeployModel(
            deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="ticket-router", version="1"))
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Shared read-only: beta sees it and may train on it, but not delete it.
    acme_datasets = datasets_pb2_grpc.DatasetServiceStub(acme)
    acme_datasets.ShareDataset(datasets_pb2.ShareDatasetRequest(name="support-tickets", tenant="beta"))
    described = beta_datasets.DescribeDataset(datasets_pb2.DescribeDatasetRequest(dataset=theirs))
    assert described.dataset.owner == "acme" and not described.dataset.shared_with
    job = beta_training.StartTraining(
        training_pb2.StartTrainingRequest(dataset=theirs, model_name="beta-router"), timeout=30
    ).job
    assert job.owner == "beta" and job.dataset.owner == "acme"
    cancelled = beta_training.CancelTraining(training_pb2.CancelTrainingRequest(job_id=job.job_id)).job
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    err = refused(lambda: beta_datasets.DeleteDataset(datasets_pb2.DeleteDatasetRequest(dataset=theirs)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    acme_datasets.ShareDataset(datasets_pb2.ShareDatasetRequest(name="support-tickets", tenant="beta", revoke=True))
    err = refused(lambda: beta_datasets.DescribeDataset(datasets_pb2.DescribeDatasetRequest(dataset=theirs)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_the_model_catalogue_lists_a_tenants_own_models_to_that_tenant_only(
    mesh: LocalMesh, acme: grpc.Channel, beta: grpc.Channel, ticket_router: training_pb2.TrainingJob
) -> None:
    own = deployments_pb2_grpc.DeploymentServiceStub(acme).ListCustomModels(
        deployments_pb2.ListCustomModelsRequest(model=common_pb2.ModelRef(name="ticket-router"))
    )
    (custom,) = own.models
    catalogue = models_pb2_grpc.ModelServiceStub(acme)
    listed = catalogue.ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    by_name = {m.name: m for m in listed}
    assert [m.name for m in listed] == sorted(by_name)
    assert "all-MiniLM-L6-v2" in by_name and not by_name["all-MiniLM-L6-v2"].owner  # the mesh's own, still there
    assert not by_name["all-MiniLM-L6-v2"].HasField("custom")
    router = by_name["ticket-router"]
    assert router.owner == "acme" and router.custom == custom
    assert router.modality == models_pb2.MODALITY_TEXT
    assert list(router.services) == ["aimass.v1.NlpService"]
    assert list(router.methods) == ["aimass.v1.NlpService/Classify"]
    assert [(v.version, v.footprint_bytes) for v in router.versions] == [
        (v.version, v.artifact_bytes) for v in custom.versions
    ]
    assert all(v.footprint_bytes > 0 for v in router.versions)
    assert router.default_version == custom.deployment.default_version
    first = router.custom.versions[0]
    assert first.version == "1" and first.job_id == ticket_router.job_id  # lineage
    assert first.dataset.name == "support-tickets" and first.dataset.owner == "acme" and first.dataset_sha256
    assert first.base_model and first.evaluation.accuracy > 0.5 and first.evaluation.eval_rows > 0
    assert first.state != deployments_pb2.VERSION_STATE_UNSPECIFIED
    # The filters hold for custom models too.
    text = catalogue.ListModels(models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_TEXT), timeout=30).models
    assert "ticket-router" in {m.name for m in text}
    vision = catalogue.ListModels(models_pb2.ListModelsRequest(service="aimass.v1.VisionService"), timeout=30).models
    assert "ticket-router" not in {m.name for m in vision}
    named = catalogue.ListModels(
        models_pb2.ListModelsRequest(model=common_pb2.ModelRef(name="ticket-router")), timeout=30
    ).models
    assert [m.name for m in named] == ["ticket-router"]
    loaded = catalogue.ListModels(models_pb2.ListModelsRequest(loaded_only=True), timeout=30).models
    assert ("ticket-router" in {m.name for m in loaded}) == bool(custom.deployment.default_version)
    described = catalogue.DescribeModel(
        models_pb2.DescribeModelRequest(model=common_pb2.ModelRef(name="ticket-router", version="1")), timeout=30
    ).model
    assert described.owner == "acme" and described.custom == custom
    err = refused(
        lambda: catalogue.DescribeModel(
            models_pb2.DescribeModelRequest(model=common_pb2.ModelRef(name="ticket-router", version="999"))
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Another tenant sees none of it: not listed, and NOT_FOUND worded exactly like a name that does not exist.
    beta_catalogue = models_pb2_grpc.ModelServiceStub(beta)
    beta_listed = beta_catalogue.ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    assert "ticket-router" not in {m.name for m in beta_listed} and "all-MiniLM-L6-v2" in {m.name for m in beta_listed}
    assert all(m.owner in ("", "beta") for m in beta_listed)
    answers = []
    for name in ("ticket-router", "no-such-model"):
        err = refused(
            lambda name=name: beta_catalogue.DescribeModel(
                models_pb2.DescribeModelRequest(model=common_pb2.ModelRef(name=name)), timeout=30
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        answers.append(err.details() or "")
    assert answers[0] == answers[1].replace("no-such-model", "ticket-router")
    # A key of acme's without models:train sees the mesh's models only.
    with mesh.channel(key_for("acme", (keys.SCOPE_INFER,))) as infer_only:
        names = {
            m.name
            for m in models_pb2_grpc.ModelServiceStub(infer_only)
            .ListModels(models_pb2.ListModelsRequest(), timeout=30)
            .models
        }
    assert "ticket-router" not in names and "all-MiniLM-L6-v2" in names


def test_an_image_model_trained_on_a_zip_of_folders(acme: grpc.Channel, tmp_path: Path) -> None:
    archive = digits_zip(tmp_path / "digits.zip", per_class=30)
    uploaded = upload(acme, archive, "digits", datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION)
    assert uploaded.report.rows_kept == 300 and len(uploaded.report.classes) == 10
    job = train(acme, "digits", "digit-reader")
    assert job.base_model == "efficientnet-lite0" and job.evaluation.accuracy > 0.5 > 2 / 10
    deployments_pb2_grpc.DeploymentServiceStub(acme).DeployModel(
        deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="digit-reader", version="1")), timeout=60
    )
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if m.endswith(".png")][::20]  # 15: within one request's limit (16)
        images = [(m.split("/")[-2], z.read(m)) for m in members]
    reply = vision_pb2_grpc.VisionServiceStub(acme).Classify(
        vision_pb2.VisionServiceClassifyRequest(
            images=[vision_pb2.Image(data=data) for _, data in images],
            model=common_pb2.ModelRef(name="digit-reader"),
            top_k=3,
        ),
        timeout=60,
    )
    assert reply.model.version == "1"
    served = [result.labels[0].label for result in reply.results]
    assert sum(p == label for p, (label, _) in zip(served, images, strict=True)) / len(images) > 0.5
    # The export classifies the same images alike, with onnxruntime and Pillow only.
    folder = tmp_path / "export"
    with zipfile.ZipFile(export(acme, "digit-reader", "1", tmp_path / "digit-reader.zip")) as z:
        z.extractall(folder)
    names = []
    for index, (_, data) in enumerate(images[:3]):
        (folder / f"image-{index}.png").write_bytes(data)
        names.append(f"image-{index}.png")
    printed = run_example(folder, *names).splitlines()
    lines = [line for line in printed if "image-" in line]
    assert len(lines) == 3 and all(served[i] in line for i, line in enumerate(lines)), printed


def test_a_trainer_killed_mid_job_leaves_the_job_requeued_and_finished(
    mesh: LocalMesh, acme: grpc.Channel, ticket_router: training_pb2.TrainingJob
) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(acme)
    job = stub.StartTraining(
        training_pb2.StartTrainingRequest(
            dataset=datasets_pb2.DatasetRef(name="support-tickets"),
            model_name="crash-test",
            hyperparameters=training_pb2.Hyperparameters(epochs=300),
        ),
        timeout=30,
    ).job

    def running() -> training_pb2.TrainingJob | None:
        now = stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id)).job
        return now if now.state == training_pb2.JOB_STATE_RUNNING and now.stage != "starting" else None

    placed = eventually_value("the job runs on a trainer", running, timeout_s=120)
    with mesh.scheduler_channel() as scheduler:
        listed = registry_pb2_grpc.RegistryServiceStub(scheduler).ListInstances(registry_pb2.ListInstancesRequest())
    pid = next(i.pid for i in listed.instances if i.instance_id == placed.trainer_id)
    os.kill(pid, signal.SIGKILL)
    updates = list(stub.WatchTraining(training_pb2.WatchTrainingRequest(job_id=job.job_id), timeout=JOB_TIMEOUT_S))
    final = updates[-1].job
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED and final.attempt == 2, (final.error, final.attempt)
    assert final.trainer_id != placed.trainer_id  # the supervisor's new trainer process finished it


def cli(mesh: LocalMesh, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`aimass ARGS` as a user runs it against the mesh's gateway, with the tenant's key in $AIMASS_API_KEY."""
    aimass = Path(sys.executable).parent / "aimass"
    return subprocess.run(
        [str(aimass), *args, "--gateway", mesh.gateway],
        env={**os.environ, "AIMASS_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_command_line_from_upload_to_export(mesh: LocalMesh, tmp_path: Path) -> None:
    """The issue's own commands, on the real mesh: upload (with its report), train (watching it to its metrics),
    deploy, list versions, call by name, export."""
    key = key_for("cli-user", TRAIN_SCOPES)
    data = tickets_csv(tmp_path / "tickets.csv", rows=400, seed=11)
    uploaded = cli(
        mesh, key, "datasets", "upload", str(data), "--name", "support-tickets", "--task", "text-classification"
    )
    assert uploaded.returncode == 0, uploaded.stderr
    assert "400" in uploaded.stdout and "billing" in uploaded.stdout
    trained = cli(mesh, key, "train", "support-tickets", "--base", "all-MiniLM-L6-v2", "--name", "ticket-router")
    assert trained.returncode == 0, trained.stderr
    assert "accuracy" in trained.stdout.lower() and "macro" in trained.stdout.lower()
    deployed = cli(mesh, key, "models", "deploy", "ticket-router", "--version", "1")
    assert deployed.returncode == 0, deployed.stderr
    versions = cli(mesh, key, "models", "versions", "ticket-router", "--json")
    assert versions.returncode == 0, versions.stderr
    listed = json.loads(versions.stdout)
    assert "ticket-router" in versions.stdout and listed
    with mesh.channel(key) as channel:
        reply = classify_texts(channel, "ticket-router", ["I was charged twice this month"])
    assert reply.model.version == "1" and reply.results[0].scores[0].label == "billing"
    out = tmp_path / "ticket-router.zip"
    exported = cli(mesh, key, "models", "export", "ticket-router", "--version", "1", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    with zipfile.ZipFile(out) as z:
        assert "model.onnx" in z.namelist()
    # A mistake reads as one line with the status and the server's words, and a non-zero exit.
    missing = cli(mesh, key, "models", "deploy", "no-such-model", "--version", "1")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr
