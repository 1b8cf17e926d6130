"""A small fake of the Consul agent's HTTP API on loopback, for the Consul registry backend's tests.

It implements exactly the endpoints ``aimass.runtime.discovery.consul`` and ``.leader`` use, the way a Consul
agent answers them:

* ``PUT /v1/agent/service/register[?replace-existing-checks=true]``, ``PUT /v1/agent/service/deregister/<id>``
* ``PUT /v1/agent/check/{pass,warn,fail}/<check id>?note=`` (TTL checks)
* ``GET /v1/health/service/<name>[?passing=1]`` and ``GET /v1/catalog/services``
* ``PUT /v1/session/{create,renew/<id>,destroy/<id>}``
* ``GET|PUT|DELETE /v1/kv/<key>[?acquire=<session>|release=<session>]``

Reads are blocking queries: with ``?index=N&wait=D`` the request is held until the resource's modify index passes N
or D elapses, and every read answers ``X-Consul-Index``. JSON bodies are decoded as Consul decodes them (field
names case-insensitive, snake_case aliases): py-consul sends lowercase keys. TTL checks expire ("TTL expired"),
``DeregisterCriticalServiceAfter`` removes instances, gRPC checks call the target's ``grpc.health.v1`` at their
interval, sessions expire after their TTL and release their locks, which then stay free of other sessions for the
session's lock delay.

gRPC checks with ``GRPCUseTLS`` dial TLS, verifying the server as ``TLSServerName`` (with ``TLSSkipVerify``, trusting
the certificate the server presents: grpc cannot skip verification, so the fake takes it as its root, which works for
the self-signed certificates the tests give front doors), and
present the agent's own certificate when it has one (``FakeConsul(tls=AgentTls(...))``: a real agent's
``tls.defaults`` with ``enable_agent_tls_for_checks``); without one they trust only the system's roots and present
nothing, as a real agent configured without TLS would.

For fault tests: ``stop()``/``start()`` take the agent away and back on the same port (connections in flight are
cut), and ``inject(path_prefix, body)`` makes matching requests answer a given body until ``clear_faults()``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

NODE = "fake-node"
NODE_ADDRESS = "127.0.0.1"
DATACENTER = "dc1"
MAX_WAIT_S = 600.0
DEFAULT_WAIT_S = 300.0
META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "250ms") in seconds; ValueError for anything else."""
    text = text.strip()
    if not text or DURATION.sub("", text):
        raise ValueError(f"time: invalid duration {text!r}")
    return sum(float(n) * UNITS[u] for n, u in DURATION.findall(text))


def normalise(body: dict[str, Any]) -> dict[str, Any]:
    """Consul's decoding of field names: case-insensitive, snake_case accepted (check_id = CheckID)."""
    return {key.lower().replace("_", ""): value for key, value in body.items()}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class AgentTls:
    """The agent's TLS for its checks: the CA it trusts and its own certificate and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass
class Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    kind: str  # "ttl" or "grpc"
    status: str = "critical"
    output: str = ""
    ttl_s: float = 0.0
    ttl_deadline: float = 0.0
    grpc_target: str = ""
    grpc_use_tls: bool = False
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    interval_s: float = 10.0
    timeout_s: float = 10.0
    next_run: float = 0.0
    deregister_after_s: float = 0.0
    critical_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "Node": NODE,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": "",
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": [],
            "Type": self.kind,
            "Interval": f"{self.interval_s:g}s" if self.kind == "grpc" else "",
            "Timeout": f"{self.timeout_s:g}s" if self.kind == "grpc" else "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }


@dataclass
class Service:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    check_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.service_id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "TaggedAddresses": {},
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Proxy": {},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }


@dataclass
class Session:
    session_id: str
    name: str
    ttl_s: float
    lock_delay_s: float
    behavior: str
    deadline: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.session_id,
            "Name": self.name,
            "Node": NODE,
            "LockDelay": int(self.lock_delay_s * 1e9),
            "Behavior": self.behavior,
            "TTL": f"{self.ttl_s:g}s" if self.ttl_s else "",
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    create_index: int
    modify_index: int
    lock_index: int = 0
    flags: int = 0
    session: str = ""

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode() if self.value is not None else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            entry["Session"] = self.session
        return entry


@dataclass
class Fault:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    at: float


class FakeConsul:
    def __init__(
        self, *, token: str = "", grpc_checks: bool = True, tick_s: float = 0.05, tls: AgentTls | None = None
    ) -> None:
        self.token = token
        self.grpc_checks = grpc_checks
        self.tls = tls
        self.tick_s = tick_s
        self.port = 0
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._index = 1
        self._indexes: dict[str, int] = {}
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.sessions: dict[str, Session] = {}
        self.kv: dict[str, KVEntry] = {}
        self._lock_delay_until: dict[str, float] = {}
        self._faults: dict[str, Fault] = {}
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._down = False

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeConsul:
        """Listen (on the same port again after ``stop``) and run the agent's check and session timers."""
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with fake._cond:
                    fake._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with fake._cond:
                    fake._connections.discard(request)
                super().shutdown_request(request)

            def handle_error(self, request: Any, client_address: Any) -> None:
                # Clients hang up on held queries (a watch cancelled, the agent stopped): that is no error here.
                pass

        self._server = Server(("127.0.0.1", self.port), _handler(self))
        self.port = self._server.server_address[1]
        with self._cond:
            self._down = False
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True),
            threading.Thread(target=self._timers, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """The agent goes away: the port stops answering and held requests and open connections are cut."""
        with self._cond:
            self._down = True
            self._cond.notify_all()
            connections = list(self._connections)
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> FakeConsul:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------------------------------------

    def inject(self, path_prefix: str, body: bytes | str, *, status: int = 200, index: str | None = None) -> None:
        """Requests whose path starts with ``path_prefix`` answer ``body`` (with X-Consul-Index ``index``, default
        the current one; "" for none) until ``clear_faults``. Held blocking queries on that path return at once."""
        data = body.encode() if isinstance(body, str) else body
        with self._cond:
            headers = {} if index == "" else {"X-Consul-Index": index or str(self._index)}
            self._faults[path_prefix] = Fault(data, status, headers)
            self._bump_all()

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()
            self._bump_all()

    def queries(self, path_prefix: str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def check(self, check_id: str) -> Check | None:
        with self._cond:
            return self.checks.get(check_id)

    def wait_until(self, condition: Callable[[FakeConsul], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("fake Consul: condition not met in time")
                self._cond.wait(min(left, 0.1))

    def set_check_status(self, check_id: str, status: str, output: str = "") -> None:
        """What the agent would do when a check's target changes (e.g. a gRPC health check failing)."""
        with self._cond:
            self._set_check(self.checks[check_id], status, output)

    def expire_session(self, session_id: str) -> None:
        """The session's TTL ran out (or its node failed): invalidated, its locks released after the lock delay."""
        with self._cond:
            self._invalidate(session_id)

    # -- state changes (under self._cond) ------------------------------------------------------------------------

    def _bump(self, *resources: str) -> None:
        self._index += 1
        for resource in resources:
            self._indexes[resource] = self._index
        self._cond.notify_all()

    def _bump_all(self) -> None:
        self._bump("catalog", *(k for k in self._indexes if k != "catalog"))

    def _resource_index(self, resource: str) -> int:
        # Consul answers at least 1, and for something never written the index of its table (here: the latest).
        return max(self._indexes.get(resource, self._index if resource.startswith("kv:") else 1), 1)

    def _set_check(self, check: Check, status: str, output: str) -> None:
        now = time.monotonic()
        changed = status != check.status
        check.output = output
        check.status = status
        if status == "critical":
            check.critical_since = check.critical_since or now
        else:
            check.critical_since = None
        if changed:
            # As a real agent: output-only changes reach the catalog later (check_update_interval), status at once.
            self._bump(f"health:{check.service_name}")

    def _remove_service(self, service_id: str) -> None:
        service = self.services.pop(service_id)
        for check_id in service.check_ids:
            self.checks.pop(check_id, None)
        self._bump("catalog", f"health:{service.name}")

    def _invalidate(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        now = time.monotonic()
        for entry in list(self.kv.values()):
            if entry.session == session_id:
                entry.session = ""
                entry.modify_index = self._index + 1
                if session.behavior == "delete":
                    del self.kv[entry.key]
                self._lock_delay_until[entry.key] = now + session.lock_delay_s
                self._bump(f"kv:{entry.key}")

    def _timers(self) -> None:
        while not self._stopping.wait(self.tick_s):
            due: list[Check] = []
            with self._cond:
                now = time.monotonic()
                for check in list(self.checks.values()):
                    if check.kind == "ttl" and check.ttl_s and now > check.ttl_deadline and check.status != "critical":
                        self._set_check(check, "critical", "TTL expired")
                    if check.kind == "grpc" and self.grpc_checks and now >= check.next_run:
                        check.next_run = now + check.interval_s
                        due.append(check)
                for service in list(self.services.values()):
                    for check_id in service.check_ids:
                        check = self.checks[check_id]
                        since = check.critical_since
                        if check.deregister_after_s and since is not None and now - since > check.deregister_after_s:
                            self._remove_service(service.service_id)
                            break
                for session in list(self.sessions.values()):
                    if session.ttl_s and now > session.deadline:
                        self._invalidate(session.session_id)
            for check in due:
                status, output = _grpc_health(check, self.tls)
                with self._cond:
                    if self.checks.get(check.check_id) is check:
                        self._set_check(check, status, output)

    # -- endpoints -----------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes, token: str) -> tuple[int, Any, int]:
        """(status, JSON-able answer or raw bytes, X-Consul-Index or 0)."""
        if self.token and token != self.token:
            raise HTTPError(403, "Permission denied: token with AccessorID '' lacks permission")
        if path == "/v1/agent/service/register" and method == "PUT":
            return self._register(_json_object(body), query.get("replace-existing-checks") in ("true", "1"))
        if path.startswith("/v1/agent/service/deregister/") and method == "PUT":
            service_id = path.removeprefix("/v1/agent/service/deregister/")
            with self._cond:
                if service_id not in self.services:
                    raise HTTPError(404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed')
                self._remove_service(service_id)
            return 200, b"", 0
        if path.startswith("/v1/agent/check/") and method == "PUT":
            verb, _, check_id = path.removeprefix("/v1/agent/check/").partition("/")
            statuses = {"pass": "passing", "warn": "warning", "fail": "critical"}
            if verb not in statuses:
                raise HTTPError(404, f"no such endpoint /v1/agent/check/{verb}")
            with self._cond:
                check = self.checks.get(check_id)
                if check is None or check.kind != "ttl":
                    raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
                check.ttl_deadline = time.monotonic() + check.ttl_s
                self._set_check(check, statuses[verb], query.get("note", ""))
            return 200, b"", 0
        if path.startswith("/v1/health/service/") and method == "GET":
            name = path.removeprefix("/v1/health/service/")
            passing = query.get("passing", "0") not in ("0", "false")
            return self._blocking(f"health:{name}", query, lambda: self._health(name, passing))
        if path == "/v1/catalog/services" and method == "GET":
            return self._blocking("catalog", query, self._catalog)
        if path == "/v1/session/create" and method == "PUT":
            return self._session_create(_json_object(body) if body.strip() else {})
        if path.startswith("/v1/session/renew/") and method == "PUT":
            session_id = path.removeprefix("/v1/session/renew/")
            with self._cond:
                session = self.sessions.get(session_id)
                if session is None:
                    raise HTTPError(404, f"Session id '{session_id}' not found")
                session.deadline = time.monotonic() + session.ttl_s
                return 200, [session.to_json()], 0
        if path.startswith("/v1/session/destroy/") and method == "PUT":
            with self._cond:
                self._invalidate(path.removeprefix("/v1/session/destroy/"))
            return 200, True, 0
        if path.startswith("/v1/kv/"):
            return self._kv(method, path.removeprefix("/v1/kv/"), query, body)
        raise HTTPError(404, f"no such endpoint {method} {path}")

    def _register(self, raw: dict[str, Any], replace_checks: bool) -> tuple[int, Any, int]:
        body = normalise(raw)
        name, service_id = body.get("name"), body.get("id") or body.get("name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "Missing service name")
        port, address = body.get("port", 0), body.get("address", "")
        if not isinstance(port, int) or not isinstance(address, str):
            raise HTTPError(400, "Request decode failed: Port must be a number, Address a string")
        meta = body.get("meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise HTTPError(400, "Request decode failed: Meta must be an object of strings")
        for key, value in meta.items():
            if not META_KEY.match(key) or len(key) > 128 or len(value) > 512:
                raise HTTPError(400, f"Invalid Service Meta: Key {key!r} or its value is invalid")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise HTTPError(400, "Request decode failed: Tags must be a list of strings")
        definitions = list(body.get("checks") or [])
        if body.get("check"):
            definitions.insert(0, body["check"])
        checks = [
            self._check(normalise(d), str(service_id), name, n, len(definitions)) for n, d in enumerate(definitions)
        ]
        with self._cond:
            old = self.services.get(str(service_id))
            if old is not None:
                keep = [] if replace_checks else [c for c in old.check_ids if c not in {k.check_id for k in checks}]
                for check_id in old.check_ids:
                    if check_id not in keep:
                        self.checks.pop(check_id, None)
            else:
                keep = []
            service = Service(str(service_id), name, address, port, list(tags), dict(meta), [*keep])
            for check in checks:
                self.checks[check.check_id] = check
                service.check_ids.append(check.check_id)
            self.services[service.service_id] = service
            if old is not None and old.name != name:
                self._bump(f"health:{old.name}")
            self._bump("catalog", f"health:{name}")
        return 200, b"", 0

    def _check(self, d: dict[str, Any], service_id: str, service_name: str, n: int, count: int) -> Check:
        check_id = (
            d.get("checkid")
            or d.get("id")
            or (f"service:{service_id}" if count == 1 else f"service:{service_id}:{n + 1}")
        )
        status = d.get("status") or "critical"
        if status not in ("passing", "warning", "critical"):
            raise HTTPError(400, f"Invalid check status {status!r}")
        try:
            deregister = (
                parse_duration(d["deregistercriticalserviceafter"]) if d.get("deregistercriticalserviceafter") else 0.0
            )
            if d.get("ttl"):
                ttl = parse_duration(d["ttl"])
                return Check(
                    str(check_id),
                    d.get("name") or f"Service '{service_name}' check",
                    service_id,
                    service_name,
                    "ttl",
                    status=status,
                    ttl_s=ttl,
                    ttl_deadline=time.monotonic() + ttl,
                    deregister_after_s=deregister,
                )
            if d.get("grpc"):
                if not d.get("interval"):
                    raise HTTPError(400, "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks")
                return Check(
                    str(check_id),
                    d.get("name") or f"Service '{service_name}' check",
                    service_id,
                    service_name,
                    "grpc",
                    status=status,
                    grpc_target=str(d["grpc"]),
                    grpc_use_tls=_flag(d, "grpcusetls"),
                    tls_server_name=str(d.get("tlsservername") or ""),
                    tls_skip_verify=_flag(d, "tlsskipverify"),
                    interval_s=parse_duration(d["interval"]),
                    timeout_s=parse_duration(d["timeout"]) if d.get("timeout") else 10.0,
                    next_run=time.monotonic(),
                    deregister_after_s=deregister,
                )
        except ValueError as err:
            raise HTTPError(400, f"Request decode failed: {err}") from err
        raise HTTPError(400, "Check types that are not TTL or GRPC are not faked here")

    def _health(self, name: str, passing: bool) -> list[dict[str, Any]]:
        entries = []
        for service in sorted(self.services.values(), key=lambda s: s.service_id):
            if service.name != name:
                continue
            checks = [_serf_health(), *(self.checks[c].to_json() for c in service.check_ids)]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append(
                {
                    "Node": {
                        "ID": "00000000-0000-0000-0000-000000000001",
                        "Node": NODE,
                        "Address": NODE_ADDRESS,
                        "Datacenter": DATACENTER,
                        "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS},
                        "Meta": {"consul-network-segment": ""},
                        "CreateIndex": 1,
                        "ModifyIndex": 1,
                    },
                    "Service": service.to_json(),
                    "Checks": checks,
                }
            )
        return entries

    def _catalog(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {"consul": []}
        for service in self.services.values():
            tags = found.setdefault(service.name, [])
            tags.extend(t for t in service.tags if t not in tags)
        return found

    def _session_create(self, raw: dict[str, Any]) -> tuple[int, Any, int]:
        body = normalise(raw)
        try:
            ttl = parse_duration(body["ttl"]) if body.get("ttl") else 0.0
            lock_delay = parse_duration(body["lockdelay"]) if body.get("lockdelay") else 15.0
        except ValueError as err:
            raise HTTPError(400, f"Request decode failed: {err}") from err
        if ttl and not 10 <= ttl <= 86400:
            raise HTTPError(400, f"Invalid Session TTL '{ttl:g}s', must be between [10s=24h0m0s]")
        behavior = body.get("behavior") or "release"
        session_id = str(uuid.uuid4())
        with self._cond:
            self.sessions[session_id] = Session(
                session_id, str(body.get("name", "")), ttl, lock_delay, behavior, time.monotonic() + ttl
            )
            self._bump("sessions")
        return 200, {"ID": session_id}, 0

    def _kv(self, method: str, key: str, query: dict[str, str], body: bytes) -> tuple[int, Any, int]:
        if method == "GET":

            def read() -> Any:
                entry = self.kv.get(key)
                return None if entry is None else [entry.to_json()]

            return self._blocking(f"kv:{key}", query, read)
        with self._cond:
            entry = self.kv.get(key)
            if method == "DELETE":
                if entry is not None:
                    del self.kv[key]
                    self._bump(f"kv:{key}")
                return 200, True, 0
            if method != "PUT":
                raise HTTPError(405, f"method {method} not allowed")
            acquire, release = query.get("acquire"), query.get("release")
            for session_id in (acquire, release):
                if session_id and session_id not in self.sessions:
                    raise HTTPError(500, f'rpc error making call: invalid session "{session_id}"')
            if acquire:
                if entry is not None and entry.session and entry.session != acquire:
                    return 200, False, 0
                if entry is not None and entry.session == acquire:
                    entry.value = body
                    entry.modify_index = self._index + 1
                    self._bump(f"kv:{key}")
                    return 200, True, 0
                if time.monotonic() < self._lock_delay_until.get(key, 0.0):
                    return 200, False, 0
            if release and (entry is None or entry.session != release):
                return 200, False, 0
            if entry is None:
                entry = self.kv[key] = KVEntry(key, body, self._index + 1, self._index + 1)
            entry.value = body
            entry.modify_index = self._index + 1
            if acquire:
                entry.session = acquire
                entry.lock_index += 1
            if release:
                entry.session = ""
            self._bump(f"kv:{key}")
        return 200, True, 0

    def _blocking(self, resource: str, query: dict[str, str], read: Callable[[], Any]) -> tuple[int, Any, int]:
        try:
            index = int(query.get("index", "0") or 0)
            wait_s = min(parse_duration(query["wait"]), MAX_WAIT_S) if "wait" in query else DEFAULT_WAIT_S
        except ValueError as err:
            raise HTTPError(400, f"Invalid blocking query: {err}") from err
        deadline = time.monotonic() + wait_s
        with self._cond:
            while index and self._resource_index(resource) <= index and not self._down:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._down:
                raise ConnectionAbortedError("the agent went away")
            answer = read()
            status = 404 if answer is None else 200
            return status, answer if answer is not None else b"", self._resource_index(resource)

    def fault_for(self, path: str) -> Fault | None:
        with self._cond:
            for prefix, fault in self._faults.items():
                if path.startswith(prefix):
                    return fault
        return None


def _serf_health() -> dict[str, Any]:
    return {
        "Node": NODE,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }


def _flag(definition: dict[str, Any], key: str) -> bool:
    value = definition.get(key, False)
    if not isinstance(value, bool):
        raise HTTPError(400, f"Request decode failed: {key} must be a boolean, got {value!r}")
    return value


def _check_channel(check: Check, tls: AgentTls | None) -> grpc.Channel:
    """The channel Consul's GRPC check dials: plaintext, or TLS as the check's fields and the agent's TLS say."""
    address = check.grpc_target.partition("/")[0]
    if not check.grpc_use_tls:
        return grpc.insecure_channel(address)
    if check.tls_skip_verify:
        return _unverified_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca if tls else None,
        private_key=tls.key if tls else None,
        certificate_chain=tls.cert if tls else None,
    )
    options = [("grpc.ssl_target_name_override", check.tls_server_name)] if check.tls_server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def _unverified_channel(address: str) -> grpc.Channel:
    """TLS trusting whatever the server presents, as TLSSkipVerify does (grpc has no such switch: the server's own
    certificate becomes the root, and the name checked is one it holds)."""
    host, _, port = address.rpartition(":")
    pem = ssl.get_server_certificate((host, int(port)), timeout=5)
    cert = x509.load_pem_x509_certificate(pem.encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    options = [("grpc.ssl_target_name_override", dns[0])] if dns else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem.encode()), options=options)


def _grpc_health(check: Check, tls: AgentTls | None) -> tuple[str, str]:
    """Consul's GRPC check: ``host:port[/service]`` answers SERVING → passing; anything else (a failed TLS handshake
    included) → critical."""
    target = check.grpc_target
    service = target.partition("/")[2]
    try:
        with _check_channel(check, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=check.timeout_s
            )
    except grpc.RpcError as err:
        return "critical", f"gRPC health check failed: {err.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "passing", f"gRPC check {target}: success"
    return "critical", f"gRPC check {target}: {status}"


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except ValueError as err:
        raise HTTPError(400, f"Request decode failed: {err}") from err
    if not isinstance(data, dict):
        raise HTTPError(400, "Request decode failed: expected an object")
    return data


def _handler(fake: FakeConsul) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with fake._cond:
                fake.requests.append(Request(self.command, path, query, time.monotonic()))
            fault = fake.fault_for(path)
            try:
                if fault is not None:
                    self._send(fault.status, fault.body, fault.headers)
                    return
                status, answer, index = fake.handle(
                    self.command, path, query, body, self.headers.get("X-Consul-Token", "")
                )
            except HTTPError as err:
                self._send(err.status, err.message.encode(), {"Content-Type": "text/plain; charset=utf-8"})
                return
            except ConnectionAbortedError:
                # The agent "went away" while holding the request: cut the connection without an answer.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {"Content-Type": "application/json"}
            if index:
                headers.update(
                    {"X-Consul-Index": str(index), "X-Consul-Knownleader": "true", "X-Consul-Lastcontact": "0"}
                )
            payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self._send(status, payload, headers)

        def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_DELETE = do_POST = _serve

    return Handler


@contextlib.contextmanager
def running_fake_consul(**kwargs: Any) -> Iterator[FakeConsul]:
    fake = FakeConsul(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()
