"""Fault injection under load (`make chaos`): each scenario breaks one part of a running mesh while several clients
send steady traffic through the gateway, and counts what became of every request.

    python -m loadtest.chaos                       # every scenario, full length; writes docs/reliability.md
    python -m loadtest.chaos --short sigkill-replica sigstop-replica   # a few, short (what tests/test_chaos.py runs)

The mesh is the real thing: `aimass up` (aimass.local_mesh.LocalMesh) on free loopback ports with two NLP replicas,
so another replica can serve while one is hurt, and two LLM replicas for the drain scenario; the Consul scenario
starts its own mesh against a fake Consul agent on loopback (tests/fake_consul.py), and the partition scenario its
own mesh spread over network namespaces (tests/netns.py; skipped, with the reason, where they cannot be made).

The load: ``unary_clients`` clients, each with its own channel (its own TCP connection), alternating NLP Embed and
Sentiment at a steady pace (``rate`` calls per second each, one call in flight per client), each call with its own
deadline; scenarios that need streams add LLM Chat clients (short greedy replies, read to their last message). The
clients use the retry policy a real client of this mesh uses (aimass.client.service_config: UNAVAILABLE and
RESOURCE_EXHAUSTED retried by gRPC up to 5 tries, after the server's pushback) plus ``waitForReady`` and a 1 s
reconnect backoff cap, so a restarted gateway is found again within the call's deadline. Every call ends as one of:

- **OK**: answered OK (a stream: OK and its last message carries a finish reason);
- **retryable**: answered UNAVAILABLE or RESOURCE_EXHAUSTED after the client's own retries (the caller may try again);
- **lost**: no answer by its deadline (DEADLINE_EXCEEDED), any other status, or a stream that ended OK but cut short.

Recovery time: the OK rate of unary calls in sliding 1 s windows, compared with the rate in the seconds before the
fault; the time from the fault to the end of the last window below 80 % of it (0 when it never dipped; "not
recovered" when the run ended below it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.cli import CONSOLE_PROCESS, REST_PROCESS
from aimass.client import keyed_aio_channel, service_config
from aimass.local_mesh import LocalMesh
from aimass.v1 import common_pb2, llm_pb2, llm_pb2_grpc, nlp_pb2, nlp_pb2_grpc, registry_pb2, registry_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
NLP_SERVICE = "aimass.v1.NlpService"
# A wrong key's calls must be refused (UNAUTHENTICATED) whatever else goes wrong: that is their "OK".
REFUSED_OK = "UNAUTHENTICATED"
# Recovery: the unary OK rate in windows of WINDOW_S, stepped by STEP_S, against RECOVERED of the pre-fault rate.
WINDOW_S = 1.0
STEP_S = 0.25
RECOVERED = 0.8
# Where run_scenario keeps every call of each scenario (main's --logs); None: nowhere.
CALLS_DIR: Path | None = None
REGENERATE = "make chaos   # = .venv/bin/python -m loadtest.chaos --write docs/reliability.md"


def client_options() -> list[tuple[str, Any]]:
    """A real client's channel: aimass.client's retry policy, waiting for a (re)connection rather than failing fast,
    and reconnecting at least once a second (gRPC's default backoff grows to 2 minutes)."""
    config = service_config(5)
    config["methodConfig"][0]["waitForReady"] = True
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


# -- the load --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str  # "unary", "stream" or "refused" (a wrong key's call)
    started: float  # time.monotonic(): one clock for every process (and network namespace) of the machine
    ended: float
    code: str
    details: str = ""


@dataclass(frozen=True)
class LoadSpec:
    gateway: str
    api_key: str
    unary_clients: int = 4
    # Calls per second per unary client (one in flight each): a steady offered load below the mesh's capacity.
    rate: float = 8.0
    deadline_s: float = 10.0
    stream_clients: int = 0
    stream_tokens: int = 16
    stream_deadline_s: float = 60.0
    # Clients calling with a wrong key (their calls are refused and audited: the gateway writes to the store).
    refused_clients: int = 0


class Load:
    """The clients of ``spec`` until ``stop()``; every call they made is in ``calls`` once ``run()`` returns."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.calls: list[Call] = []
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        clients = [self._unary(i) for i in range(self.spec.unary_clients)]
        clients += [self._streams(i) for i in range(self.spec.stream_clients)]
        clients += [self._refused(i) for i in range(self.spec.refused_clients)]
        await asyncio.gather(*clients)

    async def _paced(self, period_s: float, one: Callable[[int], Awaitable[Call]]) -> None:
        next_at = time.monotonic()
        index = 0
        while not self._stopping.is_set():
            self.calls.append(await one(index))
            index += 1
            # No catching up after a slow call: the offered load stays steady.
            next_at = max(next_at + period_s, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.0, next_at - time.monotonic()))

    async def _unary(self, client: int) -> None:
        async with keyed_aio_channel(self.spec.gateway, self.spec.api_key, options=client_options()) as channel:
            stub = nlp_pb2_grpc.NlpServiceStub(channel)

            async def one(index: int) -> Call:
                started = time.monotonic()
                try:
                    if index % 2:
                        await stub.Embed(
                            nlp_pb2.EmbedRequest(texts=[f"client {client} call {index}"]), timeout=self.spec.deadline_s
                        )
                    else:
                        await stub.Sentiment(
                            nlp_pb2.SentimentRequest(texts=[f"call {index} went well"]), timeout=self.spec.deadline_s
                        )
                except grpc.aio.AioRpcError as err:
                    return Call("unary", started, time.monotonic(), err.code().name, err.details() or "")
                return Call("unary", started, time.monotonic(), "OK")

            await self._paced(1.0 / self.spec.rate, one)

    async def _streams(self, client: int) -> None:
        async with keyed_aio_channel(self.spec.gateway, self.spec.api_key, options=client_options()) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)

            async def one(index: int) -> Call:
                request = llm_pb2.ChatRequest(
                    messages=[
                        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=f"Count from {index} to {index + 20}.")
                    ],
                    sampling=llm_pb2.SamplingParams(max_tokens=self.spec.stream_tokens, temperature=0),
                )
                started = time.monotonic()
                finished = False
                try:
                    async for reply in stub.Chat(request, timeout=self.spec.stream_deadline_s):
                        finished = finished or reply.finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED
                except grpc.aio.AioRpcError as err:
                    return Call("stream", started, time.monotonic(), err.code().name, err.details() or "")
                if not finished:
                    return Call("stream", started, time.monotonic(), "INCOMPLETE", "ended OK without a finish reason")
                return Call("stream", started, time.monotonic(), "OK")

            await self._paced(0.2, one)

    async def _refused(self, client: int) -> None:
        async with keyed_aio_channel(self.spec.gateway, f"wrong-key-{client}", options=client_options()) as channel:
            stub = nlp_pb2_grpc.NlpServiceStub(channel)

            async def one(index: int) -> Call:
                started = time.monotonic()
                try:
                    await stub.Sentiment(nlp_pb2.SentimentRequest(texts=["let me in"]), timeout=self.spec.deadline_s)
                except grpc.aio.AioRpcError as err:
                    return Call("refused", started, time.monotonic(), err.code().name, err.details() or "")
                return Call("refused", started, time.monotonic(), "OK", "a wrong key was let in")

            await self._paced(0.25, one)


class LoadHandle(Protocol):
    """A load under way, in this process or another: stop it and get its calls."""

    async def finish(self) -> list[Call]: ...


class LocalLoad:
    def __init__(self, spec: LoadSpec) -> None:
        self.load = Load(spec)
        self.task = asyncio.get_running_loop().create_task(self.load.run(), name="chaos-load")

    async def finish(self) -> list[Call]:
        self.load.stop()
        await self.task
        return self.load.calls


# -- results ---------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    scenario: str
    sent: int = 0
    ok: int = 0
    retryable: int = 0
    lost: int = 0
    # Seconds from the fault until the unary OK rate was back (0: it never dipped; None: not back by the run's end).
    recovery_s: float | None = 0.0
    baseline_ok_per_s: float = 0.0
    lost_codes: dict[str, int] = field(default_factory=dict)
    retryable_codes: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    notes: str = ""
    skipped: str = ""

    def row(self) -> str:
        if self.skipped:
            return f"| {self.scenario} | skipped: {self.skipped} | | | | |"
        recovery = "not recovered" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        return f"| {self.scenario} | {self.sent} | {self.ok} | {self.retryable} | {self.lost} | {recovery} |"


def outcome(call: Call) -> str:
    """ "ok", "retryable" or "lost"."""
    if call.kind == "refused":
        return "ok" if call.code == REFUSED_OK else "retryable" if call.code in RETRYABLE else "lost"
    if call.code == "OK":
        return "ok"
    return "retryable" if call.code in RETRYABLE else "lost"


def recovery_s(
    calls: Sequence[Call], fault_at: float, stopped_at: float, *, baseline_s: float = 3.0
) -> tuple[float | None, float]:
    """(recovery time, pre-fault unary OK rate per second), up to when the load was told to stop (streams still
    finishing after it are no throughput to measure); see the module's docstring."""
    ends = sorted(c.ended for c in calls if c.kind == "unary" and c.code == "OK")
    if not ends:
        return None, 0.0
    baseline = sum(1 for t in ends if fault_at - baseline_s <= t < fault_at) / baseline_s
    end = stopped_at
    last_low: float | None = None
    t = fault_at
    while t + WINDOW_S <= end:
        rate = sum(1 for e in ends if t <= e < t + WINDOW_S) / WINDOW_S
        if rate < RECOVERED * baseline:
            last_low = t + WINDOW_S
        t += STEP_S
    if last_low is None:
        return 0.0, baseline
    if last_low > end - STEP_S:
        return None, baseline
    return last_low - fault_at, baseline


def tally(scenario: str, calls: Sequence[Call], fault_at: float, stopped_at: float, notes: str = "") -> Tally:
    result = Tally(scenario, notes=notes)
    lost: Counter[str] = Counter()
    retryable: Counter[str] = Counter()
    for call in calls:
        result.sent += 1
        kind = outcome(call)
        if kind == "ok":
            result.ok += 1
        elif kind == "retryable":
            result.retryable += 1
            retryable[f"{call.kind} {call.code}"] += 1
        else:
            result.lost += 1
            lost[f"{call.kind} {call.code}"] += 1
            if len(result.samples) < 5:
                result.samples.append(f"{call.kind} {call.code} after {call.ended - call.started:.1f}s: {call.details}")
    result.lost_codes, result.retryable_codes = dict(lost), dict(retryable)
    result.recovery_s, result.baseline_ok_per_s = recovery_s(calls, fault_at, stopped_at)
    return result


# -- the mesh --------------------------------------------------------------------------------------------------------


def mesh_processes(root: psutil.Process) -> dict[str, psutil.Process]:
    """The processes `aimass up` supervises, by name (gateway, scheduler, node-agent, nlp-0, ...)."""
    named: dict[str, psutil.Process] = {}
    for child in root.children():
        with contextlib.suppress(psutil.Error):
            name = child.environ().get("AIMASS_MESH__IDENTITY", "")
            if name and child.status() != psutil.STATUS_ZOMBIE:
                named[name] = child
    return named


class ChaosMesh:
    """A LocalMesh and what the scenarios need of it: its processes by name, and whether it is whole again."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh

    @property
    def gateway(self) -> str:
        return self.mesh.gateway

    @property
    def api_key(self) -> str:
        return self.mesh.api_key

    def processes(self) -> dict[str, psutil.Process]:
        assert self.mesh.process is not None
        return mesh_processes(psutil.Process(self.mesh.process.pid))

    def pid(self, name: str) -> int:
        process = self.processes().get(name)
        if process is None:
            raise RuntimeError(f"no process {name} in the mesh")
        return int(process.pid)

    def signal(self, name: str, sig: signal.Signals) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def registered(self) -> dict[int, str]:
        """pid → kind of every instance the registry lists SERVING ({} when the registry does not answer)."""
        try:
            with self.mesh.scheduler_channel() as channel:
                listed = registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(
                    registry_pb2.ListInstancesRequest(), timeout=2
                )
        except grpc.RpcError:
            return {}
        return {i.pid: i.kind for i in listed.instances if i.state == common_pb2.SERVING_STATE_SERVING}

    def whole(self) -> bool:
        """Every process of the mesh is running and registered SERVING."""
        # The node agent and the HTTP front doors are supervised but not in the registry (they serve no aimass.v1).
        unlisted = ("node-agent", REST_PROCESS, CONSOLE_PROCESS)
        running = {name: p.pid for name, p in self.processes().items() if name not in unlisted}
        registered = self.registered()
        return all(pid in registered for pid in running.values()) and len(running) == len(self.expected_names())

    def expected_names(self) -> list[str]:
        names = ["gateway", "scheduler"]
        return names + [f"{kind}-{i}" for kind, n in self.mesh.replicas.items() for i in range(n)]

    async def wait_whole(self, timeout_s: float, *, replaced: Sequence[tuple[str, int]] = ()) -> float:
        """Until the mesh is whole and each (name, old pid) of ``replaced`` runs under a new pid; the time it took."""
        began = time.monotonic()
        while True:
            done = await asyncio.to_thread(self.whole)
            if done and replaced:
                now = await asyncio.to_thread(self.processes)
                done = all(name in now and now[name].pid != old for name, old in replaced)
            if done:
                return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"the mesh was not whole again {timeout_s:.0f}s after the fault")
            await asyncio.sleep(0.2)


# -- scenarios -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """How long a scenario runs: load before the fault, how long a fault lasts, load after the mesh is whole."""

    warm_s: float
    fault_s: float
    settle_s: float
    whole_timeout_s: float


FULL = Timing(warm_s=5.0, fault_s=10.0, settle_s=5.0, whole_timeout_s=300.0)
SHORT = Timing(warm_s=3.0, fault_s=3.0, settle_s=2.0, whole_timeout_s=240.0)

Fault = Callable[[ChaosMesh, Timing], Awaitable[str]]


async def sigkill_replica(mesh: ChaosMesh, timing: Timing) -> str:
    pid = mesh.signal("nlp-0", signal.SIGKILL)
    back = await mesh.wait_whole(timing.whole_timeout_s, replaced=[("nlp-0", pid)])
    return f"nlp-0 (pid {pid}) SIGKILLed; the supervisor's new nlp-0 served again {back:.1f}s later"


async def sigstop_replica(mesh: ChaosMesh, timing: Timing) -> str:
    pid = mesh.signal("nlp-1", signal.SIGSTOP)
    try:
        await asyncio.sleep(timing.fault_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    back = await mesh.wait_whole(timing.whole_timeout_s)
    return f"nlp-1 frozen (SIGSTOP) for {timing.fault_s:.0f}s, then SIGCONT; whole {back:.1f}s later"


async def restart_gateway(mesh: ChaosMesh, timing: Timing) -> str:
    pid = mesh.signal("gateway", signal.SIGTERM)
    back = await mesh.wait_whole(timing.whole_timeout_s, replaced=[("gateway", pid)])
    return f"gateway SIGTERMed (drains, exits); the supervisor's new gateway registered {back:.1f}s later"


async def kill_scheduler(mesh: ChaosMesh, timing: Timing) -> str:
    # SIGSTOP first: the scheduler (and the registry it hosts) is gone for fault_s, as a host that hangs is; then it
    # is killed and the supervisor starts a fresh one with an empty registry, which everyone joins again.
    pid = mesh.signal("scheduler", signal.SIGSTOP)
    await asyncio.sleep(timing.fault_s)
    os.kill(pid, signal.SIGKILL)
    back = await mesh.wait_whole(timing.whole_timeout_s, replaced=[("scheduler", pid)])
    return (
        f"scheduler (with the embedded registry) frozen {timing.fault_s:.0f}s, then SIGKILLed; the new one had every "
        f"process registered again {back:.1f}s later"
    )


async def sigterm_mid_stream(mesh: ChaosMesh, timing: Timing) -> str:
    # The streams are under way (the load has run warm_s): SIGTERM one LLM replica; its streams must finish. The
    # load goes on against the other one; the supervisor's new llm-0 (a minute or more to load vLLM) is not awaited.
    pid = mesh.signal("llm-0", signal.SIGTERM)
    began = time.monotonic()
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() - began > timing.whole_timeout_s:
            raise TimeoutError(f"llm-0 had not drained {timing.whole_timeout_s:.0f}s after SIGTERM")
        await asyncio.sleep(0.1)
    return f"llm-0 SIGTERMed with Chat streams in flight; it drained and exited {time.monotonic() - began:.1f}s later"


@contextlib.contextmanager
def small_disk(folder: Path, size_mb: int) -> Iterator[Path]:
    """``folder`` on a tmpfs of ``size_mb`` MiB (needs root: mount), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)], check=True, timeout=30)
    try:
        yield folder
    finally:
        # What was written there (the mesh's log) outlives the disk, beside it.
        for item in folder.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(item, folder.parent / f"{folder.name}.{item.name}")
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=30)


def fill(path: Path) -> int:
    """Writes ``path`` until the disk is full; the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with path.open("wb", buffering=0) as sink:
        while True:
            try:
                written += sink.write(chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
            # A partial write means the next one fails: keep going until it does.
    with contextlib.suppress(OSError):
        small = b"\0" * 4096
        with path.open("ab", buffering=0) as sink:
            while True:
                written += sink.write(small)
    return written


async def fill_disk(mesh: ChaosMesh, timing: Timing) -> str:
    # The mesh's state directory (store: keys, audit log, LLM usage) and its log sit on a small tmpfs.
    filler = mesh.mesh.log_path.parent / "filler"
    written = await asyncio.to_thread(fill, filler)
    try:
        await asyncio.sleep(timing.fault_s)
    finally:
        filler.unlink()
    back = await mesh.wait_whole(timing.whole_timeout_s)
    return (
        f"the disk holding the store and the log filled ({written >> 20} MiB written) for {timing.fault_s:.0f}s, then "
        f"freed; whole {back:.1f}s later"
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    # The load's shape beyond the default unary clients.
    stream_clients: int = 0
    refused_clients: int = 0
    description: str = ""


MAIN_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("sigkill-replica", sigkill_replica, description="SIGKILL one of two NLP replicas"),
    Scenario("sigstop-replica", sigstop_replica, description="SIGSTOP one of two NLP replicas, then SIGCONT"),
    Scenario("restart-gateway", restart_gateway, description="SIGTERM the gateway; the supervisor restarts it"),
    Scenario("kill-scheduler", kill_scheduler, description="freeze, then SIGKILL the scheduler; it comes back empty"),
    Scenario(
        "fill-disk",
        fill_disk,
        stream_clients=1,
        refused_clients=1,
        description="fill the disk of the store and the log (refused calls are audited, LLM usage saved)",
    ),
    Scenario(
        "sigterm-mid-stream",
        sigterm_mid_stream,
        stream_clients=3,
        description="SIGTERM one of two LLM replicas with Chat streams in flight",
    ),
)


async def run_scenario(
    name: str,
    start_load: Callable[[], LoadHandle],
    fault: Callable[[], Awaitable[str]],
    timing: Timing,
) -> Tally:
    load = start_load()
    try:
        await asyncio.sleep(timing.warm_s)
        fault_at = time.monotonic()
        try:
            notes = await fault()
        except TimeoutError as err:  # the mesh did not heal in time: still count what the load saw
            notes = f"FAULT NOT HEALED: {err}"
        await asyncio.sleep(timing.settle_s)
    finally:
        stopped_at = time.monotonic()
        calls = await load.finish()
    result = tally(name, calls, fault_at, stopped_at, notes)
    print(f"{name}: {json.dumps(asdict(result))}", flush=True)
    if CALLS_DIR is not None:  # every call, for a closer look (--logs)
        record = {"fault_at": fault_at, "stopped_at": stopped_at, "calls": [asdict(c) for c in calls]}
        await asyncio.to_thread((CALLS_DIR / f"{name}.calls.json").write_text, json.dumps(record))
    return result


def main_mesh(folder: Path, *, llm: bool = True) -> LocalMesh:
    """`aimass up` with two NLP replicas (and two LLM replicas), one torch thread each: they share the machine."""
    replicas = {"nlp": 2, "llm": 2} if llm else {"nlp": 2}
    return LocalMesh(folder / "mesh.log", replicas=replicas, env={"AIMASS_NLP__TORCH_THREADS": "1"})


def can_mount() -> str:
    """Why a small tmpfs cannot be mounted here ("" when it can)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) to put the mesh's state and log on a small tmpfs"
    return ""


@contextlib.contextmanager
def started_main_mesh(folder: Path, *, llm: bool, small: bool) -> Iterator[ChaosMesh]:
    """The main mesh, ready; with ``small``, its folder (state and log) on a 64 MiB tmpfs for fill-disk."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if small:
            stack.enter_context(small_disk(folder, 64))
        mesh = main_mesh(folder, llm=llm)
        mesh.start()
        stack.callback(mesh.stop)
        mesh.wait_ready(600)
        yield ChaosMesh(mesh)


async def run_main_scenario(chaos: ChaosMesh, scenario: Scenario, timing: Timing, base: LoadSpec) -> Tally:
    """One scenario on the main mesh, once it is whole."""
    mesh = chaos.mesh
    spec = LoadSpec(
        **{
            **asdict(base),
            "gateway": mesh.gateway,
            "api_key": mesh.api_key,
            "stream_clients": scenario.stream_clients,
            "refused_clients": scenario.refused_clients,
        }
    )
    await chaos.wait_whole(timing.whole_timeout_s)
    return await run_scenario(scenario.name, lambda: LocalLoad(spec), lambda: scenario.fault(chaos, timing), timing)


async def run_main(folder: Path, names: Sequence[str], timing: Timing, base: LoadSpec) -> list[Tally]:
    """The scenarios of ``names`` (from MAIN_SCENARIOS) against one mesh, one after another, the mesh whole between
    them."""
    chosen = [s for s in MAIN_SCENARIOS if s.name in names]
    results: list[Tally] = []
    if any(s.name == "fill-disk" for s in chosen) and can_mount():
        results.append(Tally("fill-disk", skipped=can_mount()))
        chosen = [s for s in chosen if s.name != "fill-disk"]
    if not chosen:
        return results
    llm = any(s.stream_clients for s in chosen)
    small = any(s.name == "fill-disk" for s in chosen)
    with started_main_mesh(folder, llm=llm, small=small) as chaos:
        for scenario in chosen:
            results.append(await run_main_scenario(chaos, scenario, timing, base))
    return results


# -- Consul ----------------------------------------------------------------------------------------------------------


class ConsulChaosMesh(ChaosMesh):
    """A LocalMesh whose registry is a (fake) Consul agent on loopback: what is registered is read from the agent."""

    def __init__(self, mesh: LocalMesh, agent: Any) -> None:
        super().__init__(mesh)
        self.agent = agent

    def registered(self) -> dict[int, str]:
        with self.agent._cond:  # the fake's own lock: its HTTP threads change these maps
            services = list(self.agent.services.values())
            checks = dict(self.agent.checks)
        return {
            int(service.meta.get("pid", "0")): service.meta.get("kind", "")
            for service in services
            if all(checks[c].status == "passing" for c in service.check_ids if c in checks)
        }

    def ready(self) -> bool:
        """Every replica passing in Consul, and the gateway has them: NlpService SERVING at its health."""
        if sum(1 for kind in self.registered().values() if kind == "nlp") < self.mesh.replicas.get("nlp", 0):
            return False
        try:
            with grpc.insecure_channel(self.mesh.gateway) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=NLP_SERVICE), timeout=2
                )
        except grpc.RpcError:
            return False
        return bool(status.status == health_pb2.HealthCheckResponse.SERVING)

    def expected_names(self) -> list[str]:
        return [name for name in super().expected_names() if name != "scheduler"] + ["scheduler"]

    def whole(self) -> bool:
        # The scheduler registers in Consul as the gateway and replicas do.
        return super().whole() and self.ready()


async def drop_consul(mesh: ChaosMesh, timing: Timing) -> str:
    assert isinstance(mesh, ConsulChaosMesh)
    await asyncio.to_thread(mesh.agent.stop)
    await asyncio.sleep(timing.fault_s)
    await asyncio.to_thread(mesh.agent.start)
    back = await mesh.wait_whole(timing.whole_timeout_s)
    return (
        f"the Consul agent (the registry) stopped for {timing.fault_s:.0f}s, its connections cut, then started again "
        f"with its state; every process passing again {back:.1f}s later"
    )


async def run_consul(folder: Path, timing: Timing, base: LoadSpec) -> list[Tally]:
    """`aimass up` (two NLP replicas) with ``registry.backend = consul`` against the fake agent (tests/fake_consul.py,
    checking every process over mesh TLS with its own certificate, as compose/consul/aimass.hcl sets a real one up)."""
    from aimass import pki
    from aimass.bootstrap import ensure_certificates
    from aimass.runtime.config import Settings
    from aimass.runtime.identity import MeshCredentials
    from tests.fake_consul import AgentTls, FakeConsul

    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    state = folder / "state"
    settings = Settings(state_dir=state)
    # The mesh's CA first (`aimass up` keeps it), so the agent can have its certificate before the mesh starts.
    await asyncio.to_thread(ensure_certificates, settings, {"operator": "operator"})
    await asyncio.to_thread(pki.issue, settings.pki_dir, role="consul", name="consul")
    own = MeshCredentials.load(settings.pki_dir, "consul")
    agent = FakeConsul(grpc_checks=True, tls=AgentTls(ca=own.ca, cert=own.cert, key=own.key)).start()
    env = {
        "AIMASS_NLP__TORCH_THREADS": "1",
        "AIMASS_REGISTRY__BACKEND": "consul",
        "AIMASS_REGISTRY__CONSUL__ADDRESS": agent.address,
        "AIMASS_REGISTRY__CONSUL__CHECK_INTERVAL_S": "0.5",
        "AIMASS_REGISTRY__CONSUL__WAIT_S": "5",
    }
    mesh = LocalMesh(folder / "mesh.log", replicas={"nlp": 2}, env=env, state_dir=state)
    chaos = ConsulChaosMesh(mesh, agent)
    try:
        mesh.start()
        await chaos.wait_whole(600)
        spec = LoadSpec(**{**asdict(base), "gateway": mesh.gateway, "api_key": mesh.api_key})

        def start_load() -> LoadHandle:
            return LocalLoad(spec)

        return [await run_scenario("drop-consul", start_load, lambda: drop_consul(chaos, timing), timing)]
    finally:
        await asyncio.to_thread(mesh.stop)
        await asyncio.to_thread(agent.stop)


# -- a partitioned host ----------------------------------------------------------------------------------------------


class RemoteLoad:
    """A Load run by ``python -m loadtest.chaos --load`` in another process (a network namespace's client host):
    it waits for the mesh, starts, stops when told on its stdin, and prints its calls as JSON."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    async def started(self, timeout_s: float) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout_s)
        if line.strip() != b"started":
            raise RuntimeError(f"the load did not start: {line!r} (exit {self.process.poll()})")

    async def finish(self) -> list[Call]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"stop\n")
        self.process.stdin.close()
        out = await asyncio.to_thread(self.process.stdout.read)
        await asyncio.to_thread(self.process.wait, 60)
        return [Call(**call) for call in json.loads(out)]


async def remote_load_main(spec_json: str, scheduler: str, replicas: int) -> None:
    """The far end of RemoteLoad: wait for ``replicas`` NLP replicas serving through the gateway, run the load."""
    from aimass.runtime.config import load_settings
    from aimass.runtime.identity import ROLE_OPERATOR, ROLE_SCHEDULER, MeshCredentials, mesh_channel
    from tests.test_multihost import wait_ready

    spec = LoadSpec(**json.loads(spec_json))
    operator = MeshCredentials.load(load_settings().pki_dir, ROLE_OPERATOR)
    async with (
        keyed_aio_channel(spec.gateway, spec.api_key) as gateway,
        mesh_channel(scheduler, operator, server_role=ROLE_SCHEDULER) as control,
    ):
        await wait_ready(control, gateway, replicas, 180)
    load = Load(spec)
    print("started", flush=True)
    task = asyncio.get_running_loop().create_task(load.run())
    await asyncio.to_thread(sys.stdin.readline)
    load.stop()
    await task
    print(json.dumps([asdict(call) for call in load.calls]), flush=True)


async def partition_host(folder: Path, timing: Timing, base: LoadSpec) -> list[Tally]:
    """The mesh over network namespaces as tests/test_multihost.py builds it (gw: scheduler and gateway; host-a and
    host-b: an NLP replica each; client: the load), host-a's cable pulled for fault_s, then plugged back."""
    from tests.test_multihost import GATEWAY_PORT, SCHEDULER_PORT, Mesh, mesh

    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        return [Tally("partition-host", skipped="network namespaces need root, iproute2 and util-linux")]
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    # The multihost test's fixture, driven by hand: it builds the hosts, starts every process and tears all down.
    fixture = mesh.__wrapped__(folder)  # type: ignore[attr-defined]
    try:
        hosts: Mesh = await asyncio.to_thread(next, fixture)
    except BaseException as err:  # netns.require_netns skips with pytest's exception where namespaces fail
        if type(err).__name__ == "Skipped":
            return [Tally("partition-host", skipped=str(err))]
        raise
    try:
        gw = hosts.hosts["gw"].ip
        key = (folder / "state" / "admin.key").read_text().strip()
        spec = LoadSpec(**{**asdict(base), "gateway": f"{gw}:{GATEWAY_PORT}", "api_key": key})
        argv = ["-m", "loadtest.chaos", "--load", json.dumps(asdict(spec)), "--scheduler", f"{gw}:{SCHEDULER_PORT}"]
        with (folder / "load.log").open("wb") as log:
            process = hosts.hosts.run_in(
                "client",
                [sys.executable, *argv],
                {**os.environ, "AIMASS_STATE_DIR": str(folder / "state")},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(ROOT),
            )
        load = RemoteLoad(process)
        await load.started(240)

        async def fault() -> str:
            hosts.hosts.unplug("host-a")
            try:
                await asyncio.sleep(timing.fault_s)
            finally:
                hosts.hosts.plug("host-a")
            return f"host-a (one of two NLP replicas) cut off the network for {timing.fault_s:.0f}s, then plugged back"

        return [await run_scenario("partition-host", lambda: load, fault, timing)]
    finally:
        # The fixture's teardown: kills what runs in the namespaces and deletes them.
        await asyncio.to_thread(next, fixture, None)


# -- the table -------------------------------------------------------------------------------------------------------


# What the runs found that the table alone does not say (kept by hand: update when a finding is fixed).
FINDINGS = """Findings (2026-12-05; reported to the gateway's and the runtime's owners):

- **sigstop-replica loses the calls in flight on the frozen replica.** The calls that were on nlp-1 when it stopped
  hang until the client's deadline (10.0 s, DEADLINE_EXCEEDED); nothing fails them over, although the gateway pings
  replicas every `gateway.keepalive_s` (2 s, timeout 2 s) and the registry dropped the replica after its TTL (the
  gateway logged "left; closing its channel after in-flight calls finish" and then waited on them). Every later call
  went to nlp-0 at once, so only the calls in flight at the freeze are lost. Cause: grpc 1.85 does not fail a
  transport whose keepalive ping goes unanswered within `grpc.keepalive_timeout_ms` alone; the ping's own timeout is
  `grpc.http2.ping_timeout_ms` (default 60 s), which gateway/app.py `replica_channel_options` does not set. With both
  at 2 s, a call on a SIGSTOPped server fails UNAVAILABLE "Stream removed (ping timeout)" 3.9 s after the freeze
  (without: DEADLINE_EXCEEDED at the call's 12 s deadline), and the forwarder retries such a call elsewhere.
  That one channel option, tried on a copy of the tree, back to back on this machine: sigstop-replica 602 sent /
  602 OK / 0 lost, recovery 3.0 s (without it: 486 / 484 / 2 lost, 10.5 s); tests/test_chaos.py's sigstop test
  (frozen 9 s, 7 s deadlines) xfails on the 2 lost calls without it and passes with it.
- **restart-gateway: calls racing the gateway's stop are CANCELLED** (intermittent: 3 of 178 in one short run, 0 in
  the run above). They reach the gateway after `server.stop(grace)` began (aimass/runtime/server.py, drain) and
  grpc-core cancels them before any handler runs (the gateway's access log has no line for them); CANCELLED is not
  retryable, so the client's retry policy cannot save them. Refusing them UNAVAILABLE during the drain delay (or
  a GOAWAY before the stop) would let clients retry.
- **Replicas answered the gateway's keepalive pings with GOAWAY `too_many_pings`** under load (6 times in 3 minutes
  on a busy 2-core machine, before 6324cb7): each closed the gateway's connection to the replica, so streams already
  answering were cut and gRPC doubled the channel's keepalive time. Fixed in 6324cb7 (mesh listeners take any number
  of pings, `max_ping_strikes` 0).
"""


def chaos_section(results: Sequence[Tally], timing: Timing, spec: LoadSpec) -> str:
    lines = [
        "## Chaos",
        "",
        "Each fault is injected into a running mesh (`aimass up` with two NLP and two LLM replicas; drop-consul and "
        "partition-host run meshes of their own, see loadtest/chaos.py) under steady "
        f"load: {spec.unary_clients} clients, each on its own connection, alternating NLP Embed and Sentiment at "
        f"{spec.rate:g} calls/s (one in flight, {spec.deadline_s:g} s deadline each), plus LLM Chat streams and "
        "wrong-key calls where the scenario says. The clients retry as aimass.client does (gRPC retry policy: "
        "UNAVAILABLE and RESOURCE_EXHAUSTED, 5 tries, server pushback) with `waitForReady` and a 1 s reconnect "
        "backoff cap. *Retryable*: answered UNAVAILABLE or RESOURCE_EXHAUSTED after those retries; *lost*: no answer "
        "by the deadline, any other status, or a stream cut short. *Recovery*: from the fault until the unary OK rate "
        f"stays at {RECOVERED:.0%} of the rate before it (1 s windows). Load ran {timing.warm_s:g} s before the fault, "
        f"faults lasted {timing.fault_s:g} s where they have a length, and load went on {timing.settle_s:g} s after "
        "the mesh was whole again.",
        "",
        f"Regenerate: `{REGENERATE}` (~10 min; `--short` for the versions `make test` runs).",
        "",
        "| scenario | sent | OK | retryable | lost | recovery |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(r.row() for r in results),
        "",
        "What happened in each:",
        "",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.scenario}**: skipped ({r.skipped}).")
            continue
        detail = f"- **{r.scenario}**: {r.notes}."
        if r.retryable_codes:
            detail += f" Retryable: {r.retryable_codes}."
        if r.lost_codes:
            detail += f" Lost: {r.lost_codes}, e.g. {'; '.join(r.samples[:2])}."
        lines.append(detail)
    return "\n".join(lines) + "\n\n" + FINDINGS


def write_section(doc: Path, heading: str, body: str) -> None:
    """Replaces the ``heading`` section (up to the next "## ") of ``doc``, or appends it; other sections stay."""
    text = doc.read_text() if doc.exists() else "# Reliability\n\n"
    start = text.find(f"\n{heading}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + body + ("\n" + text[end + 1 :] if end >= 0 else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


# Scenarios with a mesh of their own: (folder, timing, load) → results.
OWN_MESH: dict[str, Callable[[Path, Timing, LoadSpec], Awaitable[list[Tally]]]] = {
    "drop-consul": run_consul,
    "partition-host": partition_host,
}
ALL = [s.name for s in MAIN_SCENARIOS] + list(OWN_MESH)


async def run(names: Sequence[str], timing: Timing, folder: Path, spec: LoadSpec | None = None) -> list[Tally]:
    """The scenarios of ``names`` in ALL's order; the main mesh's first (one mesh for all of them)."""
    base = spec or LoadSpec("", "")
    results = await run_main(folder / "main", [n for n in names if n in ALL], timing, base)
    for name, runner in OWN_MESH.items():
        if name in names:
            results += await runner(folder / name, timing, base)
    order = {name: i for i, name in enumerate(ALL)}
    return sorted(results, key=lambda r: order.get(r.scenario, len(order)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(ALL)}")
    parser.add_argument("--short", action="store_true", help="the short versions (as in make test)")
    parser.add_argument("--write", type=Path, help="write the Chaos section of this markdown file")
    parser.add_argument("--logs", type=Path, help="keep the meshes' logs in this folder (default: a temporary one)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # a LoadSpec as JSON: be a RemoteLoad's far end
    parser.add_argument("--scheduler", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        asyncio.run(remote_load_main(args.load, args.scheduler, 2))
        return 0
    names = args.scenarios or ALL
    unknown = set(names) - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(ALL)}")
    timing = SHORT if args.short else FULL
    with contextlib.ExitStack() as stack:
        folder = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aimass-chaos-")))
        global CALLS_DIR
        CALLS_DIR = args.logs
        results = asyncio.run(run(names, timing, folder))
    spec = LoadSpec("", "")
    section = chaos_section(results, timing, spec)
    print(section)
    if args.write:
        write_section(args.write, "## Chaos", section)
    return 0 if all(r.lost == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
