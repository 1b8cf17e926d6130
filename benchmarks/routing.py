"""Routing decision cost and view fan-out.

1. Decision cost: each Router's ``choose`` against 1,000 replicas with a full routing view (queue depths,
   utilisation, KV cache, memory), timed one decision at a time; p50/p99 in microseconds.
2. Fan-out: a real SchedulerService on loopback with 10 gateways' ViewWatchers subscribed; a load report goes in,
   and we time until every watcher holds the view that includes it (p50/p99 over repeated reports).

    python -m benchmarks.routing [--replicas 1000] [--decisions 20000] [--watchers 10] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import grpc

from aimass.runtime.discovery import Instance
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from benchmarks.common import command_line, machine, markdown_table, publish, utc_now
from gateway.replicas import Replica
from gateway.router import ROUTERS
from gateway.view import LoadView, ViewWatcher
from scheduler.service import SchedulerServicer, SchedulerState

NAME = "routing"
SERVICE = "aimass.v1.NlpService"
DECISION_GOAL_US = 200.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fleet_view(count: int, rng: random.Random) -> scheduler_pb2.RoutingView:
    replicas, devices = [], []
    for i in range(count):
        device_id = f"node{i // 8}/gpu:{i % 8}"
        load = scheduler_pb2.ModelLoad(
            model=common_pb2.ModelRef(name="m"),
            device_id=device_id,
            loaded=rng.random() > 0.05,
            queue_depth=rng.randrange(0, 32),
            in_flight=rng.randrange(0, 16),
            max_batch_size=16,
            kv_cache_usage=rng.random(),
            requests_per_second=rng.uniform(1, 100),
        )
        replicas.append(scheduler_pb2.ReplicaView(instance_id=f"r{i}", services=[SERVICE], models=[load]))
        info = common_pb2.DeviceInfo(
            utilization_percent=rng.uniform(0, 100),
            memory_used_bytes=rng.randrange(1, 80),
            memory_total_bytes=80,
            # A mixed fleet (T4, L4, A100, H100 FP32 peaks), so capacity takes its compute path.
            compute_tflops=rng.choice((8.1, 30.3, 19.5, 67.0)),
        )
        devices.append(scheduler_pb2.NodeDevice(device_id=device_id, info=info))
    return scheduler_pb2.RoutingView(
        version=1, replicas=replicas, nodes=[scheduler_pb2.NodeView(node_id="all", devices=devices)]
    )


async def decision_costs(count: int, decisions: int) -> list[tuple[str, float, float]]:
    rng = random.Random(0)
    view = LoadView()
    view.connected = True
    view.apply(fleet_view(count, rng))
    replicas = [
        Replica(
            Instance(f"r{i}", "nlp", (SERVICE,), f"10.0.{i // 250}.{i % 250}:50061"), grpc.aio.insecure_channel("x")
        )
        for i in range(count)
    ]
    rows = []
    for name, router_type in ROUTERS.items():
        router = router_type(view, random.Random(1))
        timings = []
        for _ in range(decisions):
            started = time.perf_counter_ns()
            chosen = router.choose(SERVICE, replicas)
            timings.append((time.perf_counter_ns() - started) / 1000)
            chosen.inflight += 1  # live counts change between decisions, as under load
        rows.append((name, percentile(timings, 0.5), percentile(timings, 0.99)))
    for replica in replicas:
        await replica.channel.close()
    return rows


async def fan_out(watchers: int, rounds: int) -> tuple[float, float]:
    state = SchedulerState(report_interval_s=1.0)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    views = [LoadView() for _ in range(watchers)]
    subscribed = [ViewWatcher(address, v, subscriber_id=f"gw{i}", min_interval_ms=1) for i, v in enumerate(views)]
    for watcher in subscribed:
        watcher.start()
    delays = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for i in range(rounds):
            started = time.perf_counter()
            await stub.ReportLoad(scheduler_pb2.ReportLoadRequest(instance_id=f"r{i % 4}", node_id="n"), timeout=5)
            target = state.version
            # Polled every 0.2 ms (LoadView has no change hook); far finer than the delays measured.
            while any(v.version < target for v in views):  # noqa: ASYNC110
                await asyncio.sleep(0.0002)
            delays.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.005)
    for watcher in subscribed:
        await watcher.close()
    await state.close_watches()
    await server.stop(1)
    return percentile(delays, 0.5), percentile(delays, 0.99)


async def main_async(args: argparse.Namespace) -> None:
    rows = await decision_costs(args.replicas, args.decisions)
    p50_ms, p99_ms = await fan_out(args.watchers, args.rounds)
    ours_p99 = next(p99 for name, _, p99 in rows if name == "ours")
    text = "\n".join(
        [
            "## Routing decision cost and view fan-out",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}.",
            "",
            markdown_table(
                ("router", f"p50 µs ({args.replicas} replicas)", "p99 µs"),
                [(name, f"{p50:.1f}", f"{p99:.1f}") for name, p50, p99 in rows],
            ),
            "",
            f"- `ours` decision p99 **{ours_p99:.1f} µs** with {args.replicas} replicas in the view (goal ≤"
            f" {DECISION_GOAL_US:.0f} µs: {'met' if ours_p99 <= DECISION_GOAL_US else 'missed'}); it scores at most"
            " 16 sampled candidates, so the cost does not grow with the fleet.",
            f"- View fan-out to {args.watchers} gateways (load report in → every watcher holds the new view, over"
            f" {args.rounds} reports, scheduler and watchers in one process on loopback): p50 {p50_ms:.1f} ms,"
            f" p99 {p99_ms:.1f} ms.",
        ]
    )
    publish(text, args.write, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--watchers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's routing section")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
