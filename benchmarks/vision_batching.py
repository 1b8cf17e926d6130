"""What dynamic batching buys VisionService/Classify, through the gateway.

Classify (top_k 5) on one real photo per request (skimage's ``coffee``, 400x600, JPEG-encoded by Pillow) at c=16
through the gateway: a mesh (gateway + one vision replica) with the default batching config vs one with
``AIMASS_VISION__CLASSIFY_BATCHING__MAX_BATCH_SIZE=1``, both started here and measured in interleaved rounds. The
batch size is read from the batched replica's ``aimass_batch_size`` histogram (images per batch) when its metrics
endpoint answers (the mesh runs with metrics on). After both meshes stop, the classifier alone is timed
in-process (decode + preprocess per image, the ONNX model at batch 1 and at the served batch size), which shows
what bounds the speedup.

Served vs in-process, alternating: every round also measures, on the batched mesh, a lone request (c=1, p50) and
c=32, then (the meshes idle) the same classifier in this process: one image decoded, preprocessed and classified
back to back (p50; goal: served ≤ in-process + 3 ms) and the rate of decode + preprocess + the model at the batch
size the c=32 run formed (goal: served c=32 ≥ 80% of it).

    python -m benchmarks.vision_batching [--rounds 2] [--duration 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    CpuMeter,
    Mesh,
    batch_histogram,
    command_line,
    machine,
    markdown_table,
    measure_load,
    median,
    publish,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadResult, LoadSpec

NAME = "vision_batching"
METHOD = "aimass.v1.VisionService/Classify"
CONCURRENCY = 16
TOP_K = 5
JPEG_QUALITY = 90
SPEEDUP_GOAL = 2.5
PROCESSES = ("client", "gateway", "replica")
REPLICAS = {"vision": 1}
BATCHED = "batched"
UNBATCHED = "unbatched"
LONE = "lone"  # c=1 on the batched mesh
WIDE = "c32"  # c=32 on the batched mesh
WIDE_CONCURRENCY = 32
LONE_GOAL_MS = 3.0
SERVED_RATIO_GOAL = 0.80


def photo_jpeg() -> bytes:
    """skimage's ``coffee`` photo (400x600 RGB) as a JPEG, at its native size."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    photo = data.coffee()  # type: ignore[no-untyped-call]  # skimage ships no annotations for it
    Image.fromarray(photo).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@dataclass(frozen=True)
class Served:
    label: str
    round: int
    result: LoadResult
    cpu_ms_per_image: dict[str, float]
    avg_batch: float | None  # images per model call, from the replica's histogram
    # CPU used meanwhile by processes outside this benchmark, in % of one CPU.
    others_pct: float

    @property
    def images_per_s(self) -> float:
        return self.result.rps  # one image per request


@dataclass(frozen=True)
class ModelAlone:
    """The classifier in-process, one thread calling it back to back (ms of wall time per image)."""

    prepare_ms: float  # decode (at least 256 px on the short side) + preprocess, per image
    model_ms_batch1: float
    batch: int
    model_ms_batched: float
    # CPU ms per image (this process, all threads) for the same three.
    prepare_cpu_ms: float
    model_cpu_ms_batch1: float
    model_cpu_ms_batched: float
    others_pct: float  # the most CPU other processes used during any of the three, % of one CPU


async def serve_load(
    label: str,
    mesh: Mesh,
    target: str,
    request: dict[str, object],
    pids: dict[str, int],
    rnd: int,
    duration: float,
    port: int | None,
    concurrency: int = CONCURRENCY,
) -> Served:
    spec = LoadSpec(
        target=target,
        method=METHOD,
        request=request,
        concurrency=concurrency,
        duration_s=duration,
        warmup=concurrency * 2,
        deadline_s=30.0,
        progress=False,
        **mesh.access(target),
    )
    measured = await measure_load(spec, pids, port, "classify")
    result, avg_batch = measured.result, measured.avg_batch
    images = result.requests + spec.warmup
    cpu = {name: seconds * 1000 / images for name, seconds in measured.cpu_seconds.items()}
    sample = Served(label, rnd, result, cpu, avg_batch, measured.others_pct)
    print(
        f"  round {rnd + 1} {label:<10} {sample.images_per_s:7,.1f} images/s  p50 {result.latency.p50_ms:7.1f} ms"
        f"  p99 {result.latency.p99_ms:7.1f} ms  non-OK {result.errors}  others {measured.others_pct:.0f}% CPU"
        + (f"  avg batch {avg_batch:.1f}" if avg_batch is not None else ""),
        file=sys.stderr,
    )
    return sample


@dataclass(frozen=True)
class Local:
    """The classifier in this process, measured in one round right after the served runs."""

    round: int
    lone_p50_ms: float  # one image: decode + preprocess + model at batch 1
    # The same with the cores left idle between calls as long as a served call spends outside the classifier (the
    # served c=1 p50 minus lone_p50_ms): how much slower the same work runs on cores that idled in between.
    gapped_p50_ms: float
    batch: int
    images_per_s: float  # decode + preprocess per image + the model at ``batch``, one caller


async def run_served(
    batched: Mesh,
    unbatched: Mesh,
    request: dict[str, object],
    rounds: int,
    duration: float,
    port: int | None,
    quiet: Callable[[], object],
    local: Callable[[int, int, float], Local] | None = None,
) -> tuple[list[Served], list[Local]]:
    """Interleaved rounds; ``quiet`` (waiting for other busy processes to finish) runs before every measurement, and
    ``local(round, batch, served c=1 p50 ms)`` after each round's served runs."""
    me = os.getpid()
    batched_pids = {"client": me, **batched.pids()}
    unbatched_pids = {"client": me, **unbatched.pids()}
    samples: list[Served] = []
    locals_: list[Local] = []
    for rnd in range(rounds):
        quiet()
        samples.append(await serve_load(BATCHED, batched, batched.gateway, request, batched_pids, rnd, duration, port))
        quiet()
        samples.append(
            await serve_load(UNBATCHED, unbatched, unbatched.gateway, request, unbatched_pids, rnd, duration, None)
        )
        if local is None:
            continue
        quiet()
        lone = await serve_load(LONE, batched, batched.gateway, request, batched_pids, rnd, duration, None, 1)
        samples.append(lone)
        quiet()
        wide = await serve_load(
            WIDE, batched, batched.gateway, request, batched_pids, rnd, duration, port, WIDE_CONCURRENCY
        )
        samples.append(wide)
        quiet()
        batch = max(1, round(wide.avg_batch)) if wide.avg_batch else WIDE_CONCURRENCY
        locals_.append(local(rnd, batch, lone.result.latency.p50_ms))
    return samples, locals_


def local_classifier(jpeg: bytes, seconds: float) -> Callable[[int, int, float], Local]:
    """Loads the classifier in this process (the replica's defaults) and returns the per-round measurement."""
    import numpy as np

    from aimass.runtime.config import VisionConfig
    from services.vision.engine import CLASSIFY_MODEL, RESIZE_SIZE, Tensor, VisionEngine, preprocess
    from services.vision.images import decode_all

    print("loading the classifier in-process ...", file=sys.stderr)
    config = VisionConfig()
    engine = VisionEngine(config)
    engine.models.load(CLASSIFY_MODEL)

    def prepare() -> Tensor:
        return preprocess(decode_all([jpeg], config, min_side=RESIZE_SIZE)[0].image)

    def measure(rnd: int, batch: int, served_lone_ms: float) -> Local:
        lone, _, _ = per_call_ms(lambda: engine.classify_logits(np.stack([prepare()])), seconds)
        gap_s = max(0.0, served_lone_ms - lone) / 1000
        gapped, _, _ = per_call_ms(lambda: engine.classify_logits(np.stack([prepare()])), seconds, gap_s=gap_s)
        many = np.repeat(np.stack([prepare()]), batch, axis=0)
        prepare_ms, _, _ = per_call_ms(prepare, seconds / 2)
        model_ms, _, _ = per_call_ms(lambda: engine.classify_logits(many), seconds / 2)
        sample = Local(rnd, lone, gapped, batch, 1000 / (prepare_ms + model_ms / batch))
        print(
            f"  round {rnd + 1} in-process lone p50 {lone:.1f} ms ({gapped:.1f} with {gap_s * 1000:.1f} ms idle between"
            f" calls), {sample.images_per_s:.1f} images/s at batch {batch}",
            file=sys.stderr,
        )
        return sample

    return measure


def per_call_ms(call: Callable[[], object], seconds: float, gap_s: float = 0.0) -> tuple[float, float, float]:
    """Median wall ms and mean CPU ms (this process) of ``call``, run back to back (or ``gap_s`` apart) for about
    ``seconds``, and the CPU other processes used meanwhile (% of one CPU)."""
    call()
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    with CpuMeter({"self": os.getpid()}) as meter:
        while time.perf_counter() < stop_at or len(times) < 3:
            if gap_s:
                time.sleep(gap_s)
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return median(times) * 1000, meter.used["self"] * 1000 / len(times), meter.others_pct


def run_model_alone(jpeg: bytes, batch: int, seconds: float, quiet: Callable[[], object]) -> ModelAlone:
    """Decode + preprocess one image, and the ONNX classifier at batch 1 and ``batch``, in this process."""
    import numpy as np

    from aimass.runtime.config import VisionConfig
    from services.vision.engine import CLASSIFY_MODEL, RESIZE_SIZE, Tensor, VisionEngine, preprocess
    from services.vision.images import decode_all

    print("loading the classifier in-process ...", file=sys.stderr)
    config = VisionConfig()
    engine = VisionEngine(config)
    engine.models.load(CLASSIFY_MODEL)

    def prepare() -> Tensor:
        return preprocess(decode_all([jpeg], config, min_side=RESIZE_SIZE)[0].image)

    one = np.stack([prepare()])
    many = np.repeat(one, batch, axis=0)
    quiet()
    prepare_ms, prepare_cpu, others1 = per_call_ms(prepare, seconds)
    quiet()
    batch1, batch1_cpu, others2 = per_call_ms(lambda: engine.classify_logits(one), seconds)
    quiet()
    batched, batched_cpu, others3 = per_call_ms(lambda: engine.classify_logits(many), seconds)
    others = max(others1, others2, others3)
    alone = ModelAlone(prepare_ms, batch1, batch, batched / batch, prepare_cpu, batch1_cpu, batched_cpu / batch, others)
    print(
        f"  in-process: decode+preprocess {prepare_ms:.1f} ms/image ({prepare_cpu:.1f} CPU), model {batch1:.1f}"
        f" ms/image ({batch1_cpu:.1f} CPU) at batch 1, {alone.model_ms_batched:.1f}"
        f" ({alone.model_cpu_ms_batched:.1f} CPU) at batch {batch}  others {others:.0f}% CPU",
        file=sys.stderr,
    )
    return alone


@dataclass(frozen=True)
class Figures:
    served: Sequence[Served]
    alone: ModelAlone | None
    local: Sequence[Local] = ()

    def rows(self, label: str) -> list[Served]:
        return [s for s in self.served if s.label == label]

    def images_per_s(self, label: str) -> float:
        return median(s.images_per_s for s in self.rows(label))

    def median_of(self, label: str, attr: str) -> float:
        return median(getattr(s.result.latency, attr) for s in self.rows(label))

    @property
    def speedup(self) -> float:
        return self.images_per_s(BATCHED) / self.images_per_s(UNBATCHED)

    def cpu(self, label: str) -> dict[str, float]:
        got = self.rows(label)
        return {p: median(s.cpu_ms_per_image.get(p, 0.0) for s in got) for p in PROCESSES}

    def avg_batch(self, label: str) -> float | None:
        sizes = [s.avg_batch for s in self.rows(label) if s.avg_batch is not None]
        return median(sizes) if sizes else None

    def cores(self, label: str) -> float:
        return self.images_per_s(label) * sum(self.cpu(label).values()) / 1000


def report(f: Figures, *, host: str, date: str, rounds: int, duration: float, jpeg_bytes: int, busy: list[str]) -> str:
    batch = f.avg_batch(BATCHED)
    table = markdown_table(
        (f"Classify through the gateway, c={CONCURRENCY}", "images/s", "p50 ms", "p99 ms", "avg batch"),
        [
            (
                "batching on (default config)",
                f"{f.images_per_s(BATCHED):,.1f}",
                f"{f.median_of(BATCHED, 'p50_ms'):.1f}",
                f"{f.median_of(BATCHED, 'p99_ms'):.1f}",
                f"{batch:.1f}" if batch is not None else "-",
            ),
            (
                "max_batch_size = 1",
                f"{f.images_per_s(UNBATCHED):,.1f}",
                f"{f.median_of(UNBATCHED, 'p50_ms'):.1f}",
                f"{f.median_of(UNBATCHED, 'p99_ms'):.1f}",
                "1",
            ),
            ("**speedup**", f"**{f.speedup:.2f}x**", "", "", ""),
        ],
    )
    cpu_rows = []
    for label, name in ((BATCHED, "batching on"), (UNBATCHED, "max_batch_size = 1")):
        cpu = f.cpu(label)
        cpu_rows.append(
            (name, *(f"{cpu[p]:.2f}" for p in PROCESSES), f"{sum(cpu.values()):.2f}", f"{f.cores(label):.2f}")
        )
    cpu_table = markdown_table(
        ("run", *(f"{p} CPU ms/image" for p in PROCESSES), "total", f"cores busy (of {os.cpu_count()})"), cpu_rows
    )
    raw = markdown_table(
        (
            "round",
            "run",
            "c",
            "requests",
            "s",
            "images/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "non-OK",
            "avg batch",
            "other procs CPU %",
        ),
        [
            (
                str(s.round + 1),
                s.label,
                str(s.result.concurrency),
                str(s.result.requests),
                f"{s.result.elapsed_s:.2f}",
                f"{s.images_per_s:,.1f}",
                f"{s.result.latency.p50_ms:.1f}",
                f"{s.result.latency.p95_ms:.1f}",
                f"{s.result.latency.p99_ms:.1f}",
                str(s.result.errors),
                f"{s.avg_batch:.1f}" if s.avg_batch is not None else "-",
                f"{s.others_pct:.0f}",
            )
            for s in f.served
        ],
    )
    batch_source = (
        "avg batch: images per model call from the batched replica's aimass_batch_size histogram"
        if batch is not None
        else "avg batch: the replica's metrics endpoint did not answer, so the batch size could not be read"
    )
    parts = [
        "## Vision batching",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"VisionService/Classify (top_k {TOP_K}) on one real photo per request (skimage's `coffee`, 400x600, JPEG"
        f" quality {JPEG_QUALITY}, {jpeg_bytes:,} bytes) from loadtest.generator at c={CONCURRENCY} through the"
        f" gateway; {rounds} interleaved rounds of {duration:g} s, median. Two meshes (gateway + one vision replica"
        " each) run side by side, one with the default batching config, one with"
        " `AIMASS_VISION__CLASSIFY_BATCHING__MAX_BATCH_SIZE=1`; only one is loaded at a time. " + batch_source + ".",
        "",
        table,
        "",
        goal_line(f),
    ]
    if f.local:
        lone_local = median(x.lone_p50_ms for x in f.local)
        lone_served = f.median_of(LONE, "p50_ms")
        wide_local = median(x.images_per_s for x in f.local)
        wide_served = f.images_per_s(WIDE)
        # Side by side per round, median round: the host is shared and noisy.
        by_round = {x.round: x for x in f.local}
        lone_by_round = {x.round: x.result.latency.p50_ms for x in f.rows(LONE)}
        wide_by_round = {x.round: x.images_per_s for x in f.rows(WIDE)}
        extra = median(lone_by_round[r] - by_round[r].lone_p50_ms for r in by_round.keys() & lone_by_round.keys())
        ratio = median(wide_by_round[r] / by_round[r].images_per_s for r in by_round.keys() & wide_by_round.keys())
        batches = ", ".join(str(x.batch) for x in f.local)
        gapped = median(x.gapped_p50_ms for x in f.local)
        extra_gapped = median(
            lone_by_round[r] - by_round[r].gapped_p50_ms for r in by_round.keys() & lone_by_round.keys()
        )
        parts += [
            "",
            "Served vs the same classifier in-process, alternating round by round (the in-process side runs in this"
            " process right after each round's served runs, the meshes idle):",
            "",
            markdown_table(
                (
                    "Classify, one photo per request",
                    "in-process",
                    "served (gateway)",
                    "served vs in-process, median round",
                ),
                [
                    (
                        "c=1, p50 ms",
                        f"{lone_local:.1f}",
                        f"{lone_served:.1f}",
                        f"**{extra:+.1f} ms**",
                    ),
                    (
                        f"c={WIDE_CONCURRENCY}, images/s (in-process: batches of {batches})",
                        f"{wide_local:,.1f}",
                        f"{wide_served:,.1f}",
                        f"**{ratio:.2f}**",
                    ),
                ],
            ),
            "",
            f"- c=1 p50: {extra:+.1f} ms over in-process (goal ≤ +{LONE_GOAL_MS:g} ms):"
            + (" met." if extra <= LONE_GOAL_MS else " **missed**."),
            f"- The same in-process call with the cores left idle between calls as long as a served call spends"
            f" outside the classifier ({extra:.1f} ms): {gapped:.1f} ms p50, {gapped - lone_local:+.1f} ms against back"
            f" to back, so served vs this in-process figure is {extra_gapped:+.1f} ms"
            + (
                ": the cores idling between requests (cache, clock) explain little of the served call's extra time."
                if gapped - lone_local < extra / 2
                else ": much of the served call's extra time is the same work running slower on cores that idled."
            ),
            f"- c={WIDE_CONCURRENCY}: {ratio:.2f} of the in-process batched rate (goal ≥ {SERVED_RATIO_GOAL:.2f}):"
            + (" met." if ratio >= SERVED_RATIO_GOAL else " **missed**."),
        ]
    if f.alone is not None:
        parts += ["", alone_line(f.alone)]
    if busy:
        parts += [
            "",
            "Other busy processes still running after waiting for them before a measurement (see the last column of"
            " the raw figures for their share):",
            *(f"- {b}" for b in busy),
        ]
    parts += [
        "",
        "CPU per image by process (from /proc, median of rounds):",
        "",
        cpu_table,
        "",
        "Raw figures:",
        "",
        raw,
    ]
    return "\n".join(parts)


def goal_line(f: Figures) -> str:
    text = f"- Speedup from batching: **{f.speedup:.2f}x** (goal ≥ {SPEEDUP_GOAL:g}x): "
    if f.speedup >= SPEEDUP_GOAL:
        return text + "met."
    on, off = f.cpu(BATCHED), f.cpu(UNBATCHED)
    total_on, total_off = sum(on.values()), sum(off.values())
    text += (
        f"**missed**. Throughput follows CPU per image on {os.cpu_count()} shared cores ({f.cores(BATCHED):.2f} and"
        f" {f.cores(UNBATCHED):.2f} busy): batching cut it from {total_off:.2f} to {total_on:.2f} ms (replica"
        f" {off['replica']:.2f} → {on['replica']:.2f}, gateway {off['gateway']:.2f} → {on['gateway']:.2f}, client"
        f" {off['client']:.2f} → {on['client']:.2f})."
    )
    a = f.alone
    if a is None:
        return text + " Decoding and preprocessing are per image and batching does not touch them."
    floor = a.prepare_cpu_ms + a.model_cpu_ms_batched
    return text + (
        f" What bounds it: onnxruntime already spreads one image over both cores, so the model's CPU per image barely"
        f" drops with batch size ({a.model_cpu_ms_batch1:.1f} → {a.model_cpu_ms_batched:.1f} ms at batch {a.batch},"
        f" in-process below), and decode + preprocess ({a.prepare_cpu_ms:.1f} ms) is per image. Even with no serving"
        f" cost at all the batched side could not go below {floor:.1f} ms per image, a ceiling of"
        f" {total_off / floor:.2f}x over this unbatched figure; what batching did save is mostly the replica's work"
        f" per model call beyond the model itself ({off['replica'] - a.prepare_cpu_ms - a.model_cpu_ms_batch1:.1f} ms"
        f" per image unbatched, {on['replica'] - floor:.1f} batched)."
    )


def alone_line(a: ModelAlone) -> str:
    return (
        f"- The classifier alone, in-process (one caller, ms per image, wall / CPU): decode + preprocess"
        f" {a.prepare_ms:.1f} / {a.prepare_cpu_ms:.1f}; the ONNX model {a.model_ms_batch1:.1f} /"
        f" {a.model_cpu_ms_batch1:.1f} at batch 1 and {a.model_ms_batched:.1f} / {a.model_cpu_ms_batched:.1f} at batch"
        f" {a.batch} (CPU per image at batch {a.batch}: {a.model_cpu_ms_batched / a.model_cpu_ms_batch1:.2f} of batch"
        f" 1's); other processes used up to {a.others_pct:.0f}% of a CPU meanwhile."
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m benchmarks.vision_batching", description=(__doc__ or "").split("\n")[0]
    )
    cli.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    cli.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    cli.add_argument(
        "--no-in-process", action="store_true", help="skip timing the classifier alone in-process after the meshes"
    )
    cli.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each measurement, wait up to this long for other busy processes (default 60)",
    )
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = cli.parse_args(argv)
    if not 1 <= args.rounds <= 5 or not 1 <= args.duration <= 10:
        cli.error("rounds must be 1..5 and duration 1..10 s (the whole run stays bounded)")
    host, date = machine(), utc_now()
    jpeg = photo_jpeg()
    request: dict[str, object] = {
        "images": [{"data": base64.b64encode(jpeg).decode(), "mime_type": "image/jpeg"}],
        "top_k": TOP_K,
    }
    batched = Mesh("vision-batched", replicas=REPLICAS)
    # `aimass up` gives every process a metrics port of its own when asked (LocalMesh.metrics).
    batched.metrics = True
    unbatched = Mesh(
        "vision-unbatched", env={"AIMASS_VISION__CLASSIFY_BATCHING__MAX_BATCH_SIZE": "1"}, replicas=REPLICAS
    )
    measure = local_classifier(jpeg, 2.0)
    print("starting two vision meshes (batching on / max_batch_size 1; models load first) ...", file=sys.stderr)
    batched.start()
    unbatched.start()
    try:
        batched.wait_ready()
        unbatched.wait_ready()
        assert batched.process is not None and unbatched.process is not None
        mesh_pids = [batched.process.pid, unbatched.process.pid, *batched.pids().values(), *unbatched.pids().values()]
        busy = wait_quiet(args.wait_quiet, exclude=mesh_pids)
        metrics_port = int(batched.metrics_address("vision-0").rpartition(":")[2])
        scrape = metrics_port if batch_histogram(metrics_port, "classify") is not None else None

        def quiet_served() -> None:
            busy.extend(wait_quiet(args.wait_quiet, exclude=mesh_pids))

        served, local = asyncio.run(
            run_served(batched, unbatched, request, args.rounds, args.duration, scrape, quiet_served, measure)
        )
    finally:
        unbatched.stop()
        batched.stop()
    alone = None
    if not args.no_in_process:
        sizes = [s.avg_batch for s in served if s.label == BATCHED and s.avg_batch is not None]
        batch = max(1, round(median(sizes))) if sizes else CONCURRENCY
        alone = run_model_alone(jpeg, batch, 2.0, lambda: busy.extend(wait_quiet(args.wait_quiet)))
    text = report(
        Figures(served, alone, local),
        host=host,
        date=date,
        rounds=args.rounds,
        duration=args.duration,
        jpeg_bytes=len(jpeg),
        busy=busy,
    )
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
