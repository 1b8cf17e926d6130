"""Replica → scheduler load reports (SchedulerService.ReportLoad), sent periodically while the replica serves.

The scheduler routes on these figures but is never on the request path: a scheduler that is down or slow only
delays reports (logged once), never requests.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from aimass.runtime.identity import MeshCredentials
from aimass.runtime.interceptors import AdmissionInterceptor
from aimass.runtime.models import ModelSet
from aimass.runtime.reporting import PeriodicReporter
from aimass.v1 import common_pb2, models_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


@runtime_checkable
class ReportsLoad(Protocol):
    """A ServiceApp that can say how loaded its models are (optional part of the app protocol)."""

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        """Per-model load over the last ``window_s`` seconds; rates are reset for the next window."""
        ...

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        """Per-tenant work since the previous call (deltas)."""
        ...


def local_device_id(device: str) -> str:
    """A torch device name as a load report names it: "cuda:1" → "gpu:1", "cuda" → "gpu:0", else "cpu"."""
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return f"gpu:{index or 0}"
    return "cpu"


class AdmissionLoad:
    """The load of an app that does not report its own, from what admission sees per method: a model's in-flight
    requests, rate and last use are those of the methods that serve it (ModelInfo.methods).

    Coarser than an engine's own figures (no queue inside the engine, no batch occupancy), but it gives the
    scheduler and the gateways' routers every replica's in-flight work and throughput. With the app's ``models``
    (engines that load models one at a time) it says which are loaded, where, and their measured footprints.
    """

    def __init__(
        self, served: Sequence[models_pb2.ModelInfo], admission: AdmissionInterceptor, models: ModelSet | None = None
    ) -> None:
        self.served = tuple(served)
        self.admission = admission
        self.models = models
        self.device_id = local_device_id(models.device) if models is not None else "cpu"
        self._reported_completed: dict[str, int] = {}

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        admission = self.admission
        loads = []
        for info in self.served:
            methods = [f"/{method}" for method in info.methods]
            completed = sum(admission.completed_by_method[m] for m in methods)
            last_used = max([0, *(admission.last_completed_unix_ms_by_method.get(m, 0) for m in methods)])
            rate = (completed - self._reported_completed.get(info.name, 0)) / window_s
            self._reported_completed[info.name] = completed
            managed = self.models is not None and info.name in self.models.names
            loaded = not managed or (self.models is not None and info.name in self.models.loaded)
            loads.append(
                scheduler_pb2.ModelLoad(
                    model=common_pb2.ModelRef(name=info.name, version=info.default_version),
                    device_id=self.device_id,
                    loaded=loaded,
                    in_flight=sum(admission.inflight_by_method[m] for m in methods),
                    queue_capacity=admission.max_inflight,
                    requests_per_second=rate,
                    memory_bytes=self.models.footprint_bytes(info.name) if self.models is not None and loaded else 0,
                    last_used_unix_ms=last_used,
                    modality=info.modality,
                )
            )
        return loads

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        """Requests each tenant had served by this replica's models since the previous report (no tokens here)."""
        methods = {f"/{method}" for info in self.served for method in info.methods}
        by_tenant: collections.Counter[str] = collections.Counter()
        for (method, tenant), completed in self.admission.take_completed_by_method_tenant().items():
            if method in methods:
                by_tenant[tenant] += completed
        return [scheduler_pb2.TenantTokens(tenant_id=tenant, requests=n) for tenant, n in sorted(by_tenant.items())]


# An unchanged load report is sent again after this many intervals (see LoadReporter); the scheduler keeps a
# registered replica's last report this much longer before it counts the replica silent.
KEEPALIVE_INTERVALS = 10


def load_changed(before: scheduler_pb2.ReportLoadRequest, after: scheduler_pb2.ReportLoadRequest) -> bool:
    """Whether a replica's new report says something ``before`` does not: its state, node, models' figures (in
    flight, queues, loaded, memory, rate), or tenants' work to account. Timestamps and windows alone do not."""
    if after.tenant_tokens or before.state != after.state or before.node_id != after.node_id:
        return True
    if len(before.models) != len(after.models):
        return True
    for was, now in zip(before.models, after.models, strict=True):
        # When a model was last used moves on every request; routing never reads it (placement's LRU gets it with
        # the next report that changes anything, or the keep-alive).
        if was.last_used_unix_ms != now.last_used_unix_ms:
            copy = scheduler_pb2.ModelLoad()
            copy.CopyFrom(was)
            copy.last_used_unix_ms = now.last_used_unix_ms
            was = copy
        if was != now:
            return True
    return False


class LoadReporter(PeriodicReporter):
    """Sends ``app``'s load as this replica's ReportLoad: every interval while it changes, and every
    ``KEEPALIVE_INTERVALS`` intervals while it does not (an idle replica), so idle replicas cost the scheduler
    almost nothing."""

    def __init__(
        self,
        app: ReportsLoad,
        *,
        scheduler_address: str,
        credentials: MeshCredentials | None,
        instance_id: str,
        node_id: str,
        interval_s: float,
    ) -> None:
        super().__init__(scheduler_address, interval_s, what="load reports", credentials=credentials)
        self.app = app
        self.instance_id = instance_id
        self.node_id = node_id
        self.state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_SERVING
        self._last_report = time.monotonic()
        # The last report the scheduler took, and how many intervals' reports were skipped since.
        self._last_sent: scheduler_pb2.ReportLoadRequest | None = None
        self._skipped = 0

    def build_report(self) -> scheduler_pb2.ReportLoadRequest:
        now = time.monotonic()
        window_s = max(now - self._last_report, 1e-3)
        self._last_report = now
        models = list(self.app.model_loads(window_s))
        for load in models:
            # Apps name devices locally ("cpu", "gpu:0"); the mesh names them "<node_id>/<device>".
            if "/" not in load.device_id:
                load.device_id = f"{self.node_id}/{load.device_id}"
        return scheduler_pb2.ReportLoadRequest(
            instance_id=self.instance_id,
            node_id=self.node_id,
            state=self.state,
            models=models,
            window_seconds=window_s,
            observed_unix_ms=int(time.time() * 1000),
            tenant_tokens=self.app.tenant_tokens(),
        )

    async def _send(
        self, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub, timeout_s: float, *, force: bool
    ) -> int | None:
        report = self.build_report()
        last = self._last_sent
        if (
            not force
            and last is not None
            and self._skipped + 1 < KEEPALIVE_INTERVALS
            and not load_changed(last, report)
        ):
            self._skipped += 1
            return None
        response = await stub.ReportLoad(report, timeout=timeout_s)
        self._last_sent, self._skipped = report, 0
        return response.report_interval_ms

    async def stop(self, state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_DRAINING) -> None:
        """Stops reporting after one last report saying ``state``, so the scheduler stops routing here at once."""
        await self._stop_loop()
        if self._stub is not None:
            self.state = state
            with contextlib.suppress(Exception):
                await self.report()
        await self._close()
