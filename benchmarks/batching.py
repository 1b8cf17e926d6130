"""What dynamic batching buys, and what serving costs next to calling the model in-process.

(a) Embed throughput at c=32 through the gateway, one short sentence per request: a mesh with the default
    batching config vs a mesh with ``AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE=1`` (both started here, measured
    interleaved).
(b) The served, batched Embed (same load) vs ``NlpEngine.embed_batch`` called in-process with batches of the size
    the server formed: read from the replica's ``aimass_batch_size`` histogram when its metrics endpoint answers
    (``AIMASS_NLP__SERVER__METRICS_PORT``), else a fixed 32 single-text jobs per batch. The in-process side runs
    after both meshes have stopped, so the two never share the CPU.

    python -m benchmarks.batching [--rounds 2] [--duration 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    CpuMeter,
    Mesh,
    command_line,
    free_port,
    machine,
    markdown_table,
    median,
    update_doc,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadResult, LoadSpec, run_load

NAME = "batching"
METHOD = "aimass.v1.NlpService/Embed"
TEXT = "The quick brown fox jumps over the lazy dog."
REQUEST = {"texts": [TEXT]}
CONCURRENCY = 32
FALLBACK_BATCH = 32
SPEEDUP_GOAL = 3.0
SERVED_RATIO_GOAL = 0.80
PROCESSES = ("client", "gateway", "replica")
_METRIC_LINE = re.compile(r'^aimass_batch_size_(sum|count)\{batcher="embed"\}\s+(\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class Served:
    label: str  # "batched-gateway", "unbatched-gateway", "batched-direct"
    round: int
    result: LoadResult
    cpu_ms_per_text: dict[str, float]
    avg_batch: float | None
    # CPU used meanwhile by processes outside this benchmark, in % of one CPU.
    others_pct: float


@dataclass(frozen=True)
class InProcess:
    batch: int
    round: int
    texts: int
    elapsed_s: float
    cpu_ms_per_text: float
    others_pct: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.elapsed_s


def batch_histogram(metrics_port: int) -> tuple[float, float] | None:
    """(sum, count) of the embed batcher's aimass_batch_size, or None when no metrics endpoint answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    found = {kind: float(value) for kind, value in _METRIC_LINE.findall(text)}
    if "sum" not in found or "count" not in found:
        return None
    return found["sum"], found["count"]


async def serve_load(
    label: str, target: str, pids: dict[str, int], rnd: int, duration: float, metrics_port: int | None
) -> Served:
    spec = LoadSpec(
        target=target,
        method=METHOD,
        request=REQUEST,
        concurrency=CONCURRENCY,
        duration_s=duration,
        warmup=CONCURRENCY * 2,
        deadline_s=30.0,
        progress=False,
    )
    before = batch_histogram(metrics_port) if metrics_port else None
    with CpuMeter(pids) as meter:
        result = await run_load(spec)
    after = batch_histogram(metrics_port) if metrics_port else None
    avg_batch = None
    if before is not None and after is not None and after[1] > before[1]:
        avg_batch = (after[0] - before[0]) / (after[1] - before[1])
    texts = result.requests + spec.warmup
    cpu = {name: seconds * 1000 / texts for name, seconds in meter.used.items()}
    print(
        f"  round {rnd + 1} {label:<18} {result.rps:7,.1f} texts/s  p50 {result.latency.p50_ms:7.1f} ms"
        f"  p99 {result.latency.p99_ms:7.1f} ms  non-OK {result.errors}  others {meter.others_pct:.0f}% CPU"
        + (f"  avg batch {avg_batch:.1f}" if avg_batch is not None else ""),
        file=sys.stderr,
    )
    return Served(label, rnd, result, cpu, avg_batch, meter.others_pct)


async def run_served(
    batched: Mesh, unbatched: Mesh, rounds: int, duration: float, metrics_port: int | None
) -> list[Served]:
    me = os.getpid()
    batched_pids = {"client": me, **batched.pids()}
    unbatched_pids = {"client": me, **unbatched.pids()}
    samples: list[Served] = []
    for rnd in range(rounds):
        samples.append(await serve_load("batched-gateway", batched.gateway, batched_pids, rnd, duration, metrics_port))
        samples.append(await serve_load("unbatched-gateway", unbatched.gateway, unbatched_pids, rnd, duration, None))
        samples.append(await serve_load("batched-direct", batched.replica, batched_pids, rnd, duration, metrics_port))
    return samples


def run_in_process(batch: int, rounds: int, duration: float) -> list[InProcess]:
    """NlpEngine.embed_batch on ``batch`` single-text jobs, back to back, in this process."""
    from services.nlp.engine import EmbedJob, NlpEngine

    print("loading NlpEngine in-process ...", file=sys.stderr)
    engine = NlpEngine(device="cpu")
    engine.load(progress=lambda _: None)
    jobs = [EmbedJob((TEXT,), False) for _ in range(batch)]
    for _ in range(3):
        engine.embed_batch(jobs)
    samples = []
    for rnd in range(rounds):
        texts = 0
        with CpuMeter({"self": os.getpid()}) as meter:
            started = time.perf_counter()
            stop_at = started + duration
            while time.perf_counter() < stop_at:
                engine.embed_batch(jobs)
                texts += batch
            elapsed = time.perf_counter() - started
        sample = InProcess(batch, rnd, texts, elapsed, meter.used["self"] * 1000 / texts, meter.others_pct)
        print(
            f"  round {rnd + 1} in-process batch {batch:<3} {sample.texts_per_s:7,.1f} texts/s"
            f"  others {meter.others_pct:.0f}% CPU",
            file=sys.stderr,
        )
        samples.append(sample)
    return samples


@dataclass(frozen=True)
class Figures:
    batched: float
    unbatched: float
    direct: float
    in_process: float
    batch: int
    batch_source: str
    served: Sequence[Served]
    local: Sequence[InProcess]

    @property
    def speedup(self) -> float:
        return self.batched / self.unbatched

    @property
    def served_ratio(self) -> float:
        return self.batched / self.in_process

    def rows(self, label: str) -> list[Served]:
        return [s for s in self.served if s.label == label]

    def median_of(self, label: str, attr: str) -> float:
        return median(getattr(s.result.latency, attr) for s in self.rows(label))

    def cpu(self, label: str) -> dict[str, float]:
        got = self.rows(label)
        return {p: median(s.cpu_ms_per_text.get(p, 0.0) for s in got) for p in PROCESSES}


def figures(served: Sequence[Served], local: Sequence[InProcess], batch: int, batch_source: str) -> Figures:
    def rps(label: str) -> float:
        return median(s.result.rps for s in served if s.label == label)

    return Figures(
        batched=rps("batched-gateway"),
        unbatched=rps("unbatched-gateway"),
        direct=rps("batched-direct"),
        in_process=median(s.texts_per_s for s in local),
        batch=batch,
        batch_source=batch_source,
        served=served,
        local=local,
    )


def report(f: Figures, *, host: str, date: str, rounds: int, duration: float, busy: list[str]) -> str:
    table_a = markdown_table(
        ("Embed through the gateway, c=32", "texts/s", "p50 ms", "p99 ms"),
        [
            (
                "batching on (default config)",
                f"{f.batched:,.1f}",
                f"{f.median_of('batched-gateway', 'p50_ms'):.1f}",
                f"{f.median_of('batched-gateway', 'p99_ms'):.1f}",
            ),
            (
                "max_batch_size = 1",
                f"{f.unbatched:,.1f}",
                f"{f.median_of('unbatched-gateway', 'p50_ms'):.1f}",
                f"{f.median_of('unbatched-gateway', 'p99_ms'):.1f}",
            ),
            ("**speedup**", f"**{f.speedup:.2f}x**", "", ""),
        ],
    )
    local_cpu = median(s.cpu_ms_per_text for s in f.local)
    table_b = markdown_table(
        ("path", "texts/s", "ratio to in-process"),
        [
            (f"in-process `embed_batch`, {f.batch} single-text jobs per batch", f"{f.in_process:,.1f}", "1.00"),
            ("served, through the gateway (c=32)", f"{f.batched:,.1f}", f"**{f.served_ratio:.2f}**"),
            ("served, straight to the replica (c=32)", f"{f.direct:,.1f}", f"{f.direct / f.in_process:.2f}"),
        ],
    )
    cpu_rows = []
    for label in ("batched-gateway", "batched-direct", "unbatched-gateway"):
        cpu = f.cpu(label)
        cpu_rows.append((label, *(f"{cpu[p]:.2f}" for p in PROCESSES), f"{sum(cpu.values()):.2f}"))
    cpu_rows.append(("in-process", "-", "-", f"{local_cpu:.2f}", f"{local_cpu:.2f}"))
    cpu_table = markdown_table(("run", *(f"{p} CPU ms/text" for p in PROCESSES), "total"), cpu_rows)
    raw = markdown_table(
        (
            "round",
            "run",
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
                str(s.result.requests),
                f"{s.result.elapsed_s:.2f}",
                f"{s.result.rps:,.1f}",
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
            (str(s.round + 1), f"in-process batch {s.batch}", "-", f"{s.elapsed_s:.2f}", f"{s.texts_per_s:,.1f}")
            + ("-",) * 5
            + (f"{s.others_pct:.0f}",)
            for s in f.local
        ],
    )
    parts = [
        "## Dynamic batching",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"NlpService/Embed with one short sentence per request ({TEXT!r}), {CONCURRENCY} concurrent requests from"
        f" loadtest.generator; {rounds} interleaved rounds of {duration:g} s, median. Two meshes (gateway + one"
        " replica each) run side by side; only one is loaded at a time.",
        "",
        "(a) Batching on vs off:",
        "",
        table_a,
        "",
        goal_line_a(f),
        "",
        f"(b) Served vs in-process, same batches (batch size {f.batch}: {f.batch_source}); the in-process run starts"
        " after both meshes stopped:",
        "",
        table_b,
        "",
        goal_line_b(f, local_cpu),
    ]
    if busy:
        parts += [
            "",
            "Other busy processes seen before the run (see the last column of the raw figures for their share):",
            *(f"- {b}" for b in busy),
        ]
    parts += ["", "CPU per text by process (from /proc, median of rounds):", "", cpu_table, "", "Raw figures:", "", raw]
    return "\n".join(parts)


def goal_line_a(f: Figures) -> str:
    text = f"- Speedup from batching: **{f.speedup:.2f}x** (goal ≥ {SPEEDUP_GOAL:.0f}x): "
    if f.speedup >= SPEEDUP_GOAL:
        return text + "met."
    return text + (
        "**missed**. With max_batch_size 1 every request is its own model call, so the replica's time goes to "
        "per-call model overhead; with batching the model's share per text falls, and the rest (gRPC in client, "
        "gateway and replica, all on the same cores) does not."
    )


def goal_line_b(f: Figures, local_cpu: float) -> str:
    text = f"- Served / in-process: **{f.served_ratio:.2f}** (goal ≥ {SERVED_RATIO_GOAL:.2f}): "
    if f.served_ratio >= SERVED_RATIO_GOAL:
        return text + "met."
    cpu = f.cpu("batched-gateway")
    served_cores = f.batched * sum(cpu.values()) / 1000
    local_cores = f.in_process * local_cpu / 1000
    return text + (
        f"**missed**. The replica's CPU per text is about the model's own ({cpu['replica']:.2f} ms served vs"
        f" {local_cpu:.2f} ms in-process), but client and gateway add {cpu['client'] + cpu['gateway']:.2f} ms per"
        f" text on the same {os.cpu_count()} cores, and served the processes keep only {served_cores:.2f} cores busy"
        f" (in-process: {local_cores:.2f}): one batch executes at a time and the gRPC work of receiving and answering"
        " the requests around it is not fully overlapped with the model, which leaves the cores partly idle."
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    cli.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    cli.add_argument(
        "--wait-quiet", type=float, default=60.0, help="wait up to this long for other busy processes (default 60)"
    )
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = cli.parse_args(argv)
    if not 1 <= args.rounds <= 5 or not 1 <= args.duration <= 10:
        cli.error("rounds must be 1..5 and duration 1..10 s (the whole run stays bounded)")
    host, date = machine(), utc_now()
    metrics_port = free_port()
    batched = Mesh("batched", env={"AIMASS_NLP__SERVER__METRICS_PORT": str(metrics_port)})
    unbatched = Mesh("unbatched", env={"AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE": "1"})
    print("starting two meshes (batching on / max_batch_size 1; models load first) ...", file=sys.stderr)
    batched.start()
    unbatched.start()
    try:
        batched.wait_ready()
        unbatched.wait_ready()
        assert batched.process is not None and unbatched.process is not None
        mesh_pids = [batched.process.pid, unbatched.process.pid, *batched.pids().values(), *unbatched.pids().values()]
        busy = wait_quiet(args.wait_quiet, exclude=mesh_pids)
        scrape = metrics_port if batch_histogram(metrics_port) is not None else None
        served = asyncio.run(run_served(batched, unbatched, args.rounds, args.duration, scrape))
    finally:
        unbatched.stop()
        batched.stop()
    sizes = [s.avg_batch for s in served if s.label == "batched-gateway" and s.avg_batch is not None]
    if sizes:
        batch, source = max(1, round(median(sizes))), "the server's average, from its aimass_batch_size histogram"
    else:
        batch, source = (
            FALLBACK_BATCH,
            (
                "fixed: the replica's metrics endpoint did not answer (nlp.server.metrics_port is not served), so the"
                " server's own batch size could not be read"
            ),
        )
    busy += wait_quiet(args.wait_quiet)
    local = run_in_process(batch, args.rounds, args.duration)
    text = report(
        figures(served, local, batch, source),
        host=host,
        date=date,
        rounds=args.rounds,
        duration=args.duration,
        busy=busy,
    )
    print(text)
    if args.write is not None:
        update_doc(args.write, NAME, text)
        print(f"\nupdated the {NAME} section of {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
