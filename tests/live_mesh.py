"""A mesh of real processes on loopback, started one by one (not by `aimass up`), so a test can restart any of
them with other settings: the scheduler (with the embedded registry) at a fixed port, the gateway at another,
optionally a node agent, and NLP replicas loading their real models. Secured as `aimass up` secures a mesh: each
process runs with its own certificate (mesh mTLS), and the gateway wants the admin key (``mesh.api_key``,
``mesh.channel()``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.bootstrap import ensure_certificates, operator_credentials, prepare_store
from aimass.client import keyed_aio_channel, keyed_channel
from aimass.local_mesh import free_port
from aimass.runtime.config import Settings
from aimass.runtime.discovery import Instance
from aimass.runtime.identity import ROLE_GATEWAY, ROLE_SCHEDULER, MeshCredentials, mesh_channel, mesh_sync_channel
from aimass.v1 import common_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
NLP_SERVICE = "aimass.v1.NlpService"
START_TIMEOUT_S = 180.0
GATEWAY_START_TIMEOUT_S = 30.0


class LiveMesh:
    """Gateway (with the embedded registry), scheduler, ``replicas`` NLP replicas and, with ``node_agent``, this
    host's node agent (the scheduler then knows the CPU device and can place models), each its own process.

    Every process finds the registry at the gateway's fixed port and the scheduler at its own, so either can be
    restarted (with other settings) and the others find it again.
    """

    def __init__(self, log_dir: Path, *, replicas: int = 2, node_agent: bool = False) -> None:
        self.log_dir = log_dir
        self.replicas = replicas
        self.node_agent = node_agent
        self.gateway_port = free_port()
        self.scheduler_port = free_port()
        while self.scheduler_port == self.gateway_port:
            self.scheduler_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.router = ""
        self._gateway_log_from = 0
        self.state_dir = log_dir / "state"
        self.settings = Settings(state_dir=self.state_dir)
        self.api_key = ""
        self.credentials: MeshCredentials | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    def channel(self) -> grpc.Channel:
        """The gateway, with the admin key on every call."""
        return keyed_channel(self.gateway, self.api_key)

    def aio_channel(self) -> grpc.aio.Channel:
        return keyed_aio_channel(self.gateway, self.api_key)

    def scheduler_channel(self) -> grpc.Channel:
        """The scheduler (and the registry it hosts), as an operator."""
        return mesh_sync_channel(self.scheduler, self.credentials, server_role=ROLE_SCHEDULER)

    def as_gateway(self, address: str, kind: str) -> grpc.aio.Channel:
        """A replica of ``kind`` at ``address``, called as a gateway calls it (the only role a replica serves)."""
        return mesh_channel(address, MeshCredentials.load(self.settings.pki_dir, ROLE_GATEWAY), server_role=kind)

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "AIMASS_LOG_LEVEL": "INFO",
            "AIMASS_STATE_DIR": str(self.state_dir),
            "AIMASS_REGISTRY__ADDRESS": self.scheduler,
            # Re-register quickly after a gateway restart.
            "AIMASS_REGISTRY__HEARTBEAT_S": "0.2",
            "AIMASS_SCHEDULER__ADDRESS": self.scheduler,
            # A fresh view: replicas report load ten times a second.
            "AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.1",
            **extra,
        }

    def spawn(self, name: str, module: str, extra: Mapping[str, str]) -> None:
        """Starts ``module`` as process ``name``, with its own mesh certificate (its role: the name up to "-N")."""
        ensure_certificates(self.settings, {name: name if name == "node-agent" else name.split("-")[0]})
        env = {**self.env(extra), "AIMASS_MESH__IDENTITY": name}
        with (self.log_dir / f"{name}.log").open("ab") as sink:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module], env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
            )

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def name_of(self, instance: Instance) -> str:
        return next(name for name, process in self.processes.items() if process.pid == instance.pid)

    def start(self) -> None:
        key_file, _ = prepare_store(self.settings)
        assert key_file is not None
        self.api_key = key_file.read_text().strip()
        ensure_certificates(self.settings, {ROLE_GATEWAY: ROLE_GATEWAY})
        self.credentials = operator_credentials(self.settings)
        # The scheduler first: it hosts the registry, and the gateway's view watcher finds it at once.
        self.start_scheduler({})
        if self.node_agent:
            self.spawn("node-agent", "scheduler.node_agent", {})
        for index in range(self.replicas):
            # One torch thread each: two replicas share a 2-core machine as they would share a node.
            self.spawn(
                f"nlp-{index}",
                "services.nlp",
                {"AIMASS_NLP__SERVER__PORT": "0", "AIMASS_NLP__DEVICE": "cpu", "AIMASS_NLP__TORCH_THREADS": "1"},
            )
        self.start_gateway("ours", START_TIMEOUT_S)

    def start_scheduler(self, extra: Mapping[str, str]) -> None:
        self.spawn("scheduler", "scheduler", {"AIMASS_SCHEDULER__SERVER__PORT": str(self.scheduler_port), **extra})

    def start_gateway(self, router: str, timeout_s: float = GATEWAY_START_TIMEOUT_S) -> None:
        # Readiness reads only what this gateway logs (a restarted one appends to the same file).
        self._gateway_log_from = len(self.log_text("gateway"))
        self.spawn(
            "gateway",
            "gateway",
            {
                "AIMASS_GATEWAY__SERVER__PORT": str(self.gateway_port),
                "AIMASS_GATEWAY__ROUTER": router,
                "AIMASS_GATEWAY__SERVER__DRAIN_DELAY_S": "0",
                # The scheduler's registry watch never ends by itself: without a short grace a restart waits 30 s.
                "AIMASS_GATEWAY__SERVER__DRAIN_GRACE_S": "1",
            },
        )
        self.router = router
        self.wait_ready(timeout_s)

    def use_router(self, router: str) -> None:
        """Restart the gateway with ``router`` unless it runs with it already."""
        if router != self.router:
            self.stop_process("gateway")
            self.start_gateway(router)

    def wait_ready(self, timeout_s: float) -> None:
        """Until every replica is registered and serving through the gateway, and the gateway holds a view in which
        the scheduler has load reports from all (so ``ours`` scores on it rather than falling back)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.gateway) as gateway, self.scheduler_channel() as scheduler:
            while not self._ready(gateway, scheduler):
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_text(name)[-3000:]}")
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {name}\n{self.log_text(name)[-1500:]}" for name in self.processes)
                    raise TimeoutError(f"mesh not ready in {timeout_s:.0f}s:\n{tails}")
                time.sleep(0.2)

    def _ready(self, gateway: grpc.Channel, scheduler: grpc.Channel) -> bool:
        try:
            listed = registry_pb2_grpc.RegistryServiceStub(scheduler).ListInstances(
                registry_pb2.ListInstancesRequest(), timeout=2
            )
            nlp = {
                i.instance_id
                for i in listed.instances
                if i.kind == "nlp" and i.state == common_pb2.SERVING_STATE_SERVING
            }
            kinds = {i.kind for i in listed.instances if i.state == common_pb2.SERVING_STATE_SERVING}
            if len(nlp) < self.replicas or not {"scheduler", "gateway"} <= kinds:
                return False
            status = health_pb2_grpc.HealthStub(gateway).Check(
                health_pb2.HealthCheckRequest(service=NLP_SERVICE), timeout=2
            )
            if status.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            views = scheduler_pb2_grpc.SchedulerServiceStub(scheduler).WatchView(
                scheduler_pb2.WatchViewRequest(subscriber_id="test-live-mesh"), timeout=2
            )
            view = next(iter(views)).view
            views.cancel()
            reported = {r.instance_id for r in view.replicas if any(m.loaded for m in r.models)}
        except grpc.RpcError:
            return False
        return (
            nlp <= reported and "routing view from the scheduler" in self.log_text("gateway")[self._gateway_log_from :]
        )

    def nlp_instances(self) -> list[Instance]:
        with self.scheduler_channel() as channel:
            listed = registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(
                registry_pb2.ListInstancesRequest(), timeout=5
            )
        instances = [Instance.from_proto(i) for i in listed.instances]
        return sorted((i for i in instances if i.kind == "nlp" and i.serving), key=lambda i: i.instance_id)

    def stop_process(self, name: str, timeout_s: float = 30.0) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def stop(self) -> None:
        # Replicas drain first, then the gateway, the scheduler (their registry) last.
        last = ("gateway", "scheduler")
        for name in [n for n in self.processes if n not in last] + [n for n in last if n in self.processes]:
            self.stop_process(name)
