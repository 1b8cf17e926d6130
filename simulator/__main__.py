"""python -m simulator --scenario skewed --router ours [--router p2c ...] [--seed 1] [--duration 60] [--admission]
[--plot x.png]"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gateway.router import ROUTERS
from simulator.calibration import DEFAULT_PATH, Calibration
from simulator.mesh import simulate
from simulator.report import calibration_table, llm_table, main_table, plot, summarize, utilization_table
from simulator.scenarios import SCENARIOS, make_scenario
from simulator.workload import Outcome, build_trace, fresh_copy


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    parser.add_argument("--scenario", default="skewed", choices=sorted(SCENARIOS))
    parser.add_argument(
        "--router", action="append", choices=sorted(ROUTERS), help="repeat to compare; default: every router"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals (scenario default)")
    parser.add_argument("--load", type=float, default=1.0, help="scales every tenant's arrival rates")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    parser.add_argument(
        "--admission", action="store_true", help="SLO-aware admission at the replicas (simulator/admission.py)"
    )
    args = parser.parse_args()

    calibration = Calibration.load(args.calibration)
    scenario = make_scenario(args.scenario, calibration, args.duration, load=args.load)
    scenario = dataclasses.replace(scenario, admission=args.admission)
    trace = build_trace(scenario.tenants, scenario.duration_s, args.seed, gateways=scenario.gateways)
    results = [simulate(scenario, router, fresh_copy(trace), seed=args.seed) for router in args.router or ROUTERS]
    summaries = [summarize(result) for result in results]
    print(f"scenario {scenario.name}, seed {args.seed}: {len(trace)} requests over {scenario.duration_s:g} s\n")
    print(main_table(summaries))
    print()
    print(utilization_table(summaries))
    print()
    print(calibration_table(scenario))
    if llm := llm_table(results):
        print(f"\n{llm}")
    for result in results:
        print(
            f"\n{result.router}: {result.events} events in {result.wall_s:.1f} s; placements"
            f" {result.placements_initial} at start, {result.placements_on_demand} on demand,"
            f" {result.evictions} evictions, {result.placement_failures} failed"
            + (
                f"; {sum(r.outcome is Outcome.REFUSED for r in result.requests)} refused by admission"
                if args.admission
                else ""
            )
        )
    if args.plot is not None:
        print(f"\nplot: {plot(results, summaries, args.plot, title=f'scenario {scenario.name}, seed {args.seed}')}")


if __name__ == "__main__":
    main()
