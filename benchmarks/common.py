"""What the benchmarks share: a mesh started with `aimass up`, per-process CPU accounting, the machine's
description, medians, and updating one section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import grpc

from aimass.cli import SERVICE_MODULES
from aimass.local_mesh import LocalMesh
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials
from aimass.store.sql import SqlStore
from aimass.tenancy.keys import SCOPE_INFER
from loadtest.generator import LoadResult, LoadSpec, run_load

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Access(TypedDict):
    """LoadSpec keywords that reach one process of a secured mesh."""

    api_key: str | None
    mesh_credentials: MeshCredentials | None
    server_role: str


class Mesh(LocalMesh):
    """A benchmark's mesh: gateway + one replica (NLP unless ``replicas`` says otherwise, e.g. ``{"vision": 1}``),
    quiet logs in a temporary file, and its processes' pids."""

    def __init__(
        self, name: str, env: Mapping[str, str] | None = None, replicas: Mapping[str, int] | None = None
    ) -> None:
        handle, log = tempfile.mkstemp(prefix=f"aimass-bench-{name}-", suffix=".log")
        os.close(handle)
        super().__init__(
            log_path=Path(log),
            replicas=dict(replicas or {"nlp": 1}),
            env=dict(env or {}),
            log_level="WARNING",
            # Its own state (CA, store, admin key), as a user's mesh has; removed with the mesh.
            state_dir=Path(tempfile.mkdtemp(prefix=f"aimass-bench-{name}-state-")),
        )
        self.name = name

    @property
    def replica(self) -> str:
        """The address of the (first) replica of the mesh's first service kind."""
        return self.addresses(next(iter(self.replicas)))[0]

    def access(self, target: str) -> Access:
        """How a load generator calls ``target`` on this mesh: the gateway with the mesh's admin key, a replica
        directly as a gateway does (mesh mTLS, expecting the replica's kind), which is the only way it answers."""
        if target == self.gateway:
            return Access(api_key=self.api_key, mesh_credentials=None, server_role="")
        kind = next(kind for kind in self.replicas if target in self.addresses(kind))
        settings = self.settings()
        credentials = MeshCredentials.load(settings.pki_dir, ROLE_GATEWAY) if settings.mesh.tls == "on" else None
        return Access(api_key="", mesh_credentials=credentials, server_role=kind)

    def key_for(self, tenant: str) -> str:
        """A new key of ``tenant`` (scope infer) in the mesh's store."""
        store = SqlStore.open(self.settings().store_url)
        try:
            return store.create_key(tenant, [SCOPE_INFER], name="benchmark")[1]
        finally:
            store.close()

    def stop(self) -> int:
        code = super().stop()
        self.log_path.unlink(missing_ok=True)
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return code

    def wait_quiet(self, max_wait_s: float) -> list[str]:
        """Waits up to ``max_wait_s`` for processes outside this mesh to go quiet; those still busy (see
        ``wait_quiet``)."""
        assert self.process is not None
        return wait_quiet(max_wait_s, exclude=[self.process.pid, *self.pids().values()])

    def pids(self) -> dict[str, int]:
        """``gateway`` and ``replica`` → pid, from the children of the `aimass up` process."""
        assert self.process is not None
        found: dict[str, int] = {}
        for pid in child_pids(self.process.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"gateway" in cmdline:
                found["gateway"] = pid
            elif any(module.encode() in cmdline for module in SERVICE_MODULES.values()):
                found["replica"] = pid
        return found


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(child) for child in text)
    return children


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process so far (all threads), or of its thread ``tid``."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based), i.e. indexes 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user/nice.
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds spent by named processes between enter and exit, and by every other process meanwhile."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float] = {}
        self._system_before = 0.0
        self._started = 0.0
        self.used: dict[str, float] = {}
        # Percent of one CPU that processes outside ``pids`` used during the measurement (skew indicator).
        self.others_pct = 0.0

    def __enter__(self) -> CpuMeter:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._system_before = system_busy_seconds()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        wall = time.perf_counter() - self._started
        others = system_busy_seconds() - self._system_before - sum(self.used.values())
        self.others_pct = max(0.0, others / wall * 100) if wall > 0 else 0.0


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, {memory_gib():.0f} GiB; Python {platform.python_version()},"
        f" grpcio {grpc.__version__}"
    )


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def busy_processes(exclude: Iterable[int] = (), threshold_pct: float = 20.0, window_s: float = 1.0) -> list[str]:
    """Other processes using more than ``threshold_pct`` of a CPU now: they would skew a 2-core benchmark."""
    skip = {os.getpid(), *exclude}

    def snapshot() -> dict[int, float]:
        seen: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in skip:
                try:
                    seen[int(entry.name)] = cpu_seconds(int(entry.name))
                except (OSError, IndexError, ValueError):
                    continue
        return seen

    before = snapshot()
    time.sleep(window_s)
    after = snapshot()
    busy: list[str] = []
    for pid, used in after.items():
        pct = (used - before.get(pid, used)) / window_s * 100
        if pct >= threshold_pct:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                command = "?"
            busy.append(f"pid {pid} {pct:.0f}% {command[:100].strip()}")
    return busy


def wait_quiet(max_wait_s: float, exclude: Iterable[int] = ()) -> list[str]:
    """Wait (at most ``max_wait_s``) until no other process is busy; warn about and return those still busy."""
    deadline = time.monotonic() + max_wait_s
    announced = False
    while True:
        busy = busy_processes(exclude)
        if not busy or time.monotonic() >= deadline:
            break
        if not announced:
            print(f"waiting up to {max_wait_s:.0f}s for other busy processes to finish: {busy}", file=sys.stderr)
            announced = True
    for line in busy:
        print(f"WARNING: another process is busy during the benchmark: {line}", file=sys.stderr)
    return busy


def busy_lines(busy: Sequence[str]) -> list[str]:
    """A report's lines naming the processes that were still busy before the run (none when there were none)."""
    return ["", "Other busy processes seen before the run:", *(f"- {b}" for b in busy)] if busy else []


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


DOC_HEADER = """# Benchmarks

Each section below is written by its benchmark (`python -m benchmarks.<name> --write docs/benchmarks.md`), which
replaces only its own section. Client, gateway and replica share the same machine, so every figure includes the
load generator's own CPU use. CPU per request comes from /proc for each process; the last column of the raw tables
is the CPU that processes outside the benchmark used meanwhile (% of one CPU): anything but ~0 means skewed figures.
"""


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name}:begin -->", f"<!-- benchmark:{name}:end -->"


def update_doc(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section of benchmark ``name`` in ``path``, keeping every other section."""
    begin, end = section_markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line() -> str:
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else Path(sys.argv[0]).stem
    return " ".join(["python -m", name, *sys.argv[1:]])


def batch_histogram(metrics_port: int, batcher: str) -> tuple[float, float] | None:
    """(sum, count) of a batcher's aimass_batch_size histogram, or None when no metrics endpoint answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    line = re.compile(rf'^aimass_batch_size_(sum|count)\{{batcher="{re.escape(batcher)}"\}}\s+(\S+)$', re.MULTILINE)
    found = {kind: float(value) for kind, value in line.findall(text)}
    if "sum" not in found or "count" not in found:
        return None
    return found["sum"], found["count"]


def rounds_cli(
    module: str,
    doc: str | None,
    *,
    rounds: int = 3,
    rounds_help: str = "interleaved rounds",
    duration_s: float = 3.0,
    wait_quiet_s: float | None = 60.0,
) -> argparse.ArgumentParser:
    """The command line the benchmarks that measure in interleaved rounds share: --rounds, --duration,
    --wait-quiet (unless ``wait_quiet_s`` is None) and --write; a benchmark adds its own options to it."""
    cli = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=(doc or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    cli.add_argument(
        "--duration", type=float, default=duration_s, help=f"seconds per measurement (default {duration_s:g})"
    )
    if wait_quiet_s is not None:
        cli.add_argument(
            "--wait-quiet",
            type=float,
            default=wait_quiet_s,
            help=f"wait up to this long for other busy processes (default {wait_quiet_s:g})",
        )
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    return cli


def check_bounded(
    cli: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    max_rounds: int = 10,
    duration_s: tuple[float, float] = (0.5, 10.0),
) -> None:
    """Refuse rounds and durations that would make the run unbounded (argparse's usage error)."""
    low, high = duration_s
    if not 1 <= args.rounds <= max_rounds or not low <= args.duration <= high:
        cli.error(f"rounds must be 1..{max_rounds} and duration {low:g}..{high:g} s (the whole run stays bounded)")


def publish(text: str, doc: Path | None, name: str) -> None:
    """Print a benchmark's report and, when asked, write it into its section of ``doc``."""
    print(text)
    if doc is not None:
        update_doc(doc, name, text)
        print(f"\nupdated the {name} section of {doc}", file=sys.stderr)


@dataclass(frozen=True)
class MeasuredLoad:
    result: LoadResult
    # CPU seconds per named process during the run (see CpuMeter).
    cpu_seconds: dict[str, float]
    others_pct: float
    # Mean units per executed batch during the run, from the replica's aimass_batch_size; None when not readable.
    avg_batch: float | None


async def measure_load(spec: LoadSpec, pids: Mapping[str, int], metrics_port: int | None, batcher: str) -> MeasuredLoad:
    """Run ``spec`` while metering each process's CPU and reading the batcher's batch sizes before and after."""
    before = batch_histogram(metrics_port, batcher) if metrics_port else None
    with CpuMeter(pids) as meter:
        result = await run_load(spec)
    after = batch_histogram(metrics_port, batcher) if metrics_port else None
    avg_batch = None
    if before is not None and after is not None and after[1] > before[1]:
        avg_batch = (after[0] - before[0]) / (after[1] - before[1])
    return MeasuredLoad(result, meter.used, meter.others_pct, avg_batch)


@dataclass(frozen=True)
class MeteredRun:
    """One load run with each named process's CPU per call (warm-up calls counted on both sides of the division)."""

    result: LoadResult
    # Process name → CPU milliseconds per call.
    cpu_ms: dict[str, float]
    # CPU used meanwhile by processes outside the benchmark, in % of one CPU.
    others_pct: float
    # Calls made, warm-up included.
    calls: int

    def load_cells(self) -> tuple[str, str, str, str]:
        """Requests, RPS, p50 ms and p99 ms, as the benchmarks' raw tables print them."""
        result = self.result
        return (
            str(result.requests),
            f"{result.rps:,.1f}",
            f"{result.latency.p50_ms:.3f}",
            f"{result.latency.p99_ms:.3f}",
        )


async def run_metered(spec: LoadSpec, pids: Mapping[str, int], label: str) -> MeteredRun:
    """Run ``spec`` while metering each process's CPU; one progress line on stderr, starting with ``label``."""
    with CpuMeter(pids) as meter:
        result = await run_load(spec)
    calls = result.requests + spec.warmup
    cpu_ms = {name: seconds * 1000 / calls for name, seconds in meter.used.items()}
    print(
        f"  {label} {result.rps:8,.0f} RPS  p50 {result.latency.p50_ms:6.2f} ms  p99 {result.latency.p99_ms:7.2f} ms"
        f"  non-OK {result.errors}  others {meter.others_pct:.0f}% CPU",
        file=sys.stderr,
    )
    return MeteredRun(result, cpu_ms, meter.others_pct, calls)


@dataclass(frozen=True)
class SideMedians:
    """Medians per side ("direct"/"gateway", "off"/"10%", ...) of runs that alternated between the sides."""

    rps: dict[str, float]
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    # Side → process → CPU milliseconds per call.
    cpu_ms: dict[str, dict[str, float]]

    @classmethod
    def of(cls, runs: Mapping[str, Sequence[MeteredRun]], processes: Sequence[str]) -> SideMedians:
        return cls(
            rps={side: median(r.result.rps for r in got) for side, got in runs.items()},
            p50_ms={side: median(r.result.latency.p50_ms for r in got) for side, got in runs.items()},
            p99_ms={side: median(r.result.latency.p99_ms for r in got) for side, got in runs.items()},
            cpu_ms={
                side: {p: median(r.cpu_ms.get(p, 0.0) for r in got) for p in processes} for side, got in runs.items()
            },
        )

    def cpu_rows(self, label: str, processes: Sequence[str]) -> list[tuple[str, ...]]:
        """Rows of a CPU-per-call table: label, side, each process's ms, their total."""
        return [
            (label, side, *(f"{cpu[p]:.3f}" for p in processes), f"{sum(cpu.values()):.3f}")
            for side, cpu in self.cpu_ms.items()
        ]


@dataclass(frozen=True)
class Scenario:
    """One method, request and concurrency that a benchmark measures on each of its sides."""

    method: str
    concurrency: int
    request: Mapping[str, object]

    @property
    def label(self) -> str:
        return f"{self.method.rpartition('/')[2]} c={self.concurrency}"


@dataclass(frozen=True)
class ScenarioSample:
    """One measurement of a scenario on one side in one round."""

    scenario: Scenario
    side: str
    round: int
    run: MeteredRun
