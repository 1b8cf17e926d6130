"""Tenant fair share on a contended replica: a light tenant's latency beside a heavy tenant's flood.

Starts its own mesh (`aimass up` with one NLP replica), then runs two loads at once through the gateway for each
measurement: the heavy tenant sends Embed requests of 8 texts from 32 concurrent callers (several batches queue
up), the light tenant one text from one caller. Side ``fair``: the two call with keys of different tenants,
so the replica's batcher shares the queue between them (aimass/tenancy/fair_share.py). Side ``fifo``: the light
caller uses a key of the heavy tenant, so both are one tenant and the queue is first come, first served (what a
batcher without tenants does). The sides alternate, rounds rotate which goes first, and the report gives medians
per side and the ratios.

    python -m benchmarks.fairness [--rounds 3] [--duration 4] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    Mesh,
    busy_lines,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    median,
    publish,
    utc_now,
)
from loadtest.generator import LoadResult, LoadSpec, run_load

NAME = "fairness"
METHOD = "aimass.v1.NlpService/Embed"
HEAVY_REQUEST = {"texts": [f"the heavy tenant's sentence number {i} about serving models" for i in range(8)]}
LIGHT_REQUEST = {"texts": ["the light tenant's one sentence"]}
HEAVY_CONCURRENCY = 32
SIDES = ("fair", "fifo")


@dataclass(frozen=True)
class Sample:
    side: str
    round: int
    heavy: LoadResult
    light: LoadResult


async def measure(mesh: Mesh, keys: dict[str, str], side: str, rnd: int, duration: float) -> Sample:
    def spec(request: dict[str, list[str]], concurrency: int, tenant: str) -> LoadSpec:
        return LoadSpec(
            target=mesh.gateway,
            method=METHOD,
            request=request,
            concurrency=concurrency,
            duration_s=duration,
            deadline_s=30.0,
            # The tenant is the key's: each calls with a key of its own.
            api_key=keys[tenant],
            progress=False,
        )

    light_tenant = "light" if side == "fair" else "heavy"
    heavy, light = await asyncio.gather(
        run_load(spec(HEAVY_REQUEST, HEAVY_CONCURRENCY, "heavy")), run_load(spec(LIGHT_REQUEST, 1, light_tenant))
    )
    print(
        f"  round {rnd + 1} {side:<4}  light p50 {light.latency.p50_ms:7.1f} ms p99 {light.latency.p99_ms:7.1f} ms"
        f" ({light.requests} calls)  heavy {heavy.rps * len(HEAVY_REQUEST['texts']):6.0f} texts/s"
        f"  non-OK {heavy.errors + light.errors}",
        file=sys.stderr,
    )
    return Sample(side, rnd, heavy, light)


async def run_all(mesh: Mesh, rounds: int, duration: float) -> list[Sample]:
    keys = {tenant: mesh.key_for(tenant) for tenant in ("heavy", "light")}
    # Settle: first connections and lazy initialisation are not measured.
    await run_load(
        LoadSpec(
            mesh.gateway, METHOD, HEAVY_REQUEST, concurrency=8, duration_s=1.5, progress=False, api_key=keys["heavy"]
        )
    )
    samples = []
    for rnd in range(rounds):
        for side in SIDES[rnd % 2 :] + SIDES[: rnd % 2]:
            samples.append(await measure(mesh, keys, side, rnd, duration))
    return samples


def side_medians(samples: Sequence[Sample], side: str) -> dict[str, float]:
    got = [s for s in samples if s.side == side]
    return {
        "light_p50": median(s.light.latency.p50_ms for s in got),
        "light_p99": median(s.light.latency.p99_ms for s in got),
        "light_rps": median(s.light.rps for s in got),
        "heavy_texts": median(s.heavy.rps * len(HEAVY_REQUEST["texts"]) for s in got),
    }


def report(samples: Sequence[Sample], *, host: str, date: str, rounds: int, duration: float, busy: list[str]) -> str:
    fair, fifo = side_medians(samples, "fair"), side_medians(samples, "fifo")
    rows = [
        (side, f"{m['light_p50']:.1f}", f"{m['light_p99']:.1f}", f"{m['light_rps']:.1f}", f"{m['heavy_texts']:,.0f}")
        for side, m in (("fair", fair), ("fifo", fifo))
    ]
    errors = sum(s.heavy.errors + s.light.errors for s in samples)
    p50_ratio = fifo["light_p50"] / fair["light_p50"]
    p99_ratio = fifo["light_p99"] / fair["light_p99"]
    heavy_ratio = fair["heavy_texts"] / fifo["heavy_texts"]
    raw = [
        (
            str(s.round + 1),
            s.side,
            str(s.light.requests),
            f"{s.light.latency.p50_ms:.1f}",
            f"{s.light.latency.p99_ms:.1f}",
            str(s.heavy.requests),
            f"{s.heavy.latency.p50_ms:.1f}",
            str(s.heavy.errors + s.light.errors),
        )
        for s in samples
    ]
    parts = [
        "## Tenant fair share on a contended replica",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"One NLP replica behind the gateway. Heavy tenant: {HEAVY_CONCURRENCY} concurrent callers, Embed of"
        f" {len(HEAVY_REQUEST['texts'])} texts each; light tenant: one caller, one text; both at once for"
        f" {duration:g} s per measurement, {rounds} alternating rounds, medians. `fair`: two tenants (the batcher"
        " shares the queue); `fifo`: the light caller sends the heavy tenant's header, so the queue is first come,"
        " first served.",
        "",
        markdown_table(("side", "light p50 ms", "light p99 ms", "light calls/s", "heavy texts/s"), rows),
        "",
        f"- Light tenant's latency, first come first served / fair share: p50 **{p50_ratio:.1f}x**, p99"
        f" **{p99_ratio:.1f}x** (the fair queue puts its request in the next batch instead of behind the flood).",
        f"- Heavy tenant's throughput, fair / fifo: **{heavy_ratio:.2f}** (the light tenant's one text per batch is"
        " all it gives up: a difference this small is within the machine's noise).",
        f"- Non-OK calls: {errors}.",
    ]
    parts += busy_lines(busy)
    header = ("round", "side", "light calls", "light p50 ms", "light p99 ms", "heavy calls", "heavy p50 ms", "non-OK")
    parts += ["", "Raw figures:", "", markdown_table(header, raw)]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m benchmarks.fairness", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (default 3)")
    cli.add_argument("--duration", type=float, default=4.0, help="seconds per measurement (default 4)")
    cli.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for other load to end first")
    cli.add_argument("--write", type=Path, default=None, help="docs file to update")
    args = cli.parse_args(argv)
    check_bounded(cli, args, max_rounds=5)
    host, date = machine(), utc_now()
    mesh = Mesh(NAME)
    try:
        print("starting the mesh (models load first) ...", file=sys.stderr)
        mesh.start()
        mesh.wait_ready()
        busy = mesh.wait_quiet(args.wait_quiet)
        samples = asyncio.run(run_all(mesh, args.rounds, args.duration))
    finally:
        mesh.stop()
    publish(
        report(samples, host=host, date=date, rounds=args.rounds, duration=args.duration, busy=busy), args.write, NAME
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
