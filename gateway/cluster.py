"""aimass.v1.ClusterService: the mesh's live status (nodes and devices, replicas, traffic, tenants' usage), from
what the gateway holds in memory.

Nothing here calls the scheduler or the store per request: nodes, replicas and tenants' LLM token counts come from
the scheduler's routing view the gateway follows (gateway/view.py), traffic from the gateway's own counts
(gateway/traffic.py), tenants and their limits from the key verifier (refreshed from the store every auth.refresh_s).

The front door has checked the key and its infer scope (gateway/auth.py); this servicer decides what the key sees:
its own tenant's usage only (every tenant with tenants:admin), and network addresses and foreign processes' pid and
name only with models:admin or tenants:admin. With auth off (no keys) everything is shown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final

import grpc

from aimass.runtime.errors import InvalidArgument
from aimass.runtime.scope import RequestScope, current_scope
from aimass.tenancy import keys
from aimass.tenancy.quotas import Limits
from aimass.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2, scheduler_pb2
from gateway.admin import limits_message
from gateway.auth import KeyVerifier
from gateway.replicas import ReplicaSet
from gateway.traffic import TrafficRecorder
from gateway.view import LoadView

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_INTERVAL_MS: Final = 2000
MIN_INTERVAL_MS: Final = 500
MAX_INTERVAL_MS: Final = 60_000
# Scopes that may see where things run (replica addresses, node hosts, foreign processes on a GPU).
SEES_ADDRESSES: Final = frozenset({keys.SCOPE_MODELS_ADMIN, keys.SCOPE_TENANTS_ADMIN})


def watch_interval_s(interval_ms: int) -> float:
    """WatchClusterRequest.interval_ms in seconds: 0 is the default; outside the range is INVALID_ARGUMENT."""
    if interval_ms == 0:
        return DEFAULT_INTERVAL_MS / 1000
    if not MIN_INTERVAL_MS <= interval_ms <= MAX_INTERVAL_MS:
        raise InvalidArgument(
            f"interval_ms is {interval_ms}; send 0 (every {DEFAULT_INTERVAL_MS} ms) or {MIN_INTERVAL_MS} to "
            f"{MAX_INTERVAL_MS}",
            reason="BAD_INTERVAL",
            metadata={"min": str(MIN_INTERVAL_MS), "max": str(MAX_INTERVAL_MS)},
        )
    return interval_ms / 1000


def holds(replica: scheduler_pb2.ReplicaView, model: common_pb2.ModelRef) -> bool:
    return any(
        load.model.name == model.name and (not model.version or load.model.version == model.version)
        for load in replica.models
    )


def without_addresses(nodes: Iterable[scheduler_pb2.NodeView], replicas: Iterable[scheduler_pb2.ReplicaView]) -> None:
    """Blanks where things run: hosts, replica addresses, and the pid and name of processes on a device."""
    for node in nodes:
        node.host = ""
        for device in node.devices:
            for process in device.processes:
                process.pid = 0
                process.process_name = ""
    for replica in replicas:
        replica.address = ""


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(
        self,
        view: LoadView,
        traffic: TrafficRecorder,
        replicas: ReplicaSet,
        verifier: KeyVerifier | None,
        *,
        forwarded: Callable[[], Iterable[str]],
    ) -> None:
        self.view = view
        self.traffic = traffic
        self.replicas = replicas
        # None: auth.mode = "off", where every caller sees everything.
        self.verifier = verifier
        # The services the gateway forwards to replicas (their healthy replicas are counted).
        self.forwarded = forwarded

    async def GetCluster(
        self, request: cluster_pb2.GetClusterRequest, context: Context
    ) -> cluster_pb2.GetClusterResponse:
        return cluster_pb2.GetClusterResponse(cluster=self.snapshot(current_scope(), request.model))

    async def WatchCluster(
        self, request: cluster_pb2.WatchClusterRequest, context: Context
    ) -> AsyncIterator[cluster_pb2.WatchClusterResponse]:
        interval_s = watch_interval_s(request.interval_ms)
        scope = current_scope()
        # Until the caller cancels or the deadline passes: grpc cancels this generator at either.
        while True:
            yield cluster_pb2.WatchClusterResponse(cluster=self.snapshot(scope, request.model))
            await asyncio.sleep(interval_s)

    # -- the snapshot ------------------------------------------------------------------------------------------

    def snapshot(self, scope: RequestScope, model: common_pb2.ModelRef) -> cluster_pb2.ClusterStatus:
        view = self.view.routing_view
        status = cluster_pb2.ClusterStatus(
            generated_unix_ms=int(time.time() * 1000),
            stale=not self.view.fresh,
            view_version=view.version,
            view_generated_unix_ms=view.generated_unix_ms,
            traffic_window_seconds=self.traffic.window_s,
            gateways=max(1, self.replicas.gateways),
        )
        status.nodes.extend(sorted(view.nodes, key=lambda node: node.node_id))
        status.replicas.extend(
            sorted(
                (replica for replica in view.replicas if not model.name or holds(replica, model)),
                key=lambda replica: replica.instance_id,
            )
        )
        if self.verifier is not None and not SEES_ADDRESSES & scope.scopes:
            without_addresses(status.nodes, status.replicas)
        status.services.extend(self._services())
        status.tenants.extend(self._tenants(scope, view))
        return status

    def _services(self) -> list[cluster_pb2.ServiceTraffic]:
        forwarded = set(self.forwarded())
        rows = []
        for service in self.traffic.services:
            traffic = self.traffic.service(service)
            rows.append(
                cluster_pb2.ServiceTraffic(
                    service=service,
                    requests_per_second=traffic.requests_per_second,
                    errors_per_second=traffic.errors_per_second,
                    p50_latency_ms=traffic.p50_latency_ms,
                    p99_latency_ms=traffic.p99_latency_ms,
                    in_flight=traffic.in_flight,
                    requests=traffic.requests,
                    errors=traffic.errors,
                    healthy_replicas=len(self.replicas.healthy(service)) if service in forwarded else 0,
                )
            )
        return rows

    def _tenants(self, scope: RequestScope, view: scheduler_pb2.RoutingView) -> list[cluster_pb2.TenantQuotaUsage]:
        """The caller's own tenant; with tenants:admin (or auth off) every tenant the store, the scheduler or this
        gateway's traffic knows."""
        usage = {tenant.tenant_id: tenant for tenant in view.tenants}
        if self.verifier is None or keys.SCOPE_TENANTS_ADMIN in scope.scopes:
            known = set(usage) | set(self.traffic.tenants)
            if self.verifier is not None:
                known |= set(self.verifier.known_tenants())
            shown = sorted(tenant for tenant in known if tenant)
        else:
            shown = [scope.tenant]
        rows = []
        for tenant in shown:
            limits = self.verifier.limits_of(tenant) if self.verifier is not None else Limits()
            traffic = self.traffic.tenant(tenant)
            row = cluster_pb2.TenantQuotaUsage(
                tenant_id=tenant,
                limits=limits_message(limits),
                requests_per_second=traffic.requests_per_second,
                in_flight=traffic.in_flight,
            )
            accounted = usage.get(tenant)
            if accounted is not None:
                row.llm_tokens_last_minute = accounted.llm_tokens_last_minute
                row.llm_tokens_today = accounted.llm_tokens_today
                row.usage.CopyFrom(accounted)
            rows.append(row)
        return rows
