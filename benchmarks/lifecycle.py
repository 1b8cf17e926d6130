"""Tenants' own models: how long training and deploying takes on this machine, and what a served custom model
costs next to zero-shot classification on the same replica.

    python -m benchmarks.lifecycle [--rounds 3] [--duration 5] [--write docs/benchmarks.md]

One `aimass up` mesh (gateway, scheduler, one NLP, one vision replica, one trainer). A tenant uploads a 1,000-row
text dataset and a 500-image dataset (tickets_csv and digits_zip from aimass.datasets.samples), trains each with the
default hyperparameters and deploys version 1; the times are wall-clock from the client. Then Classify throughput
through the gateway, 8 texts a request, 8 callers: the trained ticket-router (no labels) against zero-shot Classify
with its five labels, alternating in rounds on the same replica.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from aimass.datasets.samples import digits_zip, tickets_csv
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    datasets_pb2_grpc,
    deployments_pb2,
    deployments_pb2_grpc,
    nlp_pb2,
    nlp_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from benchmarks.common import (
    Mesh,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    median,
    publish,
    rounds_cli,
    utc_now,
)

NAME = "Custom models"
CALLERS = 8
TEXTS = [
    "I was charged twice for my subscription this month",
    "The app crashes when I open the settings page",
    "Where is my parcel? It has not arrived yet",
    "I cannot log in, the reset link does not work",
    "Please add dark mode to the dashboard",
    "My invoice shows the wrong amount",
    "The export button does nothing on Firefox",
    "Can you support two-factor authentication by SMS?",
]


def upload(channel: grpc.Channel, path: Path, name: str, task: int) -> float:
    data = path.read_bytes()

    def requests() -> Iterator[datasets_pb2.UploadDatasetRequest]:
        yield datasets_pb2.UploadDatasetRequest(
            header=datasets_pb2.UploadDatasetHeader(
                name=name,
                task=datasets_pb2.TrainingTask.ValueType(task),
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        for start in range(0, len(data), 1 << 20):
            yield datasets_pb2.UploadDatasetRequest(chunk=data[start : start + (1 << 20)])

    started = time.monotonic()
    datasets_pb2_grpc.DatasetServiceStub(channel).UploadDataset(requests(), timeout=300)
    return time.monotonic() - started


def train_and_deploy(channel: grpc.Channel, dataset: str, model: str) -> tuple[float, float, training_pb2.TrainingJob]:
    """(seconds to train, seconds to deploy, the finished job)."""
    training = training_pb2_grpc.TrainingServiceStub(channel)
    started = time.monotonic()
    job = training.StartTraining(
        training_pb2.StartTrainingRequest(dataset=datasets_pb2.DatasetRef(name=dataset), model_name=model), timeout=30
    ).job
    for update in training.WatchTraining(training_pb2.WatchTrainingRequest(job_id=job.job_id), timeout=1800):
        job = update.job
    trained = time.monotonic() - started
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job.job_id} ended {job.state}: {job.error}")
    started = time.monotonic()
    deployments_pb2_grpc.DeploymentServiceStub(channel).DeployModel(
        deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name=model, version=job.model_version)),
        timeout=120,
    )
    return trained, time.monotonic() - started, job


def throughput(call: Callable[[], object], seconds: float) -> float:
    """Requests a second with CALLERS threads calling for ``seconds``."""
    stop = threading.Event()
    done = [0] * CALLERS

    def loop(index: int) -> None:
        while not stop.is_set():
            call()
            done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(CALLERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli(
        "lifecycle", __doc__, rounds_help="alternating throughput rounds", duration_s=5.0, wait_quiet_s=None
    )
    args = cli.parse_args(argv)
    check_bounded(cli, args, duration_s=(1, 30))
    host, date = machine(), utc_now()
    data = Path(tempfile.mkdtemp(prefix="aimass-bench-lifecycle-"))
    texts_file = tickets_csv(data / "tickets.csv", rows=1000, seed=1)
    images_file = digits_zip(data / "digits.zip", per_class=50)
    mesh = Mesh("lifecycle", replicas={"nlp": 1, "vision": 1, "trainer": 1})
    print("starting the mesh (models load first) ...", file=sys.stderr)
    mesh.start()
    try:
        mesh.wait_ready()
        store = SqlStore.open(mesh.settings().store_url)
        try:
            key = store.create_key("bench", [keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN], name="benchmark")[1]
        finally:
            store.close()
        with mesh.channel(key) as channel:
            rows = []
            for label, path, task, dataset, model in (
                ("text, 1,000 rows", texts_file, 1, "tickets", "ticket-router"),
                ("images, 500 (10 classes)", images_file, 2, "digits", "digit-reader"),
            ):
                print(f"{label}: upload, train, deploy ...", file=sys.stderr)
                uploaded = upload(channel, path, dataset, task)
                trained, deployed, job = train_and_deploy(channel, dataset, model)
                rows.append(
                    [
                        label,
                        f"{uploaded:.1f}",
                        f"{trained:.1f}",
                        f"{deployed:.1f}",
                        f"{uploaded + trained + deployed:.1f}",
                        f"{job.evaluation.accuracy:.3f}",
                        f"{job.evaluation.macro_f1:.3f}",
                    ]
                )
            nlp = nlp_pb2_grpc.NlpServiceStub(channel)
            custom = nlp_pb2.ClassifyRequest(texts=TEXTS, model=common_pb2.ModelRef(name="ticket-router"))
            labels = sorted(s.label for s in nlp.Classify(custom, timeout=30).results[0].scores)
            zero_shot = nlp_pb2.ClassifyRequest(texts=TEXTS, labels=labels)
            custom_rps, zero_rps = [], []
            for _ in range(args.rounds):
                custom_rps.append(throughput(lambda: nlp.Classify(custom, timeout=30), args.duration))
                zero_rps.append(throughput(lambda: nlp.Classify(zero_shot, timeout=30), args.duration))
    finally:
        mesh.stop()
    custom_median, zero_median = median(custom_rps), median(zero_rps)
    text = "\n".join(
        [
            f"### {NAME}",
            "",
            f"`{command_line()}` — {date}, {host}.",
            "",
            "Time from the client, seconds: upload, train (queued to SUCCEEDED: features, head, evaluation, export), "
            "deploy (until every replica serves it).",
            "",
            markdown_table(
                ["dataset", "upload", "train", "deploy", "total", "accuracy", "macro-F1"],
                rows,
            ),
            "",
            f"Classify through the gateway, {len(TEXTS)} texts a request, {CALLERS} callers, median of {args.rounds} "
            f"alternating rounds of {args.duration:g} s on the same NLP replica:",
            "",
            markdown_table(
                ["model", "requests/s", "texts/s", "ratio"],
                [
                    [
                        "ticket-router (trained head)",
                        f"{custom_median:.1f}",
                        f"{custom_median * len(TEXTS):.0f}",
                        f"{custom_median / zero_median:.2f}x",
                    ],
                    [
                        f"zero-shot ({len(labels)} labels)",
                        f"{zero_median:.1f}",
                        f"{zero_median * len(TEXTS):.0f}",
                        "1.00x",
                    ],
                ],
            ),
        ]
    )
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
