"""What the gateway costs: a cheap RPC straight to the NLP replica vs the same RPC through the gateway.

Starts its own mesh (`aimass up` on free ports), then measures NlpService/Sentiment on one short text at c=1
(latency) and c=64 (throughput), interleaving the two sides (direct, gateway, direct, gateway, ...) so drift on
the machine hits both alike, and reports the median per side. CPU seconds of the client, gateway and replica
processes are read from /proc around every measurement, so the report shows where each request's CPU goes.

    python -m benchmarks.gateway_overhead [--rounds 3] [--duration 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.common import (
    Mesh,
    MeteredRun,
    SideMedians,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    publish,
    rounds_cli,
    run_metered,
    utc_now,
)
from loadtest.generator import LoadSpec, run_load

NAME = "gateway_overhead"
METHOD = "aimass.v1.NlpService/Sentiment"
REQUEST = {"texts": ["I love how fast this is."]}
CONCURRENCIES = (1, 64)
SIDES = ("direct", "gateway")
RATIO_GOAL = 0.70  # gateway RPS / direct RPS at c=64
ADDED_P50_GOAL_MS = 0.5  # at c=1
PROCESSES = ("client", "gateway", "replica")


@dataclass(frozen=True)
class Sample:
    side: str
    concurrency: int
    round: int
    run: MeteredRun


@dataclass(frozen=True)
class Summary:
    concurrency: int
    medians: SideMedians

    @property
    def ratio(self) -> float:
        return self.medians.rps["gateway"] / self.medians.rps["direct"]

    @property
    def added_p50_ms(self) -> float:
        return self.medians.p50_ms["gateway"] - self.medians.p50_ms["direct"]


def warmup_for(concurrency: int) -> int:
    return max(100, concurrency * 10)


async def measure(mesh: Mesh, pids: dict[str, int], side: str, concurrency: int, rnd: int, duration: float) -> Sample:
    target = mesh.replica if side == "direct" else mesh.gateway
    spec = LoadSpec(
        target=target,
        method=METHOD,
        request=REQUEST,
        concurrency=concurrency,
        duration_s=duration,
        warmup=warmup_for(concurrency),
        deadline_s=10.0,
        progress=False,
        **mesh.access(target),
    )
    run = await run_metered(spec, pids, f"round {rnd + 1} c={concurrency:<3} {side:<8}")
    return Sample(side, concurrency, rnd, run)


async def run_all(mesh: Mesh, rounds: int, duration: float) -> list[Sample]:
    pids = {"client": os.getpid(), **mesh.pids()}
    # Settle first: the first seconds after start-up (lazy initialisation, first connections) are not measured.
    for target in (mesh.replica, mesh.gateway):
        await run_load(
            LoadSpec(target, METHOD, REQUEST, concurrency=8, duration_s=1.5, progress=False, **mesh.access(target))
        )
    samples: list[Sample] = []
    for concurrency in CONCURRENCIES:
        for rnd in range(rounds):
            for side in SIDES:
                samples.append(await measure(mesh, pids, side, concurrency, rnd, duration))
    return samples


def summarise(samples: Sequence[Sample]) -> list[Summary]:
    return [
        Summary(
            concurrency,
            SideMedians.of(
                {side: [s.run for s in samples if s.concurrency == concurrency and s.side == side] for side in SIDES},
                PROCESSES,
            ),
        )
        for concurrency in CONCURRENCIES
    ]


def headline_table(summaries: Sequence[Summary]) -> str:
    rows = [
        (
            f"c={s.concurrency}",
            f"{s.medians.rps['direct']:,.0f}",
            f"{s.medians.rps['gateway']:,.0f}",
            f"{s.ratio:.2f}",
            f"{s.medians.p50_ms['direct']:.2f}",
            f"{s.medians.p50_ms['gateway']:.2f}",
            f"{s.added_p50_ms:+.2f}",
        )
        for s in summaries
    ]
    header = (
        "concurrency",
        "RPS direct",
        "RPS gateway",
        "ratio gw/direct",
        "p50 direct ms",
        "p50 gateway ms",
        "added p50 ms",
    )
    return markdown_table(header, rows)


def cpu_table(summaries: Sequence[Summary]) -> str:
    rows = [row for s in summaries for row in s.medians.cpu_rows(f"c={s.concurrency}", PROCESSES)]
    return markdown_table(("concurrency", "path", *(f"{p} CPU ms/req" for p in PROCESSES), "total"), rows)


def raw_table(samples: Sequence[Sample]) -> str:
    rows = [
        (
            str(s.round + 1),
            f"c={s.concurrency}",
            s.side,
            str(s.run.result.requests),
            f"{s.run.result.elapsed_s:.2f}",
            f"{s.run.result.rps:,.1f}",
            f"{s.run.result.latency.p50_ms:.3f}",
            f"{s.run.result.latency.p95_ms:.3f}",
            f"{s.run.result.latency.p99_ms:.3f}",
            f"{s.run.result.latency.max_ms:.3f}",
            str(s.run.result.errors),
            f"{s.run.others_pct:.0f}",
        )
        for s in samples
    ]
    header = (
        "round",
        "c",
        "path",
        "requests",
        "s",
        "RPS",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "non-OK",
        "other procs CPU %",
    )
    return markdown_table(header, rows)


def goal_lines(summaries: Sequence[Summary]) -> list[str]:
    by_c = {s.concurrency: s for s in summaries}
    high, low = by_c[max(CONCURRENCIES)], by_c[min(CONCURRENCIES)]
    lines = []
    met = high.ratio >= RATIO_GOAL
    lines.append(
        f"- Throughput ratio at c={high.concurrency}: **{high.ratio:.2f}** (goal ≥ {RATIO_GOAL:.2f}): "
        + ("met." if met else "**missed**. " + throughput_note(high))
    )
    met = low.added_p50_ms <= ADDED_P50_GOAL_MS
    lines.append(
        f"- Added p50 at c={low.concurrency}: **{low.added_p50_ms:.2f} ms** (goal ≤ {ADDED_P50_GOAL_MS} ms): "
        + ("met." if met else "**missed**. " + latency_note(low))
    )
    return lines


def throughput_note(s: Summary) -> str:
    direct, gateway = s.medians.cpu_ms["direct"], s.medians.cpu_ms["gateway"]
    direct_total, gateway_total = sum(direct.values()), sum(gateway.values())
    # CPU-bound on shared cores, RPS scales with 1 / (CPU per request over all processes).
    budget = direct_total / RATIO_GOAL - (gateway_total - gateway["gateway"])
    return (
        f"Client, gateway and replica share {os.cpu_count()} cores, so CPU per request bounds throughput:"
        f" {direct_total:.2f} ms direct vs {gateway_total:.2f} ms through the gateway, of which the gateway process"
        f" takes {gateway['gateway']:.2f} ms (replica {gateway['replica']:.2f}, client {gateway['client']:.2f})."
        f" With both sides CPU-bound the ratio would be about {direct_total / gateway_total:.2f} (direct used"
        f" {s.medians.rps['direct'] * direct_total / 1000:.1f} cores here); {RATIO_GOAL:.2f} would need the gateway at"
        f" ≤ {max(budget, 0.0):.2f} ms CPU per request. Its cost is a grpc.aio server call plus a grpc.aio client"
        " call in Python per request (raw bytes or not): that dominates."
    )


def latency_note(s: Summary) -> str:
    return (
        f"The gateway hop is a second grpc.aio server + client round trip in Python: it spends "
        f"{s.medians.cpu_ms['gateway']['gateway']:.2f} ms CPU per request at c=1, and that work is on the critical"
        " path."
    )


def report(samples: Sequence[Sample], *, host: str, date: str, rounds: int, duration: float, busy: list[str]) -> str:
    summaries = summarise(samples)
    parts = [
        "## Gateway overhead",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"NlpService/Sentiment on one short text ({REQUEST['texts'][0]!r}), straight to the replica vs through the"
        f" gateway; {rounds} interleaved rounds of {duration:g} s per side and concurrency, median per side; one"
        " aio channel from the load generator (loadtest.generator), running in the benchmark process.",
        "",
        headline_table(summaries),
        "",
        *goal_lines(summaries),
    ]
    if busy:
        parts += [
            "",
            "Other busy processes seen before the run (see the last column of the raw figures for their share):",
            *(f"- {b}" for b in busy),
        ]
    parts += [
        "",
        "CPU per request by process (from /proc, median of rounds):",
        "",
        cpu_table(summaries),
        "",
        "Raw figures:",
        "",
        raw_table(samples),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli("gateway_overhead", __doc__, rounds_help="interleaved rounds per concurrency")
    args = cli.parse_args(argv)
    check_bounded(cli, args)
    host, date = machine(), utc_now()
    mesh = Mesh("gateway-overhead")
    print("starting the mesh (models load first) ...", file=sys.stderr)
    mesh.start()
    try:
        mesh.wait_ready()
        busy = mesh.wait_quiet(args.wait_quiet)
        samples = asyncio.run(run_all(mesh, args.rounds, args.duration))
    finally:
        mesh.stop()
    text = report(samples, host=host, date=date, rounds=args.rounds, duration=args.duration, busy=busy)
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
