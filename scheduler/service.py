"""aimass.v1.SchedulerService: the mesh's routing view and placement table.

Node agents report device readings, replicas report their load, the registry says which replicas exist and where
they listen. The scheduler joins them into one ``RoutingView`` with a version that increases on every change, and
pushes it to every gateway that watches (at most one view per subscriber interval). Reports arrive every interval
whether or not anything changed; only those that change what the view says make a new version (``load_changed``,
``readings_changed``: an idle mesh's reports are the same every second, and the CPU's readings jitter), so an idle
mesh pushes no views at all.
Placement decisions go through ``PlacementTable`` against the latest readings. Nothing here is on a request's path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
import prometheus_client

from aimass.runtime.discovery import CONTROL_PLANE_KINDS, InMemoryRegistry, Instance
from aimass.runtime.errors import AimassError, FailedPrecondition, InvalidArgument, ResourceExhausted
from aimass.runtime.identity import MeshIdentity, check_owner, peer_identity
from aimass.runtime.load_report import KEEPALIVE_INTERVALS, load_changed
from aimass.store.records import now_ms
from aimass.tenancy.fair_share import TOKEN_WEIGHTS, TokenWeights
from aimass.tenancy.quotas import TokenUsage
from aimass.v1 import common_pb2, models_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.placement import Device, ModalityValue, PlacementTable

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_VIEW_INTERVAL_MS = 100

PLACEMENTS = prometheus_client.Counter(
    "aimass_scheduler_placements_total",
    "PlaceModel decisions by outcome (placed, already_placed, or the refusal's reason, e.g. insufficient_memory).",
    ["outcome"],
)
EVICTIONS = prometheus_client.Counter(
    "aimass_scheduler_evictions_total", "Placements removed, by why (lru to make room, admin, ...).", ["reason"]
)
REPORTS = prometheus_client.Counter("aimass_scheduler_reports_total", "Reports received, by kind.", ["kind"])
VIEW_VERSION = prometheus_client.Gauge("aimass_scheduler_view_version", "Version of the routing view.")
WATCHERS = prometheus_client.Gauge("aimass_scheduler_view_watchers", "Gateways watching the routing view.")
VIEWS_SENT = prometheus_client.Counter("aimass_scheduler_views_sent_total", "Routing views pushed to watchers.")


# A node's readings change the view when a device's utilisation moved this many percentage points, or its used
# memory this fraction of the total, since the readings the view holds: the CPU's readings jitter every second.
UTILIZATION_STEP_PERCENT = 5.0
MEMORY_STEP_FRACTION = 0.01
TEMPERATURE_STEP_CELSIUS = 5.0
POWER_STEP_WATTS = 25.0


def readings_changed(before: Iterable[scheduler_pb2.NodeDevice], after: Iterable[scheduler_pb2.NodeDevice]) -> bool:
    """Whether ``after`` differs from ``before`` enough to tell the gateways: other devices or processes, another
    device description, or a reading moved by a step (above). Small drifts accumulate until they make a step."""
    old, new = list(before), list(after)
    if [d.device_id for d in old] != [d.device_id for d in new]:
        return True
    for was, now in zip(old, new, strict=True):
        if list(was.processes) != list(now.processes):
            return True
        a, b = was.info, now.info
        if abs(a.utilization_percent - b.utilization_percent) >= UTILIZATION_STEP_PERCENT:
            return True
        total = max(a.memory_total_bytes, b.memory_total_bytes, 1)
        if abs(a.memory_used_bytes - b.memory_used_bytes) / total >= MEMORY_STEP_FRACTION:
            return True
        if abs(a.temperature_celsius - b.temperature_celsius) >= TEMPERATURE_STEP_CELSIUS:
            return True
        if abs(a.power_watts - b.power_watts) >= POWER_STEP_WATTS:
            return True
        described = (a.kind, a.index, a.name, a.uuid, a.memory_total_bytes, a.compute_tflops)
        if described != (b.kind, b.index, b.name, b.uuid, b.memory_total_bytes, b.compute_tflops):
            return True
    return False


class SchedulerState:
    def __init__(
        self,
        *,
        report_interval_s: float,
        silent_intervals: int = 3,
        tenant_weights: Mapping[str, float] | None = None,
        token_weights: TokenWeights = TOKEN_WEIGHTS,
        model_budgets: Mapping[ModalityValue, int] | None = None,
        max_tenants: int = 10_000,
        tenant_idle_expiry_s: float = 600.0,
    ) -> None:
        self.report_interval_ms = max(1, int(report_interval_s * 1000))
        # Modality → the most bytes its placements may take together on one device (scheduler.model_budgets).
        self.model_budgets = dict(model_budgets or {})
        self.silence_ms = silent_intervals * self.report_interval_ms
        self.keepalive_ms = KEEPALIVE_INTERVALS * self.report_interval_ms
        self.tenant_weights = dict(tenant_weights or {})
        self.token_weights = token_weights
        self.table = PlacementTable()
        self.nodes: dict[str, scheduler_pb2.NodeView] = {}
        # Node id → its readings when they last changed the view: drifts are measured from there (readings_changed).
        self._node_basis: dict[str, list[scheduler_pb2.NodeDevice]] = {}
        self.loads: dict[str, scheduler_pb2.ReportLoadRequest] = {}
        self.load_received_ms: dict[str, int] = {}
        self.instances: dict[str, Instance] = {}
        # Tenant → its usage in the view; bounded (max_tenants, least recently reported first) and expired when idle,
        # so made-up tenant names cannot grow the view. Insertion order is recency order (moved to the end on use).
        self.tenants: dict[str, scheduler_pb2.TenantUsage] = {}
        self.tenant_seen_ms: dict[str, int] = {}
        # LLM tokens per tenant, trailing minute and today (UTC): the gateways' token quotas read them in the view.
        self.llm_usage = TokenUsage(max_tracked=max_tenants)
        self.max_tenants = max_tenants
        self.tenant_idle_ms = int(tenant_idle_expiry_s * 1000)
        # Instance id / node id → the mesh identity that first reported as it (with mesh TLS on): nobody reports
        # for another's id. Let go when the reports expire.
        self.instance_reporters: dict[str, str] = {}
        self.node_reporters: dict[str, str] = {}
        self.version = 0
        # Set when the server drains: watch streams end so the drain does not wait for them.
        self.closing = False
        self._changed = asyncio.Condition()
        self._view_cache: scheduler_pb2.RoutingView | None = None
        # Custom heads placed for deployments, (name, version) as in the table: held while deployed, never evicted.
        self.heads: set[tuple[str, str]] = set()

    def _bump(self) -> None:
        self.version += 1
        self._view_cache = None

    async def changed(self) -> None:
        self._bump()
        async with self._changed:
            self._changed.notify_all()

    async def wait_newer(self, version: int) -> bool:
        """Waits for a view newer than ``version``; False when the scheduler is closing instead."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > version or self.closing)
        return not self.closing

    async def close_watches(self) -> None:
        self.closing = True
        async with self._changed:
            self._changed.notify_all()

    # -- inputs --------------------------------------------------------------------------------------------------

    def record_node(self, report: scheduler_pb2.ReportNodeRequest) -> bool:
        """Records a node's readings; whether they changed the view (``readings_changed``)."""
        if not report.node_id:
            raise InvalidArgument("node_id is empty; a node agent names its node", reason="NO_NODE_ID")
        before = self.nodes.get(report.node_id)
        changed = (
            before is None
            or before.host != report.host
            or before.source != report.source
            or readings_changed(self._node_basis.get(report.node_id, ()), report.devices)
        )
        if changed:
            self._node_basis[report.node_id] = list(report.devices)
        self.nodes[report.node_id] = scheduler_pb2.NodeView(
            node_id=report.node_id,
            host=report.host,
            source=report.source,
            devices=report.devices,
            last_report_unix_ms=now_ms(),
        )
        return changed

    def record_load(self, report: scheduler_pb2.ReportLoadRequest) -> bool:
        """Records a replica's load; whether it changed the view (``load_changed``)."""
        if not report.instance_id:
            raise InvalidArgument("instance_id is empty; a replica reports as itself", reason="NO_INSTANCE_ID")
        before = self.loads.get(report.instance_id)
        changed = before is None or load_changed(before, report)
        self.loads[report.instance_id] = report
        self.load_received_ms[report.instance_id] = now_ms()
        for work in report.tenant_tokens:
            self._account(work)
        devices = {device.device_id: device for device in self.devices()}
        received = now_ms()
        for load in report.models:
            device = devices.get(load.device_id)
            if device is None:
                # The node agent has not reported this device yet; the next report places it.
                continue
            if load.loaded:
                self.table.observe_loaded(
                    load.model,
                    device,
                    report.instance_id,
                    load.memory_bytes,
                    received,
                    load.last_used_unix_ms,
                    load.modality,
                )
            else:
                self.table.observe_unloaded(load.model, load.device_id, report.instance_id)
        return changed

    def _account(self, work: scheduler_pb2.TenantTokens) -> None:
        tenant = work.tenant_id or "anonymous"
        usage = self.tenants.pop(tenant, None)
        if usage is None:
            usage = scheduler_pb2.TenantUsage(tenant_id=tenant, weight=self.tenant_weights.get(tenant, 1.0))
            while len(self.tenants) >= self.max_tenants:
                oldest = next(iter(self.tenants))
                del self.tenants[oldest]
                del self.tenant_seen_ms[oldest]
        self.tenants[tenant] = usage
        self.tenant_seen_ms[tenant] = now_ms()
        # Its weight as it is now (the store's may have changed): later service counts at the new weight.
        usage.weight = self.tenant_weights.get(tenant, 1.0)
        usage.requests += work.requests
        usage.prompt_tokens += work.prompt_tokens
        usage.completion_tokens += work.completion_tokens
        self.llm_usage.add(tenant, work.prompt_tokens + work.completion_tokens)
        usage.virtual_tokens += self.token_weights.cost(work.prompt_tokens, work.completion_tokens) / usage.weight

    def set_instances(self, instances: list[Instance]) -> None:
        self.instances = {i.instance_id: i for i in instances if i.kind not in CONTROL_PLANE_KINDS}

    def expire(self, now: int | None = None) -> list[str]:
        """Drops nodes and load reports silent for too long; returns what went, for the log."""
        now = now_ms() if now is None else now
        gone: list[str] = []
        for node_id, node in list(self.nodes.items()):
            if now - node.last_report_unix_ms > self.silence_ms:
                del self.nodes[node_id]
                self._node_basis.pop(node_id, None)
                evicted = self.table.drop_node(node_id)
                gone.append(f"node {node_id} ({len(evicted)} placements dropped)")
        for instance_id, received in list(self.load_received_ms.items()):
            # A replica still in the registry (its heartbeats say it lives) skips unchanged reports (LoadReporter).
            registered = instance_id in self.instances
            if now - received > self.silence_ms + (self.keepalive_ms if registered else 0):
                del self.load_received_ms[instance_id]
                del self.loads[instance_id]
                dropped = self.table.drop_instance(instance_id)
                gone.append(f"load reports of {instance_id} ({len(dropped)} placements dropped)")
        for bindings, live in ((self.instance_reporters, self.loads), (self.node_reporters, self.nodes)):
            for reporter in bindings.keys() - live.keys():
                del bindings[reporter]
        self.llm_usage.forget_idle()
        idle = [tenant for tenant, seen in self.tenant_seen_ms.items() if now - seen > self.tenant_idle_ms]
        for tenant in idle:
            del self.tenants[tenant]
            del self.tenant_seen_ms[tenant]
        if idle:
            gone.append(f"{len(idle)} tenants idle for {self.tenant_idle_ms // 1000} s")
        return gone

    @staticmethod
    def check_reporter(
        caller: MeshIdentity | None, bindings: dict[str, str], subject: str, reporter_id: str, owner: str | None = None
    ) -> None:
        """With mesh TLS, a report for ``reporter_id`` (a ``subject``: node, instance) comes from the identity that
        speaks for it: ``owner`` when the registry knows it, else whoever reported as it first (in ``bindings``)."""
        if caller is None:
            return
        bound = owner or bindings.setdefault(reporter_id, caller.name)
        check_owner(caller, f"{subject} {reporter_id!r}", bound)
        bindings[reporter_id] = bound

    # -- outputs -------------------------------------------------------------------------------------------------

    def view(self) -> scheduler_pb2.RoutingView:
        if self._view_cache is not None:
            return self._view_cache
        replicas = []
        for instance_id, instance in sorted(self.instances.items()):
            load = self.loads.get(instance_id)
            replicas.append(
                scheduler_pb2.ReplicaView(
                    instance_id=instance_id,
                    address=instance.address,
                    node_id=load.node_id if load is not None else "",
                    services=instance.services,
                    state=load.state if load is not None else instance.state,
                    models=load.models if load is not None else [],
                    last_report_unix_ms=self.load_received_ms.get(instance_id, 0),
                )
            )
        tenants = []
        for tenant in sorted(self.tenants):
            usage = self.tenants[tenant]
            usage.llm_tokens_last_minute, usage.minute_window_frees_unix_ms = self.llm_usage.last_minute(tenant)
            usage.llm_tokens_today = self.llm_usage.today(tenant)
            tenants.append(usage)
        self._view_cache = scheduler_pb2.RoutingView(
            version=self.version,
            replicas=replicas,
            nodes=[self.nodes[n] for n in sorted(self.nodes)],
            tenants=tenants,
            generated_unix_ms=now_ms(),
        )
        return self._view_cache

    def devices(self, model: str = "") -> list[Device]:
        """Every reported device, with the replicas that can host models there: those on its node, and with
        ``model``, only replicas that serve it (they list it in their load reports) on this device (a replica's
        models share one device) or, for a replica that has not said where its models sit, on any of the node's."""
        hosts: dict[str, list[str]] = collections.defaultdict(list)
        for instance_id, load in sorted(self.loads.items()):
            served = [m for m in load.models if not model or m.model.name == model]
            if model and not served:
                continue
            where = frozenset(m.device_id for m in load.models if m.device_id)
            for device_id in where or {""}:
                hosts[f"{load.node_id}|{device_id}"].append(instance_id)
        found = []
        for node in self.nodes.values():
            for device in node.devices:
                on_device = hosts.get(f"{node.node_id}|{device.device_id}", [])
                anywhere = hosts.get(f"{node.node_id}|", [])
                found.append(
                    Device(
                        device_id=device.device_id,
                        node_id=node.node_id,
                        kind=device.info.kind,
                        total_bytes=device.info.memory_total_bytes,
                        used_bytes=device.info.memory_used_bytes,
                        instance_ids=tuple(sorted({*on_device, *anywhere})),
                        index=device.info.index,
                    )
                )
        return found

    def is_busy(self, model: common_pb2.ModelRef, device_id: str) -> bool:
        """Some replica has requests in flight for ``model`` on ``device_id``, or it is a deployed custom head (never
        evict it then)."""
        if (model.name, model.version) in self.heads:
            return True
        return any(
            load.in_flight > 0 or load.running_requests > 0 or load.waiting_requests > 0
            for report in self.loads.values()
            for load in report.models
            if load.model.name == model.name and load.device_id == device_id
        )

    # -- placement decisions (PlaceModel/EvictModel, and the loads scheduler/model_loading.py applies) -------------

    async def place(self, request: scheduler_pb2.PlaceModelRequest) -> scheduler_pb2.PlaceModelResponse:
        """Places ``request.model`` against the latest readings (best fit, LRU eviction when allowed); the table
        holds the reservation until load reports confirm it or ``evict`` drops it."""
        try:
            result = self.table.place(
                request.model,
                request.required_bytes,
                self.devices(request.model.name),
                target=request.target if request.HasField("target") else None,
                allow_eviction=request.allow_eviction,
                is_busy=self.is_busy,
                now_ms=now_ms(),
                budget_bytes=self.model_budgets.get(request.modality),
                modality=request.modality,
            )
        except AimassError as err:
            PLACEMENTS.labels(err.reason.lower()).inc()
            raise
        PLACEMENTS.labels("already_placed" if result.already_placed else "placed").inc()
        if result.evicted:
            EVICTIONS.labels("lru").inc(len(result.evicted))
        await self.changed()
        return result.to_proto()

    async def evict(self, request: scheduler_pb2.EvictModelRequest) -> scheduler_pb2.EvictModelResponse:
        """Drops the placements of ``request.model`` (narrowed by its target)."""
        if not request.model.name:
            raise InvalidArgument("model.name is required", reason="NO_MODEL")
        evicted = self.table.evict(request.model, request.target if request.HasField("target") else None)
        if evicted:
            EVICTIONS.labels(request.reason or "unspecified").inc(len(evicted))
            log.info("evicted %d placement(s) of %s: %s", len(evicted), request.model.name, request.reason or "-")
            await self.changed()
        return scheduler_pb2.EvictModelResponse(evicted=evicted, freed_bytes=sum(p.bytes for p in evicted))

    # -- custom heads (deployed versions of tenants' models; scheduler/lifecycle/replica_sync.py asks) -------------

    async def place_head(self, model: common_pb2.ModelRef, nbytes: int, instance_ids: Iterable[str]) -> list[str]:
        """Places a custom head of ``nbytes`` beside its backbone on every replica of ``instance_ids`` whose device
        has room by the latest readings and placements (never evicting): the replicas that hold it now, sorted.
        RESOURCE_EXHAUSTED INSUFFICIENT_MEMORY (for the device with the most room) when none holds it and some has a
        reading; a replica whose device has no reading yet is left for a later try."""
        held = {p.instance_id for p in self.table.placements(model=model)}
        devices = self.devices()
        short: list[ResourceExhausted] = []
        newly = 0
        for instance_id in sorted(set(instance_ids) - held):
            try:
                self.table.place(
                    model,
                    max(nbytes, 1),
                    devices,
                    target=models_pb2.PlacementTarget(instance_id=instance_id),
                    allow_eviction=False,
                    is_busy=self.is_busy,
                    now_ms=now_ms(),
                )
            except ResourceExhausted as err:
                short.append(err)
                continue
            except FailedPrecondition:  # no reading of its device yet
                continue
            held.add(instance_id)
            self.heads.add((model.name, model.version))
            newly += 1
        if newly:
            PLACEMENTS.labels("placed").inc(newly)
            await self.changed()
        placed = sorted(held & set(instance_ids))
        if not placed and short:
            PLACEMENTS.labels("insufficient_memory").inc()
            raise max(short, key=lambda err: int(err.metadata.get("largest_free_bytes", "0")))
        return placed

    async def confirm_heads(self, instance_id: str, serving: Iterable[common_pb2.ModelRef]) -> None:
        """The replica serves these heads: their placements there are LOADED (in its device's readings from now)."""
        for model in serving:
            for placed in self.table.placements(model=model):
                if placed.instance_id == instance_id and placed.state != scheduler_pb2.PLACEMENT_STATE_LOADED:
                    self.table.mark(
                        model, placed.device_id, scheduler_pb2.PLACEMENT_STATE_LOADED, instance_id=instance_id
                    )
                    await self.changed()

    async def release_heads(self, keep: Iterable[tuple[str, str]]) -> None:
        """Drops the placements of every head but ``keep`` ((name, version) pairs still deployed)."""
        kept = set(keep)
        for name, version in sorted(self.heads - kept):
            evicted = self.table.evict(common_pb2.ModelRef(name=name, version=version))
            if evicted:
                EVICTIONS.labels("undeployed").inc(len(evicted))
                await self.changed()
        self.heads &= kept


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, state: SchedulerState, *, registry: InMemoryRegistry | None = None) -> None:
        self.state = state
        # The embedded registry, when hosted here: it knows which identity registered each instance.
        self.registry = registry

    async def ReportNode(
        self, request: scheduler_pb2.ReportNodeRequest, context: Context
    ) -> scheduler_pb2.ReportNodeResponse:
        self.state.check_reporter(peer_identity(context), self.state.node_reporters, "node", request.node_id)
        REPORTS.labels("node").inc()
        if self.state.record_node(request):
            await self.state.changed()
        return scheduler_pb2.ReportNodeResponse(report_interval_ms=self.state.report_interval_ms)

    async def ReportLoad(
        self, request: scheduler_pb2.ReportLoadRequest, context: Context
    ) -> scheduler_pb2.ReportLoadResponse:
        owner = self.registry.owner(request.instance_id) if self.registry is not None else None
        self.state.check_reporter(
            peer_identity(context), self.state.instance_reporters, "instance", request.instance_id, owner
        )
        REPORTS.labels("load").inc()
        if self.state.record_load(request):
            await self.state.changed()
        return scheduler_pb2.ReportLoadResponse(report_interval_ms=self.state.report_interval_ms)

    async def WatchView(
        self, request: scheduler_pb2.WatchViewRequest, context: Context
    ) -> AsyncIterator[scheduler_pb2.WatchViewResponse]:
        interval_s = (request.min_interval_ms or DEFAULT_VIEW_INTERVAL_MS) / 1000
        log.info("%s watches the routing view", request.subscriber_id or "a subscriber")
        sent = -1
        WATCHERS.inc()
        try:
            while not self.state.closing:
                if sent >= 0 and not await self.state.wait_newer(sent):
                    return
                view = self.state.view()
                sent = view.version
                VIEW_VERSION.set(sent)
                yield scheduler_pb2.WatchViewResponse(view=view)
                VIEWS_SENT.inc()
                # Coalesce: changes during the pause go out together in the next view.
                await asyncio.sleep(interval_s)
        finally:
            WATCHERS.dec()

    async def PlaceModel(
        self, request: scheduler_pb2.PlaceModelRequest, context: Context
    ) -> scheduler_pb2.PlaceModelResponse:
        return await self.state.place(request)

    async def EvictModel(
        self, request: scheduler_pb2.EvictModelRequest, context: Context
    ) -> scheduler_pb2.EvictModelResponse:
        return await self.state.evict(request)

    async def GetPlacement(
        self, request: scheduler_pb2.GetPlacementRequest, context: Context
    ) -> scheduler_pb2.GetPlacementResponse:
        model = request.model if request.model.name else None
        return scheduler_pb2.GetPlacementResponse(
            placements=self.state.table.placements(request.node_id, model), version=self.state.version
        )
