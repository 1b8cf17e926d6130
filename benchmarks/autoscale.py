"""Autoscaler on one host (`aimass up --autoscale`): from a load step to a second replica serving, and calls lost.

Starts `aimass up` with autoscaling on for NLP (1..2 replicas, a target of 2 calls in flight per replica, up after
1 s above it, down after 4 s under the band), then per round:

1. a load step: ``--clients`` concurrent clients calling Embed (16 short texts a call) through the gateway until a
   second replica answers one, and ``--duration`` seconds longer;
2. then one call at a time (under the band) until the autoscaler has removed the second replica again, which drains
   first, and two seconds more.

Reported per round and as medians: seconds from the step to the second replica's first answer, that replica's cold
start (its start to SERVING, from the autoscaler's status), the step's calls/s on one replica (before the second
answers, after a 1 s ramp) and on two (the ``--duration`` seconds after), measured side by side in the same burst,
the seconds from the load's end to the removal, and calls that failed in each phase (lost: the goal is 0).

    python -m benchmarks.autoscale [--rounds 3] [--duration 3] [--clients 8] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from aimass.autoscale import read_status
from aimass.local_mesh import LocalMesh
from aimass.runtime.metadata import REPLICA_KEY, metadata_value
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc, registry_pb2, registry_pb2_grpc
from benchmarks.common import (
    Mesh,
    busy_lines,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    median,
    publish,
    rounds_cli,
    utc_now,
)

NAME = "autoscale"
TARGET_IN_FLIGHT = 2
SCALE_UP_AFTER_S = 1
SCALE_DOWN_AFTER_S = 4
TEXTS_PER_CALL = 16
RAMP_S = 1.0
STEP_TIMEOUT_S = 150.0
IDLE_TIMEOUT_S = 90.0

# `aimass up` for the step: NLP from 1 to 2 replicas on the autoscaler's word, one engine thread each (two share
# this machine's cores as they would share a node), load reported five times a second.
ENV = {
    "AIMASS_AUTOSCALE__ENABLED": "true",
    "AIMASS_AUTOSCALE__TARGET_IN_FLIGHT": str(TARGET_IN_FLIGHT),
    "AIMASS_AUTOSCALE__SCALE_UP_AFTER_S": str(SCALE_UP_AFTER_S),
    "AIMASS_AUTOSCALE__SCALE_DOWN_AFTER_S": str(SCALE_DOWN_AFTER_S),
    "AIMASS_AUTOSCALE__SERVICES": json.dumps({"nlp": {"max_replicas": 2}}),
    "AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.2",
    "AIMASS_NLP__DEVICE": "cpu",
    "AIMASS_NLP__TORCH_THREADS": "1",
    "AIMASS_REST__ENABLED": "false",
    "AIMASS_CONSOLE__ENABLED": "false",
}


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    code: str
    replica: str
    details: str


@dataclass
class Step:
    """One load step and the idle after it."""

    burst: list[Call]
    trickle: list[Call]
    step_at: float
    # From the step to the first answer of a second replica (nan: none came).
    to_second_s: float
    # From the end of the burst to the registry listing one NLP replica again (nan: not within the timeout).
    removed_after_s: float
    hold_s: float

    @property
    def lost(self) -> list[Call]:
        return [call for call in self.burst + self.trickle if call.code != "OK"]

    def rate(self, start_s: float, end_s: float) -> float:
        """Calls answered per second between two offsets from the step."""
        done = [c for c in self.burst if start_s <= c.ended - self.step_at < end_s and c.code == "OK"]
        return len(done) / (end_s - start_s) if end_s > start_s else math.nan

    @property
    def rps_one(self) -> float:
        return self.rate(RAMP_S, self.to_second_s)

    @property
    def rps_two(self) -> float:
        return self.rate(self.to_second_s, self.to_second_s + self.hold_s)


async def one_call(stub: nlp_pb2_grpc.NlpServiceAsyncStub, index: int, size: int) -> Call:
    started = time.monotonic()
    call = stub.Embed(nlp_pb2.EmbedRequest(texts=[f"call {index} text {i}" for i in range(size)]), timeout=60)
    try:
        await call
        code, details, trailers = "OK", "", await call.trailing_metadata()
    except grpc.aio.AioRpcError as err:
        code, details, trailers = err.code().name, err.details() or "", err.trailing_metadata()
    return Call(started, time.monotonic(), code, metadata_value(trailers, REPLICA_KEY) or "", details)


def serving_replicas(mesh: LocalMesh, kind: str = "nlp") -> int:
    with mesh.scheduler_channel() as channel:
        listed = registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(
            registry_pb2.ListInstancesRequest(), timeout=5
        )
    return sum(1 for i in listed.instances if i.kind == kind and i.state == common_pb2.SERVING_STATE_SERVING)


async def load_step(mesh: LocalMesh, *, clients: int = 8, hold_s: float = 0.0) -> Step:
    """A burst of ``clients`` until a second replica answers (and ``hold_s`` longer); then one call at a time until
    the autoscaler has removed it again (and two seconds more)."""
    burst: list[Call] = []
    trickle: list[Call] = []
    async with mesh.aio_channel() as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        first = (await one_call(stub, -1, 1)).replica
        step = time.monotonic()
        second_at = math.nan

        def more() -> bool:
            now = time.monotonic()
            if second_at == second_at:
                return now - second_at < hold_s
            return now - step < STEP_TIMEOUT_S

        async def client(offset: int) -> None:
            nonlocal second_at
            index = offset
            while more():
                call = await one_call(stub, index, TEXTS_PER_CALL)
                burst.append(call)
                if call.code == "OK" and call.replica != first and second_at != second_at:
                    second_at = call.ended
                index += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        quiet = time.monotonic()
        removed_after = math.nan
        checked = 0.0
        index = 0
        while time.monotonic() - quiet < IDLE_TIMEOUT_S:
            trickle.append(await one_call(stub, index, 1))
            index += 1
            now = time.monotonic()
            if removed_after != removed_after and now - checked > 0.5:
                checked = now
                if await asyncio.to_thread(serving_replicas, mesh) == 1:
                    removed_after = now - quiet
            if removed_after == removed_after and now - quiet > removed_after + 2:
                break
            await asyncio.sleep(0.05)
    return Step(burst, trickle, step, second_at - step, removed_after, hold_s)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def report(
    steps: Sequence[Step],
    cold_starts: Sequence[float | None],
    *,
    host: str,
    date: str,
    clients: int,
    hold_s: float,
    busy: Sequence[str] = (),
) -> str:
    rows = []
    for number, (step, cold) in enumerate(zip(steps, cold_starts, strict=True), 1):
        lost_burst = sum(1 for c in step.burst if c.code != "OK")
        lost_idle = sum(1 for c in step.trickle if c.code != "OK")
        rows.append(
            [
                str(number),
                fmt(step.to_second_s),
                fmt(cold if cold is not None else math.nan),
                fmt(step.rps_one),
                fmt(step.rps_two),
                fmt(step.rps_two / step.rps_one, 2),
                fmt(step.removed_after_s),
                f"{len(step.burst)} / {lost_burst}",
                f"{len(step.trickle)} / {lost_idle}",
            ]
        )
    header = [
        "round",
        "step → 2nd replica serving (s)",
        "its cold start (s)",
        "calls/s on 1",
        "calls/s on 2",
        "2 vs 1",
        "idle → removed (s)",
        "burst calls / lost",
        "drain calls / lost",
    ]
    ok = [s for s in steps if s.to_second_s == s.to_second_s]
    lost = sum(len(s.lost) for s in steps)
    total = sum(len(s.burst) + len(s.trickle) for s in steps)
    to_second = median(s.to_second_s for s in ok) if ok else math.nan
    ratio = median(s.rps_two / s.rps_one for s in ok) if ok else math.nan
    removed = [s.removed_after_s for s in steps if s.removed_after_s == s.removed_after_s]
    lines = [
        "## Autoscaler on one host",
        "",
        f"`{command_line()}` — {date}",
        "",
        f"Machine: {host}. NLP from 1 to 2 replicas (`aimass up --autoscale`: target {TARGET_IN_FLIGHT} calls in "
        f"flight per replica, up after {SCALE_UP_AFTER_S} s above it, down after {SCALE_DOWN_AFTER_S} s under half "
        f"of it), one engine thread per replica; the step: {clients} clients calling Embed ({TEXTS_PER_CALL} texts a "
        f"call) through the gateway until the second replica answers and {hold_s:g} s longer; then one call at a "
        "time until the autoscaler has removed it (it drains first). Client, gateway and replicas share this "
        "machine's cores with others' work: the side-by-side ratio (one replica vs two, within each burst) means more "
        "than the absolute rates.",
        "",
        f"**Median: a second replica serves {fmt(to_second)} s after the load step; calls lost: {lost} of {total}"
        f"; calls/s with two replicas {fmt(ratio, 2)}x those with one; removed "
        f"{fmt(median(removed) if removed else math.nan)} s after the load ended.**",
        "",
        markdown_table(header, rows),
        *busy_lines(busy),
    ]
    return "\n".join(lines)


async def run_rounds(mesh: Mesh, rounds: int, clients: int, hold_s: float) -> tuple[list[Step], list[float | None]]:
    steps: list[Step] = []
    colds: list[float | None] = []
    for number in range(rounds):
        step = await load_step(mesh, clients=clients, hold_s=hold_s)
        steps.append(step)
        status = read_status(mesh.settings().state_dir)
        colds.append(status[0].last_cold_start_s if status else None)
        print(
            f"round {number + 1}: second replica after {fmt(step.to_second_s)} s, removed {fmt(step.removed_after_s)} s"
            f" after the load, {len(step.lost)} lost",
            file=sys.stderr,
        )
    return steps, colds


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli(NAME, __doc__, rounds=3, rounds_help="load steps", duration_s=3.0)
    cli.add_argument("--clients", type=int, default=8, help="concurrent clients in the step (default 8)")
    args = cli.parse_args(argv)
    check_bounded(cli, args, max_rounds=5)
    if not 1 <= args.clients <= 64:
        cli.error("clients must be 1..64")
    host, date = machine(), utc_now()
    mesh = Mesh(NAME, env=ENV, replicas={"nlp": 1})
    print("starting the mesh (models load first) ...", file=sys.stderr)
    mesh.start()
    try:
        mesh.wait_ready()
        busy = mesh.wait_quiet(args.wait_quiet)
        steps, colds = asyncio.run(run_rounds(mesh, args.rounds, args.clients, args.duration))
    finally:
        mesh.stop()
    text = report(steps, colds, host=host, date=date, clients=args.clients, hold_s=args.duration, busy=busy)
    publish(text, args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
