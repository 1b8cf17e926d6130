"""What the xDS path costs: a gRPC client dialling ``xds:///aimass.v1.NlpService`` (the scheduler's ADS answers pick
the replica) vs the same client dialling the replica's address, on the same mesh.

Starts its own mesh (`aimass up` on free ports, one NLP replica, so both sides reach the same replica), then
measures each scenario on both sides in interleaved rounds (the order alternating from round to round) so drift on
the machine hits them alike, with the same mesh credentials (a gateway certificate) and one aio channel from the
load generator (loadtest.generator) in the benchmark process. Reports the median per side, the ratio xDS / direct
of the medians and the median of each round's own ratio (the goal holds when both reach it), and CPU per call of
the client, the replica and the scheduler (off the path once the client has its xDS answers: shown to prove it).

- NlpService/Sentiment, one short text: the cheapest call, so the worst case relative to the work.
- NlpService/Embed, one short text: a call through the batcher and the model.

    python -m benchmarks.xds [--rounds 3] [--duration 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials
from aimass.runtime.xds_client import bootstrap_config, target, use_bootstrap
from benchmarks.common import (
    Mesh,
    Scenario,
    ScenarioSample,
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
    run_metered,
    utc_now,
)
from loadtest.generator import LoadSpec, run_load

NAME = "xds"
SERVICE = "aimass.v1.NlpService"
SIDES = ("direct", "xds")
PROCESSES = ("client", "replica", "scheduler")
RATIO_GOAL = 0.95  # xDS / direct throughput
SCENARIOS = (
    Scenario(f"{SERVICE}/Sentiment", 32, {"texts": ["I love how fast this is."]}),
    Scenario(f"{SERVICE}/Embed", 16, {"texts": ["a cat sat on the mat"]}),
)


def spec_for(mesh: Mesh, credentials: MeshCredentials, side: str, scenario: Scenario, duration: float) -> LoadSpec:
    return LoadSpec(
        # mesh_channel takes an xds: target as it takes an address: the same credentials and expected role.
        target=mesh.replica if side == "direct" else target(SERVICE),
        method=scenario.method,
        request=dict(scenario.request),
        concurrency=scenario.concurrency,
        duration_s=duration,
        warmup=max(50, scenario.concurrency * 5),
        deadline_s=10.0,
        progress=False,
        api_key="",
        mesh_credentials=credentials,
        server_role="nlp",
    )


def scheduler_pid(mesh: Mesh) -> int:
    """The scheduler among the mesh's processes (``python -m scheduler``; the node agent is scheduler.node_agent)."""
    assert mesh.process is not None
    for pid in child_pids(mesh.process.pid):
        if b"scheduler" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return pid
    raise RuntimeError("the scheduler process was not found among the mesh's processes")


async def measure(mesh: Mesh, rounds: int, duration: float) -> list[ScenarioSample]:
    settings = mesh.settings()
    credentials = MeshCredentials.load(settings.pki_dir, ROLE_GATEWAY)
    # Before the first xds: channel of this process (gRPC reads the bootstrap when it creates its xDS client).
    use_bootstrap(bootstrap_config(mesh.scheduler, pki_dir=settings.pki_dir, name=ROLE_GATEWAY))
    pids = {"client": os.getpid(), "replica": mesh.pids()["replica"], "scheduler": scheduler_pid(mesh)}
    for scenario in SCENARIOS:  # settle: first connections, the first xDS answers, lazy initialisation
        for side in SIDES:
            await run_load(spec_for(mesh, credentials, side, scenario, 1.0))
    samples: list[ScenarioSample] = []
    for scenario in SCENARIOS:
        for rnd in range(rounds):
            for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
                spec = spec_for(mesh, credentials, side, scenario, duration)
                run = await run_metered(spec, pids, f"round {rnd + 1} {scenario.label:<16} {side:<6}")
                samples.append(ScenarioSample(scenario, side, rnd, run))
    return samples


def report(samples: Sequence[ScenarioSample], *, rounds: int, duration: float, busy: list[str]) -> str:
    rows, cpu_rows, verdicts = [], [], []
    for scenario in SCENARIOS:
        medians = SideMedians.of(
            {side: [s.run for s in samples if s.scenario == scenario and s.side == side] for side in SIDES}, PROCESSES
        )
        ratio = medians.rps["xds"] / medians.rps["direct"]
        # Each round's two sides ran back to back: their ratio is the least exposed to the machine's drift.
        by_round = {(s.round, s.side): s.run.result.rps for s in samples if s.scenario == scenario}
        round_ratio = median(by_round[(r, "xds")] / by_round[(r, "direct")] for r in {r for r, _ in by_round})
        cpu_ratio = sum(medians.cpu_ms["xds"].values()) / sum(medians.cpu_ms["direct"].values())
        rows.append(
            (
                scenario.label,
                f"{medians.rps['direct']:,.0f}",
                f"{medians.rps['xds']:,.0f}",
                f"{ratio:.2f}",
                f"{round_ratio:.2f}",
                f"{cpu_ratio:.2f}",
                f"{medians.p50_ms['direct']:.2f}",
                f"{medians.p50_ms['xds']:.2f}",
                f"{medians.p99_ms['direct']:.2f}",
                f"{medians.p99_ms['xds']:.2f}",
            )
        )
        cpu_rows += medians.cpu_rows(scenario.label, PROCESSES)
        met = min(ratio, round_ratio) >= RATIO_GOAL
        verdicts.append(
            f"{scenario.label}: throughput xDS / direct **{ratio:.2f}** (median of the rounds' own ratios "
            f"{round_ratio:.2f}; goal ≥ {RATIO_GOAL:.2f}: {'met' if met else '**missed**'}); "
            f"CPU per call, all processes, xDS / direct {cpu_ratio:.2f}"
        )
    raw = [
        (
            str(s.round + 1),
            s.scenario.label,
            s.side,
            *s.run.load_cells(),
            str(s.run.result.errors),
            f"{s.run.others_pct:.0f}",
        )
        for s in samples
    ]
    parts = [
        f"## xDS: straight to replicas ({utc_now()})",
        "",
        f"`{command_line()}` on {machine()}; {rounds} interleaved rounds of {duration:g} s per scenario and side, "
        "medians. `direct`: a channel to the replica's address; `xds`: a channel to "
        f"`xds:///{SERVICE}` whose endpoints come from the scheduler's ADS (scheduler/xds.py). Both use the same "
        "mesh credentials (a gateway certificate, mTLS) and one aio channel; one NLP replica, so both sides reach the "
        "same process. The machine is shared with other work: only the side-by-side ratios of one run mean anything.",
        "",
        markdown_table(
            (
                "scenario",
                "RPS direct",
                "RPS xDS",
                "xDS / direct",
                "median round's ratio",
                "CPU/call xDS / direct",
                "p50 direct ms",
                "p50 xDS ms",
                "p99 direct ms",
                "p99 xDS ms",
            ),
            rows,
        ),
        "",
        *(f"- {line}" for line in verdicts),
    ]
    parts += busy_lines(busy)
    parts += [
        "",
        "CPU per call by process (from /proc, median of rounds; the scheduler is off the path once the client has "
        "its answers):",
        "",
        markdown_table(("scenario", "path", *(f"{p} CPU ms/call" for p in PROCESSES), "total"), cpu_rows),
        "",
        "Raw figures:",
        "",
        markdown_table(
            ("round", "scenario", "path", "requests", "RPS", "p50 ms", "p99 ms", "non-OK", "other procs CPU %"), raw
        ),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    cli = rounds_cli("xds", __doc__, rounds_help="interleaved rounds per scenario", wait_quiet_s=30.0)
    args = cli.parse_args(argv)
    check_bounded(cli, args)
    mesh = Mesh("xds")
    print("starting the mesh (models load first) ...", file=sys.stderr)
    mesh.start()
    try:
        mesh.wait_ready()
        busy = mesh.wait_quiet(args.wait_quiet)
        samples = asyncio.run(measure(mesh, args.rounds, args.duration))
    finally:
        mesh.stop()
    publish(report(samples, rounds=args.rounds, duration=args.duration, busy=busy), args.write, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
