"""The scheduler's routing view, as the gateway's routers read it.

The scheduler pushes its whole view (SchedulerService.WatchView) whenever it changes; ``ViewWatcher`` keeps the
latest in a ``LoadView``. Routers read it per request from memory, so the scheduler is never on a request's path.
When the scheduler goes away the last view stays (fail-static) but is marked stale, and routers that need fresh
figures fall back to what the gateway sees itself (its own in-flight counts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.tasks import cancel_and_wait
from aimass.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """One replica's latest figures, summed over its models, with its device's readings."""

    queue_depth: int = 0
    in_flight: int = 0
    # Requests the replica runs together (max batch size or LLM sequences); at least 1.
    slots: int = 1
    kv_cache_usage: float = 0.0
    # LLM engines: requests held but not started (no sequence slot or KV blocks free yet).
    waiting_requests: int = 0
    # Of the replica's device, 0..1.
    utilization: float = 0.0
    free_memory_fraction: float = 1.0
    # Some model is loaded here (a replica whose models are loading or evicted is cold).
    warm: bool = True
    # Requests completed per second over the last report window, all models together.
    requests_per_second: float = 0.0
    # The device's peak compute (DeviceInfo.compute_tflops); 0 when unknown.
    compute: float = 0.0


def replica_loads(view: scheduler_pb2.RoutingView) -> dict[str, ReplicaLoad]:
    """instance_id → its load, joining each replica's models with the readings of the device they sit on."""
    devices = {device.device_id: device.info for node in view.nodes for device in node.devices}
    loads: dict[str, ReplicaLoad] = {}
    for replica in view.replicas:
        models = list(replica.models)
        device = devices.get(models[0].device_id) if models else None
        free = 1.0
        if device is not None and device.memory_total_bytes > 0:
            free = max(0.0, 1.0 - device.memory_used_bytes / device.memory_total_bytes)
        loads[replica.instance_id] = ReplicaLoad(
            queue_depth=sum(m.queue_depth + m.waiting_requests for m in models),
            in_flight=sum(m.in_flight for m in models),
            slots=max([1, *(m.max_batch_size for m in models)]),
            kv_cache_usage=max([0.0, *(m.kv_cache_usage for m in models)]),
            waiting_requests=sum(m.waiting_requests for m in models),
            utilization=(device.utilization_percent / 100) if device is not None else 0.0,
            free_memory_fraction=free,
            warm=any(m.loaded for m in models) or not models,
            requests_per_second=sum(m.requests_per_second for m in models),
            compute=device.compute_tflops if device is not None else 0.0,
        )
    return loads


# Capacity learning (see LoadView.capacity): below this device utilisation a window's completions say little about
# how fast the replica could go; each new estimate weighs this much against the running one.
MIN_UTILIZATION_FOR_CAPACITY = 0.2
CAPACITY_SMOOTHING = 0.3


class LoadView:
    """The latest view's loads per replica, and each replica's learnt capacity."""

    def __init__(self) -> None:
        self.version = 0
        self.connected = False
        self.received_monotonic = 0.0
        # The latest view as received (ClusterService shows it); empty until one arrives.
        self.routing_view = scheduler_pb2.RoutingView()
        self._loads: dict[str, ReplicaLoad] = {}
        # Tenant → its usage as the scheduler accounts it (LLM tokens for the token quotas).
        self._tenants: dict[str, scheduler_pb2.TenantUsage] = {}
        self._capacity: dict[str, float] = {}
        # What the fleet completes per unit of device compute (median), as of the latest view; None: unknown.
        self._per_compute: float | None = None

    @property
    def fresh(self) -> bool:
        """A view has arrived and the scheduler is still streaming it."""
        return self.connected and self.version > 0

    def apply(self, view: scheduler_pb2.RoutingView) -> bool:
        """Takes ``view`` unless it is older than the one held; True when taken."""
        if view.version < self.version:
            return False
        self.version = view.version
        self.routing_view = view
        self._loads = replica_loads(view)
        self._tenants = {usage.tenant_id: usage for usage in view.tenants}
        self.received_monotonic = time.monotonic()
        self._learn_capacity()
        return True

    def load_of(self, instance_id: str) -> ReplicaLoad | None:
        return self._loads.get(instance_id)

    def tenant_usage(self, tenant: str) -> scheduler_pb2.TenantUsage | None:
        return self._tenants.get(tenant)

    def _learn_capacity(self) -> None:
        typical = self._typical_capacity()
        for instance_id, load in self._loads.items():
            known = self._capacity.get(instance_id)
            if load.utilization >= MIN_UTILIZATION_FOR_CAPACITY and load.requests_per_second > 0:
                measured = load.requests_per_second / load.utilization
                self._capacity[instance_id] = (
                    measured if known is None else known + CAPACITY_SMOOTHING * (measured - known)
                )
            elif known is not None and typical is not None:
                # Too idle to measure: drift back towards the typical replica, or one measured slow once (it held the
                # heavy models, say) would be avoided, stay idle and never be measured again.
                self._capacity[instance_id] = known + CAPACITY_SMOOTHING * (typical - known)
        for gone in self._capacity.keys() - self._loads.keys():
            del self._capacity[gone]
        # Once per view, not per decision: routers read it for every candidate.
        self._per_compute = self._capacity_per_compute()

    def _typical_capacity(self) -> float | None:
        known = sorted(self._capacity.values())
        return known[len(known) // 2] if known else None

    def capacity(self, instance_id: str) -> float:
        """Requests the replica completes per second of its device's busy time, learnt from its reports (rate over
        utilisation, smoothed). On a device whose peak compute is known (NVML), the device's compute times what the
        fleet completes per unit of compute (the median), capped by what the replica has shown itself: a faster GPU
        is trusted to be faster before it has been busy, and a throttled one is still seen as slow. Replicas not
        measured yet count as the median one (1.0 before any is measured)."""
        known = self._capacity.get(instance_id)
        load = self._loads.get(instance_id)
        if load is not None and load.compute > 0 and self._per_compute is not None:
            expected = load.compute * self._per_compute
            return expected if known is None else min(expected, known)
        if known is not None:
            return known
        typical = self._typical_capacity()
        return typical if typical is not None else 1.0

    def _capacity_per_compute(self) -> float | None:
        ratios = sorted(
            self._capacity[i] / load.compute
            for i, load in self._loads.items()
            if load.compute > 0 and i in self._capacity
        )
        return ratios[len(ratios) // 2] if ratios else None


class ViewWatcher:
    """Subscribes to the scheduler's view and keeps ``view`` current; reconnects with backoff."""

    def __init__(
        self,
        scheduler_address: str,
        view: LoadView,
        *,
        subscriber_id: str,
        credentials: MeshCredentials | None,
        min_interval_ms: int = 100,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.credentials = credentials
        self.view = view
        self.subscriber_id = subscriber_id
        self.min_interval_ms = min_interval_ms
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    def start(self) -> None:
        self._channel = mesh_channel(self.scheduler_address, self.credentials, server_role=ROLE_SCHEDULER)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="view-watcher")

    async def _run(self) -> None:
        assert self._channel is not None
        stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        request = scheduler_pb2.WatchViewRequest(subscriber_id=self.subscriber_id, min_interval_ms=self.min_interval_ms)
        delay = RETRY_MIN_S
        warned = False
        while True:
            try:
                async for response in stub.WatchView(request):
                    if not self.view.connected:
                        log.info("routing view from the scheduler at %s", self.scheduler_address)
                    self.view.connected = True
                    warned = False
                    delay = RETRY_MIN_S
                    self.view.apply(response.view)
            except grpc.aio.AioRpcError as err:
                if not warned:
                    log.warning(
                        "scheduler at %s unreachable (%s): routing on the last view (version %d) and the gateway's "
                        "own counts until it is back",
                        self.scheduler_address,
                        err.code().name,
                        self.view.version,
                    )
                    warned = True
            self.view.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._channel is not None:
            await self._channel.close()
