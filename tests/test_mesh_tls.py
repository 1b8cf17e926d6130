"""mTLS inside the mesh: every internal listener wants a certificate from the mesh's CA and serves each method only
to the roles allowed; no process registers, drains or reports for another's identity; a registration nobody can
back with the kind's certificate attracts no traffic; and TLS on the front door, tested with real TLS clients
(aimass.client and grpcurl)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass import pki
from aimass.client import AsyncClient
from aimass.local_mesh import free_port
from aimass.runtime.config import GatewayConfig
from aimass.runtime.identity import MeshCredentials, mesh_channel
from aimass.v1 import (
    common_pb2,
    models_pb2,
    models_pb2_grpc,
    nlp_pb2,
    nlp_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from gateway.app import build_runner as gateway_runner
from services.nlp.engine import NlpEngine
from tests.eventually import eventually
from tests.inprocess_mesh import InProcessMesh, in_process_mesh
from tests.security import admin_key, self_signed_certificate, settings

BIN = Path(sys.executable).parent
SENTIMENT = nlp_pb2.SentimentRequest(texts=["fine"])
NLP = "aimass.v1.NlpService"


@pytest.fixture(scope="module")
async def mesh(nlp_engine: NlpEngine) -> AsyncIterator[InProcessMesh]:
    async for started in in_process_mesh(nlp_engine):
        yield started


def identity(role: str, name: str) -> MeshCredentials:
    """A certificate of the session's CA for ``name`` in ``role`` (a mesh process that may be compromised)."""
    pki.issue(settings().pki_dir, role=role, name=name)
    return MeshCredentials.load(settings().pki_dir, name)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCredentials:
    """A gateway certificate from another CA: right names, wrong signer."""
    other = tmp_path_factory.mktemp("foreign-pki")
    pki.init_ca(other)
    pki.issue(other, role="gateway", name="gateway")
    return MeshCredentials.load(other, "gateway")


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def sentiment_via(address: str, credentials: MeshCredentials | None, role: str = "nlp") -> Any:
    async with mesh_channel(address, credentials, server_role=role) as channel:
        return await nlp_pb2_grpc.NlpServiceStub(channel).Sentiment(SENTIMENT, timeout=5)


async def test_a_replica_serves_gateways_only(mesh: InProcessMesh, foreign_ca: MeshCredentials) -> None:
    replica = mesh.replicas[0].address
    # Plaintext, or a certificate the mesh's CA did not sign: the handshake fails, nothing reaches the replica.
    for credentials in (None, foreign_ca):
        assert (await error_of(sentiment_via(replica, credentials))).code() == grpc.StatusCode.UNAVAILABLE
    # A mesh certificate of another role: refused by the policy, with the reason.
    for role, name in (("nlp", "nlp-peer"), ("operator", "operator"), ("node-agent", "node-agent")):
        error = await error_of(sentiment_via(replica, identity(role, name)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, role
        assert f"{role}/{name} may not call /aimass.v1.NlpService/Sentiment; it is for gateway" in (
            error.details() or ""
        )
    async with mesh_channel(replica, identity("nlp", "nlp-peer"), server_role="nlp") as channel:
        error = await error_of(
            models_pb2_grpc.ModelServiceStub(channel).UnloadModel(
                models_pb2.UnloadModelRequest(model=common_pb2.ModelRef(name="vader")), timeout=5
            )
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await sentiment_via(replica, identity("gateway", "gateway"))).results[0].label == "positive"
    # The caller checks the server too: a replica is not the scheduler.
    assert (await error_of(sentiment_via(replica, identity("gateway", "gateway"), role="scheduler"))).code() == (
        grpc.StatusCode.UNAVAILABLE
    )


async def test_the_scheduler_and_its_registry_need_the_right_role(mesh: InProcessMesh) -> None:
    assert mesh.scheduler is not None
    address = mesh.scheduler.address
    async with grpc.aio.insecure_channel(address) as channel:
        error = await error_of(
            registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(registry_pb2.ListInstancesRequest(), timeout=5)
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    async with mesh_channel(address, identity("operator", "operator"), server_role="scheduler") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        listed = await registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=5)
        assert {i.kind for i in listed.instances} >= {"gateway", "nlp", "scheduler"}
        # Operators read; they do not register, place or report.
        rogue = registry_pb2.ServiceInstance(
            instance_id="operator-x", kind="operator", services=["aimass.v1.NlpService"], address="127.0.0.1:1"
        )
        error = await error_of(registry.Register(registry_pb2.RegisterRequest(instance=rogue), timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        error = await error_of(scheduler.PlaceModel(scheduler_pb2.PlaceModelRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        placements = await scheduler.GetPlacement(scheduler_pb2.GetPlacementRequest(), timeout=5)
        assert placements.version >= 0
    async with mesh_channel(address, identity("nlp", "nlp-peer"), server_role="scheduler") as channel:
        error = await error_of(
            scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportNode(
                scheduler_pb2.ReportNodeRequest(node_id="n"), timeout=5
            )
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_no_process_registers_drains_or_reports_for_another(mesh: InProcessMesh) -> None:
    assert mesh.scheduler is not None
    real = mesh.replicas[0].instance_id
    intruder = identity("nlp", "nlp-intruder")
    async with mesh_channel(mesh.scheduler.address, intruder, server_role="scheduler") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        drain = registry.Heartbeat(
            registry_pb2.HeartbeatRequest(instance_id=real, state=common_pb2.SERVING_STATE_DRAINING), timeout=5
        )
        assert (await error_of(drain)).code() == grpc.StatusCode.PERMISSION_DENIED
        hijack = registry_pb2.ServiceInstance(
            instance_id=real, kind="nlp", services=["aimass.v1.NlpService"], address="127.0.0.1:1"
        )
        error = await error_of(registry.Register(registry_pb2.RegisterRequest(instance=hijack), timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to" in (error.details() or "")
        other_kind = registry_pb2.ServiceInstance(
            instance_id="llm-fake", kind="llm", services=["aimass.v1.LlmService"], address="127.0.0.1:1"
        )
        error = await error_of(registry.Register(registry_pb2.RegisterRequest(instance=other_kind), timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "registers nlp instances only" in (
            error.details() or ""
        )
        assert (
            await error_of(registry.Deregister(registry_pb2.DeregisterRequest(instance_id=real), timeout=5))
        ).code() == (grpc.StatusCode.PERMISSION_DENIED)
        report = scheduler_pb2.ReportLoadRequest(instance_id=real, node_id="n", state=common_pb2.SERVING_STATE_DRAINING)
        error = await error_of(scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportLoad(report, timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    async with mesh_channel(mesh.scheduler.address, identity("operator", "operator"), server_role="scheduler") as ch:
        listed = await registry_pb2_grpc.RegistryServiceStub(ch).ListInstances(registry_pb2.ListInstancesRequest())
    states = {i.instance_id: i.state for i in listed.instances}
    assert states[real] == common_pb2.SERVING_STATE_SERVING
    # A node's readings belong to the node agent that first reported them.
    for name, allowed in (("node-agent-a", True), ("node-agent-b", False)):
        async with mesh_channel(mesh.scheduler.address, identity("node-agent", name), server_role="scheduler") as ch:
            call = scheduler_pb2_grpc.SchedulerServiceStub(ch).ReportNode(
                scheduler_pb2.ReportNodeRequest(node_id="shared-node"), timeout=5
            )
            if allowed:
                await call
            else:
                assert (await error_of(call)).code() == grpc.StatusCode.PERMISSION_DENIED


class CountingServer(grpc.GenericRpcHandler):
    """A rogue "replica": counts every call that reaches it, answers nothing useful."""

    def __init__(self) -> None:
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.calls += 1
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)


async def test_a_registration_no_server_backs_with_the_kinds_certificate_attracts_no_traffic(
    mesh: InProcessMesh,
) -> None:
    assert mesh.scheduler is not None
    rogue = CountingServer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((rogue,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        intruder = identity("nlp", "nlp-rogue")
        async with mesh_channel(mesh.scheduler.address, intruder, server_role="scheduler") as channel:
            await registry_pb2_grpc.RegistryServiceStub(channel).Register(
                registry_pb2.RegisterRequest(
                    instance=registry_pb2.ServiceInstance(
                        instance_id="nlp-rogue-1",
                        kind="nlp",
                        services=["aimass.v1.NlpService"],
                        address=f"127.0.0.1:{port}",
                        state=common_pb2.SERVING_STATE_SERVING,
                        models=[common_pb2.ModelRef(name="vader")],
                    ),
                    ttl_seconds=30,
                ),
                timeout=5,
            )
        gateway = mesh.gateway_app()
        await eventually("the rogue registration in the view", lambda: len(gateway.replicas.healthy(NLP)) == 2)
        async with mesh.channel() as channel:
            stub = nlp_pb2_grpc.NlpServiceStub(channel)
            replies = await asyncio.gather(*(stub.Sentiment(SENTIMENT, timeout=10) for _ in range(20)))
        # Every call answered by the real replica (the rogue's address fails the handshake: retried elsewhere).
        assert all(reply.results[0].label == "positive" for reply in replies)
        assert rogue.calls == 0
    finally:
        await server.stop(0)


# -- TLS on the front door -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def front_door_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, as an operator would get one for the gateway."""
    return self_signed_certificate(tmp_path_factory.mktemp("front-door"))


async def test_the_front_door_speaks_tls_to_real_tls_clients(
    mesh: InProcessMesh, front_door_cert: tuple[Path, Path]
) -> None:
    cert, key = front_door_cert
    port = free_port()
    tls_settings = mesh.settings.model_copy(
        update={
            "gateway": GatewayConfig(
                server=mesh.settings.gateway.server.model_copy(update={"port": port}), tls_cert=cert, tls_key=key
            )
        }
    )
    runner = gateway_runner(tls_settings)
    await runner.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", api_key=admin_key(), root_certificates=cert.read_bytes()) as client:
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    reply = await client.sentiment(["I love that this works over TLS"])
                    break
                except grpc.aio.AioRpcError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
        assert reply.results[0].label == "positive"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            error = await error_of(
                nlp_pb2_grpc.NlpServiceStub(plaintext).Sentiment(
                    SENTIMENT, timeout=3, metadata=(("authorization", f"Bearer {admin_key()}"),)
                )
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # grpcurl, as the README shows it: reflection and a call over TLS with the key.
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        called = await asyncio.to_thread(
            subprocess.run,
            [
                "grpcurl",
                "-cacert",
                str(cert),
                "-H",
                f"authorization: Bearer {admin_key()}",
                "-d",
                json.dumps({"texts": ["grpcurl over TLS is lovely"]}),
                f"127.0.0.1:{port}",
                "aimass.v1.NlpService/Sentiment",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["results"][0]["label"] == "positive"
    finally:
        await runner.drain()
