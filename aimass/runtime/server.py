"""Server bootstrap shared by every aimass process.

``ServerRunner`` turns a ``ServiceApp`` (servicers + engines) into a running grpc.aio server with health,
reflection, interceptors and registry membership, and drains it on SIGTERM: health NOT_SERVING and deregister,
a short delay so routers notice, then queued and in-flight work finishes before the server stops.

What differs between processes is composed, not switched on their kind: a ``Listener`` says how the port is
secured (mesh mTLS with a role policy inside the mesh, the API-key front door on the gateway) and a process that
serves models adds a ``ReplicaRole`` (aimass.runtime.replica); control-plane processes have none.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import grpc
import prometheus_client
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aimass.runtime import tracing
from aimass.runtime.config import RegistryConfig, ServerConfig, Settings, load_settings
from aimass.runtime.discovery import (
    DISCOVERY_HEALTH_SERVICE,
    LISTENER_LABEL,
    Instance,
    Membership,
    Registry,
    ReportsReachability,
)
from aimass.runtime.identity import MeshCredentials, MeshPolicy, MeshPolicyInterceptor
from aimass.runtime.interceptors import (
    AdmissionInterceptor,
    DeadlineInterceptor,
    ErrorMappingInterceptor,
    TelemetryInterceptor,
)
from aimass.runtime.logs import configure_logging
from aimass.runtime.replica import ReplicaRole
from aimass.v1 import common_pb2, models_pb2

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@runtime_checkable
class EndsStreams(Protocol):
    """An app serving streams that never end by themselves (watch RPCs): it ends them when the server drains, so
    draining does not wait the whole grace period for them."""

    async def end_streams(self) -> None: ...


@runtime_checkable
class StandsBy(Protocol):
    """An app that may stand by behind another instance of itself (a second scheduler behind the leader lock).

    Once the server listens and the app has loaded, the runner calls ``stand_by``; the app then calls
    ``set_active(True)`` when it becomes the active one (at once if nothing holds it back) and ``set_active(False)``
    when it goes back to standing by. While standing by, its services' health is NOT_SERVING and the registry lists
    it NOT_SERVING (routers and Consul DNS skip it); the process's own health ("") stays SERVING.
    """

    async def stand_by(self, identity: str, set_active: Callable[[bool], Awaitable[None]]) -> None: ...


class ServiceApp(Protocol):
    """What a process serves. Servicers stay thin; engines load in ``load`` (showing progress in the log)."""

    kind: str
    # Fully-qualified gRPC services this process implements; health and registry report these.
    service_names: tuple[str, ...]

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None: ...

    async def load(self) -> None: ...

    def model_names(self) -> tuple[str, ...]: ...

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        """The catalogue entries of the models this process serves (replicas left empty; the runner adds itself)."""
        ...

    async def close(self) -> None:
        """Release engines after the server stopped (queued work has finished by then)."""
        ...


def server_options(config: ServerConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC server arguments: message limits and HTTP/2 hygiene (streams per connection, ping enforcement,
    connection idle and age limits), all from ``config``. ``reuse_port``: only for gateway workers, whose parent
    claimed the port first (gateway/workers.py)."""
    options = [
        *message_options(config),
        # Without this a second server silently shares the port (SO_REUSEPORT); we want "address in use".
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # Keepalive pings are accepted (gateways ping idle replica channels to notice a vanished host), but a peer
        # pinging more often than min_ping_interval_s gets a strike, and past max_ping_strikes a GOAWAY
        # (ENHANCE_YOUR_CALM): a ping flood costs its sender the connection, not the server its CPU.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(config.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
    ]
    if config.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", int(config.max_connection_idle_s * 1000)))
    if config.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)))
    return options


def message_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments for calls to a server of ``config`` (and the server's own): the same message limits and
    stream window."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
    ]


Security = Literal["plaintext", "mesh", "tls"]


@dataclass(frozen=True)
class Listener:
    """How a server's port is secured: its credentials (None: plaintext), the interceptors that decide who may call
    what (the mesh role policy, or the gateway's API keys), and which kind of security that is: ``mesh`` (mTLS with
    the mesh's CA), ``tls`` (server TLS only, the front door) or ``plaintext``."""

    credentials: grpc.ServerCredentials | None = None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    security: Security = "plaintext"
    # More ports of the same server (address → credentials; port 0 picks one): same handlers and interceptors, so an
    # interceptor tells their calls apart by what their credentials verified (a mesh certificate), never by port.
    # The gateway's adapter listener is one (gateway/app.py).
    extra_ports: tuple[tuple[str, grpc.ServerCredentials], ...] = ()


def mesh_listener(credentials: MeshCredentials | None, policy: MeshPolicy) -> Listener:
    """An internal listener: a client certificate from the mesh's CA, and ``policy`` on the caller's role."""
    if credentials is None:
        return Listener()
    return Listener(credentials.server_credentials(), (MeshPolicyInterceptor(policy),), "mesh")


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_host(config: ServerConfig, toward: str) -> str:
    """The host others dial: ``advertise_host``, else ``host``, else (a wildcard bind) the local address on the route
    to ``toward`` (host:port of the registry), else the hostname."""
    if config.advertise_host:
        return config.advertise_host
    if config.host not in WILDCARD_HOSTS:
        return config.host
    host, _, port = toward.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # A UDP "connect" only picks the route and source address; nothing is sent.
            probe.connect((host.strip("[]"), int(port or 0)))
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return socket.gethostname()


class ServerRunner:
    def __init__(
        self,
        app: ServiceApp,
        config: ServerConfig,
        *,
        registry: Registry | None,
        registry_config: RegistryConfig,
        listener: Listener = Listener(),
        replica: ReplicaRole | None = None,
        reflection_extra: Sequence[str] = (),
        reflection_pool: Callable[[Sequence[str]], descriptor_pool.DescriptorPool] | None = None,
        echo_request_id: bool = True,
        node_id: str = "",
        reuse_port: bool = False,
    ) -> None:
        self.app = app
        self.config = config
        self.registry = registry
        self.registry_config = registry_config
        self.listener = listener
        self.replica = replica
        self.reflection_extra = tuple(reflection_extra)
        # Builds the pool reflection describes the served names from (None: protobuf's default pool).
        self.reflection_pool = reflection_pool
        self.echo_request_id = echo_request_id
        self.node_id = node_id or socket.gethostname()
        # Share the ports with sibling workers (SO_REUSEPORT); see server_options.
        self.reuse_port = reuse_port
        registry_address = (
            registry_config.consul.address if registry_config.backend == "consul" else registry_config.address
        )
        self.advertised_host = advertised_host(config, registry_address)
        self.state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_STARTING
        self.health = health.aio.HealthServicer()
        self.admission = AdmissionInterceptor(
            config.max_inflight,
            max_streams=config.max_streams,
            tenant_share=config.tenant_share,
            # Replicas take the tenant from their gateways' metadata; elsewhere a tenant counts only when verified.
            trust_tenant=replica is not None,
        )
        self.port = 0
        # The listener's extra ports as bound: address asked for → port.
        self.extra_ports: dict[str, int] = {}
        self.membership: Membership | None = None
        self._server: grpc.aio.Server | None = None
        # config.health_port's server (grpc.health.v1 alone, plaintext), when there is one.
        self._health_server: grpc.aio.Server | None = None
        self._stopped = False
        # False while a StandsBy app stands by.
        self._active = True
        self._active_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """Where others dial this server (registered with the registry)."""
        return f"{self.advertised_host}:{self.port}"

    @property
    def instance_id(self) -> str:
        return f"{self.app.kind}-{self.address}-{os.getpid()}"

    @property
    def server(self) -> grpc.aio.Server:
        if self._server is None:
            raise RuntimeError("the server exists once start() has run")
        return self._server

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Outermost first: trace, meter and log every call; hold it to its deadline; decide who may make it
        (listener); the replica's request scope; admission; then errors become statuses next to the handler."""
        replica = self.replica
        interceptors: list[grpc.aio.ServerInterceptor] = [
            TelemetryInterceptor(
                access_log_enabled=self.config.access_log,
                echo_request_id=self.echo_request_id,
                # Replicas name themselves in a trailer (x-aimass-replica); the gateway relays theirs.
                replica_id=None if replica is None else lambda: self.instance_id,
            ),
            DeadlineInterceptor(self.config.unary_deadline, self.config.stream_deadline, self.config.deadline_rules),
            *self.listener.interceptors,
            *(replica.interceptors() if replica is not None else ()),
            self.admission,
            ErrorMappingInterceptor(),
        ]
        traces = tracing.installed()
        if traces is not None:
            # Outermost: the server span covers the whole call, and refusals and mapped errors (which abort through
            # the context it wraps) record their code on it.
            interceptors.insert(0, traces.server_interceptor())
        return interceptors

    def _listen(self) -> int:
        try:
            if self.listener.credentials is None:
                port = self.server.add_insecure_port(self.config.address)
            else:
                port = self.server.add_secure_port(self.config.address, self.listener.credentials)
        except RuntimeError as err:
            raise RuntimeError(f"{self.app.kind}: cannot listen on {self.config.address}: {err}") from err
        for address, credentials in self.listener.extra_ports:
            try:
                self.extra_ports[address] = self.server.add_secure_port(address, credentials)
            except RuntimeError as err:
                raise RuntimeError(f"{self.app.kind}: cannot listen on {address}: {err}") from err
        return port

    async def start(self) -> None:
        # grpc.aio binds a server to the running event loop, so it is built here rather than in __init__.
        self._server = grpc.aio.server(
            interceptors=self._interceptors(), options=server_options(self.config, reuse_port=self.reuse_port)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (*self.app.service_names, *self.reflection_extra, health.SERVICE_NAME, reflection.SERVICE_NAME)
        if self.replica is not None:
            names = (*names, *self.replica.add_to_server(self, self.server))
        pool = None if self.reflection_pool is None else self.reflection_pool(names)
        reflection.enable_server_reflection(names, self.server, pool=pool)
        self.app.add_to_server(self.server, self.health)
        for name in ("", *self.app.service_names):
            await self.health.set(name, NOT_SERVING)
        self.port = self._listen()
        await self.server.start()
        if self.config.health_port:
            await self._serve_health_port()
        if self.config.metrics_port:
            prometheus_client.start_http_server(self.config.metrics_port, addr=self.config.host)
            log.info("%s metrics at http://%s:%d/metrics", self.app.kind, self.config.host, self.config.metrics_port)
        log.info("%s listening on %s; loading models", self.app.kind, self.address)
        started = time.perf_counter()
        await self.app.load()
        # Models leave hundreds of thousands of long-lived objects; without freezing them every full garbage
        # collection walks them all (~250 ms pauses under load).
        gc.collect()
        gc.freeze()
        if isinstance(self.app, StandsBy):
            # Active only once the app says so (which it may do before stand_by returns).
            self._active = False
            await self.app.stand_by(self.instance_id, self._set_active)
        await self.health.set("", SERVING)
        await self._apply_active()
        if self.replica is not None:
            await self.replica.serve(self)
        if self.registry is not None:
            await self._join(self.registry)
        log.info(
            "%s ready on %s in %.1fs (models: %s)",
            self.app.kind,
            self.address,
            time.perf_counter() - started,
            ", ".join(self.app.model_names()) or "none",
        )

    async def _serve_health_port(self) -> None:
        """grpc.health.v1 alone, plaintext, on health_port: the same statuses (SERVING once the models are loaded,
        NOT_SERVING while draining), for a prober that cannot present a mesh certificate; nothing else is there."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.config.host}:{self.config.health_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as err:
            raise RuntimeError(f"{self.app.kind}: cannot listen on {address} (health_port): {err}") from err
        await server.start()
        self._health_server = server

    async def _join(self, registry: Registry) -> None:
        """Registers this process (kept registered by heartbeats) with its models and labels."""
        if isinstance(registry, ReportsReachability):
            # The process keeps serving on its last view while the registry is away; its health says so.
            await self.health.set(DISCOVERY_HEALTH_SERVICE, SERVING if registry.reachable is not False else NOT_SERVING)
            registry.on_reachability(self._registry_reachability)
        replica = self.replica
        labels = replica.labels() if replica is not None else {"node": self.node_id}
        instance = Instance(
            instance_id=self.instance_id,
            kind=self.app.kind,
            services=self.app.service_names,
            address=self.address,
            models=replica.serving_models() if replica is not None else self.app.model_names(),
            state=self.state,
            labels={**labels, LISTENER_LABEL: self.listener.security},
            pid=os.getpid(),
        )
        self.membership = Membership(
            registry, instance, heartbeat_s=self.registry_config.heartbeat_s, ttl_s=self.registry_config.ttl_s
        )
        self.membership.start()

    async def _set_active(self, active: bool) -> None:
        """A StandsBy app became active (True) or went back to standing by (False)."""
        if self._stopped or active == self._active:
            return
        self._active = active
        log.info("%s is %s", self.app.kind, "active" if active else "standing by")
        await self._apply_active()

    async def _apply_active(self) -> None:
        async with self._active_lock:
            status = SERVING if self._active else NOT_SERVING
            for name in self.app.service_names:
                await self.health.set(name, status)
            self.state = common_pb2.SERVING_STATE_SERVING if self._active else common_pb2.SERVING_STATE_NOT_SERVING
            if self.membership is not None:
                await self.membership.set_state(self.state)

    def _registry_reachability(self, reachable: bool) -> None:
        if self._stopped:
            return
        task = asyncio.get_running_loop().create_task(
            self.health.set(DISCOVERY_HEALTH_SERVICE, SERVING if reachable else NOT_SERVING)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Stop taking work, finish what was accepted, then stop."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        log.info("%s draining: health NOT_SERVING, finishing in-flight work", self.app.kind)
        await self.health.enter_graceful_shutdown()
        self.state = common_pb2.SERVING_STATE_DRAINING
        if self.membership is not None:
            await self.membership.leave()
        if self.replica is not None:
            await self.replica.drain()
        await asyncio.sleep(self.config.drain_delay_s)
        if isinstance(self.app, EndsStreams):
            await self.app.end_streams()
        await self.server.stop(self.config.drain_grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.app.close()
        if self.registry is not None:
            await self.registry.close()
        log.info("%s stopped", self.app.kind)

    async def run_until_signalled(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then drain. A signal during model loading ends the process at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Nothing was accepted yet (health NOT_SERVING, not registered), so there is nothing to drain; the
            # load runs in a thread that cannot be interrupted, and waiting for it would delay every shutdown.
            log.info("%s stopped while loading models; exiting without waiting for the load", self.app.kind)
            if self._server is not None:
                await self._server.stop(0)
            logging.shutdown()
            os._exit(0)
        starting.result()
        await stopping
        await self.drain()


def serve_process(kind: str, build_runner: Callable[[Settings], ServerRunner], *, log_name: str = "") -> None:
    """A process's ``main``: settings from file and env, logging (lines prefixed ``log_name``, default ``kind``),
    then serve until SIGTERM/SIGINT and drain."""
    settings = load_settings()
    configure_logging(settings.log_level, log_name or kind)
    # Before the runner is built: servers, batchers and the gateway see whether tracing is on as they start.
    traces = tracing.setup_process(settings.telemetry, kind)

    async def serve() -> None:
        # Built inside the running loop: grpc.aio servers and channels belong to the loop that creates them.
        try:
            runner = build_runner(settings)
        except FileNotFoundError as err:  # no certificate (mesh TLS on): say how to get one, no traceback
            log.error("%s cannot start: %s", kind, err)
            raise SystemExit(2) from err
        await runner.run_until_signalled()

    try:
        asyncio.run(serve())
    finally:
        if traces is not None:
            # The last spans of the drain, within telemetry.export_timeout_s (a collector that is down costs that).
            traces.shutdown()
