"""A whole mesh on this machine: `aimass up` in a subprocess, on free loopback ports, with a clean stop.

For tests, benchmarks and scripts that need the real thing exactly as users start it, secured as users get it
(API keys at the gateway, mTLS inside), with its own state directory (store, admin key, CA) next to its log::

    mesh = LocalMesh(log_path=Path("/tmp/mesh.log"), replicas={"nlp": 2, "vision": 1})
    mesh.start()
    mesh.wait_ready()
    ...  # NlpServiceStub(mesh.channel()) calls the gateway with the admin key; mesh.api_key is the key itself
    mesh.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.bootstrap import operator_credentials
from aimass.cli import PROCESS_MODULES, WORKER_MODULES
from aimass.client import keyed_aio_channel, keyed_channel
from aimass.runtime.config import AuthConfig, MeshTlsConfig, Settings
from aimass.runtime.discovery import CONTROL_PLANE_KINDS
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_sync_channel
from aimass.v1 import common_pb2, registry_pb2, registry_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def consecutive_free_ports(count: int) -> int:
    """First of ``count`` consecutive free ports (NLP replicas take port, port+1, ...)."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for offset in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no run of {count} free ports found")


@dataclass
class LocalMesh:
    log_path: Path
    # Processes per kind (replicas of aimass.cli.SERVICE_MODULES, trainers); kinds left out are not started.
    replicas: Mapping[str, int] = field(default_factory=lambda: {"nlp": 1})
    # Extra environment for every process, e.g. {"AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE": "1"}.
    env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    gateway_port: int = 0
    # The gateway's adapter listener, which the REST front door calls over mesh mTLS (unused with mesh TLS off).
    gateway_adapter_port: int = 0
    scheduler_port: int = 0
    # The OpenAI-compatible REST front door's port (see rest_url); off when env sets AIMASS_REST__ENABLED=false.
    rest_port: int = 0
    # The web console's port (see console_url); off when env sets AIMASS_CONSOLE__ENABLED=false.
    console_port: int = 0
    # First port of each kind; its replicas listen on consecutive ports.
    ports: dict[str, int] = field(default_factory=dict)
    # Serve Prometheus metrics from every process (on free consecutive ports; see metrics_address).
    metrics: bool = False
    metrics_port: int = 0
    # The mesh's state (store, admin key, CA and certificates); default: "state" next to the log.
    state_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.replicas) - set(PROCESS_MODULES)
        if unknown:
            raise ValueError(f"unknown service kinds {sorted(unknown)}; known: {sorted(PROCESS_MODULES)}")
        if self.state_dir is None:
            self.state_dir = self.log_path.parent / "state"

    def settings(self) -> Settings:
        """The settings the mesh's processes run with, as far as tools talking to it need them."""
        assert self.state_dir is not None
        return Settings(
            state_dir=self.state_dir,
            mesh=MeshTlsConfig(tls=self.env.get("AIMASS_MESH__TLS", "on")),  # type: ignore[arg-type]
            auth=AuthConfig(mode=self.env.get("AIMASS_AUTH__MODE", "on")),  # type: ignore[arg-type]
        )

    @property
    def api_key(self) -> str:
        """The admin key `aimass up` made for this mesh ("" with auth off)."""
        path = self.settings().admin_key_file
        return path.read_text().strip() if path.exists() else ""

    def operator_credentials(self) -> MeshCredentials | None:
        """An operator certificate for calls inside the mesh (registry, scheduler); None with mesh TLS off."""
        return operator_credentials(self.settings())

    def channel(self, api_key: str | None = None) -> grpc.Channel:
        """A blocking channel to the gateway whose calls carry ``api_key`` (default: the admin key)."""
        return keyed_channel(self.gateway, api_key or self.api_key or None)

    def aio_channel(self, api_key: str | None = None) -> grpc.aio.Channel:
        return keyed_aio_channel(self.gateway, api_key or self.api_key or None)

    def scheduler_channel(self) -> grpc.Channel:
        """A blocking channel to the scheduler (and its registry) as an operator."""
        return mesh_sync_channel(self.scheduler, self.operator_credentials(), server_role=ROLE_SCHEDULER)

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def rest_enabled(self) -> bool:
        return self.env.get("AIMASS_REST__ENABLED", "true").lower() not in ("false", "0", "no", "off")

    @property
    def rest_url(self) -> str:
        """The REST front door's OpenAI base URL, e.g. "http://127.0.0.1:PORT/v1"."""
        return f"http://127.0.0.1:{self.rest_port}/v1"

    @property
    def console_enabled(self) -> bool:
        return self.env.get("AIMASS_CONSOLE__ENABLED", "true").lower() not in ("false", "0", "no", "off")

    @property
    def console_url(self) -> str:
        """The web console, e.g. "http://127.0.0.1:PORT"."""
        return f"http://127.0.0.1:{self.console_port}"

    def addresses(self, kind: str) -> list[str]:
        return [f"127.0.0.1:{self.ports[kind] + i}" for i in range(self.replicas.get(kind, 0))]

    def metrics_address(self, process: str) -> str:
        """host:port of a process's Prometheus endpoint: "gateway", "scheduler", "node-agent", "<kind>-<index>" or
        "rest" (the REST front door)."""
        if not self.metrics_port:
            raise RuntimeError("this mesh serves no metrics (LocalMesh(metrics=True) turns them on)")
        order = ["gateway", "scheduler", "node-agent"]
        order += [f"{kind}-{i}" for kind in PROCESS_MODULES for i in range(self.replicas.get(kind, 0))]
        order += ["rest"] if self.rest_enabled else []
        return f"127.0.0.1:{self.metrics_port + order.index(process)}"

    @property
    def nlp_addresses(self) -> list[str]:
        return self.addresses("nlp")

    def start(self) -> None:
        """Spawn `aimass up`; returns at once (see ``wait_ready``)."""
        taken: set[int] = set()
        arguments = []
        for kind in PROCESS_MODULES:
            count = self.replicas.get(kind, 0)
            if count:
                first = consecutive_free_ports(count)
                while taken & set(range(first, first + count)):
                    first = consecutive_free_ports(count)
                self.ports[kind] = first
                taken |= set(range(first, first + count))
                arguments.append(f"--{kind}-port={first}")
            arguments.append(f"--{kind}-replicas={count}")

        def another_port() -> int:
            """A free port none of this mesh's others has taken."""
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            return port

        self.gateway_port = another_port()
        self.scheduler_port = another_port()
        self.rest_port = another_port()
        self.gateway_adapter_port = another_port()
        self.console_port = another_port()
        # gateway, scheduler, node agent, then replicas, then the REST front door
        processes = 3 + sum(self.replicas.values()) + self.rest_enabled
        self.metrics_port = 0
        while self.metrics and (
            not self.metrics_port or taken & set(range(self.metrics_port, self.metrics_port + processes))
        ):
            self.metrics_port = consecutive_free_ports(processes)
        env = {**os.environ, "AIMASS_LOG_LEVEL": self.log_level, "AIMASS_STATE_DIR": str(self.state_dir), **self.env}
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    str(BIN / "aimass"),
                    "up",
                    f"--gateway-port={self.gateway_port}",
                    f"--gateway-adapter-port={self.gateway_adapter_port}",
                    f"--scheduler-port={self.scheduler_port}",
                    f"--metrics-port={self.metrics_port}",
                    f"--rest-port={self.rest_port}",
                    f"--console-port={self.console_port}",
                    *arguments,
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Until every replica is registered and the gateway reports each of their services SERVING.

        Fails early, with the log's tail, if `aimass up` died.
        """
        deadline = time.monotonic() + timeout_s
        # `aimass up` makes the certificates first; the operator's is usable once it has.
        while self.settings().mesh.tls == "on" and not (self.settings().pki_dir / "operator.crt").exists():
            self._check_alive(deadline, "the mesh's certificates")
            time.sleep(0.2)
        with self.scheduler_channel() as control, grpc.insecure_channel(self.gateway) as front:
            registry = registry_pb2_grpc.RegistryServiceStub(control)
            health = health_pb2_grpc.HealthStub(front)
            while not self._ready(registry, health):
                self._check_alive(deadline, "every replica to register and serve")
                time.sleep(0.2)
        while self.rest_enabled and not self._http_ready(self.rest_url):
            self._check_alive(deadline, "the REST front door's /healthz")
            time.sleep(0.2)
        while self.console_enabled and not self._http_ready(self.console_url):
            self._check_alive(deadline, "the console's /healthz")
            time.sleep(0.2)
        # Ready as `aimass up` sees it: it says so once every process (the REST front door included) answers.
        while "aimass is up" not in self.log_text():
            self._check_alive(deadline, "`aimass up` to say the mesh is up")
            time.sleep(0.2)

    @staticmethod
    def _http_ready(base_url: str) -> bool:
        try:
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/healthz", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def _ready(self, registry: registry_pb2_grpc.RegistryServiceStub, health: health_pb2_grpc.HealthStub) -> bool:
        try:
            listed = registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=2).instances
            serving = [i for i in listed if i.state == common_pb2.SERVING_STATE_SERVING]
            if not any(i.kind == "scheduler" for i in serving) or not any(i.kind == "gateway" for i in serving):
                return False
            # The gateway and the scheduler serve no models; the gateway forwards to the others.
            serving = [i for i in serving if i.kind not in CONTROL_PLANE_KINDS]
            if any(sum(1 for i in serving if i.kind == kind) < n for kind, n in self.replicas.items()):
                return False
            # Workers (trainers) serve the control plane, not clients: the gateway forwards nothing to them.
            services = {
                service for instance in serving if instance.kind not in WORKER_MODULES for service in instance.services
            }
            return all(
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
                for service in services
            )
        except grpc.RpcError:
            return False  # the scheduler or the gateway is still starting

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        assert self.process is not None, "start() first"
        if self.process.poll() is not None:
            raise RuntimeError(f"aimass up exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {waiting_for}:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGINT, as Ctrl-C sends: services drain, then the gateway; SIGKILL after a minute."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
