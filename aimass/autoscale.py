"""Elastic on one host: `aimass up --autoscale` grows and shrinks each service's replica processes between a minimum
and a maximum, from the same signal the Kubernetes HPAs scale on (deploy/kubernetes/autoscaling).

The signal is the scheduler's routing view (SchedulerService.WatchView, read as the operator, as gateways read it):
for each replica, the calls in flight (admitted and not finished, queued in its batcher included) summed over its
models, which replicas report every ``scheduler.report_interval_s`` and also export as ``aimass_inflight_requests``.
A view replica is matched to the process that runs it by the pid that ends its instance id.

The policy (``ScalePolicy``: no I/O, so tests drive it with their own clock) per service:

- **up**: while the mean in flight per serving replica stays above ``target_in_flight`` for ``scale_up_after_s``,
  one more replica (at most ``max_replicas``). Nothing more is added while one is still starting (loading its
  models, not yet SERVING in the view): its cold start is waited out and then counted in the mean, so one burst does
  not start every replica at once.
- **down**: while everything in flight would fit in one replica fewer at ``scale_down_below`` of the target (the
  hysteresis band: between it and the target nothing changes), for ``scale_down_after_s``, the newest replica goes
  (at least ``min_replicas``).

Removing a replica loses no request: it is stopped as the supervisor stops any child, with SIGTERM, and a replica
drains on SIGTERM (aimass.runtime.server): NOT_SERVING and deregistered first, so the view drops it and gateways stop
routing to it; a call that still reaches it in ``drain_delay_s`` is refused UNAVAILABLE, which the gateway retries on
another replica; calls it admitted finish within ``drain_grace_s``.

What it does is written to ``state_dir/autoscale.json`` on every change (replicas per service, starting ones,
limits, the signal, the last cold start: seconds from spawn to SERVING), which `aimass status` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from aimass.bootstrap import ensure_certificates
from aimass.runtime.config import AutoscaleConfig, Settings
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.tasks import cancel_and_wait
from aimass.supervisor import ProcessSpec, Supervised, Supervisor
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("aimass.autoscale")

STATUS_FILE = "autoscale.json"
IDENTITY_ENV = "AIMASS_MESH__IDENTITY"
# How often the view may be pushed to us: the decisions need no finer grain than the replicas' reports.
VIEW_INTERVAL_MS = 250


@dataclass(frozen=True)
class ScaleLimits:
    min_replicas: int
    max_replicas: int
    target_in_flight: float


def limits_for(config: AutoscaleConfig, kind: str, started: int) -> ScaleLimits:
    """A service's bounds: its own (autoscale.services.<kind>), else the replicas `aimass up` started as the floor
    and autoscale.max_replicas as the ceiling (never under the floor)."""
    own = config.services.get(kind)
    low = (own.min_replicas if own is not None and own.min_replicas else 0) or max(started, 1)
    high = (own.max_replicas if own is not None and own.max_replicas else 0) or config.max_replicas
    target = (own.target_in_flight if own is not None and own.target_in_flight else 0) or config.target_in_flight
    return ScaleLimits(low, max(low, high), target)


class ScalePolicy:
    """When one service needs a replica more or one fewer; see the module docstring. ``decide`` is called on every
    tick with the time, the load of each serving replica and the number still starting."""

    def __init__(
        self, limits: ScaleLimits, *, scale_up_after_s: float, scale_down_after_s: float, scale_down_below: float
    ) -> None:
        if not 1 <= limits.min_replicas <= limits.max_replicas:
            raise ValueError(
                f"need 1 <= min_replicas <= max_replicas, not {limits.min_replicas}..{limits.max_replicas}"
            )
        self.limits = limits
        self.scale_up_after_s = scale_up_after_s
        self.scale_down_after_s = scale_down_after_s
        self.scale_down_below = scale_down_below
        self._above_since: float | None = None
        self._below_since: float | None = None

    def decide(self, now: float, serving_loads: Sequence[float], starting: int) -> int:
        """+1 to add a replica, -1 to remove one, 0 to leave it."""
        count = len(serving_loads) + starting
        if count < self.limits.min_replicas:
            self._above_since = self._below_since = None
            return 1
        if starting:
            # A cold start under way: wait for it to serve before judging the load again.
            self._above_since = self._below_since = None
            return 0
        total = sum(serving_loads)
        mean = total / len(serving_loads) if serving_loads else 0.0
        if mean > self.limits.target_in_flight and count < self.limits.max_replicas:
            self._below_since = None
            self._above_since = now if self._above_since is None else self._above_since
            if now - self._above_since >= self.scale_up_after_s:
                self._above_since = None
                return 1
            return 0
        self._above_since = None
        fits_in_fewer = total <= self.limits.target_in_flight * self.scale_down_below * (count - 1)
        if count > self.limits.min_replicas and fits_in_fewer:
            self._below_since = now if self._below_since is None else self._below_since
            if now - self._below_since >= self.scale_down_after_s:
                self._below_since = None
                return -1
            return 0
        self._below_since = None
        return 0


def replica_load(replica: scheduler_pb2.ReplicaView) -> float:
    """Calls in flight on one replica: admitted and not finished, queued included, over all its models."""
    return float(sum(model.in_flight for model in replica.models))


def pid_of(instance_id: str) -> int | None:
    """The process id that ends a replica's instance id (``<kind>-<address>-<pid>``, aimass.runtime.server)."""
    tail = instance_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass
class ServiceStatus:
    """One service's line in autoscale.json (and `aimass status`)."""

    kind: str
    min_replicas: int
    max_replicas: int
    target_in_flight: float
    replicas: int = 0
    serving: int = 0
    starting: int = 0
    in_flight_per_replica: float = 0.0
    cold_starts: int = 0
    last_cold_start_s: float | None = None
    last_event: str = ""


@dataclass
class _Replica:
    child: Supervised
    spawned: float
    # Set when the view first shows it SERVING; replicas there before the autoscaler start with it set.
    serving_since: float | None = None


@dataclass
class _Service:
    policy: ScalePolicy
    status: ServiceStatus
    replicas: list[_Replica] = field(default_factory=list)


class Autoscaler:
    """Scales the replica processes of ``supervisor`` (those of the kinds in ``initial``) from the scheduler's view.

    ``make_spec(kind, index)`` gives the ProcessSpec of replica ``<kind>-<index>`` (a free port, its own identity);
    ``prepare(spec)`` readies what it needs before it starts (its certificate), off the event loop.
    """

    def __init__(
        self,
        config: AutoscaleConfig,
        *,
        supervisor: Supervisor,
        initial: Mapping[str, Sequence[Supervised]],
        make_spec: Callable[[str, int], ProcessSpec],
        prepare: Callable[[ProcessSpec], None],
        scheduler: str,
        credentials: MeshCredentials | None,
        status_path: Path,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.make_spec = make_spec
        self.prepare = prepare
        self.scheduler = scheduler
        self.credentials = credentials
        self.status_path = status_path
        self.services: dict[str, _Service] = {}
        now = time.monotonic()
        for kind, children in initial.items():
            limits = limits_for(config, kind, len(children))
            policy = ScalePolicy(
                limits,
                scale_up_after_s=config.scale_up_after_s,
                scale_down_after_s=config.scale_down_after_s,
                scale_down_below=config.scale_down_below,
            )
            status = ServiceStatus(kind, limits.min_replicas, limits.max_replicas, limits.target_in_flight)
            self.services[kind] = _Service(policy, status, [_Replica(child, now, now) for child in children])
        self._view: scheduler_pb2.RoutingView | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Removals under way (each replica drains); `aimass up`'s own stop reaches any it cuts short.
        self._draining: set[asyncio.Task[None]] = set()
        self._draining_names: set[str] = set()
        self._written = ""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="autoscale-watch"),
            loop.create_task(self._run(), name="autoscale-run"),
        ]

    async def stop(self) -> None:
        """Stops deciding; a replica still draining is left to the supervisor's own stop, which follows."""
        for task in [*self._tasks, *self._draining]:
            await cancel_and_wait(task)
        self.status_path.unlink(missing_ok=True)

    async def _watch(self) -> None:
        """Keeps the latest routing view, reconnecting (with backoff) when the scheduler is away."""
        backoff = 0.5
        while True:
            try:
                async with mesh_channel(self.scheduler, self.credentials, server_role=ROLE_SCHEDULER) as channel:
                    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                    request = scheduler_pb2.WatchViewRequest(
                        subscriber_id="autoscaler", min_interval_ms=VIEW_INTERVAL_MS
                    )
                    async for response in stub.WatchView(request):
                        self._view = response.view
                        backoff = 0.5
            except grpc.aio.AioRpcError as err:
                log.debug("routing view unavailable (%s); retrying in %.1fs", err.code().name, backoff)
            self._view = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            if self._view is not None:
                await self.tick(self._view, time.monotonic())

    async def tick(self, view: scheduler_pb2.RoutingView, now: float) -> None:
        """One decision per service from ``view``: add a replica, remove one, or neither."""
        by_pid = {pid_of(replica.instance_id): replica for replica in view.replicas}
        for kind, service in self.services.items():
            loads: list[float] = []
            starting = 0
            for replica in service.replicas:
                # By the child's current pid: one the supervisor restarted is starting again until it serves.
                seen = by_pid.get(replica.child.pid)
                if seen is not None and seen.state == common_pb2.SERVING_STATE_SERVING:
                    if replica.serving_since is None:
                        replica.serving_since = now
                        self._cold_start(service, now - replica.spawned)
                    loads.append(replica_load(seen))
                else:
                    starting += 1
            status = service.status
            status.replicas, status.serving, status.starting = len(service.replicas), len(loads), starting
            status.in_flight_per_replica = round(sum(loads) / len(loads), 2) if loads else 0.0
            step = service.policy.decide(now, loads, starting)
            if step > 0:
                await self._add(kind, service, loads)
            elif step < 0:
                self._remove(kind, service, loads)
        self._write_status()

    def _cold_start(self, service: _Service, seconds: float) -> None:
        service.status.cold_starts += 1
        service.status.last_cold_start_s = round(seconds, 2)
        log.info("%s: a replica serves %.1fs after it was started (cold start)", service.status.kind, seconds)

    async def _add(self, kind: str, service: _Service, loads: Sequence[float]) -> None:
        # The lowest free index: a replica added again after one was removed reuses its name (and certificate).
        taken = {replica.child.spec.name for replica in service.replicas} | self._draining_names
        index = next(i for i in range(len(taken) + 1) if f"{kind}-{i}" not in taken)
        spec = self.make_spec(kind, index)
        await asyncio.to_thread(self.prepare, spec)
        child = self.supervisor.add(spec)
        service.replicas.append(_Replica(child, time.monotonic()))
        service.status.last_event = (
            f"added {spec.name}: {sum(loads) / max(len(loads), 1):.1f} in flight per replica > "
            f"{service.policy.limits.target_in_flight:g}"
        )
        log.info("%s: %s", kind, service.status.last_event)
        self._write_status()

    def _remove(self, kind: str, service: _Service, loads: Sequence[float]) -> None:
        """Stops the newest replica in the background: it drains for up to drain_grace_s, and the other services'
        decisions must not wait for it."""
        replica = service.replicas.pop()
        name = replica.child.spec.name
        service.status.last_event = f"removing {name}: {sum(loads):.1f} in flight fits in {len(service.replicas)}"
        log.info("%s: %s (it drains first)", kind, service.status.last_event)

        async def drain() -> None:
            try:
                await self.supervisor.remove(replica.child)
            finally:
                self._draining_names.discard(name)
            service.status.last_event = f"removed {name} (drained)"
            log.info("%s: %s", kind, service.status.last_event)
            self._write_status()

        self._draining_names.add(name)
        task = asyncio.get_running_loop().create_task(drain(), name=f"autoscale-remove-{name}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "services": [asdict(service.status) for service in self.services.values()]}

    def _write_status(self) -> None:
        text = json.dumps(self.snapshot(), indent=1)
        if text == self._written:
            return
        tmp = self.status_path.with_name(f".{self.status_path.name}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(text)
            tmp.replace(self.status_path)
            self._written = text


def unknown_kinds(config: AutoscaleConfig, kinds: Iterable[str]) -> list[str]:
    """Kinds autoscale.services names that are no service `aimass up` runs."""
    return sorted(set(config.services) - set(kinds))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def for_mesh(
    settings: Settings,
    *,
    supervisor: Supervisor,
    kinds: Iterable[str],
    scheduler: str,
    credentials: MeshCredentials | None,
) -> Autoscaler:
    """The autoscaler of an `aimass up`: every service of ``kinds`` it started replicas of (``<kind>-<n>``), new
    replicas made like its first one on a port of their own (the registry tells the gateway which), with their own
    metrics port when it has one, and their own certificate."""
    initial = {
        kind: [child for child in supervisor.children if re.fullmatch(rf"{re.escape(kind)}-\d+", child.spec.name)]
        for kind in kinds
    }
    initial = {kind: children for kind, children in initial.items() if children}
    templates = {kind: children[0].spec for kind, children in initial.items()}

    def make_spec(kind: str, index: int) -> ProcessSpec:
        name = f"{kind}-{index}"
        env = dict(templates[kind].env)
        for key, value in env.items():
            if key.endswith("__SERVER__PORT"):
                env[key] = "0"
            elif key.endswith("METRICS_PORT") and value != "0":
                env[key] = str(_free_port())
        env[IDENTITY_ENV] = name
        return ProcessSpec(name, templates[kind].module, env)

    def prepare(spec: ProcessSpec) -> None:
        ensure_certificates(settings, {spec.name: spec.name.rsplit("-", 1)[0]})

    return Autoscaler(
        settings.autoscale,
        supervisor=supervisor,
        initial=initial,
        make_spec=make_spec,
        prepare=prepare,
        scheduler=scheduler,
        credentials=credentials,
        status_path=settings.state_dir / STATUS_FILE,
    )


def read_status(state_dir: Path) -> list[ServiceStatus] | None:
    """What the autoscaler of a running `aimass up` last wrote; None when none runs."""
    path = state_dir / STATUS_FILE
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)  # a file left by an `aimass up` that died says nothing of now
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [ServiceStatus(**entry) for entry in data["services"]]


def format_status(services: Sequence[ServiceStatus]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        ("KIND", "REPLICAS", "STARTING", "MIN..MAX", "IN FLIGHT/REPLICA", "TARGET", "COLD STARTS", "LAST", "EVENT")
    ]
    for s in services:
        last = f"{s.last_cold_start_s:.1f}s" if s.last_cold_start_s is not None else "-"
        rows.append(
            (
                s.kind,
                str(s.replicas),
                str(s.starting),
                f"{s.min_replicas}..{s.max_replicas}",
                f"{s.in_flight_per_replica:g}",
                f"{s.target_in_flight:g}",
                str(s.cold_starts),
                last,
                s.last_event or "-",
            )
        )
    return rows
