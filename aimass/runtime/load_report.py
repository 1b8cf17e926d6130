"""Replica → scheduler load reports (SchedulerService.ReportLoad), sent periodically while the replica serves.

The scheduler routes on these figures but is never on the request path: a scheduler that is down or slow only
delays reports (logged once), never requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import grpc

from aimass.runtime.interceptors import AdmissionInterceptor
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

# Bounds on the interval a scheduler may ask for, so a bad answer cannot flood it or silence us.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 60.0


@runtime_checkable
class ReportsLoad(Protocol):
    """A ServiceApp that can say how loaded its models are (optional part of the app protocol)."""

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        """Per-model load over the last ``window_s`` seconds; rates are reset for the next window."""
        ...

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        """Per-tenant work since the previous call (deltas)."""
        ...


class AdmissionLoad:
    """The load of an app that does not report its own: all its models share the process's admitted requests.

    Coarser than an engine's own figures (no queue inside the engine, no batch occupancy), but it gives the
    scheduler and the gateways' routers every replica's in-flight work and throughput.
    """

    def __init__(self, models: Sequence[str], admission: AdmissionInterceptor, *, device_id: str = "cpu") -> None:
        self.models = tuple(models)
        self.admission = admission
        self.device_id = device_id
        self._reported_completed = admission.completed

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        completed = self.admission.completed - self._reported_completed
        self._reported_completed = self.admission.completed
        return tuple(
            scheduler_pb2.ModelLoad(
                model=common_pb2.ModelRef(name=name),
                device_id=self.device_id,
                loaded=True,
                in_flight=self.admission.inflight,
                queue_capacity=self.admission.max_inflight,
                requests_per_second=completed / window_s,
                last_used_unix_ms=self.admission.last_completed_unix_ms,
            )
            for name in self.models
        )

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        return ()


class LoadReporter:
    def __init__(
        self,
        app: ReportsLoad,
        *,
        scheduler_address: str,
        instance_id: str,
        node_id: str,
        interval_s: float,
    ) -> None:
        self.app = app
        self.scheduler_address = scheduler_address
        self.instance_id = instance_id
        self.node_id = node_id
        self.interval_s = interval_s
        self.state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_SERVING
        self.reports_sent = 0
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._last_report = time.monotonic()
        self._unreachable = False

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.scheduler_address)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-reporter")

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

    async def send(self) -> None:
        assert self._channel is not None
        stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        request = self.build_report()
        try:
            response = await stub.ReportLoad(request, timeout=max(self.interval_s, 1.0))
        except grpc.aio.AioRpcError as err:
            if not self._unreachable:
                log.warning(
                    "scheduler at %s unreachable (%s); still serving, will keep trying",
                    self.scheduler_address,
                    err.code().name,
                )
            self._unreachable = True
            return
        if self._unreachable:
            log.info("scheduler at %s reachable again", self.scheduler_address)
        self._unreachable = False
        self.reports_sent += 1
        if response.report_interval_ms > 0:
            self.interval_s = min(max(response.report_interval_ms / 1000, MIN_INTERVAL_S), MAX_INTERVAL_S)

    async def _run(self) -> None:
        while True:
            try:
                await self.send()
            except Exception:
                log.exception("building or sending the load report failed; retrying")
            await asyncio.sleep(self.interval_s)

    async def stop(self, state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_DRAINING) -> None:
        """Stop reporting after one last report saying ``state``, so the scheduler stops routing here at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            self.state = state
            with contextlib.suppress(Exception):
                await self.send()
            await self._channel.close()
            self._channel = None
