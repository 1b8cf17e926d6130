"""A whole secured mesh inside the test's event loop: the scheduler (with the embedded registry), NLP replicas over
the session's loaded models, and one or more gateways, each a real grpc.aio server on a loopback port with its
production listener (mesh mTLS inside, API keys at the front door), sharing the session's store and CA.

Quicker to start than `aimass up` (no model loading, no processes) and open to inspection (a gateway's quotas, a
replica's batcher), for the tests of what lies between the processes: keys, scopes, quotas, priorities.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from aimass.local_mesh import free_port
from aimass.runtime.config import (
    AuthConfig,
    BatchingConfig,
    GatewayConfig,
    NlpConfig,
    RegistryConfig,
    SchedulerConfig,
    ServerConfig,
    Settings,
    StoreConfig,
)
from aimass.runtime.server import ServerRunner
from gateway.app import GatewayApp
from gateway.app import build_runner as gateway_runner
from scheduler.app import build_runner as scheduler_runner
from services.nlp.app import NlpApp
from services.nlp.app import build_runner as nlp_runner
from services.nlp.engine import NlpEngine
from tests.security import keyed

NLP_SERVICE = "aimass.v1.NlpService"
READY_TIMEOUT_S = 20.0


def mesh_settings(
    scheduler_port: int, *, auth: AuthConfig | None = None, store_url: str = "", **overrides: Any
) -> Settings:
    """Settings every process of the mesh shares: the scheduler's address (registry included), quick heartbeats
    and reports, quiet access logs."""
    scheduler = f"127.0.0.1:{scheduler_port}"
    quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
    return Settings(
        registry=RegistryConfig(address=scheduler, heartbeat_s=0.2, ttl_s=2),
        scheduler=SchedulerConfig(
            server=quick.model_copy(update={"port": scheduler_port}), address=scheduler, report_interval_s=0.2
        ),
        gateway=GatewayConfig(server=quick.model_copy(update={"max_connection_idle_s": 0})),
        auth=auth or AuthConfig(refresh_s=0.2),
        # Empty: the session's SQLite store (tests/security.py).
        store=StoreConfig(url=SecretStr(store_url)),
        **overrides,
    )


@dataclass
class InProcessMesh:
    settings: Settings
    engine: NlpEngine
    scheduler: ServerRunner | None = None
    replicas: list[ServerRunner] = field(default_factory=list)
    gateways: list[ServerRunner] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return self.gateways[0].address

    def gateway_app(self, index: int = 0) -> GatewayApp:
        app = self.gateways[index].app
        assert isinstance(app, GatewayApp)
        return app

    def replica_app(self, index: int = 0) -> NlpApp:
        app = self.replicas[index].app
        assert isinstance(app, NlpApp)
        return app

    def channel(self, api_key: str | None = None, index: int = 0) -> grpc.aio.Channel:
        """The gateway ``index``, with ``api_key`` (default: the session's admin key) on every call."""
        return keyed(self.gateways[index].address, api_key)

    async def start(self, *, replicas: int = 1, gateways: int = 1, nlp: NlpConfig | None = None) -> None:
        self.scheduler = scheduler_runner(self.settings)
        await self.scheduler.start()
        quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
        replica_settings = self.settings.model_copy(
            update={"nlp": (nlp or NlpConfig()).model_copy(update={"server": quick, "device": "cpu"})}
        )
        for _ in range(replicas):
            runner = nlp_runner(replica_settings, engine=self.engine)
            await runner.start()
            self.replicas.append(runner)
        for _ in range(gateways):
            await self.add_gateway()

    async def add_gateway(self) -> ServerRunner:
        runner = gateway_runner(self.settings)
        await runner.start()
        self.gateways.append(runner)
        await self.wait_ready(runner)
        return runner

    async def wait_ready(self, gateway: ServerRunner) -> None:
        """Until the gateway routes to every replica and knows how many gateways share the quotas."""
        app = gateway.app
        assert isinstance(app, GatewayApp)
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                status = (await health.Check(health_pb2.HealthCheckRequest(service=NLP_SERVICE), timeout=2)).status
                if (
                    status == health_pb2.HealthCheckResponse.SERVING
                    and len(app.replicas.healthy(NLP_SERVICE)) == len(self.replicas)
                    and app.replicas.gateways == len(self.gateways)
                ):
                    return
                assert time.monotonic() < deadline, "the in-process mesh never became ready"
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for runner in [*self.replicas, *self.gateways, *([self.scheduler] if self.scheduler else [])]:
            await runner.drain()


async def in_process_mesh(
    engine: NlpEngine,
    *,
    replicas: int = 1,
    gateways: int = 1,
    nlp: NlpConfig | None = None,
    auth: AuthConfig | None = None,
    store_url: str = "",
) -> AsyncIterator[InProcessMesh]:
    """An async generator fixture body: the mesh started, then stopped."""
    mesh = InProcessMesh(mesh_settings(free_port(), auth=auth, store_url=store_url), engine)
    try:
        await mesh.start(replicas=replicas, gateways=gateways, nlp=nlp)
        yield mesh
    finally:
        await mesh.stop()


ONE_AT_A_TIME = NlpConfig(
    embed_batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_concurrent_batches=1)
)
