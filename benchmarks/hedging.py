"""Hedged requests under a replica freeze: the same Embed load through a gateway with hedging on (the default) and
off, two NLP replicas each, one replica SIGSTOPped mid-run.

Starts two meshes (`aimass up` on free ports, gateway + two NLP replicas each), one with
``AIMASS_GATEWAY__HEDGING__ENABLED=false``. In each round, each side in turn (the order alternating from round to
round, so drift on the machine hits both alike) runs a closed-loop load of ``--concurrency`` clients calling Embed
(one short text, each call its own) through its gateway:

1. **normal running** (``--normal`` s): latency percentiles, and the extra load hedging adds, hedges sent per call,
   from the gateway's own counters (``aimass_gateway_hedges_total`` / ``aimass_requests_total``);
2. **freeze**: the same load while one NLP replica is stopped (SIGSTOP) for ``--freeze`` s and then continued,
   plus one second after: the slowest call and p99, and whether any failed.

Between rounds the frozen replica registers again before the next side runs. The report gives the median round per
side and the ratio off/on of the slowest call under the freeze. Goals (issue 17): with hedging, the slowest call
under a 10 s freeze at most 1 s, and at most 5% extra load in normal running.

    python -m benchmarks.hedging [--rounds 2] [--normal 5] [--freeze 10] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from aimass.client.channels import keyed_aio_channel
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc, registry_pb2, registry_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, median, publish, utc_now
from tests.metrics import scrape, value

NAME = "hedging"
EMBED = "/aimass.v1.NlpService/Embed"
SIDES = {"on": {}, "off": {"AIMASS_GATEWAY__HEDGING__ENABLED": "false"}}
DEADLINE_S = 30.0
# Calls before the first measurement on each side: the adaptive delay needs hedging.min_samples latencies.
WARM_UP_CALLS = 200
GOAL_MAX_S = 1.0
GOAL_EXTRA = 0.05


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    # When each call was sent (time.perf_counter()), in the order of latencies.
    sent: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    calls: int = 0


@dataclass(frozen=True)
class RoundResult:
    normal_p50_ms: float
    normal_p99_ms: float
    normal_max_ms: float
    extra_load: float
    stalls: float
    freeze_p99_ms: float
    freeze_max_ms: float
    freeze_calls: int
    failed: int


async def run_load(stub: nlp_pb2_grpc.NlpServiceAsyncStub, load: Load, concurrency: int, stop: asyncio.Event) -> None:
    async def client(index: int) -> None:
        while not stop.is_set():
            load.calls += 1
            request = nlp_pb2.EmbedRequest(texts=[f"client {index} sends call {load.calls}"])
            started = time.perf_counter()
            try:
                await stub.Embed(request, timeout=DEADLINE_S)
                load.codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                load.codes[err.code().name] += 1
            load.latencies.append(time.perf_counter() - started)
            load.sent.append(started)

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def timed_load(stub: nlp_pb2_grpc.NlpServiceAsyncStub, concurrency: int, seconds: float) -> Load:
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(run_load(stub, load, concurrency, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return load


def nlp_pids(mesh: Mesh) -> list[int]:
    """The NLP replicas the registry lists SERVING ([] when it does not answer)."""
    try:
        with mesh.scheduler_channel() as channel:
            listed = registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(
                registry_pb2.ListInstancesRequest(), timeout=5
            )
    except grpc.RpcError:
        return []
    return sorted(i.pid for i in listed.instances if i.kind == "nlp" and i.state == common_pb2.SERVING_STATE_SERVING)


async def wait_both_serving(mesh: Mesh, timeout_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(pids := await asyncio.to_thread(nlp_pids, mesh)) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mesh.name}: two NLP replicas not serving after {timeout_s:.0f} s (listed {pids})")
        await asyncio.sleep(0.5)
    return pids


def counters(mesh: Mesh) -> tuple[float, float, float]:
    """(hedges sent, calls) of Embed at the gateway, and the replicas it found stalled."""
    samples = scrape(mesh.metrics_address("gateway"))
    return (
        value(samples, "aimass_gateway_hedges_total", method=EMBED),
        value(samples, "aimass_requests_total", method=EMBED),
        value(samples, "aimass_gateway_stalled_replicas_total"),
    )


async def one_round(mesh: Mesh, args: argparse.Namespace) -> RoundResult:
    pids = await wait_both_serving(mesh)
    async with keyed_aio_channel(mesh.gateway, mesh.api_key or None) as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        # A short settle so the replica that came back is warm in the router's view too.
        await timed_load(stub, args.concurrency, 1.0)
        hedges_before, calls_before, stalls_before = await asyncio.to_thread(counters, mesh)
        normal = await timed_load(stub, args.concurrency, args.normal)
        hedges_after, calls_after, stalls_after = await asyncio.to_thread(counters, mesh)

        freeze, stop = Load(), asyncio.Event()
        task = asyncio.create_task(run_load(stub, freeze, args.concurrency, stop))
        await asyncio.sleep(0.5)
        frozen_at = time.perf_counter()
        os.kill(pids[0], signal.SIGSTOP)
        try:
            await asyncio.sleep(args.freeze)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        await asyncio.sleep(1.0)
        stop.set()
        await task
    slow = [(sent - frozen_at, s) for sent, s in zip(freeze.sent, freeze.latencies, strict=True) if s > GOAL_MAX_S]
    if slow:
        listed = ", ".join(f"{s:.2f} s sent at {at:+.2f} s" for at, s in slow[:10])
        print(
            f"  {mesh.name}: {len(slow)} call(s) over {GOAL_MAX_S:.0f} s (from the SIGSTOP): {listed}", file=sys.stderr
        )
    calls = max(1.0, calls_after - calls_before)
    return RoundResult(
        normal_p50_ms=percentile(normal.latencies, 0.5) * 1000,
        normal_p99_ms=percentile(normal.latencies, 0.99) * 1000,
        normal_max_ms=max(normal.latencies) * 1000,
        extra_load=(hedges_after - hedges_before) / calls,
        stalls=stalls_after - stalls_before,
        freeze_p99_ms=percentile(freeze.latencies, 0.99) * 1000,
        freeze_max_ms=max(freeze.latencies) * 1000,
        freeze_calls=freeze.calls,
        failed=sum(n for code, n in (normal.codes + freeze.codes).items() if code != "OK"),
    )


async def run_all(meshes: dict[str, Mesh], args: argparse.Namespace) -> dict[str, list[RoundResult]]:
    for mesh in meshes.values():
        async with keyed_aio_channel(mesh.gateway, mesh.api_key or None) as channel:
            stub = nlp_pb2_grpc.NlpServiceStub(channel)
            for i in range(WARM_UP_CALLS):
                await stub.Embed(nlp_pb2.EmbedRequest(texts=[f"warm-up {i}"]), timeout=DEADLINE_S)
    results: dict[str, list[RoundResult]] = {side: [] for side in meshes}
    for index in range(args.rounds):
        order = list(meshes) if index % 2 == 0 else list(reversed(meshes))
        for side in order:
            print(f"round {index + 1}: hedging {side} ...", file=sys.stderr)
            results[side].append(await one_round(meshes[side], args))
    return results


def report(results: dict[str, list[RoundResult]], args: argparse.Namespace, host: str, date: str) -> str:
    def med(side: str, name: str) -> float:
        return median(getattr(r, name) for r in results[side])

    rows = []
    for side in results:
        rows.append(
            [
                side,
                f"{med(side, 'normal_p50_ms'):.1f}",
                f"{med(side, 'normal_p99_ms'):.1f}",
                f"{med(side, 'normal_max_ms'):.0f}",
                f"{med(side, 'extra_load') * 100:.1f}%",
                f"{med(side, 'stalls'):.0f}",
                f"{med(side, 'freeze_p99_ms'):.0f}",
                f"{med(side, 'freeze_max_ms'):.0f}",
                f"{max(r.freeze_max_ms for r in results[side]):.0f}",
                str(sum(r.failed for r in results[side])),
            ]
        )
    on_max, off_max = med("on", "freeze_max_ms"), med("off", "freeze_max_ms")
    on_extra = med("on", "extra_load")
    worst_on = max(r.freeze_max_ms for r in results["on"]) / 1000
    extra_worst = max(r.extra_load for r in results["on"])
    met_max = "met" if worst_on <= GOAL_MAX_S else "NOT met"
    met_extra = "met" if extra_worst <= GOAL_EXTRA else "NOT met"
    table = markdown_table(
        [
            "hedging",
            "normal p50 ms",
            "normal p99 ms",
            "normal max ms",
            "extra load (hedges/calls)",
            "replicas left out (normal)",
            "freeze p99 ms",
            "freeze max ms (median round)",
            "freeze max ms (worst round)",
            "failed calls",
        ],
        rows,
    )
    return f"""## Hedged requests under a replica freeze

`{command_line()}` — {date}, {host}.

Embed (one short text per call, {args.concurrency} closed-loop clients) through the gateway on two NLP replicas;
hedging on (the default: delay = the method's p97 on this gateway, floored at 20 ms, capped at 500 ms; budget 5% of
calls + a burst of 20) vs off (`gateway.hedging.enabled = false`), alternating, {args.rounds} round(s) each:
{args.normal:.0f} s of normal running, then one replica SIGSTOPped for {args.freeze:.0f} s under the same load (and
1 s after SIGCONT). Medians over rounds; the machine is shared and noisy, so only the side-by-side figures of one run
mean anything. "Replicas left out": a replica held a call past its delay, had answered nothing since and missed a
health check, so it was left out of routing until it answered one (in normal running it should stay 0). Without
hedging, a call caught on the frozen replica waits until the gateway's keepalive gives up on the connection
(`gateway.keepalive_s` + `keepalive_timeout_s`, 2 + 2 s) and is retried elsewhere: hence seconds, not the whole freeze.

{table}

Under the freeze, the slowest call took {off_max / 1000:.2f} s without hedging and {on_max / 1000:.2f} s with it
(off/on = {off_max / max(on_max, 1e-9):.1f}x). Goals: slowest call under the freeze at most {GOAL_MAX_S:.0f} s with
hedging — {met_max} (worst round {worst_on:.2f} s); extra load in normal running at most {GOAL_EXTRA:.0%} — {met_extra}
(median {on_extra:.1%}, worst round {extra_worst:.1%}).
"""


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m benchmarks.hedging", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=2, help="rounds per side, alternating (default 2)")
    cli.add_argument("--normal", type=float, default=5.0, help="seconds of normal running per round (default 5)")
    cli.add_argument("--freeze", type=float, default=10.0, help="seconds a replica stays stopped (default 10)")
    cli.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default 4)")
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = cli.parse_args(argv)
    if not 1 <= args.rounds <= 5 or not 1 <= args.normal <= 30 or not 1 <= args.freeze <= 30:
        cli.error("rounds must be 1..5, normal and freeze 1..30 s (the whole run stays bounded)")
    if not 1 <= args.concurrency <= 64:
        cli.error("concurrency must be 1..64")
    host, date = machine(), utc_now()
    meshes = {side: Mesh(f"hedging-{side}", env=env, replicas={"nlp": 2}) for side, env in SIDES.items()}
    for mesh in meshes.values():
        mesh.metrics = True
    try:
        print("starting two meshes of two NLP replicas each (models load first) ...", file=sys.stderr)
        for mesh in meshes.values():
            mesh.start()
        for mesh in meshes.values():
            mesh.wait_ready()
        results = asyncio.run(run_all(meshes, args))
    finally:
        for mesh in meshes.values():
            mesh.stop()
    publish(report(results, args, host, date), args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
