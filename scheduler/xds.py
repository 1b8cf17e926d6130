"""The scheduler as an xDS management server: internal callers skip the gateway and still route by its knowledge.

Standard gRPC clients (Python, Go, Java, C++, Node with grpc-js-xds) dial ``xds:///aimass.v1.NlpService``, ask
the scheduler over ADS (envoy.service.discovery.v3.AggregatedDiscoveryService, state of the world) what that name
means, and then call the replicas themselves, balancing with the weights the scheduler gives them. Types are the
published Envoy protos (``xds-protos``), never hand-written.

Per aimass.v1 service that replicas serve (the name is the same for all four resource types):

- Listener ``aimass.v1.NlpService``: an ``api_listener`` HttpConnectionManager whose routes come by RDS;
- RouteConfiguration ``aimass.v1.NlpService``: every method (prefix ``/``) to the cluster of that name, retried
  (twice) when a replica answers UNAVAILABLE (down or draining, safe to retry);
- Cluster ``aimass.v1.NlpService``: EDS over ADS, round robin;
- ClusterLoadAssignment ``aimass.v1.NlpService``: one locality per replica, whose ``load_balancing_weight`` is the
  replica's share. gRPC's round robin ignores endpoint weights but honours locality weights (weighted_target), so a
  locality of one endpoint carries the weight (the endpoint's own weight is set too, for clients that read it).

Weights are what the gateway's ``ours`` router knows (gateway/router.py, ``LoadView.capacity``): the replica's
learnt capacity (replicas sharing one device count as equals: their capacities only mirror the traffic each was
sent), lowered by KV-cache pressure, and a cold replica (its models not loaded) gets the least weight while any
warm one exists. They are set among the replicas of one service and quantised to tenths of the largest,
so the constant stream of load reports does not become a constant stream of EDS pushes: a resource is pushed only
when its bytes change. Replicas that are serving are HEALTHY; draining ones are listed as DRAINING (clients send
them nothing new); starting or stopped ones are left out. A service keeps its listener once seen (scaled to zero,
its endpoints are empty: UNAVAILABLE, not "does not exist"); a name no replica ever served has no listener, and
gRPC clients fail their calls with "does not exist".

Protocol (per stream and type): the first request, and any request that changes the resource names, gets the
current resources at once (for listeners and clusters, a subscribed name absent from the answer does not exist;
empty names at first mean every one, the wildcard). An ACK (the last nonce, no error) changes nothing; a NACK (the
last nonce with ``error_detail``) is logged and counted and the rejected version is not sent again: the next
change is. A request carrying an older nonce is stale and ignored. Each push carries the type's version and a
fresh nonce. The per-type services (LDS, RDS, CDS, EDS: Stream* and Fetch*) speak the same protocol for their one
type; incremental (Delta) xDS is not served. Streams end when the scheduler drains or stands by (clients keep
what they have and reconnect, to the active scheduler), as the gateways' view streams do; a standby answers
UNAVAILABLE. The scheduler's listener is mesh mTLS; ``SCHEDULER_POLICY`` says which roles may stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import prometheus_client
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from envoy.service.listener.v3 import lds_pb2_grpc
from envoy.service.route.v3 import rds_pb2_grpc
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from aimass.runtime.errors import InvalidArgument, Unavailable
from aimass.runtime.interceptors import abort_with
from aimass.runtime.tasks import cancel_and_wait
from aimass.v1 import common_pb2, scheduler_pb2
from gateway.router import KV_CACHE_WEIGHT
from gateway.view import LoadView
from scheduler.service import Context, SchedulerState

log = logging.getLogger(__name__)

ADS_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"
LDS_SERVICE: Final = "envoy.service.listener.v3.ListenerDiscoveryService"
RDS_SERVICE: Final = "envoy.service.route.v3.RouteDiscoveryService"
CDS_SERVICE: Final = "envoy.service.cluster.v3.ClusterDiscoveryService"
EDS_SERVICE: Final = "envoy.service.endpoint.v3.EndpointDiscoveryService"
# Every discovery service served here (the scheduler's mesh policy names them).
XDS_SERVICES: Final = (ADS_SERVICE, LDS_SERVICE, RDS_SERVICE, CDS_SERVICE, EDS_SERVICE)
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES: Final = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)
# Listeners and clusters: a state-of-the-world answer lists every subscribed resource that exists (and empty names
# in the first request subscribe to all of them).
WHOLE_STATE_TYPES: Final = frozenset({LISTENER, CLUSTER})
# Weights: the largest replica gets this much; the others a multiple of a tenth of it (at least 1).
MAX_WEIGHT: Final = 100
WEIGHT_STEP: Final = MAX_WEIGHT // 10
# Retries of a call answered UNAVAILABLE (a replica stopping between the scheduler's view and the call).
RETRIES: Final = 2
# Cache rebuilds follow the scheduler's view at most this often (load reports change it constantly).
REBUILD_INTERVAL_S: Final = 0.1
# Requests read ahead of the stream's handling; the reader waits beyond (back pressure on the client).
MAX_QUEUED_REQUESTS: Final = 16
# The kind of process that trains tenants' heads: its service is for the scheduler only, never published.
TRAINER_KIND: Final = "trainer"

STREAMS = prometheus_client.Gauge("aimass_scheduler_xds_streams", "ADS streams open to xDS clients.")
PUSHES = prometheus_client.Counter(
    "aimass_scheduler_xds_responses_total", "DiscoveryResponses sent, by resource type.", ["type"]
)
NACKS = prometheus_client.Counter(
    "aimass_scheduler_xds_nacks_total", "DiscoveryResponses a client rejected (NACK), by resource type.", ["type"]
)
XDS_VERSION = prometheus_client.Gauge(
    "aimass_scheduler_xds_version", "Version of the xDS resources, by type.", ["type"]
)


def short_type(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _ads_source() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.ApiVersion.V3
    )


def listener(service: str) -> Any:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=service,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=service),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(name=service, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)))


def route_configuration(service: str) -> Any:
    # UNAVAILABLE means the replica is down or draining, safe to retry (on another: gRPC's retries pick again).
    retry = route_components_pb2.RetryPolicy(
        retry_on="unavailable",
        num_retries=wrappers_pb2.UInt32Value(value=RETRIES),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=duration_pb2.Duration(nanos=25_000_000), max_interval=duration_pb2.Duration(nanos=250_000_000)
        ),
    )
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=service, retry_policy=retry),
    )
    host = route_components_pb2.VirtualHost(name=service, domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=service, virtual_hosts=[host])


def cluster(service: str) -> Any:
    return cluster_pb2.Cluster(
        name=service,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source(), service_name=service),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        connect_timeout=duration_pb2.Duration(seconds=5),
    )


@dataclass(frozen=True)
class Endpoint:
    """One replica in a service's load assignment."""

    instance_id: str
    node_id: str
    host: str
    port: int
    weight: int
    draining: bool = False


def load_assignment(service: str, endpoints: Iterable[Endpoint]) -> Any:
    localities = []
    for end in sorted(endpoints, key=lambda e: e.instance_id):
        status = health_check_pb2.DRAINING if end.draining else health_check_pb2.HEALTHY
        address = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=end.host, port_value=end.port))
        weight = wrappers_pb2.UInt32Value(value=end.weight)
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=end.node_id, sub_zone=end.instance_id),
                load_balancing_weight=weight,
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=address),
                        health_status=status,
                        load_balancing_weight=weight,
                    )
                ],
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=service, endpoints=localities)


def replica_weights(replicas: Iterable[scheduler_pb2.ReplicaView], loads: LoadView) -> dict[str, int]:
    """instance_id → its weight (1..MAX_WEIGHT) among ``replicas`` (those of one service), from ``loads`` (fed the
    view): capacity over KV-cache pressure, cold replicas the least while any is warm, quantised to tenths of the
    largest."""
    replicas = list(replicas)
    capacity = {replica.instance_id: loads.capacity(replica.instance_id) for replica in replicas}
    # Replicas on one device share its utilisation, so their capacities (completions over that shared busy time)
    # only mirror the traffic they were sent: weights fed back from them would drift apart with nothing pulling
    # them even again. They count as equals, at their mean.
    sharing: dict[str, list[str]] = {}
    for replica in replicas:
        device = next((m.device_id for m in replica.models if m.device_id), "")
        if device:
            sharing.setdefault(device, []).append(replica.instance_id)
    for group in sharing.values():
        mean = sum(capacity[i] for i in group) / len(group)
        capacity.update(dict.fromkeys(group, mean))
    raw: dict[str, float] = {}
    cold: set[str] = set()
    for replica in replicas:
        load = loads.load_of(replica.instance_id)
        share = capacity[replica.instance_id]
        if load is not None:
            share /= 1 + KV_CACHE_WEIGHT * load.kv_cache_usage
            if not load.warm:
                cold.add(replica.instance_id)
        raw[replica.instance_id] = max(share, 0.0)
    if cold and len(cold) < len(raw):
        raw = {i: (0.0 if i in cold else share) for i, share in raw.items()}
    top = max(raw.values(), default=0.0)
    if top <= 0:
        return dict.fromkeys(raw, MAX_WEIGHT)
    return {i: max(1, round(share / top * MAX_WEIGHT / WEIGHT_STEP) * WEIGHT_STEP) for i, share in raw.items()}


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) → (host, port); None for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class XdsResources:
    """The current resources per type, each type's version (raised when one of its resources changes), and a
    condition streams wait on."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, bytes]] = {type_url: {} for type_url in TYPES}
        self.versions: dict[str, int] = dict.fromkeys(TYPES, 0)
        self.generation = 0
        # Raised to end every open stream (the scheduler drains or stands by): clients reconnect, to the active one.
        self.epoch = 0
        self._changed = asyncio.Condition()

    async def update(self, built: Mapping[str, Mapping[str, bytes]]) -> bool:
        """Takes ``built`` (type → name → serialized resource); True when anything changed (streams are woken)."""
        changed = False
        for type_url in TYPES:
            fresh = dict(built.get(type_url, {}))
            if fresh != self.resources[type_url]:
                self.resources[type_url] = fresh
                self.versions[type_url] += 1
                XDS_VERSION.labels(short_type(type_url)).set(self.versions[type_url])
                changed = True
        if changed:
            self.generation += 1
            async with self._changed:
                self._changed.notify_all()
        return changed

    async def wait_newer(self, generation: int, epoch: int) -> bool:
        """Waits for a generation newer than ``generation``; False when the streams of ``epoch`` are to end instead."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > generation or self.epoch != epoch)
        return self.epoch == epoch

    async def end_streams(self) -> None:
        self.epoch += 1
        async with self._changed:
            self._changed.notify_all()


class XdsBuilder:
    """Follows the scheduler's view and rebuilds the resources from it."""

    def __init__(self, state: SchedulerState, resources: XdsResources) -> None:
        self.state = state
        self.resources = resources
        self.loads = LoadView()
        # Services seen served once keep their listener (scaled to zero they have no endpoints, but still exist).
        self.services: set[str] = set()
        self._addresses: dict[str, str | None] = {}

    async def run(self) -> None:
        seen = -1
        ended = False
        while True:
            if self.state.closing:
                # Draining or standing by (as WatchView's streams): end the open streams once, then look again
                # later (leadership may come back).
                if not ended:
                    await self.resources.end_streams()
                    ended = True
                await asyncio.sleep(1.0)
                continue
            ended = False
            if self.state.version == seen:
                await self.state.wait_newer(seen)
                continue
            seen = self.state.version
            await self.rebuild()
            await asyncio.sleep(REBUILD_INTERVAL_S)

    async def rebuild(self) -> bool:
        view = self.state.view()
        self.loads.apply(view)
        kinds = {i.instance_id: i.kind for i in self.state.instances.values()}
        usable: dict[str, list[scheduler_pb2.ReplicaView]] = {}
        for replica in view.replicas:
            if kinds.get(replica.instance_id) == TRAINER_KIND:
                continue
            self.services.update(replica.services)
            if replica.state in (common_pb2.SERVING_STATE_SERVING, common_pb2.SERVING_STATE_DRAINING):
                for service in replica.services:
                    usable.setdefault(service, []).append(replica)
        built: dict[str, dict[str, bytes]] = {type_url: {} for type_url in TYPES}
        for service in sorted(self.services):
            built[LISTENER][service] = listener(service).SerializeToString(deterministic=True)
            built[ROUTE][service] = route_configuration(service).SerializeToString(deterministic=True)
            built[CLUSTER][service] = cluster(service).SerializeToString(deterministic=True)
            ends = await self._endpoints(usable.get(service, []))
            built[ENDPOINTS][service] = load_assignment(service, ends).SerializeToString(deterministic=True)
        return await self.resources.update(built)

    async def _endpoints(self, replicas: list[scheduler_pb2.ReplicaView]) -> list[Endpoint]:
        """One service's replicas as endpoints, weighted among themselves."""
        weights = replica_weights(replicas, self.loads)
        found = []
        for replica in replicas:
            where = split_address(replica.address)
            host = await self._ip_of(where[0]) if where is not None else None
            if where is None or host is None:
                log.warning("xDS: replica %s has no usable address %r", replica.instance_id, replica.address)
                continue
            found.append(
                Endpoint(
                    instance_id=replica.instance_id,
                    node_id=replica.node_id,
                    host=host,
                    port=where[1],
                    weight=weights[replica.instance_id],
                    draining=replica.state == common_pb2.SERVING_STATE_DRAINING,
                )
            )
        return found

    async def _ip_of(self, host: str) -> str | None:
        """gRPC clients take IP addresses in EDS: a registered host name is resolved here (and remembered)."""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if host not in self._addresses:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
                self._addresses[host] = str(found[0][4][0]) if found else None
            except OSError:
                self._addresses[host] = None
        return self._addresses[host]


@dataclass
class Subscription:
    """One resource type on one stream: what the client asked for and what it was sent last."""

    names: frozenset[str] | None = None  # None: every resource (the wildcard)
    subscribed: bool = False
    nonce: str = ""
    sent_version: int = -1
    sent: dict[str, bytes] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names


class DiscoveryStreams:
    """The state-of-the-world protocol over one stream (see the module docstring), for ADS (every type) and for the
    per-type services (one type; their requests may leave ``type_url`` empty)."""

    def __init__(self, resources: XdsResources, standby: Callable[[], str] = lambda: "") -> None:
        self.resources = resources
        self.standby = standby
        self._nonces = itertools.count(1)

    async def _check_active(self, context: Context, method: str) -> None:
        reason = self.standby()
        if reason:
            await abort_with(context, method, Unavailable(reason, reason="SCHEDULER_STANDBY"))

    async def fetch(self, request: Any, context: Context, method: str, type_url: str) -> Any:
        """One answer with the current resources of ``type_url`` that ``request`` names (all when it names none)."""
        await self._check_active(context, method)
        if request.type_url not in ("", type_url):
            await abort_with(context, method, self._wrong_type(request.type_url, type_url))
        names = frozenset(request.resource_names)
        current = self.resources.resources[type_url]
        chosen = {name: data for name, data in current.items() if not names or name in names}
        return self._response(type_url, str(self.resources.versions[type_url]), chosen, "")

    async def stream(
        self, request_iterator: AsyncIterator[Any], context: Context, method: str, only: str | None = None
    ) -> None:
        await self._check_active(context, method)
        requests: asyncio.Queue[Any] = asyncio.Queue(MAX_QUEUED_REQUESTS)
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, requests), name="xds-reader")
        subscriptions = {type_url: Subscription() for type_url in ((only,) if only else TYPES)}
        node = ""
        STREAMS.inc()
        try:
            generation, epoch = self.resources.generation, self.resources.epoch
            while True:
                next_request = asyncio.ensure_future(requests.get())
                newer = asyncio.ensure_future(self.resources.wait_newer(generation, epoch))
                try:
                    done, _ = await asyncio.wait({next_request, newer}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in (next_request, newer):
                        if not waiter.done():
                            waiter.cancel()
                if next_request in done:
                    request = next_request.result()
                    if request is None:  # the client closed its side
                        return
                    node = node or request.node.id
                    type_url = request.type_url or only or ""
                    if only is not None and type_url != only:
                        await abort_with(context, method, self._wrong_type(type_url, only))
                    await self._handle(request, type_url, subscriptions, context, node)
                if newer in done:
                    if not newer.result():
                        return
                    generation = self.resources.generation
                    for type_url, sub in subscriptions.items():
                        if sub.subscribed and sub.sent_version < self.resources.versions[type_url]:
                            await self._send(type_url, sub, context, force=False)
        finally:
            STREAMS.dec()
            await cancel_and_wait(reader)

    @staticmethod
    def _wrong_type(asked: str, served: str) -> InvalidArgument:
        return InvalidArgument(
            f"this service serves {served} only, not {asked!r}; use the aggregated service ({ADS_SERVICE}) for "
            "several types on one stream",
            reason="WRONG_RESOURCE_TYPE",
        )

    @staticmethod
    async def _read(request_iterator: AsyncIterator[Any], requests: asyncio.Queue[Any]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for request in request_iterator:
                await requests.put(request)
        await requests.put(None)

    async def _handle(
        self, request: Any, type_url: str, subscriptions: dict[str, Subscription], context: Context, node: str
    ) -> None:
        sub = subscriptions.get(type_url)
        if sub is None:
            log.info("xDS client %r asked for %s, which this server does not serve; ignored", node, type_url)
            return
        if request.response_nonce and request.response_nonce != sub.nonce:
            return  # answers an older response: stale, a newer one is on its way to the client
        names: frozenset[str] | None = frozenset(request.resource_names)
        if not sub.subscribed and not names and type_url in WHOLE_STATE_TYPES:
            names = None
        if request.HasField("error_detail"):
            NACKS.labels(short_type(type_url)).inc()
            log.warning(
                "xDS client %r rejected %s version %s: %s",
                node,
                short_type(type_url),
                sub.sent_version,
                request.error_detail.message,
            )
        if sub.subscribed and names == sub.names:
            return  # an ACK, or a NACK of the same subscription: nothing new to send until something changes
        sub.names, sub.subscribed = names, True
        await self._send(type_url, sub, context, force=True)

    async def _send(self, type_url: str, sub: Subscription, context: Context, *, force: bool) -> None:
        current = self.resources.resources[type_url]
        version = self.resources.versions[type_url]
        chosen = {name: data for name, data in current.items() if sub.wants(name)}
        sub.sent_version = version
        if not force and chosen == sub.sent:
            return  # other resources of this type changed, none this client asked for
        sub.sent = chosen
        sub.nonce = str(next(self._nonces))
        PUSHES.labels(short_type(type_url)).inc()
        await context.write(self._response(type_url, str(version), chosen, sub.nonce))

    @staticmethod
    def _response(type_url: str, version: str, chosen: Mapping[str, bytes], nonce: str) -> Any:
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            nonce=nonce,
            resources=[any_pb2.Any(type_url=type_url, value=data) for _, data in sorted(chosen.items())],
        )


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Every resource type on one stream: what gRPC clients use. Delta xDS is not served (UNIMPLEMENTED)."""

    def __init__(self, streams: DiscoveryStreams) -> None:
        self.streams = streams

    async def StreamAggregatedResources(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self.streams.stream(request_iterator, context, f"/{ADS_SERVICE}/StreamAggregatedResources")


class ListenerServicer(lds_pb2_grpc.ListenerDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, streams: DiscoveryStreams) -> None:
        self.streams = streams

    async def StreamListeners(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self.streams.stream(request_iterator, context, f"/{LDS_SERVICE}/StreamListeners", LISTENER)

    async def FetchListeners(self, request: Any, context: Context) -> Any:
        return await self.streams.fetch(request, context, f"/{LDS_SERVICE}/FetchListeners", LISTENER)


class RouteServicer(rds_pb2_grpc.RouteDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, streams: DiscoveryStreams) -> None:
        self.streams = streams

    async def StreamRoutes(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self.streams.stream(request_iterator, context, f"/{RDS_SERVICE}/StreamRoutes", ROUTE)

    async def FetchRoutes(self, request: Any, context: Context) -> Any:
        return await self.streams.fetch(request, context, f"/{RDS_SERVICE}/FetchRoutes", ROUTE)


class ClusterServicer(cds_pb2_grpc.ClusterDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, streams: DiscoveryStreams) -> None:
        self.streams = streams

    async def StreamClusters(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self.streams.stream(request_iterator, context, f"/{CDS_SERVICE}/StreamClusters", CLUSTER)

    async def FetchClusters(self, request: Any, context: Context) -> Any:
        return await self.streams.fetch(request, context, f"/{CDS_SERVICE}/FetchClusters", CLUSTER)


class EndpointServicer(eds_pb2_grpc.EndpointDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, streams: DiscoveryStreams) -> None:
        self.streams = streams

    async def StreamEndpoints(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self.streams.stream(request_iterator, context, f"/{EDS_SERVICE}/StreamEndpoints", ENDPOINTS)

    async def FetchEndpoints(self, request: Any, context: Context) -> Any:
        return await self.streams.fetch(request, context, f"/{EDS_SERVICE}/FetchEndpoints", ENDPOINTS)


class XdsServer:
    """The xDS role of the scheduler: the resources, what keeps them current, and the discovery services."""

    def __init__(self, state: SchedulerState, standby: Callable[[], str] = lambda: "") -> None:
        self.resources = XdsResources()
        self.builder = XdsBuilder(state, self.resources)
        self.streams = DiscoveryStreams(self.resources, standby)
        self._task: asyncio.Task[None] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(self.streams), server)
        lds_pb2_grpc.add_ListenerDiscoveryServiceServicer_to_server(ListenerServicer(self.streams), server)
        rds_pb2_grpc.add_RouteDiscoveryServiceServicer_to_server(RouteServicer(self.streams), server)
        cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(ClusterServicer(self.streams), server)
        eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(EndpointServicer(self.streams), server)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.builder.run(), name="scheduler-xds")

    async def end_streams(self) -> None:
        await self.resources.end_streams()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self.resources.end_streams()
