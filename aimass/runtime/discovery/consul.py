"""The Consul registry backend (``registry.backend = "consul"``), on py-consul's asyncio client.

Every process registers with its local Consul agent as one instance of the Consul service ``<prefix><kind>``
(``aimass-nlp``, ``aimass-gateway``, ...; ID = the instance id), with two checks:

* a TTL check (``<id>:ttl``) that every heartbeat passes (state SERVING) or fails with the state as its output
  (STARTING, DRAINING, NOT_SERVING): a hung process stops heartbeating and goes critical after ``ttl_s``;
* a gRPC check (``<id>:grpc``) the agent runs against the process's ``grpc.health.v1`` service, so a process that
  still heartbeats but no longer answers goes critical too; an instance whose gRPC check stays critical for
  ``deregister_critical_after_s`` (a crashed process) is removed by Consul.

What routers need travels in the registration: ``meta`` holds the kind, the gRPC services, the pid and the labels
(``label-<name>``); tags hold ``kind=``, one ``model=`` per model and the device (``device=``) for filtering
(``/v1/health/service/aimass-nlp?tag=model=...``) and the Consul UI.

Reads use the health endpoint (every instance with its checks; states mapped back to ``ServingState``) and
``watch()`` follows the catalog and each aimass service with blocking queries (index + wait). Consul being
unreachable is logged once (and its recovery once); the watch keeps the last view meanwhile. An answer that does not
parse is rejected with a logged error, and the last view of that service is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import aiohttp
import consul
import consul.aio
from consul.exceptions import ACLDisabled, ACLPermissionDenied, BadRequest, ClientError, ConsulException, NotFound

from aimass import pki
from aimass.runtime.config import ConsulConfig
from aimass.runtime.discovery.base import LISTENER_LABEL, Instance
from aimass.v1 import common_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
ServingState: TypeAlias = common_pb2.ServingState.ValueType

# Blocking queries may come back up to wait/16 late (Consul's jitter); the request timeout is added on top.
WAIT_JITTER = 1 / 16
# How long a watcher waits before asking again after a failed or rejected answer (doubling up to the maximum).
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
TTL_CHECK_MISSING = ("does not have associated TTL", "Unknown check")


class ConsulError(ConnectionError):
    """Consul did not do what was asked. A ``ConnectionError``, so membership and callers retry as with any
    registry outage."""


class ConsulUnreachable(ConsulError):
    """No answer from the agent (refused, timed out, 5xx)."""


class ConsulRefused(ConsulError):
    """The agent answered with a 4xx (bad request, ACL denied): retrying the same request will not help."""


class MalformedConsulAnswer(ConsulError):
    """The agent answered something that does not parse as what the endpoint returns."""


class _UnknownCheck(ConsulError):
    """A TTL update named a check the agent does not have (the agent restarted, or the instance was removed)."""


def go_duration(seconds: float) -> str:
    """Consul's duration format ("5s", "0.5s")."""
    return f"{seconds:g}s"


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class ConsulClient:
    """py-consul's asyncio client with per-call timeouts, errors sorted into ``ConsulError`` kinds, and Consul's
    reachability tracked across every call (logged once when lost and once when back; listeners told)."""

    def __init__(self, config: ConsulConfig) -> None:
        self.config = config
        self.reachable: bool | None = None  # unknown until the first call
        self._consul: Any = None
        self._listeners: list[Callable[[bool], None]] = []
        self._malformed_logged: dict[str, str] = {}
        self._refusals_logged: dict[str, str] = {}

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        """``listener(False)`` when Consul stops answering, ``listener(True)`` when it answers again."""
        self._listeners.append(listener)

    def _client(self) -> Any:
        # Created on first use: aiohttp sessions belong to the running event loop.
        if self._consul is None:
            host, port = split_host_port(self.config.address)
            token = self.config.token.get_secret_value() if self.config.token is not None else None
            with warnings.catch_warnings():
                # py-consul 1.8 passes aiohttp's deprecated verify_ssl/ssl_context arguments.
                warnings.simplefilter("ignore", DeprecationWarning)
                self._consul = consul.aio.Consul(
                    host=host,
                    port=port,
                    scheme=self.config.scheme,
                    token=token or None,
                    dc=self.config.datacenter or None,
                    verify=self.config.scheme == "https",
                )
        return self._consul

    def blocking_timeout_s(self, wait_s: float) -> float:
        return wait_s * (1 + WAIT_JITTER) + self.config.request_timeout_s

    async def call(self, what: str, request: Callable[[Any], Awaitable[T]], *, timeout_s: float | None = None) -> T:
        """``request(client)`` within a timeout; raises a ``ConsulError`` kind, never aiohttp's or py-consul's."""
        try:
            async with asyncio.timeout(timeout_s or self.config.request_timeout_s):
                result = await request(self._client())
        except ConsulException as err:
            text = f"{what}: {_shorten(str(err))}"
            if str(err).startswith(("Failed to decode JSON", "Missing index header")):
                self._set_reachable(True)
                raise MalformedConsulAnswer(text) from err
            if any(marker in str(err) for marker in TTL_CHECK_MISSING):
                self._set_reachable(True)
                raise _UnknownCheck(text) from err
            if isinstance(err, ACLDisabled | ACLPermissionDenied | BadRequest | ClientError | NotFound):
                self._set_reachable(True)
                if not isinstance(err, NotFound) and self._refusals_logged.get(what) != text:
                    # A bad token or a rejected registration does not heal by retrying: say so (once).
                    self._refusals_logged[what] = text
                    log.error("Consul refused %s", text)
                raise ConsulRefused(text) from err
            self._set_reachable(False, text)  # 5xx: the agent is up but cannot answer (no cluster leader, ...)
            raise ConsulUnreachable(text) from err
        except UnicodeDecodeError as err:
            self._set_reachable(True)
            raise MalformedConsulAnswer(f"{what}: the body is not UTF-8") from err
        except (aiohttp.ClientError, OSError) as err:  # TimeoutError is an OSError
            text = f"{what}: {type(err).__name__} {err}".rstrip()
            self._set_reachable(False, text)
            raise ConsulUnreachable(text) from err
        self._set_reachable(True)
        self._refusals_logged.pop(what, None)
        return result

    def _set_reachable(self, reachable: bool, reason: str = "") -> None:
        if reachable == self.reachable:
            return
        if not reachable:
            log.warning(
                "Consul at %s is unreachable (%s); serving with the last view and retrying", self.config.address, reason
            )
        elif self.reachable is False:
            log.info("Consul at %s is reachable again", self.config.address)
        self.reachable = reachable
        for listener in self._listeners:
            listener(reachable)

    def malformed(self, what: str, problem: str) -> None:
        """Logs a rejected answer at ERROR, once per distinct problem (a watcher may see the same one repeatedly)."""
        if self._malformed_logged.get(what) != problem:
            self._malformed_logged[what] = problem
            log.error("rejected a malformed Consul answer (%s): %s; keeping the last view", what, problem)

    def answered_well(self, what: str) -> None:
        self._malformed_logged.pop(what, None)

    async def close(self) -> None:
        if self._consul is not None:
            client, self._consul = self._consul, None
            with contextlib.suppress(Exception):
                await client.close()


# -- parsing Consul's answers ------------------------------------------------------------------------------------


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedConsulAnswer(f"{what} is not an object of strings")
    return dict(value)


def _str_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedConsulAnswer(f"{what} is not a list of strings")
    return list(value)


def _index(raw: object) -> int:
    text = str(raw)
    if not text.isdigit():
        raise MalformedConsulAnswer(f"X-Consul-Index {raw!r} is not a non-negative number")
    return int(text)


def state_from_checks(instance_id: str, checks: list[dict[str, Any]]) -> ServingState:
    """The instance's ``ServingState`` from its checks (its own and its node's).

    The TTL check's output is the state the process last reported; when that check is critical for another reason
    (its TTL expired) or another check is critical (gRPC health, the node, maintenance), the instance is NOT_SERVING.
    """
    reported: ServingState | None = None
    critical = False
    for check in checks:
        if check.get("CheckID") == f"{instance_id}:ttl":
            name = f"SERVING_STATE_{str(check.get('Output', '')).strip()}"
            if name in common_pb2.ServingState.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
                reported = common_pb2.ServingState.Value(name)
        critical = critical or check.get("Status") == "critical"
    if reported is not None and reported != common_pb2.SERVING_STATE_SERVING:
        return reported
    return common_pb2.SERVING_STATE_NOT_SERVING if critical else common_pb2.SERVING_STATE_SERVING


def instance_from_entry(entry: object) -> Instance:
    """One ``/v1/health/service/<name>`` entry (Node, Service, Checks) → ``Instance``; MalformedConsulAnswer if the
    entry is not one an aimass process registered."""
    if not isinstance(entry, dict):
        raise MalformedConsulAnswer(f"an entry is a {type(entry).__name__}, not an object")
    service, node, checks = entry.get("Service"), entry.get("Node") or {}, entry.get("Checks")
    if not isinstance(service, dict) or not isinstance(node, dict):
        raise MalformedConsulAnswer("an entry's Service or Node is not an object")
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise MalformedConsulAnswer("an entry's Checks is not a list of objects")
    instance_id, port = service.get("ID"), service.get("Port")
    if not isinstance(instance_id, str) or not instance_id:
        raise MalformedConsulAnswer("a Service has no ID")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MalformedConsulAnswer(f"{instance_id}: Port {port!r} is not a port")
    host = service.get("Address") or node.get("Address")
    if not isinstance(host, str) or not host:
        raise MalformedConsulAnswer(f"{instance_id}: no Address")
    meta = _str_map(service.get("Meta"), f"{instance_id}: Meta")
    tags = _str_list(service.get("Tags"), f"{instance_id}: Tags")
    kind, pid = meta.get("kind", ""), meta.get("pid", "0")
    if not kind:
        raise MalformedConsulAnswer(f"{instance_id}: Meta has no kind (not registered by aimass)")
    if not pid.isdigit():
        raise MalformedConsulAnswer(f"{instance_id}: Meta pid {pid!r} is not a number")
    return Instance(
        instance_id=instance_id,
        kind=kind,
        services=tuple(s for s in meta.get("services", "").split(",") if s),
        address=join_host_port(host, port),
        models=tuple(tag.removeprefix("model=") for tag in tags if tag.startswith("model=")),
        state=state_from_checks(instance_id, checks),
        labels={key.removeprefix("label-"): value for key, value in meta.items() if key.startswith("label-")},
        pid=int(pid),
    )


def instances_from_answer(data: object) -> list[Instance]:
    if not isinstance(data, list):
        raise MalformedConsulAnswer(f"expected a list of entries, got {type(data).__name__}")
    return [instance_from_entry(entry) for entry in data]


# -- the registry ------------------------------------------------------------------------------------------------


class ConsulRegistry:
    """The ``Registry`` protocol on Consul: register/heartbeat/deregister through the local agent, reads and
    watches through the health and catalog endpoints."""

    def __init__(self, config: ConsulConfig, *, client: ConsulClient | None = None) -> None:
        self.config = config
        self.client = client or ConsulClient(config)

    @property
    def reachable(self) -> bool | None:
        return self.client.reachable

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        self.client.on_reachability(listener)

    def service_name(self, kind: str) -> str:
        return f"{self.config.service_prefix}{kind}"

    # -- membership --------------------------------------------------------------------------------------------

    def registration(self, instance: Instance, ttl_s: float) -> dict[str, Any]:
        """The keyword arguments of py-consul's ``agent.service.register`` for ``instance``."""
        host, port = split_host_port(instance.address)
        iid = instance.instance_id
        serving = instance.state == common_pb2.SERVING_STATE_SERVING
        ttl_check: dict[str, Any] = {
            **consul.Check.ttl(go_duration(ttl_s)),
            "CheckID": f"{iid}:ttl",
            "Name": "aimass heartbeat",
            "Status": "passing" if serving else "critical",
        }
        grpc_check: dict[str, Any] = {
            **consul.Check.grpc(
                join_host_port(host, port),
                go_duration(self.config.check_interval_s),
                timeout=go_duration(self.config.check_timeout_s),
            ),
            "CheckID": f"{iid}:grpc",
            "Name": "gRPC health",
            # Processes register once their server answers health checks; the agent's first run confirms it (the
            # state they report, e.g. a standby's NOT_SERVING, travels in the TTL check).
            "Status": "passing",
        }
        listener = instance.labels.get(LISTENER_LABEL, "plaintext")
        if listener == "mesh":
            # Mesh mTLS: the agent's check presents the agent's own certificate (its tls.defaults, from the mesh CA,
            # with enable_agent_tls_for_checks) and checks the process holds its kind's.
            grpc_check["GRPCUseTLS"] = True
            grpc_check["TLSServerName"] = pki.server_name(instance.kind)
        elif listener == "tls":
            # A gateway's TLS front door, with a certificate from whatever CA the operator chose: the check is about
            # liveness and carries nothing secret, so it does not verify who answers.
            grpc_check["GRPCUseTLS"] = True
            grpc_check["TLSSkipVerify"] = True
        if self.config.deregister_critical_after_s > 0:
            # On the gRPC check, not the TTL one: a process that stopped answering is removed, while one that only
            # reports itself not serving (a standby scheduler) stays listed.
            grpc_check["DeregisterCriticalServiceAfter"] = go_duration(self.config.deregister_critical_after_s)
        meta = {
            "kind": instance.kind,
            "services": ",".join(instance.services),
            "pid": str(instance.pid),
            **{f"label-{key}": value for key, value in instance.labels.items()},
        }
        tags = ["aimass", f"kind={instance.kind}", *(f"model={m}" for m in instance.models)]
        if "device" in instance.labels:
            tags.append(f"device={instance.labels['device']}")
        return {
            "name": self.service_name(instance.kind),
            "service_id": iid,
            "address": host,
            "port": port,
            "tags": tags,
            "meta": meta,
            "check": ttl_check,
            "extra_checks": [grpc_check],
            # Re-registering (a model loaded) replaces the checks rather than piling them up.
            "replace_existing_checks": True,
        }

    async def register(self, instance: Instance, ttl_s: float) -> None:
        kwargs = self.registration(instance, ttl_s)
        await self.client.call("register", lambda c: c.agent.service.register(**kwargs))
        # The TTL check's output carries the state the process reports (read back by state_from_checks).
        await self.heartbeat(instance.instance_id, instance.state)
        log.debug("registered %s as %s in Consul", instance.instance_id, kwargs["name"])

    async def heartbeat(self, instance_id: str, state: ServingState) -> bool:
        check_id = f"{instance_id}:ttl"
        note = common_pb2.ServingState.Name(state).removeprefix("SERVING_STATE_")
        serving = state == common_pb2.SERVING_STATE_SERVING
        try:
            known = await self.client.call(
                "heartbeat",
                lambda c: (c.agent.check.ttl_pass if serving else c.agent.check.ttl_fail)(check_id, notes=note),
            )
        except _UnknownCheck:
            return False
        return bool(known)

    async def deregister(self, instance_id: str) -> None:
        await self.client.call("deregister", lambda c: c.agent.service.deregister(instance_id))

    # -- reads -------------------------------------------------------------------------------------------------

    async def catalog_names(self, index: int = 0, wait_s: float = 0) -> tuple[int, list[str]]:
        """(X-Consul-Index, the aimass service names in the catalog); a blocking query when ``index`` > 0."""
        raw_index, data = await self.client.call(
            "catalog",
            lambda c: c.catalog.services(index=str(index) if index else None, wait=go_duration(wait_s)),
            timeout_s=self.client.blocking_timeout_s(wait_s) if index else None,
        )
        if not isinstance(data, dict):
            raise MalformedConsulAnswer(f"catalog: expected an object of service names, got {type(data).__name__}")
        prefix = self.config.service_prefix
        return _index(raw_index), sorted(n for n in data if isinstance(n, str) and n.startswith(prefix))

    async def instances_of(self, name: str, index: int = 0, wait_s: float = 0) -> tuple[int, list[Instance]]:
        """(X-Consul-Index, the instances of the Consul service ``name``); a blocking query when ``index`` > 0."""
        raw_index, data = await self.client.call(
            f"health {name}",
            lambda c: c.health.service(name, index=str(index) if index else None, wait=go_duration(wait_s)),
            timeout_s=self.client.blocking_timeout_s(wait_s) if index else None,
        )
        return _index(raw_index), instances_from_answer(data)

    async def list_instances(self, service: str = "") -> list[Instance]:
        _, names = await self.catalog_names()
        found: list[Instance] = []
        for name in names:
            _, instances = await self.instances_of(name)
            found.extend(i for i in instances if not service or service in i.services)
        return sorted(found, key=lambda i: i.instance_id)

    def watch(self) -> AsyncGenerator[list[Instance], None]:
        return _Watch(self).run()

    async def close(self) -> None:
        await self.client.close()


class _Watch:
    """One ``watch()``: a blocking query on the catalog (which aimass services exist) and one per service (its
    instances), merged into one view yielded whenever it changes."""

    def __init__(self, registry: ConsulRegistry) -> None:
        self.registry = registry
        self.client = registry.client
        self.wait_s = registry.config.wait_s
        self.names: set[str] | None = None  # None until the catalog has answered
        self.views: dict[str, list[Instance]] = {}
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.changed = asyncio.Event()

    async def run(self) -> AsyncGenerator[list[Instance], None]:
        catalog = asyncio.get_running_loop().create_task(
            self._blocking("catalog", self.registry.catalog_names, self._apply_names), name="consul-watch-catalog"
        )
        last: list[Instance] | None = None
        try:
            while True:
                await self.changed.wait()
                self.changed.clear()
                if self.names is None or not self.names <= set(self.views):
                    continue  # the first whole view waits for every service's first answer
                view = sorted((i for name in self.names for i in self.views[name]), key=lambda i: i.instance_id)
                if view != last:
                    last = view
                    yield view
        finally:
            catalog.cancel()
            for task in self.followers.values():
                task.cancel()
            await asyncio.gather(catalog, *self.followers.values(), return_exceptions=True)

    def _apply_names(self, names: list[str]) -> None:
        wanted = set(names)
        for gone in set(self.followers) - wanted:
            self.followers.pop(gone).cancel()
            self.views.pop(gone, None)
        for name in sorted(wanted - set(self.followers)):
            self.followers[name] = asyncio.get_running_loop().create_task(
                self._follow(name), name=f"consul-watch-{name}"
            )
        self.names = wanted

    async def _follow(self, name: str) -> None:
        def apply(instances: list[Instance]) -> None:
            self.views[name] = instances

        def rejected() -> None:
            # A service whose first answer is rejected counts as empty, so it does not hold back the others' view.
            if name not in self.views:
                self.views[name] = []
                self.changed.set()

        async def fetch(index: int, wait_s: float) -> tuple[int, list[Instance]]:
            return await self.registry.instances_of(name, index, wait_s)

        await self._blocking(f"health {name}", fetch, apply, rejected)

    async def _blocking(
        self,
        what: str,
        fetch: Callable[[int, float], Awaitable[tuple[int, T]]],
        apply: Callable[[T], None],
        on_rejected: Callable[[], None] = lambda: None,
    ) -> None:
        """Consul's blocking-query loop: ask with the last index, apply each answer, back off after failures."""
        index = 0
        retry_s = RETRY_MIN_S
        while True:
            try:
                new_index, data = await fetch(index, self.wait_s)
                apply(data)
            except MalformedConsulAnswer as err:
                self.client.malformed(what, str(err))
                on_rejected()
                index = 0  # ask afresh (no blocking) once the backoff has passed
            except ConsulError:
                pass  # logged once by the client while Consul stays unreachable
            else:
                self.client.answered_well(what)
                retry_s = RETRY_MIN_S
                # Consul's rules: an index that goes backwards (a restored server) resets the query to 0; an index
                # must be at least 1 to block.
                index = max(new_index, 1) if new_index >= index else 0
                self.changed.set()
                continue
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, RETRY_MAX_S)
