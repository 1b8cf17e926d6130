"""Per-batch execution times of the real engines, measured in-process, for the simulator's calibration table.

For each model: the time of one ``execute`` call of the engine (the very method the replica's batcher calls) at
several batch sizes, after one warm-up call; the time to load the model; and its footprint as the replica measures
it (``ModelSet.load``: the process's resident-memory delta around the load on the CPU). Libraries are imported
before the first load so a footprint is the model's own, not torch's.

    python -m benchmarks.service_times [--out simulator/calibration.json] [--repeats 5] [--passes 2] [--threads 1]

The engines run with one CPU thread by default (their own torch_threads / threads settings): one core per replica.
A call's time is then its CPU time (median of the repeats), which time spent waiting for a core that other
processes hold does not inflate, so the figures hold on a shared machine; the wall times are kept beside them. It
also waits (up to --wait-quiet seconds) for other busy processes to finish, measures every model in --passes
passes and keeps the lowest figure per batch size, and records how much CPU others used meanwhile.

The simulator reads the JSON (see simulator/calibration.py); the file is committed so it runs without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cpu_model, cpu_seconds, memory_gib, system_busy_seconds, wait_quiet

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "simulator" / "calibration.json"
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)

# Realistic short inputs of mixed length (a search query to a product sentence), cycled to fill a batch.
TEXTS = (
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Apple is looking at buying a U.K. startup for $1 billion, sources in London said on Monday.",
    "Battery life is great but the screen scratches far too easily for a phone at this price.",
    "Cheap flights from Berlin to Lisbon in May",
    "Marie Curie was the first person to win two Nobel Prizes, in physics and in chemistry.",
    "Refund not received after 14 days, order 55812, please help",
    "Sentence embeddings map text to vectors so that similar meanings end up close together.",
)


@dataclass
class Measured:
    model: str
    service: str
    method: str
    # Units per model call → seconds of one call: the estimate the simulator uses (see Timings), and the raw figures.
    batch_seconds: dict[int, float]
    timings: dict[int, Timing]
    load_seconds: float
    footprint_bytes: int
    # Percent of one CPU used by other processes while this model was measured, the most over the passes (anything
    # but ~0 may skew it).
    others_cpu_pct: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "method": self.method,
            "measured": True,
            "batch_seconds": {str(size): round(seconds, 6) for size, seconds in sorted(self.batch_seconds.items())},
            "raw": {
                str(size): {key: round(value, 6) for key, value in dataclasses.asdict(timing).items()}
                for size, timing in sorted(self.timings.items())
            },
            "load_seconds": round(self.load_seconds, 3),
            "footprint_bytes": self.footprint_bytes,
            "others_cpu_pct": round(self.others_cpu_pct, 1),
        }


@dataclass(frozen=True)
class Timing:
    """One batch size's repeats: wall time (fastest and median) and this process's CPU time (median)."""

    wall_fastest: float
    wall_median: float
    cpu_median: float

    def estimate(self, threads: int) -> float:
        # With one engine thread a call's CPU time is its wall time on an idle core, and time spent waiting for a
        # core busy with other processes does not count: the figure of choice on a shared machine. With more
        # threads CPU time adds up over them, so the fastest wall time is the estimate (others only add to it).
        return self.cpu_median if threads == 1 else self.wall_fastest


def time_batches(execute: Callable[[int], object], sizes: Sequence[int], repeats: int) -> dict[int, Timing]:
    """Timings of ``execute(size)`` per size, after one unmeasured call (caches, allocator)."""
    found: dict[int, Timing] = {}
    for size in sizes:
        execute(size)
        wall, cpu = [], []
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            execute(size)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        found[size] = Timing(min(wall), statistics.median(wall), statistics.median(cpu))
    return found


class OthersMeter:
    """CPU that processes other than this one used meanwhile, in percent of one CPU."""

    def __enter__(self) -> OthersMeter:
        self._own, self._all, self._wall = cpu_seconds(os.getpid()), system_busy_seconds(), time.perf_counter()
        self.pct = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        others = (system_busy_seconds() - self._all) - (cpu_seconds(os.getpid()) - self._own)
        self.pct = max(0.0, others / max(time.perf_counter() - self._wall, 1e-9) * 100)


@dataclass
class Target:
    """One model to measure: the engine's ModelSet holding it and one batched call of ``size`` units."""

    model: str
    service: str
    method: str
    models: Any
    execute: Callable[[int], object]


def load_timed(models: Any, name: str) -> tuple[float, int]:
    """(seconds, footprint bytes) of loading ``name`` through the engine's own ModelSet (unloaded first)."""
    if name in models.loaded:
        models.unload(name)
    gc.collect()
    started = time.perf_counter()
    models.load(name, progress=lambda _: None)
    return time.perf_counter() - started, int(models.footprint_bytes(name))


def measure(target: Target, sizes: Sequence[int], repeats: int, threads: int) -> Measured:
    with OthersMeter() as others:
        load_s, footprint = load_timed(target.models, target.model)
        timings = time_batches(target.execute, sizes, repeats)
    estimates = {size: timing.estimate(threads) for size, timing in timings.items()}
    return Measured(target.model, target.service, target.method, estimates, timings, load_s, footprint, others.pct)


def merge(passes: Sequence[Measured]) -> Measured:
    """One model's passes as one: per batch size the lowest estimate (other processes only ever add time), the
    lowest load time, the largest footprint (a reload may reuse memory the allocator kept from the first load)."""
    first = passes[0]
    sizes: dict[int, tuple[float, Timing]] = {}
    for measured in passes:
        for size, estimate in measured.batch_seconds.items():
            if size not in sizes or estimate < sizes[size][0]:
                sizes[size] = (estimate, measured.timings[size])
    return Measured(
        first.model,
        first.service,
        first.method,
        {size: estimate for size, (estimate, _) in sizes.items()},
        {size: timing for size, (_, timing) in sizes.items()},
        min(m.load_seconds for m in passes),
        max(m.footprint_bytes for m in passes),
        max(m.others_cpu_pct for m in passes),
    )


def preload(*modules: str) -> None:
    """Imports the engines' libraries first: the footprints and load times are then the models', not theirs."""
    for module in modules:
        importlib.import_module(module)


def texts(size: int) -> list[str]:
    return [TEXTS[i % len(TEXTS)] for i in range(size)]


def nlp_targets(threads: int) -> list[Target]:
    preload("torch", "sentence_transformers", "spacy")
    from services.nlp.engine import EMBED_MODEL, NER_MODEL, SENTIMENT_MODEL, EmbedJob, NlpEngine

    engine = NlpEngine(device="cpu", torch_threads=threads)
    service = "aimass.v1.NlpService"
    return [
        Target(
            EMBED_MODEL,
            service,
            "Embed",
            engine.models,
            lambda n: engine.embed_batch([EmbedJob((t,), True, count_tokens=True) for t in texts(n)]),
        ),
        Target(
            NER_MODEL, service, "Entities", engine.models, lambda n: engine.entities_batch([(t,) for t in texts(n)])
        ),
        Target(SENTIMENT_MODEL, service, "Sentiment", engine.models, lambda n: engine.sentiment(texts(n))),
    ]


def vision_targets(threads: int) -> list[Target]:
    preload("onnxruntime")
    from aimass.runtime.config import VisionConfig
    from services.vision.engine import CLASSIFY_MODEL, INPUT_SIZE, ClassifyJob, VisionEngine

    engine = VisionEngine(VisionConfig(device="cpu", threads=threads))
    # The network's cost does not depend on the pixels; normalised noise stands in for preprocessed photos.
    image = np.random.default_rng(0).standard_normal((1, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)

    def classify(n: int) -> object:
        return engine.classify_batch([ClassifyJob(image, 5) for _ in range(n)])

    return [Target(CLASSIFY_MODEL, "aimass.v1.VisionService", "Classify", engine.models, classify)]


def host() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(memory_gib(), 1),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    parser.add_argument("--skip-vision", action="store_true", help="NLP models only")
    parser.add_argument(
        "--wait-quiet", type=float, default=30.0, help="wait up to this long for other busy processes to finish"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the engines' CPU threads (their torch_threads / threads settings; 0: the library default, all cores)",
    )
    parser.add_argument("--passes", type=int, default=2, help="measurements per model; the lowest per size wins")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    started = time.perf_counter()
    targets = nlp_targets(args.threads) + ([] if args.skip_vision else vision_targets(args.threads))
    # Whole passes over every model, so a burst of other work on the machine hits one pass of a model, not all.
    runs = [[measure(target, sizes, args.repeats, args.threads) for target in targets] for _ in range(args.passes)]
    measured = [merge([run[i] for run in runs]) for i in range(len(targets))]
    document = {
        "about": (
            "Seconds of one engine execute() call per batch size, after a warm-up call: batch_seconds is the median "
            "CPU time of the repeats with one engine thread (the fastest wall time with more threads), the lowest "
            "over the passes; raw has that pass's wall times (fastest, median) and CPU time (median). Load seconds "
            "(lowest) and footprint (largest resident-memory delta, ModelSet.load) of each model. Measured "
            "in-process on the host below by `python -m benchmarks.service_times`."
        ),
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": host(),
        "threads": args.threads,
        "repeats": args.repeats,
        "passes": args.passes,
        "models": {m.model: m.to_json() for m in measured},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    for m in measured:
        per_size = ", ".join(f"b{size} {seconds * 1000:.1f} ms" for size, seconds in sorted(m.batch_seconds.items()))
        print(
            f"{m.model:20} load {m.load_seconds:.2f} s, {m.footprint_bytes / 2**20:.0f} MiB; {per_size}"
            f" (others used {m.others_cpu_pct:.0f}% of a CPU)",
            file=sys.stderr,
        )
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
