"""What idle co-resident services cost: the CPU an idle whole mesh uses, and a busy NLP replica's throughput with the
rest of the mesh up vs alone.

Each round starts two meshes one after the other (never both at once): an NLP-only mesh (gateway + one NLP
replica) and the whole mesh (`make run`'s shape: one NLP, vision, speech and LLM replica each). On the whole mesh,
idle, it reads utime + stime from /proc of every process `aimass up` started (and their children: vLLM's engine
and worker) over ``--idle`` seconds; then, on both, it drives NlpService/Embed at c=32 through the gateway (one
short sentence per request) for ``--duration`` seconds. Goals: the idle mesh uses < 2% of one core in total;
Embed c=32 with the whole mesh up ≥ 95% of the NLP-only mesh. The machine is shared, so only the ratio of two runs
measured in the same round means much; the median round is reported.

    python -m benchmarks.coresidence [--rounds 2] [--duration 5] [--idle 30] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    CpuMeter,
    Mesh,
    check_bounded,
    child_pids,
    command_line,
    cpu_seconds,
    machine,
    markdown_table,
    median,
    publish,
    rounds_cli,
    run_metered,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadSpec

NAME = "coresidence"
METHOD = "aimass.v1.NlpService/Embed"
TEXT = "The quick brown fox jumps over the lazy dog."
CONCURRENCY = 32
WHOLE = {"nlp": 1, "vision": 1, "speech": 1, "llm": 1}
NLP_ONLY = {"nlp": 1}
IDLE_GOAL_PCT = 2.0
RATIO_GOAL = 0.95


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for child in child_pids(pid):
        found.extend(process_tree(child))
    return found


def process_name(pid: int) -> str:
    """``scheduler``, ``gateway.rest``, ``services.nlp``, ``VLLM::Worker``: the module a process runs, else its name."""
    argv = [part.decode(errors="replace") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if argv and "aimass" in Path(argv[min(1, len(argv) - 1)]).name:
        return "aimass up"
    return Path(f"/proc/{pid}/comm").read_text().strip()


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id → (thread name, CPU seconds so far) for each thread of ``pid`` (none if it ended)."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return threads
    for tid in tids:
        try:
            threads[tid] = (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip(), cpu_seconds(pid, tid))
        except OSError:  # a thread that ended meanwhile
            continue
    return threads


def idle_cpu(mesh: Mesh, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """Percent of one core each process of ``mesh`` (by name, summed) used over ``seconds`` of idling, and the same
    by kind of thread ("process: thread name (count)"), which says what wakes an idle process."""
    assert mesh.process is not None
    pids = process_tree(mesh.process.pid)
    before = {pid: cpu_seconds(pid) for pid in pids}
    threads_before = {pid: thread_cpu(pid) for pid in pids}
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    used: dict[str, float] = defaultdict(float)
    by_thread: dict[tuple[str, str], list[float]] = defaultdict(list)
    for pid in pids:
        try:
            name = process_name(pid)
            used[name] += (cpu_seconds(pid) - before[pid]) / wall * 100
        except OSError:  # a process that ended meanwhile
            continue
        for tid, (thread, spent) in thread_cpu(pid).items():
            _, earlier = threads_before[pid].get(tid, (thread, spent))
            by_thread[(name, thread)].append((spent - earlier) / wall * 100)
    threads = {f"{name}: {thread} ({len(pcts)})": sum(pcts) for (name, thread), pcts in by_thread.items()}
    return dict(used), threads


@dataclass(frozen=True)
class Round:
    idle_pct: dict[str, float]
    idle_threads_pct: dict[str, float]  # "process: thread name (count)" → % of one core
    rps: dict[str, float]  # "nlp-only" / "whole" → Embed requests/s
    p50_ms: dict[str, float]
    others_pct: dict[str, float]
    # CPU the whole mesh's processes other than the gateway and the NLP replica used during its Embed run (% of one
    # core): what the idle co-residents cost the busy one directly.
    coresident_pct: float


async def embed_load(mesh: Mesh, duration: float, label: str) -> tuple[float, float, float]:
    spec = LoadSpec(
        target=mesh.gateway,
        method=METHOD,
        request={"texts": [TEXT]},
        concurrency=CONCURRENCY,
        duration_s=duration,
        warmup=CONCURRENCY * 2,
        deadline_s=30.0,
        progress=False,
        **mesh.access(mesh.gateway),
    )
    assert mesh.process is not None
    # By module: in the whole mesh several replicas run, and only the NLP one is under load.
    names = {process_name(pid): pid for pid in process_tree(mesh.process.pid)}
    pids = {"client": os.getpid(), "gateway": names["gateway"], "replica": names["services.nlp"]}
    run = await run_metered(spec, pids, label)
    return run.result.rps, run.result.latency.p50_ms, run.others_pct


def measure_round(rnd: int, duration: float, idle_s: float, quiet_s: float) -> Round:
    rps: dict[str, float] = {}
    coresident = 0.0
    p50: dict[str, float] = {}
    others: dict[str, float] = {}
    idle: dict[str, float] = {}
    idle_threads: dict[str, float] = {}
    for side, replicas in (("nlp-only", NLP_ONLY), ("whole", WHOLE)):
        mesh = Mesh(f"coresidence-{side}", replicas=replicas)
        print(f"round {rnd + 1}: starting the {side} mesh ...", file=sys.stderr)
        mesh.start()
        try:
            mesh.wait_ready(600)
            assert mesh.process is not None
            wait_quiet(quiet_s, exclude=process_tree(mesh.process.pid))
            if side == "whole":
                time.sleep(5)  # start-up's last reports and view pushes settle
                idle, idle_threads = idle_cpu(mesh, idle_s)
                print(f"  round {rnd + 1} idle whole mesh: {sum(idle.values()):.2f}% of a core", file=sys.stderr)
            tree = process_tree(mesh.process.pid)
            bystanders = {str(p): p for p in tree if process_name(p) not in ("gateway", "services.nlp")}
            with CpuMeter(bystanders) as meter:
                started = time.perf_counter()
                rps[side], p50[side], others[side] = asyncio.run(
                    embed_load(mesh, duration, f"round {rnd + 1} {side:<8} Embed c={CONCURRENCY}")
                )
                wall = time.perf_counter() - started
            if side == "whole":
                coresident = sum(meter.used.values()) / wall * 100
                print(f"  round {rnd + 1} co-residents meanwhile: {coresident:.1f}% of a core", file=sys.stderr)
        finally:
            mesh.stop()
    return Round(idle, idle_threads, rps, p50, others, coresident)


def busiest_threads(rounds: Sequence[Round], count: int = 8) -> list[tuple[str, float]]:
    names = {name for r in rounds for name in r.idle_threads_pct}
    pcts = {name: median(r.idle_threads_pct.get(name, 0.0) for r in rounds) for name in names}
    return sorted(pcts.items(), key=lambda item: -item[1])[:count]


def report(rounds: Sequence[Round], *, host: str, date: str, duration: float, idle_s: float) -> str:
    names = sorted(
        {name for r in rounds for name in r.idle_pct}, key=lambda n: -median(r.idle_pct.get(n, 0) for r in rounds)
    )
    idle_rows = [(name, f"{median(r.idle_pct.get(name, 0.0) for r in rounds):.2f}") for name in names]
    total = median(sum(r.idle_pct.values()) for r in rounds)
    idle_rows.append(("**total**", f"**{total:.2f}**"))
    ratios = [r.rps["whole"] / r.rps["nlp-only"] for r in rounds]
    ratio = median(ratios)
    load_rows = [
        (
            side,
            f"{median(r.rps[side] for r in rounds):,.1f}",
            f"{median(r.p50_ms[side] for r in rounds):.1f}",
        )
        for side in ("nlp-only", "whole")
    ]
    load_rows.append(("**whole / nlp-only**", f"**{ratio:.2f}**", ""))
    raw = markdown_table(
        (
            "round",
            "nlp-only req/s",
            "whole req/s",
            "ratio",
            "idle whole mesh % of a core",
            "co-residents during the whole run % of a core",
            "other procs CPU % (runs)",
        ),
        [
            (
                str(i + 1),
                f"{r.rps['nlp-only']:,.1f}",
                f"{r.rps['whole']:,.1f}",
                f"{r.rps['whole'] / r.rps['nlp-only']:.2f}",
                f"{sum(r.idle_pct.values()):.2f}",
                f"{r.coresident_pct:.1f}",
                f"{r.others_pct['nlp-only']:.0f} / {r.others_pct['whole']:.0f}",
            )
            for i, r in enumerate(rounds)
        ],
    )
    return "\n".join(
        [
            "## Co-residence: idle services next to a busy one",
            "",
            f"`{command_line()}` — {date}",
            "",
            f"Machine: {host}. The machine is shared: only the ratio of two runs in the same round means much.",
            "",
            f"The whole mesh (one NLP, vision, speech and LLM replica, as `make run`), idle, CPU per process over"
            f" {idle_s:g} s (utime + stime from /proc, % of one core, median of {len(rounds)} rounds):",
            "",
            markdown_table(("process", "% of one core"), idle_rows),
            "",
            f"- Idle mesh in total: **{total:.2f}%** of one core (goal < {IDLE_GOAL_PCT:g}%):"
            + (" met." if total < IDLE_GOAL_PCT else " **missed**."),
            "- What wakes it, by kind of thread (the busiest; median of rounds, % of one core): "
            + "; ".join(f"{name} {pct:.2f}" for name, pct in busiest_threads(rounds))
            + ".",
            "",
            f"NlpService/Embed, one short sentence per request, c={CONCURRENCY} through the gateway for {duration:g} s,"
            " on an NLP-only mesh and on the whole mesh, one after the other in every round:",
            "",
            markdown_table(("mesh", "requests/s", "p50 ms"), load_rows),
            "",
            f"- Whole mesh / NLP-only: **{ratio:.2f}** (goal ≥ {RATIO_GOAL:.2f}):"
            + (" met." if ratio >= RATIO_GOAL else " **missed**."),
            "",
            f"- The co-resident processes (everything but the gateway and the NLP replica) used"
            f" {median(r.coresident_pct for r in rounds):.1f}% of one core meanwhile (median round); the rest of any"
            " gap is other load on the shared host (last column: CPU used by processes outside the client, gateway and"
            " replica during each run, the co-residents included).",
            "",
            "Raw figures:",
            "",
            raw,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli(
        "coresidence",
        __doc__,
        rounds=2,
        rounds_help="rounds, each starting both meshes",
        duration_s=5.0,
        wait_quiet_s=30.0,
    )
    cli.add_argument("--idle", type=float, default=30.0, help="seconds the idle whole mesh is metered (default 30)")
    args = cli.parse_args(argv)
    check_bounded(cli, args, max_rounds=5, duration_s=(1, 10))
    if not 5 <= args.idle <= 60:
        cli.error("idle must be 5..60 s (the whole run stays bounded)")
    host, date = machine(), utc_now()
    rounds = [measure_round(rnd, args.duration, args.idle, args.wait_quiet) for rnd in range(args.rounds)]
    publish(report(rounds, host=host, date=date, duration=args.duration, idle_s=args.idle), args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
