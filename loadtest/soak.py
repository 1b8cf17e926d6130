"""Soak (`make soak`): mixed traffic across every service at ~70 % of the mesh's measured capacity for a long time,
sampling latency, errors and every mesh process's memory, to show that nothing leaks or degrades.

    SOAK_MINUTES=60 python -m loadtest.soak --write docs/reliability.md

The mesh: `aimass up` (aimass.local_mesh.LocalMesh) with one replica of each kind. The traffic, one class per
method: NLP Embed, Sentiment and Entities, vision Classify (a real photo), speech Transcribe (a ~4 s recording) and
LLM Chat (short greedy replies, read to the end), as loadtest/scenarios.py defines their requests.

1. Capacity: every class at once, each from closed-loop clients (``CAPACITY_CLIENTS`` each), for ``capacity_s``:
   the calls per second each class completes while sharing the machine with the others is its capacity in the mix.
2. Soak: each class sent open-loop (a steady arrival rate, whatever the answers' pace) at ``load`` (0.7) of that
   capacity, for ``minutes``; every ``sample_s`` a sample: per class the calls completed, the errors and the p99
   latency, and the resident memory (RSS, with its child processes) of every process `aimass up` runs: its lowest
   reading over the sample (read every ``RSS_POLL_S``), what the process keeps between calls.
3. Verdict: the RSS slope of each process (least squares over the samples after ``warmup_fraction`` of the run) must
   stay under ``RSS_SLOPE_BOUND_MB_PER_MIN``; errors must be none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from aimass.client import keyed_aio_channel
from aimass.local_mesh import LocalMesh
from loadtest.chaos import mesh_processes, write_section
from loadtest.generator import RawCall, RawStreamCall, percentile
from loadtest.scenarios import Scenario, by_name, request_bytes

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
# The stated bound: a process whose resident memory grows faster than this after warm-up is leaking.
RSS_SLOPE_BOUND_MB_PER_MIN = 5.0
# How often memory is read within a sample (its lowest reading is the sample's).
RSS_POLL_S = 1.0
CAPACITY_CLIENTS = 2
# An open-loop class never has more calls in flight than this: beyond it the mesh is not keeping up, and the call
# counts as an error ("backlog") instead of piling up in the client.
MAX_IN_FLIGHT = 64
LOAD = 0.7
REGENERATE = "make soak   # SOAK_MINUTES=60 (default); = .venv/bin/python -m loadtest.soak --write docs/reliability.md"

ENTITIES = Scenario(
    name="entities",
    kind="nlp",
    method="aimass.v1.NlpService/Entities",
    request={"texts": ["Ada Lovelace met Charles Babbage in London in June 1833."]},
    concurrency=4,
    duration_s=3.0,
    deadline_s=10.0,
    description="named entities of one sentence (spaCy)",
)


def classes() -> list[Scenario]:
    """The traffic: one class per method, every service."""
    embed, sentiment, classify, transcribe, chat = by_name(
        ["embed", "sentiment", "vision-classify", "transcribe", "chat"]
    )
    return [embed, sentiment, ENTITIES, classify, transcribe, chat]


# -- traffic ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One class's calls completed within one sampling interval."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class Traffic:
    """Calls of each class on its own channel, with their outcomes collected into the current interval."""

    def __init__(self, gateway: str, api_key: str, scenarios: Sequence[Scenario]) -> None:
        self.gateway = gateway
        self.api_key = api_key
        self.scenarios = list(scenarios)
        self.payloads = {s.name: request_bytes(s) for s in self.scenarios}
        self.current: dict[str, Sample] = {s.name: Sample() for s in self.scenarios}
        self.in_flight: dict[str, int] = {s.name: 0 for s in self.scenarios}
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> Traffic:
        # No retries: every error the mesh answers counts.
        for s in self.scenarios:
            self.channels[s.name] = keyed_aio_channel(self.gateway, self.api_key, options=[("grpc.enable_retries", 0)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels.values():
            await channel.close()

    def take(self) -> dict[str, Sample]:
        """The interval's samples; a new interval begins."""
        taken, self.current = self.current, {s.name: Sample() for s in self.scenarios}
        return taken

    async def call(self, scenario: Scenario) -> None:
        channel = self.channels[scenario.name]
        path = f"/{scenario.full_method}"
        payload = self.payloads[scenario.name]
        self.in_flight[scenario.name] += 1
        started = time.monotonic()
        try:
            if scenario.streaming:
                stream_call: RawStreamCall = channel.unary_stream(path)
                async for _ in stream_call(payload, timeout=scenario.deadline_s):
                    pass
            else:
                call: RawCall = channel.unary_unary(path)
                await call(payload, timeout=scenario.deadline_s)
        except grpc.aio.AioRpcError as err:
            self.current[scenario.name].error(err.code().name)
        else:
            self.current[scenario.name].latencies.append(time.monotonic() - started)
        finally:
            self.in_flight[scenario.name] -= 1

    async def closed_loop(self, scenario: Scenario, until: float) -> None:
        while time.monotonic() < until:
            await self.call(scenario)

    async def open_loop(self, scenario: Scenario, rate: float, until: float) -> None:
        """``rate`` calls per second, each in its own task, until ``until``; then waits for those in flight."""
        tasks: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self.in_flight[scenario.name] >= MAX_IN_FLIGHT:
                self.current[scenario.name].error("BACKLOG")
            else:
                task = asyncio.get_running_loop().create_task(self.call(scenario))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += 1.0 / rate
        if tasks:
            await asyncio.gather(*tasks)


# -- memory ----------------------------------------------------------------------------------------------------------


def rss_mb(process: psutil.Process) -> float:
    """Resident memory of a process and its descendants (vLLM runs its engine in a child), in MB."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 1e6


async def rss_floor(root: psutil.Process, *, until: float) -> dict[str, float]:
    """Each mesh process's lowest RSS (MB) polled every ``RSS_POLL_S`` until ``until`` (monotonic): the memory it
    keeps between calls. One reading at the sample's instant also caught calls' working memory (a transcription
    in flight adds ~65 MB to the speech replica), and a short run's slope followed which samples happened to."""
    floor: dict[str, float] = {}
    while True:
        processes = await asyncio.to_thread(mesh_processes, root)
        for name, process in processes.items():
            mb = await asyncio.to_thread(rss_mb, process)
            floor[name] = min(floor.get(name, mb), mb)
        left = until - time.monotonic()
        if left <= 0:
            return floor
        await asyncio.sleep(min(RSS_POLL_S, left))


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


# -- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class Interval:
    at_s: float  # seconds since the soak began, at the interval's end
    samples: dict[str, Sample]
    rss_mb: dict[str, float]


@dataclass
class SoakResult:
    minutes: float
    sample_s: float
    warmup_fraction: float
    capacity: dict[str, float]
    rates: dict[str, float]
    intervals: list[Interval]
    restarts: dict[str, int]

    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for interval in self.intervals:
            for name, sample in interval.samples.items():
                for code, n in sample.errors.items():
                    total[f"{name} {code}"] = total.get(f"{name} {code}", 0) + n
        return total

    def calls(self) -> int:
        return sum(s.calls for i in self.intervals for s in i.samples.values())

    def slopes(self) -> dict[str, float]:
        """MB per minute per process, over the intervals after warm-up."""
        start = self.intervals[0].at_s + self.warmup_fraction * (self.intervals[-1].at_s - self.intervals[0].at_s)
        after = [i for i in self.intervals if i.at_s >= start]
        names = sorted({name for i in after for name in i.rss_mb})
        return {name: slope_per_min([(i.at_s, i.rss_mb[name]) for i in after if name in i.rss_mb]) for name in names}

    def leaking(self, bound: float = RSS_SLOPE_BOUND_MB_PER_MIN) -> dict[str, float]:
        return {name: slope for name, slope in self.slopes().items() if slope >= bound}


def soak_mesh(folder: Path) -> LocalMesh:
    return LocalMesh(
        folder / "mesh.log",
        replicas={"nlp": 1, "vision": 1, "speech": 1, "llm": 1},
        env={"AIMASS_LOG_LEVEL": "WARNING"},  # an hour of access lines would be the biggest thing it writes
        log_level="WARNING",
    )


async def measure_capacity(traffic: Traffic, seconds: float) -> dict[str, float]:
    """Calls per second each class completes with CAPACITY_CLIENTS closed-loop clients, all classes at once."""
    # A short warm-up first: first calls load lazily (batches, caches) and would drag the figure down.
    warm_until = time.monotonic() + min(10.0, seconds / 2)
    await asyncio.gather(*(traffic.closed_loop(s, warm_until) for s in traffic.scenarios))
    traffic.take()
    began = time.monotonic()
    until = began + seconds
    await asyncio.gather(*(traffic.closed_loop(s, until) for s in traffic.scenarios for _ in range(CAPACITY_CLIENTS)))
    elapsed = time.monotonic() - began
    return {name: len(sample.latencies) / elapsed for name, sample in traffic.take().items()}


async def soak(
    mesh: LocalMesh, *, minutes: float, sample_s: float, capacity_s: float, load: float, warmup_fraction: float
) -> SoakResult:
    assert mesh.process is not None
    root = psutil.Process(mesh.process.pid)
    pids = {name: p.pid for name, p in mesh_processes(root).items()}
    async with Traffic(mesh.gateway, mesh.api_key, classes()) as traffic:
        capacity = await measure_capacity(traffic, capacity_s)
        rates = {name: max(load * c, 0.05) for name, c in capacity.items()}
        print(f"capacity (calls/s in the mix): {capacity}; soak rates: {rates}", flush=True)
        began = time.monotonic()
        until = began + minutes * 60
        intervals: list[Interval] = []

        async def sampler() -> None:
            next_at = began + sample_s
            while next_at <= until + 1e-6:
                memory = await rss_floor(root, until=next_at)
                interval = Interval(time.monotonic() - began, traffic.take(), memory)
                intervals.append(interval)
                print(f"{interval.at_s:7.0f}s " + summary_line(interval), flush=True)
                next_at += sample_s

        senders = [traffic.open_loop(s, rates[s.name], until) for s in traffic.scenarios]
        await asyncio.gather(sampler(), *senders)
        # Calls still in flight at the last sample ended after it: they join it.
        for name, sample in traffic.take().items():
            last = intervals[-1].samples[name]
            last.latencies += sample.latencies
            for code, n in sample.errors.items():
                last.errors[code] = last.errors.get(code, 0) + n
    now = mesh_processes(root)
    restarts = {name: 1 for name, pid in pids.items() if name in now and now[name].pid != pid}
    return SoakResult(minutes, sample_s, warmup_fraction, capacity, rates, intervals, restarts)


def p99_ms(sample: Sample) -> float:
    return 1000 * percentile(sorted(sample.latencies), 99) if sample.latencies else math.nan


def summary_line(interval: Interval) -> str:
    calls = sum(s.calls for s in interval.samples.values())
    errors = sum(sum(s.errors.values()) for s in interval.samples.values())
    p99 = " ".join(f"{name}={p99_ms(s):.0f}ms" for name, s in interval.samples.items())
    rss = " ".join(f"{name}={mb:.0f}" for name, mb in sorted(interval.rss_mb.items()))
    return f"calls={calls} errors={errors} p99: {p99} | RSS MB: {rss}"


# -- the report ------------------------------------------------------------------------------------------------------


def soak_section(result: SoakResult) -> str:
    names = list(result.capacity)
    slopes = result.slopes()
    first, last = result.intervals[0], result.intervals[-1]
    errors = result.errors()
    lines = [
        "## Soak",
        "",
        f"{result.minutes:g} minutes of mixed traffic through the gateway of `aimass up` (one replica of each kind), "
        f"each class open-loop at {LOAD:.0%} of its measured capacity in the mix (every class at once from "
        f"{CAPACITY_CLIENTS} closed-loop clients each), sampled every {result.sample_s:g} s. Regenerate: "
        f"`{REGENERATE}`.",
        "",
        "| class | capacity (calls/s) | soak rate (calls/s) |",
        "| --- | ---: | ---: |",
        *(f"| {n} | {result.capacity[n]:.2f} | {result.rates[n]:.2f} |" for n in names),
        "",
        f"Calls: {result.calls()}; errors: {sum(errors.values())}"
        + (f" ({errors})" if errors else "")
        + f"; processes restarted: {sorted(result.restarts) or 'none'}.",
        "",
        "p99 latency (ms) and errors per interval:",
        "",
        "| at | calls | errors | " + " | ".join(names) + " |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for interval in result.intervals:
        calls = sum(s.calls for s in interval.samples.values())
        errs = sum(sum(s.errors.values()) for s in interval.samples.values())
        cells = " | ".join(f"{p99_ms(interval.samples[n]):.0f}" for n in names)
        lines.append(f"| {interval.at_s / 60:.1f} min | {calls} | {errs} | {cells} |")
    lines += [
        "",
        f"Resident memory per process (with its children; each sample's lowest reading), and its slope after the first "
        f"{result.warmup_fraction:.0%} of the run (least squares); bound: < {RSS_SLOPE_BOUND_MB_PER_MIN:g} MB/min.",
        "",
        "| process | RSS at start (MB) | RSS at end (MB) | slope (MB/min) | within bound |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in sorted(slopes):
        ok = "yes" if slopes[name] < RSS_SLOPE_BOUND_MB_PER_MIN else "**no**"
        lines.append(
            f"| {name} | {first.rss_mb.get(name, math.nan):.0f} | {last.rss_mb.get(name, math.nan):.0f} | "
            f"{slopes[name]:+.2f} | {ok} |"
        )
    return "\n".join(lines) + "\n"


async def run(folder: Path, **options: Any) -> SoakResult:
    mesh = soak_mesh(folder)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 600)
        return await soak(mesh, **options)
    finally:
        await asyncio.to_thread(mesh.stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "60")))
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds per sample (default: a minute)")
    parser.add_argument("--capacity-s", type=float, default=30.0, help="seconds measuring capacity")
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="left out of the RSS slope")
    parser.add_argument("--write", type=Path, help="write the Soak section of this markdown file")
    parser.add_argument("--logs", type=Path, help="keep the mesh's log in this folder")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        folder = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aimass-soak-")))
        folder.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(
            run(
                folder,
                minutes=args.minutes,
                sample_s=min(args.sample_s, args.minutes * 60),
                capacity_s=args.capacity_s,
                load=LOAD,
                warmup_fraction=args.warmup_fraction,
            )
        )
    section = soak_section(result)
    print(section)
    if args.write:
        write_section(args.write, "## Soak", section)
    return 0 if not result.errors() and not result.leaking() else 1


if __name__ == "__main__":
    sys.exit(main())
