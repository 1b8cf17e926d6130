"""What dynamic batching buys, and what serving costs next to calling the model in-process.

(a) Embed throughput at c=32 through the gateway, one short sentence per request: a mesh with the default
    batching config vs a mesh with ``AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE=1`` (both started here, measured
    interleaved).
(b) The served, batched Embed vs ``NlpEngine.embed_batch`` called in-process with batches of the size the server
    formed, twice: one text per request at c=32, and ``--texts-per-request`` texts (default 8) per request at
    c=32/texts-per-request, so that the same 32 texts are in flight with fewer, larger requests; both through the
    gateway and straight to the replica. The batch size is read from the replica's ``aimass_batch_size`` histogram
    (texts per batch) when its metrics endpoint answers (the mesh runs with metrics on), else a fixed 32
    texts; the in-process jobs carry as many texts each as the served requests did. The in-process side runs after
    both meshes have stopped, so the two never share the CPU. Comparing the two request shapes shows whether what
    serving costs is per request (gRPC calls) or per text.
(c) Latency of a lone request: Embed of one sentence at c=1 through the gateway (p50) vs the same
    ``NlpEngine.embed_batch`` call in-process (p50 of back-to-back calls). The batcher runs a request that finds the
    model idle at once, so the served p50 should be the in-process one plus the two gRPC hops (goal: ≤ +3 ms).

The in-process engine is loaded in this process before the meshes start and measured in every round right after
the served runs (the meshes idle meanwhile), so served and in-process figures alternate round by round; the
in-process batch shapes come from the first round's served batch sizes.

    python -m benchmarks.batching [--rounds 3] [--duration 5] [--texts-per-request 8] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    CpuMeter,
    Mesh,
    batch_histogram,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    measure_load,
    median,
    publish,
    rounds_cli,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadResult, LoadSpec

NAME = "batching"
METHOD = "aimass.v1.NlpService/Embed"
TEXT = "The quick brown fox jumps over the lazy dog."
# Texts in flight at once, whatever the request shape: c=32 with one text each, or c=32/k with k texts each.
TEXTS_IN_FLIGHT = 32
FALLBACK_BATCH = 32
DEFAULT_TEXTS_PER_REQUEST = 8
SPEEDUP_GOAL = 3.0
SERVED_RATIO_GOAL = 0.80
PROCESSES = ("client", "gateway", "replica")
# Served runs: label → (mesh, path); every label is measured once per round, in this order.
BATCHED_GATEWAY = "batched-gateway"
UNBATCHED_GATEWAY = "unbatched-gateway"
BATCHED_DIRECT = "batched-direct"
MULTI_GATEWAY = "multi-gateway"
MULTI_DIRECT = "multi-direct"
LONE_GATEWAY = "lone-gateway"
LONE_GOAL_MS = 3.0


@dataclass(frozen=True)
class Served:
    label: str
    round: int
    texts_per_request: int
    result: LoadResult
    cpu_ms_per_text: dict[str, float]
    avg_batch: float | None  # texts per model call, from the replica's histogram
    # CPU used meanwhile by processes outside this benchmark, in % of one CPU.
    others_pct: float

    @property
    def texts_per_s(self) -> float:
        return self.result.rps * self.texts_per_request


@dataclass(frozen=True)
class InProcess:
    jobs: int
    texts_per_job: int
    round: int
    texts: int
    elapsed_s: float
    cpu_ms_per_text: float
    others_pct: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.elapsed_s

    @property
    def label(self) -> str:
        return jobs_label(self.jobs, self.texts_per_job)


def jobs_label(jobs: int, texts_per_job: int) -> str:
    return f"{jobs} jobs of {texts_per_job} text" + ("s" if texts_per_job > 1 else "")


async def serve_load(
    label: str,
    mesh: Mesh,
    target: str,
    pids: dict[str, int],
    rnd: int,
    duration: float,
    metrics_port: int | None,
    texts_per_request: int = 1,
    concurrency: int | None = None,
) -> Served:
    concurrency = concurrency or TEXTS_IN_FLIGHT // texts_per_request
    spec = LoadSpec(
        target=target,
        method=METHOD,
        request={"texts": [TEXT] * texts_per_request},
        concurrency=concurrency,
        duration_s=duration,
        warmup=concurrency * 2,
        deadline_s=30.0,
        progress=False,
        **mesh.access(target),
    )
    measured = await measure_load(spec, pids, metrics_port, "embed")
    result, avg_batch = measured.result, measured.avg_batch
    texts = (result.requests + spec.warmup) * texts_per_request
    cpu = {name: seconds * 1000 / texts for name, seconds in measured.cpu_seconds.items()}
    sample = Served(label, rnd, texts_per_request, result, cpu, avg_batch, measured.others_pct)
    print(
        f"  round {rnd + 1} {label:<18} {sample.texts_per_s:7,.1f} texts/s  p50 {result.latency.p50_ms:7.1f} ms"
        f"  p99 {result.latency.p99_ms:7.1f} ms  non-OK {result.errors}  others {measured.others_pct:.0f}% CPU"
        + (f"  avg batch {avg_batch:.1f}" if avg_batch is not None else ""),
        file=sys.stderr,
    )
    return sample


@dataclass(frozen=True)
class Lone:
    """In-process latency of one call of one text, back to back."""

    round: int
    calls: int
    p50_ms: float
    p99_ms: float


def lone_in_process(engine: Any, rnd: int, duration: float) -> Lone:
    from services.nlp.engine import EmbedJob

    job = [EmbedJob((TEXT,), False, count_tokens=True)]
    times: list[float] = []
    stop_at = time.perf_counter() + duration
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        engine.embed_batch(job)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    sample = Lone(rnd, len(times), median(times), times[min(len(times) - 1, int(len(times) * 0.99))])
    print(f"  round {rnd + 1} in-process lone call    p50 {sample.p50_ms:7.2f} ms", file=sys.stderr)
    return sample


def load_engine() -> Any:
    from services.nlp.engine import NlpEngine

    print("loading NlpEngine in-process ...", file=sys.stderr)
    # The replica's own defaults (device, model_threads), so both sides run the model the same way.
    engine = NlpEngine(device="cpu")
    engine.load(progress=lambda _: None)
    return engine


@dataclass(frozen=True)
class Rounds:
    served: list[Served]
    local: list[InProcess]
    lone: list[Lone]
    single: Shape
    multi: Shape


async def run_rounds(
    engine: Any,
    batched: Mesh,
    unbatched: Mesh,
    rounds: int,
    duration: float,
    metrics_port: int | None,
    texts_per_request: int,
) -> Rounds:
    """Each round: the served runs, then the in-process ones (the meshes idle meanwhile)."""
    me = os.getpid()
    batched_pids = {"client": me, **batched.pids()}
    unbatched_pids = {"client": me, **unbatched.pids()}
    k = texts_per_request
    samples: list[Served] = []
    local: list[InProcess] = []
    lone: list[Lone] = []
    shapes: tuple[Shape, Shape] | None = None
    for rnd in range(rounds):
        samples.append(
            await serve_load(LONE_GATEWAY, batched, batched.gateway, batched_pids, rnd, duration, None, 1, 1)
        )
        samples.append(
            await serve_load(BATCHED_GATEWAY, batched, batched.gateway, batched_pids, rnd, duration, metrics_port)
        )
        samples.append(
            await serve_load(UNBATCHED_GATEWAY, unbatched, unbatched.gateway, unbatched_pids, rnd, duration, None)
        )
        samples.append(
            await serve_load(BATCHED_DIRECT, batched, batched.replica, batched_pids, rnd, duration, metrics_port)
        )
        samples.append(
            await serve_load(MULTI_GATEWAY, batched, batched.gateway, batched_pids, rnd, duration, metrics_port, k)
        )
        samples.append(
            await serve_load(MULTI_DIRECT, batched, batched.replica, batched_pids, rnd, duration, metrics_port, k)
        )
        if shapes is None:
            shapes = (
                shape_for(samples, BATCHED_GATEWAY, BATCHED_DIRECT, 1),
                shape_for(samples, MULTI_GATEWAY, MULTI_DIRECT, k),
            )
        local += run_in_process(engine, [shape.key for shape in shapes], rnd, duration)
        lone.append(lone_in_process(engine, rnd, duration))
    assert shapes is not None
    return Rounds(samples, local, lone, *shapes)


def run_in_process(engine: Any, shapes: Sequence[tuple[int, int]], rnd: int, duration: float) -> list[InProcess]:
    """NlpEngine.embed_batch, back to back in this process, for each (jobs, texts per job) shape."""
    from services.nlp.engine import EmbedJob

    batches = {
        shape: [EmbedJob((TEXT,) * shape[1], False, count_tokens=True) for _ in range(shape[0])] for shape in shapes
    }
    for jobs in batches.values():
        for _ in range(3):
            engine.embed_batch(jobs)
    samples = []
    for (count, per_job), jobs in batches.items():
        texts = 0
        with CpuMeter({"self": os.getpid()}) as meter:
            started = time.perf_counter()
            stop_at = started + duration
            while time.perf_counter() < stop_at:
                engine.embed_batch(jobs)
                texts += count * per_job
            elapsed = time.perf_counter() - started
        sample = InProcess(count, per_job, rnd, texts, elapsed, meter.used["self"] * 1000 / texts, meter.others_pct)
        print(
            f"  round {rnd + 1} in-process {sample.label:<17} {sample.texts_per_s:7,.1f} texts/s"
            f"  others {meter.others_pct:.0f}% CPU",
            file=sys.stderr,
        )
        samples.append(sample)
    return samples


@dataclass(frozen=True)
class Shape:
    """One request shape of part (b): served runs and the in-process batches they are compared with."""

    texts_per_request: int
    gateway_label: str
    direct_label: str
    jobs: int  # in-process jobs per batch (each of texts_per_request texts)
    batch_source: str

    @property
    def concurrency(self) -> int:
        return TEXTS_IN_FLIGHT // self.texts_per_request

    @property
    def key(self) -> tuple[int, int]:
        return self.jobs, self.texts_per_request


@dataclass(frozen=True)
class Figures:
    served: Sequence[Served]
    local: Sequence[InProcess]
    single: Shape
    multi: Shape
    lone: Sequence[Lone]

    @property
    def lone_served_p50(self) -> float:
        return self.median_of(LONE_GATEWAY, "p50_ms")

    @property
    def lone_local_p50(self) -> float:
        return median(s.p50_ms for s in self.lone)

    def rows(self, label: str) -> list[Served]:
        return [s for s in self.served if s.label == label]

    def texts_per_s(self, label: str) -> float:
        return median(s.texts_per_s for s in self.rows(label))

    def local_rows(self, shape: Shape) -> list[InProcess]:
        return [s for s in self.local if (s.jobs, s.texts_per_job) == shape.key]

    def in_process(self, shape: Shape) -> float:
        return median(s.texts_per_s for s in self.local_rows(shape))

    def local_cpu(self, shape: Shape) -> float:
        return median(s.cpu_ms_per_text for s in self.local_rows(shape))

    def ratio(self, shape: Shape, label: str | None = None) -> float:
        """Served / in-process, each round's pair side by side, median round (the host is shared and noisy)."""
        served = {s.round: s.texts_per_s for s in self.rows(label or shape.gateway_label)}
        local = {s.round: s.texts_per_s for s in self.local_rows(shape)}
        return median(served[r] / local[r] for r in served.keys() & local.keys())

    @property
    def lone_extra_ms(self) -> float:
        """Served minus in-process c=1 p50, per round, median round."""
        served = {s.round: s.result.latency.p50_ms for s in self.rows(LONE_GATEWAY)}
        local = {s.round: s.p50_ms for s in self.lone}
        return median(served[r] - local[r] for r in served.keys() & local.keys())

    @property
    def speedup(self) -> float:
        served = {s.round: s.texts_per_s for s in self.rows(BATCHED_GATEWAY)}
        unbatched = {s.round: s.texts_per_s for s in self.rows(UNBATCHED_GATEWAY)}
        return median(served[r] / unbatched[r] for r in served.keys() & unbatched.keys())

    def median_of(self, label: str, attr: str) -> float:
        return median(getattr(s.result.latency, attr) for s in self.rows(label))

    def cpu(self, label: str) -> dict[str, float]:
        got = self.rows(label)
        return {p: median(s.cpu_ms_per_text.get(p, 0.0) for s in got) for p in PROCESSES}

    def avg_batch(self, label: str) -> float | None:
        sizes = [s.avg_batch for s in self.rows(label) if s.avg_batch is not None]
        return median(sizes) if sizes else None


def shape_for(served: Sequence[Served], label: str, direct_label: str, texts_per_request: int) -> Shape:
    """The in-process batches for a served run: the server's median average batch (in texts), as whole jobs."""
    sizes = [s.avg_batch for s in served if s.label == label and s.avg_batch is not None]
    if sizes:
        texts = median(sizes)
        source = f"the server averaged {texts:.1f} texts per batch (its aimass_batch_size histogram)"
    else:
        texts = FALLBACK_BATCH
        source = (
            f"fixed {FALLBACK_BATCH} texts: the replica's metrics endpoint did not answer (the mesh was started"
            " with metrics on), so the server's own batch size could not be read"
        )
    jobs = max(1, round(texts / texts_per_request))
    return Shape(texts_per_request, label, direct_label, jobs, source)


def served_label(shape: Shape, path: str) -> str:
    texts = "1 text" if shape.texts_per_request == 1 else f"{shape.texts_per_request} texts"
    return f"served, {path}, {texts} per request, c={shape.concurrency}"


def report(f: Figures, *, host: str, date: str, rounds: int, duration: float, busy: list[str]) -> str:
    table_a = markdown_table(
        ("Embed through the gateway, c=32", "texts/s", "p50 ms", "p99 ms"),
        [
            (
                "batching on (default config)",
                f"{f.texts_per_s(BATCHED_GATEWAY):,.1f}",
                f"{f.median_of(BATCHED_GATEWAY, 'p50_ms'):.1f}",
                f"{f.median_of(BATCHED_GATEWAY, 'p99_ms'):.1f}",
            ),
            (
                "max_batch_size = 1",
                f"{f.texts_per_s(UNBATCHED_GATEWAY):,.1f}",
                f"{f.median_of(UNBATCHED_GATEWAY, 'p50_ms'):.1f}",
                f"{f.median_of(UNBATCHED_GATEWAY, 'p99_ms'):.1f}",
            ),
            ("**speedup**", f"**{f.speedup:.2f}x**", "", ""),
        ],
    )
    b_rows = []
    for shape in (f.single, f.multi):
        b_rows += [
            (
                f"in-process `embed_batch`, {jobs_label(shape.jobs, shape.texts_per_request)} per batch",
                f"{f.in_process(shape):,.1f}",
                "1.00",
            ),
            (
                served_label(shape, "through the gateway"),
                f"{f.texts_per_s(shape.gateway_label):,.1f}",
                f"**{f.ratio(shape):.2f}**",
            ),
            (
                served_label(shape, "straight to the replica"),
                f"{f.texts_per_s(shape.direct_label):,.1f}",
                f"{f.ratio(shape, shape.direct_label):.2f}",
            ),
        ]
    table_b = markdown_table(("path", "texts/s", "ratio to in-process"), b_rows)
    table_c = markdown_table(
        ("Embed, one sentence, c=1", "p50 ms", "p99 ms"),
        [
            (
                "in-process `embed_batch` (one job of one text)",
                f"{f.lone_local_p50:.2f}",
                f"{median(s.p99_ms for s in f.lone):.2f}",
            ),
            (
                "served, through the gateway",
                f"{f.lone_served_p50:.2f}",
                f"{f.median_of(LONE_GATEWAY, 'p99_ms'):.2f}",
            ),
            ("**served minus in-process** (median round)", f"**{f.lone_extra_ms:+.2f}**", ""),
        ],
    )
    cpu_rows = []
    for label in (BATCHED_GATEWAY, BATCHED_DIRECT, MULTI_GATEWAY, MULTI_DIRECT, UNBATCHED_GATEWAY):
        cpu = f.cpu(label)
        cpu_rows.append((label, *(f"{cpu[p]:.2f}" for p in PROCESSES), f"{sum(cpu.values()):.2f}"))
    for shape in (f.single, f.multi):
        local_cpu = f.local_cpu(shape)
        name = f"in-process, {f.local_rows(shape)[0].label}"
        cpu_rows.append((name, "-", "-", f"{local_cpu:.2f}", f"{local_cpu:.2f}"))
    cpu_table = markdown_table(("run", *(f"{p} CPU ms/text" for p in PROCESSES), "total"), cpu_rows)
    raw = markdown_table(
        (
            "round",
            "run",
            "texts/req",
            "c",
            "requests",
            "s",
            "texts/s",
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
                str(s.texts_per_request),
                str(s.result.concurrency),
                str(s.result.requests),
                f"{s.result.elapsed_s:.2f}",
                f"{s.texts_per_s:,.1f}",
                f"{s.result.latency.p50_ms:.1f}",
                f"{s.result.latency.p95_ms:.1f}",
                f"{s.result.latency.p99_ms:.1f}",
                str(s.result.errors),
                f"{s.avg_batch:.1f}" if s.avg_batch is not None else "-",
                f"{s.others_pct:.0f}",
            )
            for s in f.served
        ]
        + [
            (str(s.round + 1), f"in-process {s.label}", str(s.texts_per_job), "-", "-", f"{s.elapsed_s:.2f}")
            + (f"{s.texts_per_s:,.1f}",)
            + ("-",) * 5
            + (f"{s.others_pct:.0f}",)
            for s in f.local
        ],
    )
    k = f.multi.texts_per_request
    parts = [
        "## Dynamic batching",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"NlpService/Embed on one short sentence ({TEXT!r}) from loadtest.generator, {TEXTS_IN_FLIGHT} texts in"
        f" flight: one text per request at c={TEXTS_IN_FLIGHT}, or (part b, second half) {k} copies per request at"
        f" c={f.multi.concurrency}; {rounds} interleaved rounds of {duration:g} s, median. Two meshes (gateway + one"
        " replica each) run side by side; only one is loaded at a time.",
        "",
        "(a) Batching on vs off, one text per request:",
        "",
        table_a,
        "",
        goal_line_a(f),
        "",
        "(b) Served vs in-process, same batches. Batches: one text per request — "
        f"{f.single.batch_source}; {k} texts per request — {f.multi.batch_source}. The in-process jobs carry as many"
        " texts as the served requests; the in-process runs follow the served ones in every round, the meshes idle:",
        "",
        table_b,
        "",
        *goal_lines_b(f),
        "",
        "(c) A lone request (c=1): the batcher runs a request that finds the model idle at once, so what serving"
        " adds is the two gRPC hops:",
        "",
        table_c,
        "",
        goal_line_c(f),
    ]
    if busy:
        parts += [
            "",
            "Other busy processes seen before the run (see the last column of the raw figures for their share):",
            *(f"- {b}" for b in busy),
        ]
    parts += ["", "CPU per text by process (from /proc, median of rounds):", "", cpu_table, "", "Raw figures:", "", raw]
    return "\n".join(parts)


def goal_line_c(f: Figures) -> str:
    extra = f.lone_extra_ms
    return (
        f"- c=1 p50 served {f.lone_served_p50:.2f} ms vs in-process {f.lone_local_p50:.2f} ms (medians):"
        f" {extra:+.2f} ms in the median round (goal ≤ +{LONE_GOAL_MS:.0f} ms):"
        + (" met." if extra <= LONE_GOAL_MS else " **missed**.")
    )


def goal_line_a(f: Figures) -> str:
    text = f"- Speedup from batching: **{f.speedup:.2f}x** (goal ≥ {SPEEDUP_GOAL:.0f}x): "
    if f.speedup >= SPEEDUP_GOAL:
        return text + "met."
    return text + (
        "**missed**. With max_batch_size 1 every request is its own model call, so the replica's time goes to "
        "per-call model overhead; with batching the model's share per text falls, and the rest (gRPC in client, "
        "gateway and replica, all on the same cores) does not."
    )


def goal_lines_b(f: Figures) -> list[str]:
    lines = []
    for shape in (f.single, f.multi):
        ratio = f.ratio(shape)
        texts = "one text" if shape.texts_per_request == 1 else f"{shape.texts_per_request} texts"
        lines.append(
            f"- Served (gateway) / in-process, {texts} per request: **{ratio:.2f}** (goal ≥ {SERVED_RATIO_GOAL:.2f}):"
            + (" met." if ratio >= SERVED_RATIO_GOAL else " **missed**.")
        )
    lines.append("- " + overhead_note(f))
    return lines


def overhead_note(f: Figures) -> str:
    """Where serving's cost goes: per request (client + gateway CPU per text shrinks with texts per request) or
    per text (the replica's CPU per text next to the model's own in-process)."""
    single, multi = f.cpu(f.single.gateway_label), f.cpu(f.multi.gateway_label)
    k = f.multi.texts_per_request

    def around(cpu: dict[str, float]) -> float:
        return cpu["client"] + cpu["gateway"]

    def cores(label: str) -> float:
        return f.texts_per_s(label) * sum(f.cpu(label).values()) / 1000

    return (
        f"Client and gateway CPU per text: {around(single):.2f} ms with one text per request,"
        f" {around(multi):.2f} ms with {k} (the gRPC calls are per request); the replica's:"
        f" {single['replica']:.2f} and {multi['replica']:.2f} ms, next to the model's own in-process"
        f" {f.local_cpu(f.single):.2f} and {f.local_cpu(f.multi):.2f} ms. Cores kept busy (of {os.cpu_count()}):"
        f" {cores(f.single.gateway_label):.2f} and {cores(f.multi.gateway_label):.2f} served"
        f" through the gateway, {f.in_process(f.single) * f.local_cpu(f.single) / 1000:.2f} and"
        f" {f.in_process(f.multi) * f.local_cpu(f.multi) / 1000:.2f} in-process."
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli("batching", __doc__, duration_s=5.0)
    cli.add_argument(
        "--texts-per-request",
        type=int,
        default=DEFAULT_TEXTS_PER_REQUEST,
        help=f"texts per request in the multi-text runs of part (b), at c={TEXTS_IN_FLIGHT}/this"
        f" (default {DEFAULT_TEXTS_PER_REQUEST})",
    )
    args = cli.parse_args(argv)
    check_bounded(cli, args, max_rounds=5, duration_s=(1, 10))
    k = args.texts_per_request
    if k < 2 or TEXTS_IN_FLIGHT % k:
        cli.error(f"--texts-per-request must divide {TEXTS_IN_FLIGHT} and be at least 2 (2, 4, 8, 16 or 32)")
    host, date = machine(), utc_now()
    batched = Mesh("batched")
    # `aimass up` gives every process a metrics port of its own when asked (LocalMesh.metrics).
    batched.metrics = True
    unbatched = Mesh("unbatched", env={"AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE": "1"})
    engine = load_engine()
    print("starting two meshes (batching on / max_batch_size 1; models load first) ...", file=sys.stderr)
    batched.start()
    unbatched.start()
    try:
        batched.wait_ready()
        unbatched.wait_ready()
        assert batched.process is not None and unbatched.process is not None
        mesh_pids = [batched.process.pid, unbatched.process.pid, *batched.pids().values(), *unbatched.pids().values()]
        busy = wait_quiet(args.wait_quiet, exclude=mesh_pids)
        metrics_port = int(batched.metrics_address("nlp-0").rpartition(":")[2])
        scrape = metrics_port if batch_histogram(metrics_port, "embed") is not None else None
        got = asyncio.run(run_rounds(engine, batched, unbatched, args.rounds, args.duration, scrape, k))
    finally:
        unbatched.stop()
        batched.stop()
    text = report(
        Figures(got.served, got.local, got.single, got.multi, got.lone),
        host=host,
        date=date,
        rounds=args.rounds,
        duration=args.duration,
        busy=busy,
    )
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
