"""A small grpc.aio load generator for unary and server-streaming aimass.v1 methods, usable as a library and behind
``loadtest.run``.

The request is given as JSON, parsed once into the method's input message (found through the generated
descriptors of ``aimass.v1``) and serialised once; workers then send those bytes on a raw multicallable (no
serialiser, no response deserialiser), so the generator's own cost per call is grpc's and little more.

A server-streaming call counts as one call from send to the end of its stream (its status is the stream's final
status); every message is read, and the time to its first message is summarised apart (``first_message``).
Client-streaming methods are out of scope: their load depends on how the client paces its messages.

``concurrency`` workers share ``channels`` channels (worker ``i`` uses channel ``i % channels``); each channel has its
own subchannel pool, so N channels are N TCP connections. A run stops after ``total`` requests or ``duration_s``
seconds, whichever comes first, and never later than ``max_duration_s``.

The mesh is secured: calls through the gateway carry an API key (``authorization: Bearer <key>``; ``api_key``, else
found as aimass.client finds it: ``$AIMASS_API_KEY``, else the admin key file of this host's mesh). A run straight to
a replica (to compare with the gateway) speaks mesh mTLS as a gateway does: ``mesh_credentials`` (a gateway
certificate of the mesh's CA, ``gateway_credentials``) and ``server_role``, the replica's kind; it sends no key.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor

from aimass.cli import SERVICE_MODULES
from aimass.client import resolve_api_key
from aimass.runtime import contract
from aimass.runtime.config import load_settings
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, mesh_channel

__all__ = [
    "LatencySummary",
    "LoadResult",
    "LoadSpec",
    "build_request",
    "find_method",
    "gateway_credentials",
    "kind_of",
    "method_names",
    "percentile",
    "run_load",
    "run_load_sync",
]

# No run, whatever it asks for, lasts longer than this.
HARD_MAX_DURATION_S = 3600.0
# Distinct error messages kept in a result (the counts per status code are always complete).
MAX_ERROR_SAMPLES = 5

RawCall = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
RawStreamCall = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
Metadata = tuple[tuple[str, str], ...]


# -- the contract ----------------------------------------------------------------------------------------------------


def method_names() -> list[str]:
    """Every method of the contract as ``package.Service/Method``."""
    return sorted(f"{s.full_name}/{m.name}" for s in contract.services().values() for m in s.methods)


def normalise_method(method: str) -> str:
    """``/aimass.v1.NlpService/Embed`` or ``aimass.v1.NlpService.Embed`` → ``aimass.v1.NlpService/Embed``."""
    name = method.strip().lstrip("/")
    if "/" not in name and name.count(".") >= 2:
        service, _, rpc = name.rpartition(".")
        name = f"{service}/{rpc}"
    return name


def find_method(method: str) -> MethodDescriptor:
    """The descriptor of ``method`` (``aimass.v1.NlpService/Embed``), or ValueError naming what exists."""
    service_name, _, rpc = normalise_method(method).partition("/")
    service = contract.services().get(service_name)
    if service is None:
        raise ValueError(f"unknown service {service_name!r}; aimass.v1 has {', '.join(sorted(contract.services()))}")
    descriptor = service.methods_by_name.get(rpc)
    if descriptor is None:
        names = ", ".join(m.name for m in service.methods)
        raise ValueError(f"{service_name} has no method {rpc!r}; it has {names}")
    return descriptor


def kind_of(method: str) -> str:
    """The service kind (aimass.cli.SERVICE_MODULES) whose replicas serve ``method``: ``aimass.v1.NlpService/Embed``
    → ``nlp``; ValueError for a service no single kind serves (ModelService: every replica)."""
    service = normalise_method(method).partition("/")[0]
    kind = service.removeprefix("aimass.v1.").removesuffix("Service").lower()
    if kind not in SERVICE_MODULES:
        raise ValueError(
            f"{service} is not served by one kind of replica; name the kind ({', '.join(SERVICE_MODULES)})"
        )
    return kind


def gateway_credentials(pki_dir: Path | None = None, identity: str = ROLE_GATEWAY) -> MeshCredentials | None:
    """Credentials to call replicas directly, as a gateway (the only role they serve): ``<identity>.crt/.key`` and
    the CA in ``pki_dir`` (default: this host's mesh's, ``mesh.pki_dir``, or None when its mesh TLS is off)."""
    if pki_dir is not None:
        return MeshCredentials.load(pki_dir, identity)
    settings = load_settings()
    if settings.mesh.tls == "off":
        return None
    return MeshCredentials.load(settings.pki_dir, identity)


def build_request(method: str, request: str | Mapping[str, Any] | None = None) -> bytes:
    """Parse ``request`` (JSON text or a dict, proto3 JSON mapping) into the method's input type; return its bytes."""
    descriptor = find_method(method)
    if descriptor.client_streaming:
        raise ValueError(
            f"{normalise_method(method)} is a client-streaming method; the generator drives unary and"
            " server-streaming methods only"
        )
    message = message_factory.GetMessageClass(descriptor.input_type)()
    try:
        if request is None or isinstance(request, str):
            json_format.Parse(request or "{}", message)
        else:
            json_format.ParseDict(dict(request), message)
    except json_format.ParseError as err:
        raise ValueError(f"request is not a valid {descriptor.input_type.full_name}: {err}") from err
    return message.SerializeToString()


# -- spec and result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how hard and for how long."""

    target: str
    method: str
    request: str | Mapping[str, Any] = "{}"
    concurrency: int = 1
    total: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    deadline_s: float = 10.0
    channels: int = 1
    metadata: Metadata = ()
    # The gateway's API key: None finds it as aimass.client does ($AIMASS_API_KEY, else the admin key file of this
    # host's mesh); "" sends none. Not sent on direct runs (``mesh_credentials``): replicas trust the gateway.
    api_key: str | None = None
    # A direct run, straight to a replica: mesh mTLS with these credentials (a gateway's certificate), expecting the
    # server to hold ``server_role`` (the replica's kind). None: plaintext, as to a gateway's front door.
    mesh_credentials: MeshCredentials | None = None
    server_role: str = ""
    connect_timeout_s: float = 10.0
    # A line per second on stderr while measuring (short runs print none).
    progress: bool = True
    # Safety bound for total-only runs: they stop here even if requests remain.
    max_duration_s: float = 600.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.channels < 1:
            problems.append(f"channels must be >= 1, got {self.channels}")
        if self.total is None and self.duration_s is None:
            problems.append("give total (requests) or duration_s (seconds), or both")
        if self.total is not None and self.total < 1:
            problems.append(f"total must be >= 1, got {self.total}")
        if self.duration_s is not None and not 0 < self.duration_s <= self.max_duration_s:
            problems.append(f"duration_s must be in (0, {self.max_duration_s:g}], got {self.duration_s}")
        if not 0 < self.max_duration_s <= HARD_MAX_DURATION_S:
            problems.append(f"max_duration_s must be in (0, {HARD_MAX_DURATION_S:g}], got {self.max_duration_s}")
        if self.warmup < 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        if self.deadline_s <= 0:
            problems.append(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.connect_timeout_s <= 0:
            problems.append(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.mesh_credentials is not None and not self.server_role:
            problems.append("mesh_credentials need server_role: the role (kind) the replica's certificate holds")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def time_limit_s(self) -> float:
        return self.duration_s if self.duration_s is not None else self.max_duration_s

    def call_metadata(self) -> Metadata:
        """``metadata``, with the API key unless this is a direct run, the key is "" or the metadata has one."""
        if self.mesh_credentials is not None or any(key in _KEY_HEADERS for key, _ in self.metadata):
            return self.metadata
        key = resolve_api_key(self.api_key) if self.api_key != "" else None
        return (*self.metadata, ("authorization", f"Bearer {key}")) if key else self.metadata

    def open_channel(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to ``target``: mesh mTLS for a direct run, else plaintext."""
        if self.mesh_credentials is not None:
            return mesh_channel(self.target, self.mesh_credentials, server_role=self.server_role, options=options)
        return grpc.aio.insecure_channel(self.target, options=list(options))


# Headers that carry an API key (gateway/auth.py): one given in ``metadata`` is sent as it is.
_KEY_HEADERS = frozenset({"authorization", "x-api-key"})


@dataclass(frozen=True)
class LatencySummary:
    """Latency of every completed call (whatever its status), in milliseconds."""

    min_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        if not seconds:
            nan = math.nan
            return cls(nan, nan, nan, nan, nan, nan)
        ordered = sorted(seconds)
        return cls(
            min_ms=ordered[0] * 1000,
            mean_ms=sum(ordered) / len(ordered) * 1000,
            p50_ms=percentile(ordered, 50) * 1000,
            p95_ms=percentile(ordered, 95) * 1000,
            p99_ms=percentile(ordered, 99) * 1000,
            max_ms=ordered[-1] * 1000,
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence (p100 is the maximum)."""
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {pct}")
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class LoadResult:
    target: str
    method: str
    concurrency: int
    channels: int
    requests: int
    elapsed_s: float
    rps: float
    latency: LatencySummary
    # Status code name (OK, UNAVAILABLE, ...) → calls that ended with it.
    status_counts: dict[str, int]
    # Up to MAX_ERROR_SAMPLES distinct "CODE: details" strings.
    error_samples: tuple[str, ...] = field(default=())
    # Server-streaming methods: response messages received in all, and the time from send to the first message
    # of each stream that ended OK (None for unary methods).
    streaming: bool = False
    messages: int = 0
    first_message: LatencySummary | None = None

    @property
    def ok(self) -> int:
        return self.status_counts.get("OK", 0)

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def ok_rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["errors"] = self.errors
        return data

    def format(self) -> str:
        lat = self.latency
        statuses = "  ".join(f"{code} {count}" for code, count in sorted(self.status_counts.items()))
        lines = [
            f"target {self.target}  method {self.method}  concurrency {self.concurrency}  channels {self.channels}",
            f"requests {self.requests} in {self.elapsed_s:.2f} s: {self.rps:,.1f} RPS",
            f"latency ms: p50 {lat.p50_ms:.2f}  p95 {lat.p95_ms:.2f}  p99 {lat.p99_ms:.2f}  max {lat.max_ms:.2f}"
            f"  (min {lat.min_ms:.2f}, mean {lat.mean_ms:.2f})",
            f"status: {statuses or '-'}",
        ]
        if self.first_message is not None:
            first = self.first_message
            lines.insert(
                3,
                f"first message ms: p50 {first.p50_ms:.2f}  p95 {first.p95_ms:.2f}  p99 {first.p99_ms:.2f}"
                f"  ({self.messages} messages, {self.messages / max(self.requests, 1):.1f} per stream)",
            )
        lines.extend(f"  error: {sample}" for sample in self.error_samples)
        return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------------------------


class _Run:
    """Shared state of one phase (warm-up or measurement): the request budget and what came back."""

    def __init__(self, total: int | None, time_limit_s: float) -> None:
        self.total = total
        self.stop_at = time.perf_counter() + time_limit_s
        self.issued = 0
        self.ok = 0
        self.latencies: list[float] = []
        # Server streams: time to the first message of each stream that ended OK, and messages received.
        self.firsts: list[float] = []
        self.messages = 0
        self.failures: Counter[str] = Counter()
        self.samples: dict[str, None] = {}

    def claim(self) -> bool:
        if self.total is not None and self.issued >= self.total:
            return False
        if time.perf_counter() >= self.stop_at:
            return False
        self.issued += 1
        return True

    def failed(self, err: grpc.aio.AioRpcError) -> None:
        """Counts a call that ended with a status other than OK, keeping a few messages as samples."""
        code = err.code().name
        self.failures[code] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples[f"{code}: {err.details()}"] = None

    @property
    def completed(self) -> int:
        return len(self.latencies)


async def _worker(call: RawCall, payload: bytes, deadline_s: float, metadata: Metadata | None, run: _Run) -> None:
    latencies = run.latencies
    clock = time.perf_counter
    while run.claim():
        started = clock()
        try:
            await call(payload, timeout=deadline_s, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            latencies.append(clock() - started)
            run.failed(err)
        else:
            latencies.append(clock() - started)
            run.ok += 1


async def _stream_worker(
    call: RawStreamCall, payload: bytes, deadline_s: float, metadata: Metadata | None, run: _Run
) -> None:
    latencies = run.latencies
    clock = time.perf_counter
    while run.claim():
        started = clock()
        first: float | None = None
        count = 0
        try:
            async for _ in call(payload, timeout=deadline_s, metadata=metadata):
                if first is None:
                    first = clock() - started
                count += 1
        except grpc.aio.AioRpcError as err:
            latencies.append(clock() - started)
            run.failed(err)
        else:
            latencies.append(clock() - started)
            run.ok += 1
            if first is not None:
                run.firsts.append(first)
        run.messages += count


async def _report_progress(run: _Run, started: float, out: TextIO) -> None:
    last_done, last_time = 0, started
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        done = run.completed
        rate = (done - last_done) / (now - last_time) if now > last_time else 0.0
        errors = sum(run.failures.values())
        print(f"[loadtest] {now - started:6.1f}s  {done:>8} done  {rate:9,.0f} RPS  {errors} errors", file=out)
        out.flush()
        last_done, last_time = done, now


# One worker's loop over a phase's request budget (``_worker`` or ``_stream_worker`` bound to a channel's call).
WorkerLoop = Callable[[_Run], Coroutine[Any, Any, None]]


async def _phase(workers: Sequence[WorkerLoop], run: _Run, *, progress: bool) -> float:
    """Drive one phase to its end with every worker; returns its wall time in seconds."""
    started = time.perf_counter()
    reporter = asyncio.ensure_future(_report_progress(run, started, sys.stderr)) if progress else None
    try:
        await asyncio.gather(*(worker(run) for worker in workers))
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
    return time.perf_counter() - started


def _worker_loops(
    channels: Sequence[grpc.aio.Channel], method: str, payload: bytes, spec: LoadSpec, *, streaming: bool
) -> list[WorkerLoop]:
    """``spec.concurrency`` workers; worker ``i`` uses channel ``i % len(channels)``."""
    metadata = spec.call_metadata() or None
    per_channel: list[WorkerLoop] = []
    for channel in channels:
        # No serialiser and no deserialiser: bytes go out as given and replies stay bytes.
        if streaming:
            stream_call: RawStreamCall = channel.unary_stream(f"/{method}")
            per_channel.append(functools.partial(_stream_worker, stream_call, payload, spec.deadline_s, metadata))
        else:
            call: RawCall = channel.unary_unary(f"/{method}")
            per_channel.append(functools.partial(_worker, call, payload, spec.deadline_s, metadata))
    return [per_channel[index % len(per_channel)] for index in range(spec.concurrency)]


async def run_load(spec: LoadSpec) -> LoadResult:
    """Connect, warm up, measure; the channels are closed when this returns."""
    payload = build_request(spec.method, spec.request)
    method = normalise_method(spec.method)
    streaming = find_method(method).server_streaming
    # A local subchannel pool per channel: N channels are N connections, not N handles on one shared connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [spec.open_channel(options) for _ in range(spec.channels)]
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in channels)), spec.connect_timeout_s
            )
        except TimeoutError:
            raise ConnectionError(f"cannot connect to {spec.target} within {spec.connect_timeout_s:g}s") from None
        workers = _worker_loops(channels, method, payload, spec, streaming=streaming)
        if spec.warmup:
            await _phase(workers, _Run(spec.warmup, spec.max_duration_s), progress=False)
        run = _Run(spec.total, spec.time_limit_s)
        elapsed = await _phase(workers, run, progress=spec.progress)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
    counts = {"OK": run.ok} if run.ok else {}
    counts.update(run.failures)
    return LoadResult(
        target=spec.target,
        method=method,
        concurrency=spec.concurrency,
        channels=spec.channels,
        requests=run.completed,
        elapsed_s=elapsed,
        rps=run.completed / elapsed if elapsed > 0 else 0.0,
        latency=LatencySummary.of(run.latencies),
        status_counts=counts,
        error_samples=tuple(run.samples),
        streaming=streaming,
        messages=run.messages,
        first_message=LatencySummary.of(run.firsts) if streaming else None,
    )


def run_load_sync(spec: LoadSpec) -> LoadResult:
    """``run_load`` on a fresh event loop, for callers that have none running."""
    return asyncio.run(run_load(spec))


def result_json(result: LoadResult) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True)
