"""A whole mesh on this machine: `aimass up` in a subprocess, on free loopback ports, with a clean stop.

For tests, benchmarks and scripts that need the real thing exactly as users start it::

    mesh = LocalMesh(log_path=Path("/tmp/mesh.log"), nlp_replicas=2)
    mesh.start()
    mesh.wait_ready()
    ...  # call mesh.gateway
    mesh.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.v1 import common_pb2, registry_pb2, registry_pb2_grpc

NLP_SERVICE = "aimass.v1.NlpService"
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
    nlp_replicas: int = 1
    # Extra environment for every process, e.g. {"AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE": "1"}.
    env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    gateway_port: int = 0
    nlp_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def nlp_addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.nlp_port + i}" for i in range(self.nlp_replicas)]

    def start(self) -> None:
        """Spawn `aimass up`; returns at once (see ``wait_ready``)."""
        self.gateway_port = free_port()
        self.nlp_port = consecutive_free_ports(self.nlp_replicas)
        while self.gateway_port in range(self.nlp_port, self.nlp_port + self.nlp_replicas):
            self.gateway_port = free_port()
        env = {**os.environ, "AIMASS_LOG_LEVEL": self.log_level, **self.env}
        with self.log_path.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    str(BIN / "aimass"),
                    "up",
                    f"--gateway-port={self.gateway_port}",
                    f"--nlp-port={self.nlp_port}",
                    f"--nlp-replicas={self.nlp_replicas}",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Until every replica serves and the gateway routes to all of them; fails early if `aimass up` died."""
        deadline = time.monotonic() + timeout_s
        for address in self.nlp_addresses:
            self._wait_serving(address, NLP_SERVICE, deadline)
        # The gateway reports the service SERVING once a replica registered with it.
        self._wait_serving(self.gateway, NLP_SERVICE, deadline)
        with grpc.insecure_channel(self.gateway) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            while self._serving_replicas(registry) < self.nlp_replicas:
                self._check_alive(deadline, "replicas to register")
                time.sleep(0.2)

    @staticmethod
    def _serving_replicas(registry: registry_pb2_grpc.RegistryServiceStub) -> int:
        listed = registry.ListInstances(registry_pb2.ListInstancesRequest(service=NLP_SERVICE), timeout=2)
        return sum(1 for i in listed.instances if i.state == common_pb2.SERVING_STATE_SERVING)

    def _wait_serving(self, address: str, service: str, deadline: float) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                self._check_alive(deadline, f"{service} SERVING at {address}")
                time.sleep(0.2)

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
