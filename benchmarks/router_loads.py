"""Routers across load levels with SLO-aware admission: SLO attainment and goodput from half load to twice it.

Every router (round_robin, p2c, ours) at 0.5x, 0.7x, 1.0x, 1.3x and 2x load, on the real trace (``llm_trace``: the
Azure conversation trace's window replayed faster), the synthetic scenarios (``skewed``, ``llm_mixed``) and a
weighted two-tenant variant (``weighted``: tenants of weight 2 and 1 offering equal rates), each over several
seeds, with SLO-aware admission on (simulator/admission.py: the live replicas' policy; a refusal retried once on
another replica, then answered at once with a retry delay), and ``ours`` without admission as a reference line.
A new file rather than more of benchmarks/simulator.py: that one studies one trace in depth (reference router,
report staleness, utilisation) and its section stays comparable; this one is the grid across loads and seeds.

1.0x is each scenario's knee, found by a coarse scan of ``ours`` without admission (the highest load of the scan
that still met most SLOs): ``skewed`` at 1.3x its default rates, ``llm_mixed`` at 2x, ``llm_trace`` replayed at
time x5 (its default is x3), ``weighted`` at 2 x 300 requests/s on the ``small`` fleet (SLO 1 s). The trace's
load changes by compressing time, so its request count per window stays the same.

Goodput is requests meeting their SLO per second of arrivals; attainment counts late, timed-out, queue-full and
refused requests as misses. Everything is simulated time: the figures do not depend on this machine's load.

    python -m benchmarks.router_loads [--seeds 3] [--duration 10] [--scenarios skewed,llm_mixed,llm_trace,weighted]
        [--plot docs/router_loads.png] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import command_line, machine, markdown_table, publish, utc_now
from simulator import trace
from simulator.calibration import DEFAULT_PATH, Calibration
from simulator.mesh import RunResult, simulate
from simulator.scenario import Scenario
from simulator.scenarios import BULK, TRACE_WINDOW, llm_trace, make_scenario, small
from simulator.workload import Outcome, Tenant, build_trace, fresh_copy

NAME = "router-loads"
ROUTERS = ("round_robin", "p2c", "ours")
# ``ours`` with admission off: what admission adds.
REFERENCE = "ours, no admission"
LOADS = (0.5, 0.7, 1.0, 1.3, 2.0)
SCENARIOS = ("skewed", "llm_mixed", "llm_trace", "weighted")
MAX_SEEDS = 5
MAX_DURATION_S = 60.0
DEFAULT_DURATION_S = 10.0
# Each scenario's 1.0x, relative to its definition in simulator/scenarios.py (see the module docstring).
KNEE = {"skewed": 1.3, "llm_mixed": 2.0}
TRACE_KNEE_TIME_SCALE = 5.0
WEIGHTED_RATE = 300.0
WEIGHTS = {"gold": 2.0, "bronze": 1.0}
# Goals (issue 18, part 5).
GOAL_VS_BEST = 1.1
GOAL_GOODPUT_2X = 0.9
GOAL_FAIR_SHARE = 0.10
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "router_loads.png"


def weighted(calibration: Calibration, duration_s: float) -> Scenario:
    """The ``small`` fleet, MiniLM-L6 only, two tenants of weight 2 and 1 offering equal rates (SLO 1 s)."""
    base = small(calibration, duration_s)
    tenants = tuple(
        Tenant(name, rate=WEIGHTED_RATE, request_class=BULK, models=("all-MiniLM-L6-v2",), weight=weight)
        for name, weight in WEIGHTS.items()
    )
    return dataclasses.replace(
        base,
        name="weighted",
        description="the small fleet (speeds 2, 2, 0.5), tenants gold (weight 2) and bronze (weight 1) at equal rates",
        tenants=tenants,
    )


def build(name: str, calibration: Calibration, duration_s: float, load: float) -> Scenario:
    if name == "llm_trace":
        scale = TRACE_KNEE_TIME_SCALE * load
        window = trace.Window(TRACE_WINDOW.start_s, duration_s * scale, scale, TRACE_WINDOW.token_scale)
        return llm_trace(calibration, duration_s, window=window)
    if name == "weighted":
        return weighted(calibration, duration_s).scaled(load)
    return make_scenario(name, calibration, duration_s, load=KNEE[name] * load)


@dataclass(frozen=True)
class Point:
    """One run: one scenario, load, router (or the reference) and seed."""

    attainment: float
    goodput: float
    refused: int
    late: int
    timed_out: int
    # Tenant → share of device seconds.
    shares: dict[str, float]
    # Tenant → its share under weighted max-min fairness of what was served (``due_shares``).
    due: dict[str, float]


def point(result: RunResult) -> Point:
    requests = result.requests
    met = sum(r.met_slo for r in requests)
    total = sum(result.tenant_busy_s.values())
    return Point(
        attainment=met / len(requests) if requests else float("nan"),
        goodput=met / result.duration_s,
        refused=sum(r.outcome is Outcome.REFUSED for r in requests),
        late=sum(r.outcome is Outcome.OK and not r.met_slo for r in requests),
        timed_out=sum(r.outcome is Outcome.TIMED_OUT for r in requests),
        shares={t: s / total for t, s in result.tenant_busy_s.items()} if total else {},
        due=due_shares(result, WEIGHTS),
    )


def due_shares(result: RunResult, weights: dict[str, float]) -> dict[str, float]:
    """Each tenant's share of the requests answered under weighted max-min fairness (water-filling): capacity, the
    requests answered, goes by weight, and a tenant offering less than its part gets what it offered, the rest
    shared by the others' weights."""
    offered = {t: sum(r.tenant == t for r in result.requests) for t in weights}
    capacity = float(sum(r.outcome is Outcome.OK for r in result.requests))
    if capacity == 0:
        return {}
    allocation: dict[str, float] = {}
    left, open_ = capacity, set(offered)
    while open_:
        weight = sum(weights[t] for t in open_)
        sated = {t for t in open_ if offered[t] - allocation.get(t, 0.0) <= left * weights[t] / weight}
        if not sated:
            for t in open_:
                allocation[t] = left * weights[t] / weight
            break
        for t in sated:
            allocation[t] = float(offered[t])
            left -= offered[t]
        open_ -= sated
    return {t: a / capacity for t, a in allocation.items()}


Grid = dict[tuple[str, float, str], list[Point]]


def run_grid(
    scenarios: Sequence[str],
    calibration: Calibration,
    duration_s: float,
    seeds: Sequence[int],
    progress: Callable[[str], None],
) -> Grid:
    grid: Grid = {}
    for name in scenarios:
        for load in LOADS:
            scenario = build(name, calibration, duration_s, load)
            for seed in seeds:
                requests = build_trace(scenario.tenants, scenario.duration_s, seed, gateways=scenario.gateways)
                on = dataclasses.replace(scenario, admission=True)
                for router in ROUTERS:
                    result = simulate(on, router, fresh_copy(requests), seed=seed)
                    grid.setdefault((name, load, router), []).append(point(result))
                result = simulate(scenario, "ours", fresh_copy(requests), seed=seed)
                grid.setdefault((name, load, REFERENCE), []).append(point(result))
            cell = grid[(name, load, "ours")]
            progress(
                f"{name} {load:g}x: {len(requests):,} requests per seed; ours attainment"
                f" {statistics.median(p.attainment for p in cell):.3f}"
            )
    return grid


def median_of(points: Sequence[Point], field: str) -> float:
    return float(statistics.median(getattr(p, field) for p in points))


def spread(points: Sequence[Point], field: str, fmt: str) -> str:
    values = [getattr(p, field) for p in points]
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(grid: Grid, name: str, field: str, fmt: str) -> str:
    names = (*ROUTERS, REFERENCE)
    rows = [[f"{load:g}x", *(spread(grid[(name, load, n)], field, fmt) for n in names)] for load in LOADS]
    return markdown_table(["load", *names], rows)


def outcomes(grid: Grid, name: str) -> str:
    """What happened to the misses of ``ours`` with and without admission (medians over seeds)."""
    rows = []
    for load in LOADS:
        row = [f"{load:g}x"]
        for n in ("ours", REFERENCE):
            cell = grid[(name, load, n)]
            row.append(
                f"{median_of(cell, 'late'):.0f} / {median_of(cell, 'timed_out'):.0f} / {median_of(cell, 'refused'):.0f}"
            )
        rows.append(row)
    return markdown_table(
        ["load", "ours: late / timed out / refused", f"{REFERENCE}: late / timed out / refused"], rows
    )


def goals(grid: Grid, scenarios: Sequence[str]) -> tuple[list[str], bool]:
    """Each goal, met or missed, from medians over seeds."""
    lines: list[str] = []
    every = True

    def verdict(ok: bool) -> str:
        nonlocal every
        every = every and ok
        return "met" if ok else "**missed**"

    for name in scenarios:
        worse = [
            f"{load:g}x vs {b}"
            for load in LOADS
            for b in ROUTERS[:-1]
            if median_of(grid[(name, load, "ours")], "attainment") < median_of(grid[(name, load, b)], "attainment")
        ]
        lines.append(
            f"- `{name}`: ours ≥ every baseline at every load (median SLO attainment): {verdict(not worse)}"
            + (f" (below at {', '.join(worse)})" if worse else "")
            + "."
        )
        ours = median_of(grid[(name, 1.0, "ours")], "attainment")
        best_name = max(ROUTERS[:-1], key=lambda b: median_of(grid[(name, 1.0, b)], "attainment"))
        best = median_of(grid[(name, 1.0, best_name)], "attainment")
        ratio = ours / best if best else float("inf")
        lines.append(
            f"- `{name}`: ours / best baseline ({best_name}) at 1.0x: **{ratio:.2f}x** ({ours:.3f} vs {best:.3f};"
            f" goal ≥ {GOAL_VS_BEST}x; no router can exceed {1 / best if best else float('inf'):.2f}x here):"
            f" {verdict(ratio >= GOAL_VS_BEST)}."
        )
        one, two = median_of(grid[(name, 1.0, "ours")], "goodput"), median_of(grid[(name, 2.0, "ours")], "goodput")
        kept = two / one if one else float("nan")
        off = median_of(grid[(name, 2.0, REFERENCE)], "goodput") / median_of(grid[(name, 1.0, REFERENCE)], "goodput")
        lines.append(
            f"- `{name}`: goodput at 2x / at 1.0x, ours: **{kept:.2f}** ({two:.0f} vs {one:.0f} /s; goal ≥"
            f" {GOAL_GOODPUT_2X}): {verdict(kept >= GOAL_GOODPUT_2X)}; without admission {off:.2f}."
        )
    if "weighted" in scenarios:
        for load in (1.3, 2.0):
            cell = grid[("weighted", load, "ours")]
            parts = []
            ok = True
            for tenant in WEIGHTS:
                share = statistics.median(p.shares.get(tenant, 0.0) for p in cell)
                due = statistics.median(p.due.get(tenant, 0.0) for p in cell)
                ok = ok and due > 0 and abs(share / due - 1) <= GOAL_FAIR_SHARE
                parts.append(f"{tenant} {share:.3f} (due {due:.3f})")
            lines.append(
                f"- `weighted` at {load:g}x (overload), ours: device-time shares {', '.join(parts)}; due: weighted"
                f" max-min fair shares of what was served (weights {WEIGHTS}); goal within {GOAL_FAIR_SHARE:.0%}:"
                f" {verdict(ok)}."
            )
    return lines, every


def plot(grid: Grid, scenarios: Sequence[str], path: Path) -> Path:
    """Per scenario, SLO attainment and goodput against load, median with min-max bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(scenarios), figsize=(4.6 * len(scenarios), 8), squeeze=False)
    for column, name in enumerate(scenarios):
        for row, (field, label) in enumerate((("attainment", "SLO attainment"), ("goodput", "goodput, requests/s"))):
            ax = axes[row][column]
            for n in (*ROUTERS, REFERENCE):
                cells = [grid[(name, load, n)] for load in LOADS]
                med = [median_of(c, field) for c in cells]
                low = [m - min(getattr(p, field) for p in c) for m, c in zip(med, cells, strict=True)]
                high = [max(getattr(p, field) for p in c) - m for m, c in zip(med, cells, strict=True)]
                ax.errorbar(
                    LOADS,
                    med,
                    yerr=[low, high],
                    label=n,
                    marker="o",
                    capsize=3,
                    linestyle="--" if n == REFERENCE else "-",
                )
            ax.set_xlabel("load (1.0x: the scenario's knee)")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(name)
                ax.set_ylim(0, 1.05)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds per point, 1..{MAX_SEEDS}")
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        help=f"seconds of arrivals per run, (0, {MAX_DURATION_S:g}]",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's router-loads section")
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= MAX_SEEDS:
        parser.error(f"--seeds must be within 1..{MAX_SEEDS}, got {args.seeds}")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be within (0, {MAX_DURATION_S:g}] seconds, got {args.duration:g}")
    names = tuple(s for s in args.scenarios.split(",") if s)
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown or not names:
        parser.error(f"--scenarios: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}")
    args.scenarios = names
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    calibration = Calibration.load(args.calibration)
    seeds = list(range(1, args.seeds + 1))

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {line}", file=sys.stderr, flush=True)

    grid = run_grid(args.scenarios, calibration, args.duration, seeds, progress)
    checks, all_met = goals(grid, args.scenarios)
    plotted = None if args.no_plot else plot(grid, args.scenarios, args.plot)
    sections = []
    for name in args.scenarios:
        sections += [
            f"### `{name}`",
            "",
            "SLO attainment, median (min-max) over seeds:",
            "",
            table(grid, name, "attainment", ".3f"),
            "",
            "Goodput, requests meeting SLO per second, median (min-max):",
            "",
            table(grid, name, "goodput", ".0f"),
            "",
            "The misses of ours, with and without admission (medians):",
            "",
            outcomes(grid, name),
            "",
        ]
    text = "\n".join(
        [
            "## Router loads: SLO attainment and goodput from 0.5x to 2x load, with SLO-aware admission",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}; {len(seeds)} seeds (1..{len(seeds)}),"
            f" {args.duration:g} s of arrivals per run; the whole benchmark took"
            f" {time.perf_counter() - started:.0f} s. Simulated time: the figures do not depend on this machine's"
            " load (each router replays the same requests per seed).",
            "",
            "1.0x is each scenario's knee (benchmarks/router_loads.py): `skewed` at 1.3x its default rates,"
            f" `llm_mixed` at 2x, `llm_trace` replayed at time x{TRACE_KNEE_TIME_SCALE:g}, `weighted` at 2 x"
            f" {WEIGHTED_RATE:g} requests/s. Routers run with SLO-aware admission (simulator/admission.py);"
            f" `{REFERENCE}` is the reference line. Refused requests are answered at once and count as misses.",
            "",
            "Goals (issue 18, part 5), from medians over seeds:",
            "",
            *checks,
            "",
            f"All goals met: {'yes' if all_met else '**no**'}.",
            "",
            *sections,
            *([f"![router loads]({plotted.name})"] if plotted is not None else []),
        ]
    )
    publish(text, args.write, NAME)


if __name__ == "__main__":
    main()
