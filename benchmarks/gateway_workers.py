"""The gateway as worker processes: a cheap RPC straight to the replica vs through a one-process gateway vs through
a gateway of two workers sharing its port (gateway.workers = 2, gateway/workers.py), at c=64 over many client
connections (the kernel spreads connections, not calls, over the workers).

Starts its own mesh (`aimass up`) with a two-worker gateway, then a one-process gateway beside it on another port,
joined to the same mesh (same registry, replica and store), so the three sides call the same replica. Rounds
alternate the sides (direct, 1 worker, 2 workers, direct, ...) and the report takes the median per side, with CPU
per call of the client, the gateway (parent and workers together) and the replica from /proc.

    python -m benchmarks.gateway_workers [--rounds 3] [--duration 3] [--connections 32] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.local_mesh import free_port
from benchmarks.common import (
    CpuMeter,
    Mesh,
    MeteredRun,
    SideMedians,
    busy_lines,
    check_bounded,
    child_pids,
    command_line,
    machine,
    markdown_table,
    median,
    publish,
    rounds_cli,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadSpec, run_load

NAME = "gateway_workers"
METHOD = "aimass.v1.NlpService/Sentiment"
REQUEST = {"texts": ["I love how fast this is."]}
CONCURRENCY = 64
SIDES = ("direct", "1 worker", "2 workers")
RATIO_GOAL = 0.85  # 2 workers / direct at c=64, on 4+ cores
PROCESSES = ("client", "gateway", "replica")
ENV = {"AIMASS_GATEWAY__WORKERS": "2", "AIMASS_REST__ENABLED": "false", "AIMASS_CONSOLE__ENABLED": "false"}


@dataclass(frozen=True)
class Sample:
    side: str
    round: int
    run: MeteredRun


class OneWorkerGateway:
    """A one-process gateway (gateway.workers = 1) on its own port, joined to ``mesh``."""

    def __init__(self, mesh: Mesh) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "AIMASS_STATE_DIR": str(mesh.state_dir),
            "AIMASS_LOG_LEVEL": "WARNING",
            "AIMASS_REGISTRY__ADDRESS": mesh.scheduler,
            "AIMASS_SCHEDULER__ADDRESS": mesh.scheduler,
            "AIMASS_MESH__IDENTITY": "gateway",
            "AIMASS_GATEWAY__WORKERS": "1",
            "AIMASS_GATEWAY__SERVER__PORT": str(self.port),
            "AIMASS_GATEWAY__ADAPTER_PORT": str(free_port()),
        }
        self.process = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the one-worker gateway exited with {self.process.returncode}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.NlpService"), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise TimeoutError("the one-worker gateway did not serve NlpService in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def gateway_pids(mesh: Mesh, single: OneWorkerGateway) -> dict[str, list[int]]:
    """Side → the gateway processes whose CPU it spends (the two-worker gateway: its parent and its workers)."""
    parent = mesh.pids()["gateway"]
    return {"direct": [], "1 worker": [single.process.pid], "2 workers": [parent, *child_pids(parent)]}


@dataclass(frozen=True)
class Bench:
    """What every measurement of a run shares."""

    mesh: Mesh
    # Side → the address it calls.
    targets: Mapping[str, str]
    # "client" and "replica" → pid.
    pids: Mapping[str, int]
    # Side → its gateway processes.
    gateways: Mapping[str, list[int]]
    duration: float
    connections: int


async def measure(bench: Bench, side: str, rnd: int) -> Sample:
    mesh, target, gateways = bench.mesh, bench.targets[side], bench.gateways
    access = mesh.access(mesh.replica if side == "direct" else mesh.gateway)
    spec = LoadSpec(
        target=target,
        method=METHOD,
        request=REQUEST,
        concurrency=CONCURRENCY,
        channels=bench.connections,
        duration_s=bench.duration,
        warmup=CONCURRENCY * 10,
        deadline_s=10.0,
        progress=False,
        **access,
    )
    named = {**bench.pids, **{f"gateway {pid}": pid for pid in gateways[side]}}
    with CpuMeter(named) as meter:
        result = await run_load(spec)
    calls = result.requests + spec.warmup
    cpu_ms = {
        "client": meter.used["client"] * 1000 / calls,
        "replica": meter.used["replica"] * 1000 / calls,
        "gateway": sum(meter.used[f"gateway {pid}"] for pid in gateways[side]) * 1000 / calls,
    }
    print(
        f"  round {rnd + 1} {side:<9} {result.rps:8,.0f} RPS  p50 {result.latency.p50_ms:6.2f} ms"
        f"  p99 {result.latency.p99_ms:7.2f} ms  non-OK {result.errors}  others {meter.others_pct:.0f}% CPU",
        file=sys.stderr,
    )
    return Sample(side, rnd, MeteredRun(result, cpu_ms, meter.others_pct, calls))


async def run_all(mesh: Mesh, single: OneWorkerGateway, rounds: int, duration: float, connections: int) -> list[Sample]:
    targets = {"direct": mesh.replica, "1 worker": single.address, "2 workers": mesh.gateway}
    pids = {"client": os.getpid(), "replica": mesh.pids()["replica"]}
    bench = Bench(mesh, targets, pids, gateway_pids(mesh, single), duration, connections)
    # Settle first: lazy initialisation and first connections are not measured.
    for side, target in targets.items():
        access = mesh.access(mesh.replica if side == "direct" else mesh.gateway)
        await run_load(
            LoadSpec(target, METHOD, REQUEST, concurrency=16, channels=16, duration_s=1.5, progress=False, **access)
        )
    samples = []
    for rnd in range(rounds):
        for side in SIDES:
            samples.append(await measure(bench, side, rnd))
    return samples


def summarise(samples: Sequence[Sample]) -> SideMedians:
    return SideMedians.of({side: [s.run for s in samples if s.side == side] for side in SIDES}, PROCESSES)


def round_ratios(samples: Sequence[Sample], side: str, over: str = "direct") -> list[float]:
    """``side``'s RPS over ``over``'s, per round: the two measured side by side."""
    rps = {(s.round, s.side): s.run.result.rps for s in samples}
    rounds = sorted({s.round for s in samples})
    return [rps[(r, side)] / rps[(r, over)] for r in rounds if rps.get((r, over))]


def headline_table(m: SideMedians, samples: Sequence[Sample]) -> str:
    rows = [
        (
            side,
            f"{m.rps[side]:,.0f}",
            f"{median(round_ratios(samples, side)):.2f}",
            f"{m.p50_ms[side]:.2f}",
            f"{m.p99_ms[side]:.2f}",
            f"{m.cpu_ms[side]['gateway']:.3f}",
        )
        for side in SIDES
    ]
    header = ("path", "RPS", "ratio to direct (median round)", "p50 ms", "p99 ms", "gateway CPU ms/call")
    return markdown_table(header, rows)


def limits(cpu_ms: Mapping[str, float], gateway_cores: int) -> dict[str, float]:
    """Calls a second each process could carry with cores of its own (client 1, replica 1, gateway
    ``gateway_cores``; 0: no gateway), from its CPU per call."""
    found = {"client": 1000 / cpu_ms["client"], "replica": 1000 / cpu_ms["replica"]}
    if gateway_cores:
        found["gateway"] = gateway_cores * 1000 / cpu_ms["gateway"]
    return found


def capacity(cpu_ms: Mapping[str, float], gateway_cores: int) -> float:
    """Calls a second through the process that runs out first (see ``limits``)."""
    return min(limits(cpu_ms, gateway_cores).values())


def implication(m: SideMedians, samples: Sequence[Sample], cores: int) -> list[str]:
    one, two = median(round_ratios(samples, "1 worker")), median(round_ratios(samples, "2 workers"))
    two_over_one = median(round_ratios(samples, "2 workers", over="1 worker"))
    direct = capacity(m.cpu_ms["direct"], 0)
    through = {workers: capacity(m.cpu_ms["2 workers"], workers) for workers in (1, 2, 4)}
    two_workers = limits(m.cpu_ms["2 workers"], 2)
    bound = min(two_workers, key=lambda process: two_workers[process])
    return [
        f"- Here ({cores} cores shared by the client, the gateway, the replica and other work): 1 worker"
        f" **{one:.2f}** of direct, 2 workers **{two:.2f}** (2 workers / 1 worker: {two_over_one:.2f}), median of"
        " rounds. The client, the gateway and the replica already fill both cores on every path, so a second"
        " worker can only take CPU from the others: this machine cannot show the scaling (what it gains here comes"
        " from the kernel's share of a contended CPU going per process), only what each call costs.",
        f"- What it implies for 4+ cores (client, replica and each worker on a core of its own; each process's"
        f" throughput is 1000 / its CPU ms per call, measured above): direct ~{direct:,.0f} calls/s (replica"
        f" {m.cpu_ms['direct']['replica']:.3f} ms, client {m.cpu_ms['direct']['client']:.3f} ms per call); through"
        f" the gateway ({m.cpu_ms['2 workers']['gateway']:.3f} ms of gateway CPU per call) 1 worker"
        f" ~{through[1]:,.0f} ({through[1] / direct:.2f} of direct), 2 workers ~{through[2]:,.0f}"
        f" (**{through[2] / direct:.2f}**; goal ≥ {RATIO_GOAL:.2f}), 4 workers ~{through[4]:,.0f}"
        f" ({through[4] / direct:.2f}). With 2 workers the {bound} bounds it.",
    ]


def raw_table(samples: Sequence[Sample]) -> str:
    rows = [
        (
            str(s.round + 1),
            s.side,
            *s.run.load_cells(),
            *(f"{s.run.cpu_ms[p]:.3f}" for p in PROCESSES),
            str(s.run.result.errors),
            f"{s.run.others_pct:.0f}",
        )
        for s in samples
    ]
    header = (
        "round",
        "path",
        "requests",
        "RPS",
        "p50 ms",
        "p99 ms",
        *(f"{p} CPU ms/call" for p in PROCESSES),
        "non-OK",
        "other procs CPU %",
    )
    return markdown_table(header, rows)


def report(
    samples: Sequence[Sample], *, host: str, date: str, rounds: int, duration: float, connections: int, busy: list[str]
) -> str:
    medians = summarise(samples)
    parts = [
        "## Gateway workers",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}.",
        "",
        f"NlpService/Sentiment on one short text at c={CONCURRENCY} over {connections} client connections: straight"
        " to the replica, through a one-process gateway, and through a gateway of two workers sharing its port"
        f" (gateway.workers = 2); {rounds} rounds of {duration:g} s alternating the three, median per path. The"
        " load generator runs in the benchmark process; the machine is shared with other work, so only the"
        " ratios measured side by side in this run mean anything.",
        "",
        headline_table(medians, samples),
        "",
        *implication(medians, samples, os.cpu_count() or 0),
    ]
    parts += busy_lines(busy)
    parts += [
        "",
        "CPU per call by process (from /proc, median of rounds):",
        "",
        markdown_table(
            ("path", *(f"{p} CPU ms/call" for p in PROCESSES), "total"),
            [row[1:] for row in medians.cpu_rows("", PROCESSES)],
        ),
        "",
        "Raw figures:",
        "",
        raw_table(samples),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli("gateway_workers", __doc__, rounds_help="alternating rounds", wait_quiet_s=30.0)
    cli.add_argument("--connections", type=int, default=32, help="client connections (default 32)")
    args = cli.parse_args(argv)
    check_bounded(cli, args)
    if not 1 <= args.rounds <= 10 or not 0.5 <= args.duration <= 10 or not 1 <= args.connections <= CONCURRENCY:
        cli.error(f"rounds 1..10, duration 0.5..10 s and connections 1..{CONCURRENCY}")
    host, date = machine(), utc_now()
    mesh = Mesh("gateway-workers", env=ENV)
    print("starting the mesh (models load first) ...", file=sys.stderr)
    mesh.start()
    single: OneWorkerGateway | None = None
    try:
        mesh.wait_ready()
        single = OneWorkerGateway(mesh)
        single.wait_serving()
        assert mesh.process is not None
        exclude = [mesh.process.pid, *mesh.pids().values(), single.process.pid]
        exclude += child_pids(mesh.pids()["gateway"])
        busy = wait_quiet(args.wait_quiet, exclude=exclude)
        samples = asyncio.run(run_all(mesh, single, args.rounds, args.duration, args.connections))
    finally:
        if single is not None:
            single.stop()
        mesh.stop()
    text = report(
        samples,
        host=host,
        date=date,
        rounds=args.rounds,
        duration=args.duration,
        connections=args.connections,
        busy=busy,
    )
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
