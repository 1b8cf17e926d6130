"""Shared fixtures: a real mesh started by `aimass up` on loopback ports the tests pick, and real NLP engines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.nlp.engine import NlpEngine

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MESH_START_TIMEOUT_S = 240.0


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
    raise RuntimeError("no run of free ports found")


def wait_serving(address: str, service: str, timeout_s: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    tail = log_file.read_text()[-4000:] if log_file and log_file.exists() else ""
    raise TimeoutError(f"{service} not SERVING at {address} after {timeout_s:.0f}s\n{tail}")


@dataclass
class Mesh:
    """A mesh started by `aimass up` in a subprocess (the same command users run)."""

    gateway: str
    nlp_ports: list[int]
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def nlp_addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.nlp_ports]

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_mesh(log_dir: Path, *, nlp_replicas: int = 1, extra_env: dict[str, str] | None = None) -> Mesh:
    gateway_port = free_port()
    nlp_port = consecutive_free_ports(nlp_replicas)
    log_file = log_dir / f"mesh-{gateway_port}.log"
    env = {**os.environ, "AIMASS_LOG_LEVEL": "INFO", **(extra_env or {})}
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(BIN / "aimass"),
                "up",
                f"--gateway-port={gateway_port}",
                f"--nlp-port={nlp_port}",
                f"--nlp-replicas={nlp_replicas}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    mesh = Mesh(f"127.0.0.1:{gateway_port}", [nlp_port + i for i in range(nlp_replicas)], process, log_file)
    try:
        for address in mesh.nlp_addresses:
            wait_serving(address, "aimass.v1.NlpService", MESH_START_TIMEOUT_S, log_file)
        # The gateway reports a service SERVING once a replica registered with it.
        wait_serving(mesh.gateway, "aimass.v1.NlpService", 30, log_file)
        deadline = time.monotonic() + 30
        while nlp_replicas > 1 and time.monotonic() < deadline and mesh.log_text().count("joined at") < nlp_replicas:
            time.sleep(0.2)
    except BaseException:
        mesh.stop()
        raise
    return mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def nlp_engine() -> NlpEngine:
    """The real NLP models, loaded once for every in-process server a test builds."""
    engine = NlpEngine(device="cpu")
    engine.load()
    return engine
