"""``python -m loadtest.report``: every scenario through the gateway and straight to a replica, as a markdown report
and a PNG plot.

Starts a mesh with `aimass up` on free loopback ports (one replica per service kind asked for; by default every
kind whose models install here: nlp, vision, speech, llm), or uses a running one (``--gateway`` and ``--direct``).
Each scenario (loadtest/scenarios.py) runs ``--rounds`` rounds; in each round the gateway side and the direct side
run one after the other, the order alternating from round to round, so the shared machine's noise hits both alike;
the median round per side counts. Both sides drive the same replica (the gateway's only one of that kind), so the
ratio is the cost of the extra hop: the gateway's routing and raw-bytes forwarding.

    python -m loadtest.report                                 # all services; ~4-5 min on 2 cores
    python -m loadtest.report --services nlp,vision           # only those replicas are started
    python -m loadtest.report --scenarios chat --rounds 5 --round-seconds 10
    python -m loadtest.report --gateway 127.0.0.1:50051 --direct nlp=127.0.0.1:50061 --no-write

The mesh is secured, and each side calls as its real callers do: the gateway side with an API key (the started
mesh's admin key; for a running mesh ``--api-key``, else ``$AIMASS_API_KEY``, else the admin key file of this host's
mesh), the direct side with mesh mTLS as a gateway (the mesh's gateway certificate: the started mesh's, else from
``--pki-dir``, default this host's mesh's).

Writes its section of docs/loadtest.md (the rest of the file is kept) and docs/loadtest.png, prints the section on
stdout and progress on stderr. Exit status 0 when the run completed (failed calls are part of the report), 1 when
the mesh could not start or a target was unreachable, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aimass.cli import SERVICE_MODULES
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials
from benchmarks.common import (
    CLOCK_TICKS,
    Mesh,
    busy_processes,
    child_pids,
    command_line,
    machine,
    markdown_table,
    median,
    system_busy_seconds,
    update_doc,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadResult, LoadSpec, gateway_credentials, run_load
from loadtest.scenarios import SCENARIOS, Scenario, by_name, request_json

__all__ = [
    "SIDES",
    "ScenarioSummary",
    "SideSummary",
    "Targets",
    "main",
    "measure",
    "plot",
    "publish",
    "render",
    "write_doc",
]

NAME = "loadtest"
SIDES = ("gateway", "direct")
DEFAULT_KINDS = ("nlp", "vision", "speech", "llm")
DEFAULT_DOC = Path("docs/loadtest.md")
DEFAULT_PLOT = Path("docs/loadtest.png")
DEFAULT_ROUNDS = 3

DOC_HEADER = """# Load tests

Written by `python -m loadtest.report` (`make loadtest`), which replaces only its own section below.
"""


@dataclass(frozen=True)
class Targets:
    """Where each side of a scenario sends its calls, and how it gets in: the gateway with an API key, or a replica
    of the scenario's kind with mesh mTLS, as a gateway."""

    gateway: str
    direct: Mapping[str, str]
    # The gateway's API key: None finds it as aimass.client does (loadtest.generator.LoadSpec.api_key).
    api_key: str | None = None
    # A gateway certificate of the mesh's CA for the direct side; None with mesh TLS off (plaintext).
    credentials: MeshCredentials | None = None

    def address(self, side: str, kind: str) -> str:
        return self.gateway if side == "gateway" else self.direct[kind]


@dataclass(frozen=True)
class Round:
    scenario: str
    side: str
    index: int
    result: LoadResult
    # CPU used by processes other than this one and the mesh's during the round (% of one CPU): noise. None when
    # the mesh's processes are not known (a mesh this run did not start).
    others_pct: float | None


@dataclass(frozen=True)
class SideSummary:
    """One side of one scenario over its rounds: medians of the per-round figures, calls and statuses summed."""

    side: str
    rounds: int
    calls: int
    rps: float
    # The slowest and fastest round: how far apart the rounds were (noise).
    rps_min: float
    rps_max: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # Server streams: median of the rounds' p50 time to the first message; None for unary methods.
    first_p50_ms: float | None
    # Status code name → calls that ended with it, over every round.
    statuses: dict[str, int]
    others_pct: float | None
    error_samples: tuple[str, ...] = ()

    @property
    def errors(self) -> dict[str, int]:
        return {code: count for code, count in self.statuses.items() if code != "OK"}

    @classmethod
    def of(cls, side: str, rounds: Sequence[Round]) -> SideSummary:
        results = [r.result for r in rounds]
        statuses: Counter[str] = Counter()
        samples: dict[str, None] = {}
        for result in results:
            statuses.update(result.status_counts)
            samples.update(dict.fromkeys(result.error_samples))
        firsts = [r.first_message.p50_ms for r in results if r.first_message is not None and r.ok]
        noise = [r.others_pct for r in rounds if r.others_pct is not None]
        return cls(
            side=side,
            rounds=len(results),
            calls=sum(r.requests for r in results),
            rps=median(r.rps for r in results),
            rps_min=min(r.rps for r in results),
            rps_max=max(r.rps for r in results),
            p50_ms=median(r.latency.p50_ms for r in results),
            p95_ms=median(r.latency.p95_ms for r in results),
            p99_ms=median(r.latency.p99_ms for r in results),
            first_p50_ms=median(firsts) if firsts else None,
            statuses=dict(statuses),
            others_pct=median(noise) if noise else None,
            error_samples=tuple(samples)[:3],
        )


@dataclass(frozen=True)
class ScenarioSummary:
    scenario: Scenario
    sides: dict[str, SideSummary]
    rounds: list[Round] = field(default_factory=list)

    @property
    def gateway(self) -> SideSummary:
        return self.sides["gateway"]

    @property
    def direct(self) -> SideSummary:
        return self.sides["direct"]

    @property
    def rps_ratio(self) -> float:
        return self.gateway.rps / self.direct.rps if self.direct.rps > 0 else float("nan")

    @property
    def added_p50_ms(self) -> float:
        return self.gateway.p50_ms - self.direct.p50_ms

    @property
    def p99_ratio(self) -> float:
        return self.gateway.p99_ms / self.direct.p99_ms if self.direct.p99_ms > 0 else float("nan")


# -- measuring -------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the mesh's replicas, and their own workers such as vLLM's engine core)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        try:
            children = child_pids(pending.pop())
        except OSError:
            continue
        found.extend(children)
        pending.extend(children)
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and every process below it, including children already reaped (their
    time is in their parent's cutime/cstime: flite, for one, runs once per Synthesize call)."""
    total = 0
    for pid in (root, *descendants(root)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        # After the command: utime, stime, cutime, cstime are fields 14-17 (1-based), indexes 11-14 here.
        total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


class NoiseMeter:
    """CPU that processes outside ``roots`` (and their process trees) used while the block ran, in % of one CPU."""

    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = list(roots)
        self._own = 0.0
        self._busy = 0.0
        self._started = 0.0
        self.others_pct = 0.0

    def _own_seconds(self) -> float:
        return sum(tree_cpu_seconds(root) for root in self.roots)

    def __enter__(self) -> NoiseMeter:
        self._own, self._busy, self._started = self._own_seconds(), system_busy_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._started
        others = (system_busy_seconds() - self._busy) - (self._own_seconds() - self._own)
        self.others_pct = max(0.0, others / wall * 100) if wall > 0 else 0.0


def spec_for(
    scenario: Scenario,
    targets: Targets,
    side: str,
    request: Mapping[str, object],
    seconds: float,
    total: int | None,
) -> LoadSpec:
    direct = side == "direct"
    return LoadSpec(
        target=targets.address(side, scenario.kind),
        method=scenario.method,
        request=request,
        concurrency=scenario.concurrency,
        total=total,
        duration_s=seconds if total is None else None,
        deadline_s=scenario.deadline_s,
        metadata=tuple(scenario.metadata.items()),
        # The gateway side carries the key; the direct side gets in with the mesh certificate (and sends no key).
        api_key="" if direct else targets.api_key,
        mesh_credentials=targets.credentials if direct else None,
        server_role=scenario.kind if direct else "",
        progress=False,
    )


def describe(result: LoadResult) -> str:
    statuses = ", ".join(f"{code} {count}" for code, count in sorted(result.status_counts.items())) or "no calls"
    first = ""
    if result.first_message is not None and result.ok:
        first = f"  first msg p50 {result.first_message.p50_ms:.1f} ms"
    lat = result.latency
    return f"{result.rps:8,.1f} RPS  p50 {lat.p50_ms:7.1f} ms  p99 {lat.p99_ms:7.1f} ms{first}  [{statuses}]"


async def measure(
    scenarios: Sequence[Scenario],
    targets: Targets,
    *,
    rounds: int = DEFAULT_ROUNDS,
    round_s: float | None = None,
    mesh_pid: int | None = None,
) -> list[ScenarioSummary]:
    """Each scenario: a short warm-up per side, then ``rounds`` rounds alternating which side goes first.

    ``round_s`` overrides every scenario's own duration. ``mesh_pid``: the `aimass up` process, whose process tree's
    CPU (with this process's) is not noise; when None, other processes' CPU is not measured.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    own = [os.getpid()] if mesh_pid is None else [os.getpid(), mesh_pid]
    summaries = []
    for number, scenario in enumerate(scenarios, 1):
        request = request_json(scenario)
        seconds = round_s or scenario.duration_s
        label = f"{scenario.name} ({number}/{len(scenarios)}, c={scenario.concurrency})"
        for side in SIDES:
            await run_load(spec_for(scenario, targets, side, request, seconds, scenario.warmup))
        done: list[Round] = []
        for index in range(rounds):
            order = SIDES if index % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                spec = spec_for(scenario, targets, side, request, seconds, None)
                with NoiseMeter(own) as meter:
                    result = await run_load(spec)
                others = meter.others_pct if mesh_pid is not None else None
                done.append(Round(scenario.name, side, index, result, others))
                log(f"{label} round {index + 1}/{rounds} {side:7}  {describe(result)}")
        sides = {side: SideSummary.of(side, [r for r in done if r.side == side]) for side in SIDES}
        summaries.append(ScenarioSummary(scenario, sides, done))
    return summaries


# -- the report ------------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _rps(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _rps_range(side: SideSummary) -> str:
    """The median RPS, and the slowest to the fastest round when there were several."""
    if side.rounds < 2:
        return _rps(side.rps)
    return f"{_rps(side.rps)} ({_rps(side.rps_min)} to {_rps(side.rps_max)})"


def _statuses(counts: Mapping[str, int]) -> str:
    errors = {code: count for code, count in counts.items() if code != "OK"}
    if not errors:
        return "none"
    return ", ".join(f"{code} {count:,}" for code, count in sorted(errors.items(), key=lambda item: -item[1]))


HEADLINE_HEADER = (
    "scenario",
    "method",
    "c",
    "RPS gateway",
    "RPS direct",
    "RPS gw/direct",
    "p50 gw ms",
    "p50 direct ms",
    "added p50 ms",
    "p99 gw/direct",
    "errors",
)
SERVICE_HEADER = (
    "method",
    "path",
    "c",
    "calls",
    "RPS (rounds' range)",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "first msg p50 ms",
    "errors by status",
    "RPS gw/direct",
    "others' CPU %",
)


def headline_table(summaries: Sequence[ScenarioSummary]) -> str:
    rows = [
        (
            s.scenario.name,
            s.scenario.full_method.removeprefix("aimass.v1."),
            str(s.scenario.concurrency),
            _rps(s.gateway.rps),
            _rps(s.direct.rps),
            f"{s.rps_ratio:.2f}",
            _ms(s.gateway.p50_ms),
            _ms(s.direct.p50_ms),
            f"{s.added_p50_ms:+.2f}",
            f"{s.p99_ratio:.2f}",
            str(sum(s.gateway.errors.values()) + sum(s.direct.errors.values())),
        )
        for s in summaries
    ]
    return markdown_table(HEADLINE_HEADER, rows)


def service_tables(summaries: Sequence[ScenarioSummary]) -> str:
    parts = []
    for kind in SERVICE_MODULES:
        mine = [s for s in summaries if s.scenario.kind == kind]
        if not mine:
            continue
        rows = []
        for s in mine:
            for side in SIDES:
                got = s.sides[side]
                rows.append(
                    (
                        f"{s.scenario.full_method.split('/')[-1]} ({s.scenario.name})",
                        side,
                        str(s.scenario.concurrency),
                        f"{got.calls:,}",
                        _rps_range(got),
                        _ms(got.p50_ms),
                        _ms(got.p95_ms),
                        _ms(got.p99_ms),
                        _ms(got.first_p50_ms),
                        _statuses(got.statuses),
                        f"{s.rps_ratio:.2f}" if side == "gateway" else "",
                        "—" if got.others_pct is None else f"{got.others_pct:.0f}",
                    )
                )
        service = mine[0].scenario.full_method.split("/")[0]
        parts.append(f"#### {kind} ({service})\n\n{markdown_table(SERVICE_HEADER, rows)}")
    return "\n\n".join(parts)


def error_notes(summaries: Sequence[ScenarioSummary]) -> list[str]:
    notes = []
    for s in summaries:
        for side in SIDES:
            got = s.sides[side]
            if got.errors:
                samples = "; ".join(f"`{sample[:160]}`" for sample in got.error_samples) or "no details"
                notes.append(f"- {s.scenario.name}, {side}: {_statuses(got.statuses)} — {samples}")
    return notes


def render(
    summaries: Sequence[ScenarioSummary],
    *,
    date: str,
    host: str,
    command: str,
    rounds: int,
    round_s: float | None,
    busy: Sequence[str] = (),
    plot_link: str | None = None,
) -> str:
    """The report's markdown section: headline ratios, a table per service, the plot, failed calls."""
    lengths = f"{round_s:g} s each" if round_s else "each scenario's own length (below)"
    plural = "s" if rounds != 1 else ""
    lines = [
        "## Latest run",
        "",
        f"{date}; {host}. Command: `{command}`. Client, gateway and replicas share the machine, so every figure"
        " includes the load generator's own CPU use.",
        "",
        f"{rounds} round{plural} per scenario and side, {lengths}, gateway and direct in alternating order; medians"
        " of the rounds' figures; calls and statuses summed over the rounds. `direct` calls the replica the gateway"
        " routes to. Latency is send → reply (server streams: → end of stream, every message read; `first msg`:"
        " send → first message). `others' CPU %`: median CPU of processes outside the client and the mesh during a"
        " round (% of one CPU; anything but ~0 means skewed figures; — when the mesh was not started by this run).",
        "",
        headline_table(summaries),
        "",
        service_tables(summaries),
    ]
    if plot_link:
        lines += ["", f"![RPS and p99 latency, gateway vs direct, per scenario]({plot_link})"]
    lines += ["", "Scenarios:", ""]
    lines += [
        f"- `{s.scenario.name}`: {s.scenario.full_method}, c={s.scenario.concurrency},"
        f" {(round_s or s.scenario.duration_s):g} s rounds, deadline {s.scenario.deadline_s:g} s;"
        f" {s.scenario.description}"
        for s in summaries
    ]
    notes = error_notes(summaries)
    if notes:
        lines += ["", "Failed calls (status, first distinct messages):", "", *notes]
    if busy:
        lines += ["", "Other processes busy when the run started (figures skewed):", ""]
        lines += [f"- {line}" for line in busy]
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[ScenarioSummary], path: Path, *, title: str = "") -> None:
    """Grouped bars, gateway vs direct per scenario: RPS (ratio gw/direct above each pair) and p99 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.scenario.name for s in summaries]
    positions = list(range(len(names)))
    width = 0.38
    colours = {"gateway": "#4C72B0", "direct": "#DD8452"}
    figure, (rps_axes, p99_axes) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(names) + 4), 4.6))
    for offset, side in ((-width / 2, "gateway"), (width / 2, "direct")):
        xs = [x + offset for x in positions]
        rps_axes.bar(xs, [s.sides[side].rps for s in summaries], width, label=side, color=colours[side])
        p99_axes.bar(xs, [s.sides[side].p99_ms for s in summaries], width, label=side, color=colours[side])
    for x, s in zip(positions, summaries, strict=True):
        top = max(s.gateway.rps, s.direct.rps)
        if top > 0:
            rps_axes.annotate(f"{s.rps_ratio:.2f}x", (x, top), ha="center", va="bottom", fontsize=8)
    for axes, label in ((rps_axes, "requests/s (log)"), (p99_axes, "p99 latency, ms (log)")):
        axes.set_xticks(positions, names, rotation=20, ha="right")
        axes.set_ylabel(label)
        if any(bar.get_height() > 0 for bar in axes.patches):
            axes.set_yscale("log")
        axes.grid(axis="y", alpha=0.3, which="both")
        axes.legend(fontsize=8)
    rps_axes.set_title("throughput (label: gateway / direct)", fontsize=10)
    p99_axes.set_title("p99 latency", fontsize=10)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_doc(path: Path, body: str) -> None:
    """Replace the report's section of ``path`` (created with a short header if missing), keeping the rest."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DOC_HEADER)
    update_doc(path, NAME, body)


# -- the command -----------------------------------------------------------------------------------------------------


def parse_direct(text: str) -> tuple[str, str]:
    kind, sep, address = text.partition("=")
    if not sep or kind not in SERVICE_MODULES or not address:
        raise argparse.ArgumentTypeError(f"--direct takes KIND=host:port with KIND in {sorted(SERVICE_MODULES)}")
    return kind, address


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m loadtest.report",
        description="every load-test scenario through the gateway and directly: markdown report + PNG plot",
    )
    cli.add_argument(
        "--services",
        help=f"service kinds to start and load, comma-separated (default: {','.join(DEFAULT_KINDS)};"
        " with --scenarios: theirs)",
    )
    cli.add_argument("--scenarios", help=f"scenarios to run, comma-separated ({', '.join(s.name for s in SCENARIOS)})")
    cli.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="alternating rounds per scenario (median)")
    cli.add_argument(
        "--round-seconds", type=float, default=None, help="seconds per round and side (default: each scenario's)"
    )
    cli.add_argument("--doc", type=Path, default=DEFAULT_DOC, help=f"markdown file to update (default {DEFAULT_DOC})")
    cli.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG to write (default {DEFAULT_PLOT})")
    cli.add_argument("--no-write", action="store_true", help="print the report only; write no file")
    cli.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other busy processes to finish (default 0: start at once)",
    )
    cli.add_argument("--gateway", help="use this running mesh's gateway instead of starting one (needs --direct)")
    cli.add_argument(
        "--direct", type=parse_direct, action="append", default=[], help="KIND=host:port of a replica; repeatable"
    )
    cli.add_argument(
        "--api-key",
        default=None,
        help="with --gateway: its API key (default: $AIMASS_API_KEY, else the admin key file of this host's mesh)",
    )
    cli.add_argument(
        "--pki-dir",
        type=Path,
        default=None,
        help="with --gateway: the mesh's CA and gateway certificate, for the direct side (default: this host's"
        " mesh's, mesh.pki_dir)",
    )
    return cli


def choose(args: argparse.Namespace) -> tuple[list[Scenario], list[str]]:
    """The scenarios to run and the service kinds they need."""
    kinds = [k.strip() for k in args.services.split(",") if k.strip()] if args.services else None
    if kinds is not None:
        unknown = sorted(set(kinds) - set(SERVICE_MODULES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(SERVICE_MODULES)}")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()] if args.scenarios else None
    scenarios = by_name(names)
    if kinds is None:
        kinds = [k for k in DEFAULT_KINDS if any(s.kind == k for s in scenarios)] if names else list(DEFAULT_KINDS)
    if args.gateway:
        kinds = [k for k in kinds if k in dict(args.direct)]
    scenarios = [s for s in scenarios if s.kind in kinds]
    if not scenarios:
        raise ValueError("no scenario left to run: check --services, --scenarios and --direct")
    return scenarios, [k for k in SERVICE_MODULES if k in kinds]


async def run_mesh_and_measure(
    args: argparse.Namespace, scenarios: Sequence[Scenario], kinds: Sequence[str]
) -> list[ScenarioSummary]:
    """Start the mesh (unless one is given), measure every scenario, stop the mesh."""
    mesh: Mesh | None = None
    if args.gateway:
        try:
            credentials = gateway_credentials(args.pki_dir)
        except (FileNotFoundError, ValueError) as err:
            raise ConnectionError(f"cannot call the replicas directly: {err}") from err
        targets = Targets(args.gateway, dict(args.direct), args.api_key, credentials)
        mesh_pid: int | None = None
    else:
        log(f"starting aimass up with one replica each of {', '.join(kinds)} (models load: up to a few minutes)")
        started = time.perf_counter()
        mesh = Mesh(NAME, replicas={kind: 1 for kind in kinds})
        mesh.start()
        try:
            await asyncio.to_thread(mesh.wait_ready)
            # The mesh's own state directory holds its admin key and its gateway's certificate.
            settings = mesh.settings()
            credentials = None if settings.mesh.tls == "off" else MeshCredentials.load(settings.pki_dir, ROLE_GATEWAY)
        except BaseException:
            mesh.stop()
            raise
        log(f"mesh ready in {time.perf_counter() - started:.0f} s: gateway {mesh.gateway}")
        targets = Targets(mesh.gateway, {kind: mesh.addresses(kind)[0] for kind in kinds}, mesh.api_key, credentials)
        assert mesh.process is not None
        mesh_pid = mesh.process.pid
    try:
        began = time.perf_counter()
        summaries = await measure(scenarios, targets, rounds=args.rounds, round_s=args.round_seconds, mesh_pid=mesh_pid)
        log(f"measured {len(summaries)} scenarios in {time.perf_counter() - began:.0f} s")
    finally:
        if mesh is not None:
            log("stopping the mesh")
            await asyncio.to_thread(mesh.stop)
    return summaries


def publish(args: argparse.Namespace, summaries: Sequence[ScenarioSummary], busy: Sequence[str]) -> str:
    """Render the report; unless ``--no-write``, plot it and write its section of the doc."""
    date = utc_now()
    plot_link = None
    if not args.no_write:
        plot(summaries, args.plot, title=f"aimass load test, gateway vs direct ({date}, {os.cpu_count()} CPUs)")
        plot_link = os.path.relpath(args.plot.resolve(), args.doc.resolve().parent)
    body = render(
        summaries,
        date=date,
        host=machine(),
        command=command_line(),
        rounds=args.rounds,
        round_s=args.round_seconds,
        busy=busy,
        plot_link=plot_link,
    )
    if not args.no_write:
        write_doc(args.doc, body)
        log(f"wrote {args.doc} (section {NAME!r}) and {args.plot}")
    return body


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.gateway and not args.direct:
        cli.error("--gateway needs --direct KIND=host:port for each service kind to load")
    if args.direct and not args.gateway:
        cli.error("--direct goes with --gateway (without them a mesh is started)")
    if args.round_seconds is not None and not 0 < args.round_seconds <= 600:
        cli.error("--round-seconds must be in (0, 600]")
    if args.rounds < 1:
        cli.error("--rounds must be >= 1")
    try:
        scenarios, kinds = choose(args)
    except ValueError as err:
        cli.error(str(err))
    if args.wait_quiet > 0:
        busy = wait_quiet(args.wait_quiet)
    else:
        busy = busy_processes()
        for line in busy:
            log(f"WARNING: another process is busy; figures will be skewed: {line}")
    try:
        summaries = asyncio.run(run_mesh_and_measure(args, scenarios, kinds))
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        print(f"loadtest.report: {err}", file=sys.stderr)
        return 1
    print(publish(args, summaries, busy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
