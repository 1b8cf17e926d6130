"""``aimass datasets``, ``aimass train``, ``aimass jobs`` and ``aimass models versions|deploy|promote|rollback|
undeploy|export``: a tenant's own models from the command line (DatasetService, TrainingService, DeploymentService);
``aimass models list|describe|load|unload``: the mesh's model catalogue, where each model is loaded, and loading or
unloading it (ModelService; load and unload need the models:admin scope).

Every command calls the gateway (``--gateway``, default 127.0.0.1:<gateway.server.port>) with the caller's API key
(``--api-key``, ``$AIMASS_API_KEY`` or the admin key file `aimass up` wrote; the models:train scope for a tenant's
own models), ``--ca-file`` when the gateway's front door has TLS. Results go to stdout (``--json`` for
machine-readable output on listings), progress to stderr: one line rewritten in place on a terminal, plain lines at
milestones otherwise. An error prints one line, the gRPC status name (and the mesh's reason) with the server's
message, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from aimass.admin_cli import gateway_client, rpc_error_line, seconds, size, table, when
from aimass.client import Client
from aimass.client.shortcuts import CHUNK_BYTES, FORMATS, TASKS, file_sha256, upload_requests
from aimass.v1 import (
    common_pb2,
    datasets_pb2,
    deployments_pb2,
    models_pb2,
    training_pb2,
)

__all__ = [
    "CHUNK_BYTES",
    "COMMANDS",
    "Progress",
    "add_catalogue_commands",
    "add_commands",
    "add_model_commands",
    "file_sha256",
    "run",
    "upload_requests",
]

# Deadline of one unary call (Deploy, Promote and Rollback wait for every replica to apply the change: longer).
CALL_TIMEOUT_S: Final = 60.0
DEPLOY_TIMEOUT_S: Final = 180.0
# Default deadline of `models load` and `models unload` (--timeout): a load reads weights and warms the model up.
LOAD_TIMEOUT_S: Final = 300.0
# A watch that loses its connection (a gateway restarting, say) tries again this many times before giving up.
WATCH_RECONNECTS: Final = 3
EXIT_INTERRUPTED: Final = 130

# TASKS and FORMATS (the --task and --format choices) and the upload helpers are the client's (aimass.client).
FINAL_JOB_STATES: Final = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)
# `models list --modality` and the services `--service` accepts by their short names.
MODALITIES: Final = {
    "text": models_pb2.MODALITY_TEXT,
    "vision": models_pb2.MODALITY_VISION,
    "speech": models_pb2.MODALITY_SPEECH,
    "llm": models_pb2.MODALITY_LLM,
}
SERVICES: Final = {
    "nlp": "aimass.v1.NlpService",
    "text": "aimass.v1.NlpService",
    "vision": "aimass.v1.VisionService",
    "speech": "aimass.v1.SpeechService",
    "llm": "aimass.v1.LlmService",
}


class CommandError(Exception):
    """A problem found on this side (a missing file, a bad checksum): printed as ``error: ...``, exit 1."""


# -- formatting -----------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def task_name(task: int) -> str:
    return next((name for name, value in TASKS.items() if value == task), "-")


def format_name(fmt: int) -> str:
    return next((name for name, value in FORMATS.items() if value == fmt), "-")


def job_state(state: int) -> str:
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def version_state(state: int) -> str:
    return deployments_pb2.VersionState.Name(state).removeprefix("VERSION_STATE_")  # type: ignore[arg-type]


def modality_name(modality: int) -> str:
    return models_pb2.Modality.Name(modality).removeprefix("MODALITY_").lower()  # type: ignore[arg-type]


def serving_state(state: int) -> str:
    return common_pb2.ServingState.Name(state).removeprefix("SERVING_STATE_")  # type: ignore[arg-type]


def device_kind(kind: common_pb2.DeviceKind.ValueType) -> str:
    return common_pb2.DeviceKind.Name(kind).removeprefix("DEVICE_KIND_")


def device_text(device: common_pb2.DeviceInfo) -> str:
    """kind/name/id, e.g. GPU/NVIDIA H100/0 or CPU/cpu/0 (the id: the NVML index, 0 for the CPU)."""
    return f"{device_kind(device.kind)}/{device.name or '-'}/{device.index}"


def as_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=2, always_print_fields_with_no_presence=True)


def _ratio(value: float) -> str:
    return f"{value:.3f}"


def _delta(value: float) -> str:
    return f"{value:+.3f}"


def _classes(classes: Iterable[datasets_pb2.ClassCount]) -> str:
    return ", ".join(f"{c.label} {c.count}" for c in classes) or "-"


def _dataset_ref(ref: datasets_pb2.DatasetRef, owner: str = "") -> str:
    """name@version, with owner/ in front when it is not ``owner`` (a dataset shared with the caller)."""
    text = f"{ref.owner}/{ref.name}" if ref.owner and ref.owner != owner else ref.name
    return f"{text}@{ref.version}" if ref.version else text


# -- progress -------------------------------------------------------------------------------------------------------


class Progress:
    """One line of progress on ``stream`` (stderr by default).

    On a terminal the line is rewritten in place (carriage return) at most every ``min_interval_s``; elsewhere (a
    log, a pipe) a plain line is printed each time ``milestone`` changes, so a log gets a handful of lines, not
    hundreds. ``close`` ends the line (with ``final`` as its last text, if given).
    """

    def __init__(self, stream: TextIO | None = None, *, min_interval_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.min_interval_s = min_interval_s
        self._shown = 0  # characters of the line drawn on a terminal, 0: nothing open
        self._last_draw = 0.0
        self._pending = ""
        self._milestone: object = None

    def update(self, line: str, milestone: object) -> None:
        if self.tty:
            self._pending = line
            now = time.monotonic()
            if now - self._last_draw >= self.min_interval_s:
                self._draw(line)
                self._last_draw = now
        elif milestone != self._milestone:
            self._milestone = milestone
            print(line, file=self.stream, flush=True)

    def _width(self) -> int:
        """Columns of the terminal (a longer line would wrap, and the carriage return redraw only its tail); 0 when
        it does not say."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, io.UnsupportedOperation):
            return 0

    def _draw(self, line: str) -> None:
        width = self._width()
        if width > 1:
            line = line[: width - 1]
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = max(len(line), 1)

    def close(self, final: str | None = None) -> None:
        if self.tty:
            text = final if final is not None else self._pending
            if text or self._shown:
                self._draw(text)
                self.stream.write("\n")
                self.stream.flush()
            self._shown = 0
        elif final is not None and final != self._milestone:
            print(final, file=self.stream, flush=True)
        self._milestone = None
        self._pending = ""


@contextlib.contextmanager
def waiting(text: str, *, tick_s: float = 0.5) -> Iterator[Callable[[], float]]:
    """Progress for one long call: ``text`` on stderr, with the seconds elapsed kept current on a terminal (a thread
    redraws the line while the call blocks); yields a function giving the seconds elapsed."""
    progress = Progress()
    started = time.monotonic()
    stop = threading.Event()
    progress.update(text, text)

    def tick() -> None:
        while not stop.wait(tick_s):
            progress.update(f"{text} {duration(time.monotonic() - started)}", text)

    ticker = threading.Thread(target=tick, daemon=True) if progress.tty else None
    if ticker is not None:
        ticker.start()
    try:
        yield lambda: time.monotonic() - started
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        progress.close()


def bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def transfer_line(verb: str, name: str, done: int, total: int, started: float) -> str:
    fraction = done / total if total else 1.0
    rate = done / max(time.monotonic() - started, 1e-6)
    return f"{verb} {name} {bar(fraction)} {fraction * 100:3.0f}%  {size(done)} / {size(total)}  {size(rate)}/s"


def quarter(done: int, total: int) -> int:
    """Which quarter of a transfer this is (0-4): non-terminal progress prints at 25, 50, 75 and 100%."""
    return 4 if total <= 0 or done >= total else done * 4 // total


# -- shared plumbing ------------------------------------------------------------------------------------------------


class Stubs:
    """The lifecycle services and the model catalogue of one client to the gateway, as its typed methods. The client
    has no default deadline (streams have none); unary calls pass theirs (CALL_TIMEOUT_S, DEPLOY_TIMEOUT_S,
    --timeout)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.datasets = client.datasets
        self.training = client.training
        self.deployments = client.deployments
        self.models = client.models


def _client(args: argparse.Namespace) -> Client:
    # Deadlines are set per call (streams have none).
    return gateway_client(args, timeout_s=None)


def _connected(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--gateway", default="", help="gateway address (default: 127.0.0.1:gateway.server.port)")
    parser.add_argument("--api-key", default=None, help="API key (default: $AIMASS_API_KEY, else the admin key file)")
    parser.add_argument("--ca-file", type=Path, default=None, help="CA of the gateway's TLS certificate (PEM)")
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the response as JSON (protobuf's JSON mapping)")


# -- datasets -------------------------------------------------------------------------------------------------------


def report_text(report: datasets_pb2.ValidationReport, *, first: int = 10) -> str:
    """The validation report as a user reads it: counts, issues by kind, the first issues, classes, warnings."""
    lines = [
        f"rows: {report.rows_read} read, {report.rows_kept} kept, {report.rows_dropped} dropped",
    ]
    if report.issue_counts:
        counts = sorted(report.issue_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("issues: " + ", ".join(f"{kind} {count}" for kind, count in counts))
    if report.issues:
        shown = report.issues[:first]
        lines.append(f"first issues ({len(shown)} of {sum(report.issue_counts.values()) or len(report.issues)}):")
        for issue in shown:
            where = f"line {issue.line}" if issue.line else "file"
            if issue.path:
                where = issue.path if not issue.line else f"{where} ({issue.path})"
            lines.append(f"  {where}: {issue.kind}" + (f": {issue.detail}" if issue.detail else ""))
    lines.append(f"classes ({len(report.classes)}): {_classes(report.classes)}")
    lines += [f"warning: {warning}" for warning in report.warnings]
    return "\n".join(lines)


def _upload(stubs: Stubs, args: argparse.Namespace) -> int:
    path: Path = args.file
    progress = Progress()
    started = time.monotonic()

    def sent(done: int, total: int) -> None:
        progress.update(transfer_line("uploading", path.name, done, total, started), quarter(done, total))

    try:
        reply = stubs.client.upload_dataset(
            path,
            name=args.name,
            task=args.task,
            format=args.format,
            text_column=args.text_column,
            label_column=args.label_column,
            progress=sent,
        )
    except KeyboardInterrupt:
        progress.close()
        print("upload interrupted: nothing was stored; run the command again to upload from the start")
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    dataset, version = reply.dataset, reply.version
    if reply.already_existed:
        print(f"{dataset.name} version {version.version}: the same bytes were uploaded before; nothing new was stored")
    else:
        print(
            f"uploaded {path.name} as {dataset.name} version {version.version} ({task_name(dataset.task)}, "
            f"{format_name(version.format)}, {size(version.size_bytes)}, sha256 {version.sha256})"
        )
    print(report_text(reply.report))
    return 0


def _datasets_table(datasets: Sequence[datasets_pb2.DatasetInfo]) -> str:
    rows = [["NAME", "OWNER", "TASK", "VERSIONS", "LATEST", "ROWS", "CLASSES", "SIZE", "CREATED", "SHARED WITH"]]
    for d in datasets:
        latest = d.versions[-1] if d.versions else datasets_pb2.DatasetVersion()
        rows.append(
            [
                d.name,
                d.owner,
                task_name(d.task),
                str(len(d.versions)),
                latest.version or "-",
                str(latest.rows),
                str(len(latest.classes)),
                size(latest.size_bytes),
                when(latest.created_unix_ms),
                ",".join(d.shared_with) or "-",
            ]
        )
    return table(rows)


def _versions_table(versions: Sequence[datasets_pb2.DatasetVersion]) -> str:
    rows = [["VERSION", "FORMAT", "ROWS", "SIZE", "CREATED", "CLASSES"]]
    rows += [
        [
            v.version,
            format_name(v.format),
            str(v.rows),
            size(v.size_bytes),
            when(v.created_unix_ms),
            _classes(v.classes),
        ]
        for v in versions
    ]
    return table(rows)


def _describe(stubs: Stubs, args: argparse.Namespace) -> int:
    reply = stubs.datasets.describe_dataset(
        dataset=datasets_pb2.DatasetRef(name=args.name, owner=args.owner, version=args.version),
        preview_rows=args.preview,
        timeout_s=CALL_TIMEOUT_S,
    )
    if args.json:
        print(as_json(reply))
        return 0
    d, v = reply.dataset, reply.version
    shared = f", shared with {', '.join(d.shared_with)}" if d.shared_with else ""
    print(f"{d.name} (owner {d.owner}, {task_name(d.task)}{shared})")
    print(f"version {v.version}: {v.rows} rows, {size(v.size_bytes)}, {format_name(v.format)}, sha256 {v.sha256}")
    print(report_text(reply.report))
    if reply.preview:
        print("\npreview:")
        print(table([["LABEL", "TEXT"], *([p.label, p.text] for p in reply.preview)]))
    print("\nversions (oldest first):")
    print(_versions_table(d.versions))
    return 0


def _datasets_command(stubs: Stubs, args: argparse.Namespace) -> int:
    command = args.datasets_command
    if command == "upload":
        return _upload(stubs, args)
    if command == "describe":
        return _describe(stubs, args)
    if command == "list":
        listed = stubs.datasets.list_datasets(timeout_s=CALL_TIMEOUT_S)
        if args.json:
            print(as_json(listed))
        else:
            print(_datasets_table(listed.datasets) if listed.datasets else "no datasets")
        return 0
    if command == "delete":
        ref = datasets_pb2.DatasetRef(name=args.name, version=args.version)
        deleted = stubs.datasets.delete_dataset(dataset=ref, timeout_s=CALL_TIMEOUT_S)
        versions = ", ".join(deleted.deleted_versions) or "none"
        print(f"deleted {args.name}: versions {versions}; {size(deleted.freed_bytes)} of storage freed")
        return 0
    shared = stubs.datasets.share_dataset(
        name=args.name, tenant=args.tenant, revoke=args.revoke, timeout_s=CALL_TIMEOUT_S
    ).dataset
    done = f"{args.tenant} can no longer read {shared.name}" if args.revoke else f"{args.tenant} can read {shared.name}"
    print(f"{done}; shared with: {', '.join(shared.shared_with) or 'nobody'}")
    return 0


# -- training jobs --------------------------------------------------------------------------------------------------


def job_line(job: training_pb2.TrainingJob) -> str:
    """The live progress line: state or stage, %, epoch/epochs, loss, ETA."""
    parts = [f"{job.job_id} {job.stage or job_state(job.state).lower()}", f"{job.progress * 100:3.0f}%"]
    if job.epochs:
        parts.append(f"epoch {job.epoch}/{job.epochs}")
    if job.loss:
        parts.append(f"loss {job.loss:.4f}")
    if job.eta_seconds > 0:
        parts.append(f"ETA {duration(job.eta_seconds)}")
    if job.attempt > 1:
        parts.append(f"attempt {job.attempt}")
    return "  ".join(parts)


def evaluation_text(evaluation: training_pb2.Evaluation) -> str:
    """Accuracy and macro-F1 (with the change from the previous version), the per-class table, the confusion."""
    compared = ""
    if evaluation.previous_version:
        compared = f" ({_delta(evaluation.accuracy_delta)} vs version {evaluation.previous_version})"
    lines = [
        f"evaluated on {evaluation.eval_rows} held-out rows (trained on {evaluation.train_rows})",
        f"accuracy {_ratio(evaluation.accuracy)}{compared}",
        f"macro-F1 {_ratio(evaluation.macro_f1)}"
        + (f" ({_delta(evaluation.macro_f1_delta)} vs version {evaluation.previous_version})" if compared else ""),
    ]
    if evaluation.per_class:
        rows = [["LABEL", "PRECISION", "RECALL", "F1", "SUPPORT"]]
        rows += [
            [c.label, _ratio(c.precision), _ratio(c.recall), _ratio(c.f1), str(c.support)] for c in evaluation.per_class
        ]
        lines += ["", table(rows)]
    labels = list(evaluation.labels)
    if labels and len(evaluation.confusion) == len(labels) ** 2:
        rows = [["TRUE \\ PREDICTED", *labels]]
        rows += [
            [label, *(str(n) for n in evaluation.confusion[i * len(labels) : (i + 1) * len(labels)])]
            for i, label in enumerate(labels)
        ]
        lines += ["", "confusion matrix (rows: true label, columns: predicted):", table(rows)]
    return "\n".join(lines)


def job_text(job: training_pb2.TrainingJob) -> str:
    """A job in full (``jobs show``, and what ``train`` prints once the job ends)."""
    hp = job.hyperparameters
    lines = [
        f"job {job.job_id}: {job_state(job.state)}"
        + (f" (stage {job.stage}, {job.progress * 100:.0f}%)" if job.state not in FINAL_JOB_STATES else ""),
        f"model {job.model_name}"
        + (f" version {job.model_version}" if job.model_version else "")
        + f", base {job.base_model}, {task_name(job.task)}",
        f"dataset {_dataset_ref(job.dataset, job.owner)} (sha256 {job.dataset_sha256 or '-'})",
        f"hyperparameters: epochs {hp.epochs}, learning rate {hp.learning_rate:g}, batch size {hp.batch_size}, "
        f"weight decay {hp.weight_decay:g}, holdout {hp.holdout_fraction:g}, seed {hp.seed}",
        f"created {when(job.created_unix_ms)}, started {when(job.started_unix_ms)}, "
        f"finished {when(job.finished_unix_ms)}; trainer {job.trainer_id or '-'}, attempt {job.attempt}, "
        f"code {job.code_version or '-'}",
    ]
    if job.error:
        lines.append(f"error: {job.error}")
    if job.state == training_pb2.JOB_STATE_SUCCEEDED and job.HasField("evaluation"):
        lines += ["", evaluation_text(job.evaluation)]
    return "\n".join(lines)


def _job_outcome(job: training_pb2.TrainingJob) -> int:
    """Prints the finished job; 0 when it SUCCEEDED."""
    if job.state == training_pb2.JOB_STATE_SUCCEEDED:
        print(f"job {job.job_id} SUCCEEDED: {job.model_name} version {job.model_version}")
        if job.HasField("evaluation"):
            print(evaluation_text(job.evaluation))
        print(f"\nserve it: aimass models deploy {job.model_name} --version {job.model_version}")
        return 0
    if job.state == training_pb2.JOB_STATE_FAILED:
        print(f"job {job.job_id} FAILED (attempt {job.attempt}): {job.error or 'no reason given'}", file=sys.stderr)
    else:
        print(f"job {job.job_id} {job_state(job.state)}", file=sys.stderr)
    return 1


def watch(stubs: Stubs, job_id: str) -> int:
    """Follows a job until it ends (one live progress line), then prints its outcome; exit code 0 if SUCCEEDED.
    Ctrl-C stops watching, not the job."""
    progress = Progress()
    last: training_pb2.TrainingJob | None = None
    reconnects = 0
    try:
        while True:
            try:
                for update in stubs.training.watch_training(job_id=job_id):
                    last = update.job
                    reconnects = 0
                    progress.update(job_line(last), (last.state, last.stage, int(last.progress * 10)))
                    if last.state in FINAL_JOB_STATES:
                        break
            except grpc.RpcError as err:
                # A dropped connection (a gateway restarting) is picked up again; anything else is the answer.
                unavailable = isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.UNAVAILABLE
                if not unavailable or reconnects >= WATCH_RECONNECTS:
                    raise
                reconnects += 1
                time.sleep(0.5 * 2**reconnects)
                continue
            if last is not None and last.state in FINAL_JOB_STATES:
                break
            # The stream ended before a final state: read the job once more, then watch again.
            last = stubs.training.get_training_job(job_id=job_id, timeout_s=CALL_TIMEOUT_S).job
            if last.state in FINAL_JOB_STATES:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        progress.close()
        print(f"stopped watching; job {job_id} goes on (aimass jobs watch {job_id}, aimass jobs cancel {job_id})")
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    assert last is not None  # the loop ends on a job in a final state
    return _job_outcome(last)


def _hyperparameters(args: argparse.Namespace) -> training_pb2.Hyperparameters:
    return training_pb2.Hyperparameters(
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        holdout_fraction=args.holdout,
        seed=args.seed,
    )


def _train(stubs: Stubs, args: argparse.Namespace) -> int:
    job = stubs.training.start_training(
        dataset=datasets_pb2.DatasetRef(name=args.dataset, owner=args.owner, version=args.dataset_version),
        base_model=args.base,
        model_name=args.name,
        hyperparameters=_hyperparameters(args),
        timeout_s=CALL_TIMEOUT_S,
    ).job
    print(
        f"job {job.job_id} {job_state(job.state)}: {job.model_name} on {_dataset_ref(job.dataset, job.owner)} "
        f"with {job.base_model}"
    )
    if args.no_wait:
        print(f"follow it: aimass jobs watch {job.job_id}")
        return 0
    return watch(stubs, job.job_id)


def _jobs_table(jobs: Sequence[training_pb2.TrainingJob]) -> str:
    rows = [["JOB ID", "STATE", "MODEL", "VERSION", "DATASET", "BASE", "PROGRESS", "ACCURACY", "CREATED"]]
    for job in jobs:
        succeeded = job.state == training_pb2.JOB_STATE_SUCCEEDED and job.HasField("evaluation")
        rows.append(
            [
                job.job_id,
                job_state(job.state),
                job.model_name,
                job.model_version or "-",
                _dataset_ref(job.dataset, job.owner),
                job.base_model,
                f"{job.progress * 100:.0f}%",
                _ratio(job.evaluation.accuracy) if succeeded else "-",
                when(job.created_unix_ms),
            ]
        )
    return table(rows)


def _jobs_command(stubs: Stubs, args: argparse.Namespace) -> int:
    command = args.jobs_command
    if command == "list":
        listed = stubs.training.list_training_jobs(limit=args.limit, timeout_s=CALL_TIMEOUT_S)
        if args.json:
            print(as_json(listed))
        else:
            print(_jobs_table(listed.jobs) if listed.jobs else "no training jobs")
        return 0
    if command == "watch":
        return watch(stubs, args.job)
    if command == "cancel":
        job = stubs.training.cancel_training(job_id=args.job, timeout_s=CALL_TIMEOUT_S).job
        print(f"job {job.job_id}: {job_state(job.state)}")
        return 0
    job = stubs.training.get_training_job(job_id=args.job, timeout_s=CALL_TIMEOUT_S).job
    print(as_json(job) if args.json else job_text(job))
    return 0


# -- models: versions, deployment, export ---------------------------------------------------------------------------


def deployment_text(model: deployments_pb2.CustomModel) -> str:
    d = model.deployment
    if not d.default_version and not d.canary_version:
        return f"{model.name}: not serving"
    parts = [f"default version {d.default_version or '-'}"]
    if d.canary_version:
        parts.append(f"canary version {d.canary_version} for {d.canary_percent}% of requests")
    if d.previous_version:
        parts.append(f"rollback goes to version {d.previous_version}")
    return f"{model.name}: " + ", ".join(parts) + f" (generation {d.generation})"


def model_text(model: deployments_pb2.CustomModel) -> str:
    rows = [["VERSION", "STATE", "DATASET", "BASE", "ACCURACY", "MACRO-F1", "LABELS", "CREATED", "JOB"]]
    for v in model.versions:
        state = version_state(v.state)
        if v.state == deployments_pb2.VERSION_STATE_CANARY:
            state += f" {model.deployment.canary_percent}%"
        evaluated = v.HasField("evaluation")
        rows.append(
            [
                v.version,
                state,
                _dataset_ref(v.dataset, model.owner),
                v.base_model,
                _ratio(v.evaluation.accuracy) if evaluated else "-",
                _ratio(v.evaluation.macro_f1) if evaluated else "-",
                str(len(v.labels)),
                when(v.created_unix_ms),
                v.job_id or "-",
            ]
        )
    method = f", {model.method}" if model.method else ""
    return f"{model.name} (owner {model.owner}, {task_name(model.task)}{method})\n{table(rows)}\n" + deployment_text(
        model
    )


def _ref(args: argparse.Namespace) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=args.name, version=getattr(args, "version", "") or "")


def _applied(model: deployments_pb2.CustomModel, replicas: int) -> str:
    return f"{deployment_text(model)}; {replicas} replica{'s' if replicas != 1 else ''} applied the change"


def export(stubs: Stubs, args: argparse.Namespace) -> int:
    """Receives the ZIP into a hidden file beside the target, checks its size and SHA-256, then renames it into place:
    a damaged or cut-short export leaves no file behind."""
    target: Path = args.output
    digest = hashlib.sha256()
    received = total = 0
    expected = ""
    progress = Progress()
    started = time.monotonic()
    partial: Path | None = None
    try:
        with contextlib.ExitStack() as files:
            out: BinaryIO | None = None
            for part in stubs.deployments.export_model(model=_ref(args), format=deployments_pb2.EXPORT_FORMAT_ONNX):
                if out is None:
                    if target.is_dir():
                        target = target / (Path(part.filename).name or f"{args.name}.zip")
                    partial = target.with_name(f".{target.name}.part")
                    out = files.enter_context(partial.open("wb"))
                out.write(part.data)
                digest.update(part.data)
                received += len(part.data)
                total = part.total_bytes or total
                expected = part.sha256 or expected
                progress.update(
                    transfer_line("receiving", target.name, received, max(total, received), started),
                    quarter(received, total),
                )
        progress.close()
        if partial is None:
            raise CommandError(f"the gateway sent nothing for {args.name}: no file written")
        if total and received != total:
            raise CommandError(f"received {received} bytes of {total}: the export was cut short; no file written")
        if not expected:
            raise CommandError("the export carried no SHA-256 to check it against; no file written")
        if digest.hexdigest() != expected:
            raise CommandError(
                f"the received file's SHA-256 is {digest.hexdigest()}, the server's {expected}: it was damaged on the "
                "way; no file written, try again"
            )
        os.replace(partial, target)
        partial = None
    finally:
        progress.close()
        if partial is not None:
            partial.unlink(missing_ok=True)
    print(f"wrote {target} ({size(received)}, sha256 {expected} verified)")
    print("it runs with onnxruntime alone: unzip it and see its example script")
    return 0


# -- models: the catalogue, load and unload --------------------------------------------------------------------------


def service_name(text: str) -> str:
    """--service: a fully-qualified service (aimass.v1.VisionService), its short name (VisionService) or the kind
    (nlp, text, vision, speech, llm); empty: every service."""
    if not text or text.lower() in SERVICES:
        return SERVICES.get(text.lower(), "")
    if "." in text:
        return text
    if text.endswith("Service"):
        return f"aimass.v1.{text}"
    raise argparse.ArgumentTypeError(f"{text!r} is not a service: {', '.join(sorted(SERVICES))} or aimass.v1.<Name>")


def device_target(text: str) -> tuple[int, int | None]:
    """--device: cpu, gpu or gpu:INDEX (the NVML index, with --node) → the device kind and index."""
    kind, _, index = text.strip().lower().partition(":")
    kinds = {"cpu": common_pb2.DEVICE_KIND_CPU, "gpu": common_pb2.DEVICE_KIND_GPU}
    if kind not in kinds or (index and (kind != "gpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, gpu or gpu:INDEX")
    return kinds[kind], int(index) if index else None


def _model_ref(model: common_pb2.ModelRef) -> str:
    return f"{model.name}@{model.version}" if model.version else model.name


def catalogue_table(models: Sequence[models_pb2.ModelInfo]) -> str:
    rows = [["NAME", "MODALITY", "VERSIONS", "DEFAULT", "OWNER", "IS_DEFAULT"]]
    rows += [
        [
            m.name,
            modality_name(m.modality),
            ",".join(v.version for v in m.versions) or "-",
            m.default_version or "-",
            m.owner,
            "yes" if m.is_default else "no",
        ]
        for m in models
    ]
    return table(rows)


def replicas_table(replicas: Sequence[models_pb2.ModelReplica]) -> str:
    rows = [["INSTANCE", "NODE", "DEVICE", "VERSION", "STATE", "LOADED", "MEMORY"]]
    rows += [
        [
            r.instance_id,
            r.node_id or "-",
            device_text(r.device),
            r.version or "-",
            serving_state(r.state),
            "LOADED" if r.loaded else "NOT LOADED",
            size(r.memory_bytes) if r.memory_bytes else "-",
        ]
        for r in replicas
    ]
    return table(rows)


def catalogue_text(model: models_pb2.ModelInfo) -> str:
    """``models describe``: the model's facts, its versions, then where it is loaded (or, for a tenant's own model,
    its versions as ``models versions`` shows them)."""
    owner = f"owner {model.owner}" if model.owner else "the mesh's own"
    lines = [
        f"{model.name} ({modality_name(model.modality)}, {owner}"
        + (", default model of its methods" if model.is_default else "")
        + ")",
    ]
    if model.description:
        lines.append(model.description)
    lines += [
        f"services: {', '.join(model.services) or '-'}",
        f"methods: {', '.join(model.methods) or '-'}",
        f"default version: {model.default_version or '-'}",
    ]
    for v in model.versions:
        measured = "measured" if v.footprint_measured else "estimated"
        footprint = f"{size(v.footprint_bytes)} ({measured}, {device_kind(v.footprint_device_kind)})"
        context = f", context {v.context_length} tokens" if v.context_length else ""
        lines.append(f"version {v.version}: footprint {footprint}{context}")
    if model.HasField("custom"):
        lines += ["", model_text(model.custom)]
    elif model.replicas:
        lines += ["", "replicas:", replicas_table(model.replicas)]
    else:
        lines += ["", f"replicas: none hold it (aimass models load {model.name})"]
    return "\n".join(lines)


def _placement(args: argparse.Namespace) -> models_pb2.PlacementTarget:
    target = models_pb2.PlacementTarget(node_id=args.node, instance_id=args.instance)
    if args.device is not None:
        target.device_kind, index = args.device
        if index is not None:
            target.device_index = index
    return target


def _where(replica: models_pb2.ModelReplica) -> str:
    node = f", node {replica.node_id}" if replica.node_id else ""
    return f"{replica.instance_id or replica.address}{node}, {device_text(replica.device)}"


def _load(stubs: Stubs, args: argparse.Namespace) -> int:
    model = _ref(args)
    with waiting(f"loading {_model_ref(model)}…") as elapsed:
        reply = stubs.models.load_model(model=model, target=_placement(args), timeout_s=args.timeout)
    r = reply.replica
    held = f"{args.name} version {r.version or '-'}"
    memory = f", {size(r.memory_bytes)}" if r.memory_bytes else ""
    if reply.already_loaded:
        print(f"{held} was already loaded on {_where(r)}{memory}; nothing changed")
    else:
        print(f"loaded {held} on {_where(r)}{memory} in {elapsed():.1f}s")
    if reply.evicted:
        print(f"unloaded to make room: {', '.join(_model_ref(m) for m in reply.evicted)}")
    return 0


def _unload(stubs: Stubs, args: argparse.Namespace) -> int:
    model = _ref(args)
    with waiting(f"unloading {_model_ref(model)}…") as elapsed:
        reply = stubs.models.unload_model(model=model, target=_placement(args), timeout_s=args.timeout)
    if not reply.unloaded:
        print(f"{_model_ref(model)} was loaded nowhere matching; nothing changed")
        return 0
    for r in reply.unloaded:
        print(f"unloaded {args.name} version {r.version or '-'} from {_where(r)}")
    print(f"{size(reply.freed_bytes)} freed in {elapsed():.1f}s")
    return 0


def _catalogue_command(stubs: Stubs, args: argparse.Namespace) -> int:
    """models list, describe, load and unload (ModelService)."""
    command = args.models_command
    if command == "load":
        return _load(stubs, args)
    if command == "unload":
        return _unload(stubs, args)
    reply: models_pb2.ListModelsResponse | models_pb2.DescribeModelResponse
    if command == "list":
        reply = stubs.models.list_models(
            service=args.service,
            modality=MODALITIES.get(args.modality, models_pb2.MODALITY_UNSPECIFIED),
            loaded_only=args.loaded,
            timeout_s=CALL_TIMEOUT_S,
        )
        text = catalogue_table(reply.models) if reply.models else "no models match"
    else:
        reply = stubs.models.describe_model(model=_ref(args), timeout_s=CALL_TIMEOUT_S)
        text = catalogue_text(reply.model)
    print(as_json(reply) if args.json else text)
    return 0


CATALOGUE_COMMANDS: Final = frozenset({"list", "describe", "load", "unload"})


def _models_command(stubs: Stubs, args: argparse.Namespace) -> int:
    command = args.models_command
    if command in CATALOGUE_COMMANDS:
        return _catalogue_command(stubs, args)
    if command == "versions":
        listed = stubs.deployments.list_custom_models(model=args.name, timeout_s=CALL_TIMEOUT_S)
        if args.json:
            print(as_json(listed))
        else:
            print("\n\n".join(model_text(m) for m in listed.models) if listed.models else "no models of your own yet")
        return 0
    if command == "export":
        return export(stubs, args)
    reply: (
        deployments_pb2.DeployModelResponse
        | deployments_pb2.PromoteModelResponse
        | deployments_pb2.RollbackModelResponse
        | deployments_pb2.UndeployModelResponse
    )
    if command == "deploy":
        reply = stubs.deployments.deploy_model(model=_ref(args), canary_percent=args.canary, timeout_s=DEPLOY_TIMEOUT_S)
    elif command == "promote":
        reply = stubs.deployments.promote_model(model=_ref(args), timeout_s=DEPLOY_TIMEOUT_S)
    elif command == "rollback":
        reply = stubs.deployments.rollback_model(model=_ref(args), timeout_s=DEPLOY_TIMEOUT_S)
    else:
        reply = stubs.deployments.undeploy_model(model=_ref(args), timeout_s=DEPLOY_TIMEOUT_S)
    print(_applied(reply.model, reply.replicas_applied))
    return 0


# -- the parser -----------------------------------------------------------------------------------------------------


def _target_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--instance", default="", metavar="ID", help=f"{verb} this replica (aimass status lists them)")
    parser.add_argument("--node", default="", help=f"{verb} a replica on this node")
    parser.add_argument(
        "--device", type=device_target, default=None, help="cpu, gpu or gpu:INDEX (the NVML index; with --node)"
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=LOAD_TIMEOUT_S,
        help=f"how long to wait, e.g. 90s, 10m (default {LOAD_TIMEOUT_S:.0f}s)",
    )


def add_catalogue_commands(models_sub: Any) -> None:
    """list, describe, load and unload under ``aimass models``: the mesh's catalogue (ModelService)."""
    listing = _connected(models_sub.add_parser("list", help="the model catalogue: the mesh's models and your own"))
    listing.add_argument(
        "--service", type=service_name, default="", help="only this service's: nlp, vision, speech, llm or aimass.v1.X"
    )
    listing.add_argument("--modality", choices=list(MODALITIES), default="", help="only models of this modality")
    listing.add_argument("--loaded", action="store_true", help="only models loaded on at least one replica")
    _json_flag(listing)
    describe = _connected(models_sub.add_parser("describe", help="one model: facts, versions, where it is loaded"))
    describe.add_argument("name")
    describe.add_argument("--version", default="", help="only the replicas of this version")
    _json_flag(describe)
    load = _connected(
        models_sub.add_parser("load", help="load a model onto one more device (models:admin; default: the scheduler's)")
    )
    load.add_argument("name")
    load.add_argument("--version", default="", help="default: the default version")
    _target_flags(load, "load on")
    unload = _connected(models_sub.add_parser("unload", help="unload a model (models:admin; default: from everywhere)"))
    unload.add_argument("name")
    unload.add_argument("--version", default="", help="default: every version")
    _target_flags(unload, "unload from")


def add_model_commands(models_sub: Any) -> None:
    """versions, deploy, promote, rollback, undeploy and export under ``aimass models``."""
    versions = _connected(models_sub.add_parser("versions", help="your models: versions, state, lineage, metrics"))
    versions.add_argument("name", nargs="?", default="", help="one model (default: every model of yours)")
    _json_flag(versions)
    deploy = _connected(models_sub.add_parser("deploy", help="serve a version (the default, or a canary)"))
    deploy.add_argument("name")
    deploy.add_argument("--version", required=True)
    deploy.add_argument(
        "--canary",
        type=int,
        default=0,
        metavar="PERCENT",
        help="send this share of the model's requests (1-99) to the version; 0 (default) makes it the default",
    )
    promote = _connected(models_sub.add_parser("promote", help="make a version (default: the canary) the default"))
    promote.add_argument("name")
    promote.add_argument("--version", default="", help="default: the canary")
    rollback = _connected(
        models_sub.add_parser("rollback", help="drop the canary, else go back to the default before the last promote")
    )
    rollback.add_argument("name")
    undeploy = _connected(models_sub.add_parser("undeploy", help="stop serving a version (default: every version)"))
    undeploy.add_argument("name")
    undeploy.add_argument("--version", default="", help="default: every version")
    exported = _connected(
        models_sub.add_parser("export", help="a version as a ZIP that runs with onnxruntime alone (edge devices)")
    )
    exported.add_argument("name")
    exported.add_argument("--version", default="", help="default: the default version, else the newest")
    exported.add_argument("--format", choices=["onnx"], default="onnx")
    exported.add_argument(
        "-o", "--output", type=Path, required=True, help="the ZIP to write (a folder: the server's file name in it)"
    )


def add_commands(commands: Any) -> None:
    """Adds datasets, train, jobs and models to the ``aimass`` parser's subcommands."""
    datasets_cmd = commands.add_parser("datasets", help="your labelled data: upload, list, describe, share, delete")
    datasets_sub = datasets_cmd.add_subparsers(dest="datasets_command", required=True)
    upload = _connected(
        datasets_sub.add_parser("upload", help="upload a CSV, JSONL or image ZIP as a new version, validated")
    )
    upload.add_argument("file", type=Path)
    upload.add_argument("--name", required=True, help="the dataset (lowercase letters, digits, '.', '_', '-')")
    upload.add_argument("--task", required=True, choices=sorted(TASKS))
    upload.add_argument(
        "--format", choices=sorted(FORMATS), default="", help="default: from the extension, else the server guesses"
    )
    upload.add_argument("--text-column", default="", help='CSV column or JSONL field of the text (default "text")')
    upload.add_argument("--label-column", default="", help='CSV column or JSONL field of the label (default "label")')
    listing = _connected(datasets_sub.add_parser("list", help="your datasets and those shared with you"))
    _json_flag(listing)
    describe = _connected(datasets_sub.add_parser("describe", help="one version: report, class balance, preview"))
    describe.add_argument("name")
    describe.add_argument("--owner", default="", help="the owning tenant, for a dataset shared with you")
    describe.add_argument("--version", default="", help="default: the newest")
    describe.add_argument("--preview", type=int, default=0, metavar="N", help="rows to preview (default 5, at most 50)")
    _json_flag(describe)
    delete = _connected(datasets_sub.add_parser("delete", help="delete a version, or the whole dataset"))
    delete.add_argument("name")
    delete.add_argument("--version", default="", help="default: every version")
    share = _connected(datasets_sub.add_parser("share", help="let another tenant read (and train on) a dataset"))
    share.add_argument("name")
    share.add_argument("--with", dest="tenant", required=True, metavar="TENANT")
    share.add_argument("--revoke", action="store_true", help="withdraw the tenant's access instead")

    train = _connected(commands.add_parser("train", help="train a model on a dataset, watch it, show its evaluation"))
    train.add_argument("dataset")
    train.add_argument("--owner", default="", help="the dataset's owner, for a dataset shared with you")
    train.add_argument("--dataset-version", default="", help="default: the newest")
    train.add_argument(
        "--base", default="", help="all-MiniLM-L6-v2 (text) or efficientnet-lite0 (images); default: by the task"
    )
    train.add_argument("--name", default="", help="the model to add a version to (default: the dataset's name)")
    train.add_argument("--epochs", type=int, default=0, help="1-500 (default 60 for text, 40 for images)")
    train.add_argument("--learning-rate", type=float, default=0.0, help="(0, 1] (default 0.01)")
    train.add_argument("--batch-size", type=int, default=0, help="1-4096 (default 64)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="[0, 1] (default 0.0001)")
    train.add_argument("--holdout", type=float, default=0.0, help="share held out to evaluate, [0.05, 0.5] (0.2)")
    train.add_argument("--seed", type=int, default=0, help="the same seed and dataset give the same model")
    train.add_argument("--no-wait", action="store_true", help="queue the job and return")

    jobs_cmd = commands.add_parser("jobs", help="training jobs: list, show, watch, cancel")
    jobs_sub = jobs_cmd.add_subparsers(dest="jobs_command", required=True)
    jobs_list = _connected(jobs_sub.add_parser("list", help="your jobs, newest first"))
    jobs_list.add_argument("--limit", type=int, default=0, help="at most this many (default 50)")
    _json_flag(jobs_list)
    show = _connected(jobs_sub.add_parser("show", help="one job in full, with its evaluation"))
    show.add_argument("job")
    _json_flag(show)
    _connected(jobs_sub.add_parser("watch", help="follow a job until it ends")).add_argument("job")
    _connected(jobs_sub.add_parser("cancel", help="stop a queued or running job")).add_argument("job")

    models_cmd = commands.add_parser(
        "models",
        help="the catalogue (list, describe, load, unload) and your own models (versions, deploy, canary, rollback, "
        "export)",
    )
    models_sub = models_cmd.add_subparsers(dest="models_command", required=True)
    add_catalogue_commands(models_sub)
    add_model_commands(models_sub)


COMMANDS: Final[dict[str, Callable[[Stubs, argparse.Namespace], int]]] = {
    "datasets": _datasets_command,
    "train": _train,
    "jobs": _jobs_command,
    "models": _models_command,
}


def run(args: argparse.Namespace) -> int:
    """Runs one of COMMANDS; errors print one line (the gRPC status name, the mesh's reason and message) and exit 1."""
    target = ""
    try:
        with _client(args) as client:
            target = client.target
            return COMMANDS[args.command](Stubs(client), args)
    except grpc.RpcError as err:
        print(rpc_error_line(err, target), file=sys.stderr)
        return 1
    except (CommandError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
