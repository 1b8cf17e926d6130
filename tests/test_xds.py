"""The scheduler's xDS server: gRPC's own xDS client (``xds:///aimass.v1.NlpService``) calls the replicas directly,
balanced by the scheduler's weights, and keeps succeeding while a replica stops; the ADS protocol (subscriptions,
ACK, NACK, stale nonces) at the wire with the published Envoy protos; who may stream.

One mesh of two NLP replicas (`aimass up`) for the module. The caller holds a gateway-role certificate (replicas
serve their methods to that role only) and sends no API key: the gateway would refuse such a call, so an answer
came from a replica directly.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc

from aimass import pki
from aimass.local_mesh import LocalMesh
from aimass.runtime.discovery import Instance, RemoteRegistry
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.metadata import REPLICA_KEY
from aimass.runtime.xds_client import BOOTSTRAP_ENV, BOOTSTRAP_FILE_ENV, bootstrap_config, xds_channel
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc, scheduler_pb2
from gateway.view import LoadView
from scheduler.xds import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    MAX_WEIGHT,
    ROUTE,
    AdsServicer,
    DiscoveryStreams,
    XdsResources,
    replica_weights,
)
from tests.conftest import BIN, ROOT, start_mesh
from tests.eventually import eventually

NLP = "aimass.v1.NlpService"
CLIENT = "xds-test-client"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    started = start_mesh(tmp_path_factory.mktemp("xds"), {"nlp": 2})
    pki.issue(started.settings().pki_dir, role="gateway", name=CLIENT)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client_credentials(mesh: LocalMesh) -> MeshCredentials:
    return MeshCredentials.load(mesh.settings().pki_dir, CLIENT)


@pytest.fixture(scope="module")
def bootstrap(mesh: LocalMesh) -> Iterator[dict[str, Any]]:
    config = bootstrap_config(mesh.scheduler, pki_dir=mesh.settings().pki_dir, name=CLIENT)
    yield config
    os.environ.pop(BOOTSTRAP_ENV, None)


class AdsStream:
    """One ADS stream at the protocol level: send DiscoveryRequests, read DiscoveryResponses. Requests are written
    on the call (a request iterator's writer can end a refused call INTERNAL before the server's status arrives)."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str = "test-node") -> None:
        self.node_id = node_id
        self._first = True
        self.call: Any = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()

    async def send(
        self, type_url: str, names: list[str], *, nonce: str = "", version: str = "", error: str = ""
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version
        )
        if self._first:
            request.node.id = self.node_id
            self._first = False
        if error:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        await self.call.write(request)

    async def receive(self) -> Any:
        response = await asyncio.wait_for(self.call.read(), 30)
        assert response is not grpc.aio.EOF, "the ADS stream ended"
        return response

    async def receive_type(self, type_url: str) -> Any:
        """The next response of ``type_url``, skipping endpoint pushes (weights change as load reports arrive)."""
        while True:
            response = await self.receive()
            if response.type_url == type_url or response.type_url != ENDPOINTS:
                return response

    def close(self) -> None:
        self.call.cancel()


def names_in(response: Any, message: Any) -> list[str]:
    found = []
    for packed in response.resources:
        resource = message()
        assert packed.Unpack(resource)
        found.append(resource.name if hasattr(resource, "name") and resource.name else resource.cluster_name)
    return found


def scheduler_channel(mesh: LocalMesh) -> grpc.aio.Channel:
    return mesh_channel(mesh.scheduler, mesh.operator_credentials(), server_role=ROLE_SCHEDULER)


async def nlp_instances(mesh: LocalMesh) -> list[Instance]:
    registry = RemoteRegistry(mesh.scheduler, mesh.operator_credentials())
    try:
        return [i for i in await registry.list_instances() if i.kind == "nlp" and i.serving]
    finally:
        await registry.close()


async def embed_through(stub: nlp_pb2_grpc.NlpServiceStub, text: str) -> str:
    """One Embed call; the replica that answered."""
    call: Any = stub.Embed(nlp_pb2.EmbedRequest(texts=[text]), timeout=30)
    response = await call
    assert len(response.embeddings) == 1 and len(response.embeddings[0].values) > 100
    return str(dict(await call.trailing_metadata() or ())[REPLICA_KEY])


async def test_an_xds_client_calls_both_replicas_directly(
    mesh: LocalMesh, client_credentials: MeshCredentials, bootstrap: dict[str, Any]
) -> None:
    replicas = {i.instance_id for i in await nlp_instances(mesh)}
    assert len(replicas) == 2
    async with xds_channel(NLP, client_credentials, bootstrap=bootstrap) as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        served = collections.Counter([await embed_through(stub, f"text number {i}") for i in range(40)])
    assert set(served) == replicas, f"not every replica got traffic: {dict(served)}"


async def test_an_unknown_listener_is_a_clear_error(
    client_credentials: MeshCredentials, bootstrap: dict[str, Any]
) -> None:
    async with xds_channel("aimass.v1.NoSuchService", client_credentials, bootstrap=bootstrap, role="nlp") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["x"]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "aimass.v1.NoSuchService: does not exist" in (caught.value.details() or "")


async def test_ads_without_a_mesh_certificate_or_with_a_replica_role_is_refused(mesh: LocalMesh) -> None:
    pki_dir = mesh.settings().pki_dir
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca_files(pki_dir).cert.read_bytes())
    options = [("grpc.ssl_target_name_override", pki.server_name(ROLE_SCHEDULER))]
    async with grpc.aio.secure_channel(mesh.scheduler, anonymous, options=options) as channel:
        stream = AdsStream(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.send(LISTENER, [NLP])
            await stream.receive()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake wants a client certificate
    pki.issue(pki_dir, role="nlp", name="xds-test-replica")
    replica = MeshCredentials.load(pki_dir, "xds-test-replica")
    async with mesh_channel(mesh.scheduler, replica, server_role=ROLE_SCHEDULER) as channel:
        stream = AdsStream(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.send(LISTENER, [NLP])
            await stream.receive()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call /envoy.service.discovery.v3.AggregatedDiscoveryService" in (caught.value.details() or "")


async def test_ads_subscriptions_ack_nack_and_stale_nonces(mesh: LocalMesh) -> None:
    async with scheduler_channel(mesh) as channel:
        stream = AdsStream(channel)
        await stream.send(LISTENER, [NLP])
        listeners = await stream.receive_type(LISTENER)
        assert listeners.type_url == LISTENER and names_in(listeners, listener_pb2.Listener) == [NLP]
        assert listeners.nonce and listeners.version_info
        # A NACK of that version: not sent again; the next answer is the one to the cluster subscription.
        await stream.send(LISTENER, [NLP], nonce=listeners.nonce, error="rejected by the test")
        await stream.send(CLUSTER, [NLP])
        clusters = await stream.receive_type(CLUSTER)
        assert clusters.type_url == CLUSTER and len(clusters.resources) == 1
        # A request with a nonce the server never sent last is stale: ignored, so the next answer is to RDS.
        await stream.send(LISTENER, [NLP, "aimass.v1.VisionService"], nonce="not-the-last-nonce")
        await stream.send(ROUTE, [NLP])
        routes = await stream.receive_type(ROUTE)
        assert routes.type_url == ROUTE and len(routes.resources) == 1
        # ACKs change nothing; new names are answered at once, with only the resources that exist.
        await stream.send(CLUSTER, [NLP], nonce=clusters.nonce, version=clusters.version_info)
        await stream.send(LISTENER, [NLP, "aimass.v1.NoSuchService"], nonce=listeners.nonce)
        again = await stream.receive_type(LISTENER)
        assert again.type_url == LISTENER and names_in(again, listener_pb2.Listener) == [NLP]
        assert again.nonce != listeners.nonce
        stream.close()
        # Empty names in the first request: every listener (the wildcard).
        wildcard = AdsStream(channel, "wildcard-node")
        await wildcard.send(LISTENER, [])
        everything = await wildcard.receive_type(LISTENER)
        assert NLP in names_in(everything, listener_pb2.Listener)
        wildcard.close()


async def test_the_per_type_services_speak_the_same_protocol(mesh: LocalMesh) -> None:
    async with scheduler_channel(mesh) as channel:
        clusters: Any = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).StreamClusters()
        await clusters.write(discovery_pb2.DiscoveryRequest(resource_names=[NLP]))  # type_url may be left out
        answer = await asyncio.wait_for(clusters.read(), 30)
        assert answer.type_url == CLUSTER and names_in(answer, cluster_pb2.Cluster) == [NLP]
        await clusters.write(discovery_pb2.DiscoveryRequest(type_url=ROUTE, resource_names=[NLP]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(clusters.read(), 30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "serves type.googleapis.com/envoy.config.cluster.v3.Cluster only" in (caught.value.details() or "")
        fetched = await eds_pb2_grpc.EndpointDiscoveryServiceStub(channel).FetchEndpoints(
            discovery_pb2.DiscoveryRequest(type_url=ENDPOINTS, resource_names=[NLP]), timeout=30
        )
        assert fetched.type_url == ENDPOINTS and len(fetched.resources) == 1


async def test_endpoints_carry_every_replica_with_a_weight(mesh: LocalMesh) -> None:
    async with scheduler_channel(mesh) as channel:
        stream = AdsStream(channel)
        await stream.send(ENDPOINTS, [NLP])
        response = await stream.receive_type(ENDPOINTS)
        stream.close()
    (packed,) = response.resources
    assignment = endpoint_pb2.ClusterLoadAssignment()
    assert packed.Unpack(assignment) and assignment.cluster_name == NLP
    addresses, weights = set(), []
    for locality in assignment.endpoints:
        (endpoint,) = locality.lb_endpoints
        address = endpoint.endpoint.address.socket_address
        addresses.add(f"{address.address}:{address.port_value}")
        assert endpoint.health_status == 1  # HEALTHY
        weights.append(locality.load_balancing_weight.value)
    assert addresses == set(mesh.addresses("nlp"))
    assert all(1 <= w <= MAX_WEIGHT for w in weights) and max(weights) == MAX_WEIGHT


async def test_streams_end_when_the_scheduler_drains_and_a_standby_refuses() -> None:
    """The discovery core on a server of its own: ending the streams (drain, lost leadership) closes them cleanly,
    and while the scheduler stands by a new stream is UNAVAILABLE."""
    resources = XdsResources()
    standby = ""
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AdsServicer(DiscoveryStreams(resources, lambda: standby)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = AdsStream(channel)
            await stream.send(LISTENER, [])
            assert (await stream.receive()).type_url == LISTENER  # no listeners yet: an empty answer
            await resources.end_streams()
            assert await asyncio.wait_for(stream.call.read(), 30) is grpc.aio.EOF
            assert await stream.call.code() == grpc.StatusCode.OK
            standby = "this scheduler stands by; the active one is elsewhere"
            refused = AdsStream(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.send(LISTENER, [])
                await refused.receive()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and caught.value.details() == standby
    finally:
        await server.stop(None)


def test_weights_follow_capacity_kv_pressure_and_warmth() -> None:
    def replica(instance_id: str, *, loaded: bool = True, kv: float = 0.0) -> Any:
        model = scheduler_pb2.ModelLoad(loaded=loaded, kv_cache_usage=kv)
        return scheduler_pb2.ReplicaView(instance_id=instance_id, models=[model])

    view = scheduler_pb2.RoutingView(
        version=1, replicas=[replica("a"), replica("b", kv=1.0), replica("c", loaded=False)]
    )
    loads = LoadView()
    loads.apply(view)
    weights = replica_weights(view.replicas, loads)
    # Same capacity (none measured yet); a full KV cache halves the share; a cold replica the least while warm exist.
    assert weights == {"a": MAX_WEIGHT, "b": MAX_WEIGHT // 2, "c": 1}
    all_cold = scheduler_pb2.RoutingView(version=2, replicas=[replica("x", loaded=False), replica("y", loaded=False)])
    loads.apply(all_cold)
    assert replica_weights(all_cold.replicas, loads) == {"x": MAX_WEIGHT, "y": MAX_WEIGHT}


def test_replicas_sharing_a_device_weigh_the_same_and_a_faster_device_more() -> None:
    """Capacity is learnt as completions over device busy time: two replicas on one device (busy 50%) that were
    sent 30 and 10 calls/s look 60 and 20 but are equals (40 each); one alone on a device as busy doing 40 calls/s
    is twice as fast."""

    def on(device: str, rps: float, instance_id: str) -> Any:
        model = scheduler_pb2.ModelLoad(loaded=True, device_id=device, requests_per_second=rps)
        return scheduler_pb2.ReplicaView(instance_id=instance_id, models=[model])

    def node(node_id: str, device: str) -> Any:
        info = common_pb2.DeviceInfo(utilization_percent=50)
        return scheduler_pb2.NodeView(node_id=node_id, devices=[scheduler_pb2.NodeDevice(device_id=device, info=info)])

    view = scheduler_pb2.RoutingView(
        version=1,
        replicas=[on("n/cpu", 30, "a"), on("n/cpu", 10, "b"), on("m/cpu", 40, "c")],
        nodes=[node("n", "n/cpu"), node("m", "m/cpu")],
    )
    loads = LoadView()
    loads.apply(view)
    assert replica_weights(view.replicas, loads) == {"a": MAX_WEIGHT // 2, "b": MAX_WEIGHT // 2, "c": MAX_WEIGHT}


def test_aimass_xds_bootstrap_file_serves_a_client_in_another_process(
    mesh: LocalMesh, client_credentials: MeshCredentials, tmp_path: Path
) -> None:
    """What a Go or Java client does: GRPC_XDS_BOOTSTRAP names the file `aimass xds bootstrap` wrote."""
    assert mesh.state_dir is not None
    env = {**os.environ, "AIMASS_STATE_DIR": str(mesh.state_dir), "AIMASS_SCHEDULER__ADDRESS": mesh.scheduler}
    env.pop(BOOTSTRAP_ENV, None)
    path = tmp_path / "bootstrap.json"
    made = subprocess.run(
        [str(BIN / "aimass"), "xds", "bootstrap", "--name", CLIENT, "--out", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(path.read_text())["xds_servers"][0]["server_uri"] == mesh.scheduler
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from aimass.runtime.identity import MeshCredentials\n"
        "from aimass.runtime.xds_client import xds_channel\n"
        "from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc\n"
        "async def main():\n"
        f"    creds = MeshCredentials.load(Path({str(mesh.settings().pki_dir)!r}), {CLIENT!r})\n"
        "    async with xds_channel('aimass.v1.NlpService', creds) as channel:\n"
        "        stub = nlp_pb2_grpc.NlpServiceStub(channel)\n"
        "        reply = await stub.Embed(nlp_pb2.EmbedRequest(texts=['hi']), timeout=30)\n"
        "    print(len(reply.embeddings[0].values))\n"
        "asyncio.run(main())\n"
    )
    called = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, BOOTSTRAP_FILE_ENV: str(path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert called.returncode == 0, called.stderr
    assert int(called.stdout.strip()) > 100


# A real gRPC xDS client (its own process: the bootstrap is read once) against the scheduler's discovery service and
# two real servers (grpc.health.v1.Health that name themselves), with the weights 90 and 10 as published.
WEIGHTED_CLIENT = """
import asyncio, collections, json, os
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from scheduler import xds

class Named(health_pb2_grpc.HealthServicer):
    def __init__(self, name):
        self.name = name

    async def Check(self, request, context):
        await context.send_initial_metadata((("who", self.name),))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

async def main():
    ports, servers = [], []  # the servers stop when collected: keep them
    for name in ("heavy", "light"):
        servers.append(grpc.aio.server())
        health_pb2_grpc.add_HealthServicer_to_server(Named(name), servers[-1])
        ports.append(servers[-1].add_insecure_port("127.0.0.1:0"))
        await servers[-1].start()
    service = "grpc.health.v1.Health"
    ends = [
        xds.Endpoint("heavy", "n", "127.0.0.1", ports[0], 90),
        xds.Endpoint("light", "n", "127.0.0.1", ports[1], 10),
    ]
    resources = xds.XdsResources()
    built = {
        xds.LISTENER: xds.listener(service), xds.ROUTE: xds.route_configuration(service),
        xds.CLUSTER: xds.cluster(service), xds.ENDPOINTS: xds.load_assignment(service, ends),
    }
    await resources.update({t: {service: m.SerializeToString()} for t, m in built.items()})
    control = grpc.aio.server()
    servicer = xds.AdsServicer(xds.DiscoveryStreams(resources))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, control)
    port = control.add_insecure_port("127.0.0.1:0")
    await control.start()
    where = {"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps({"xds_servers": [where], "node": {"id": "weights"}})
    served = collections.Counter()
    async with grpc.aio.insecure_channel("xds:///" + service) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(1000):
            call = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
            await call
            served[dict(await call.initial_metadata())["who"]] += 1
    print(json.dumps(served))
    for server in (control, *servers):
        await server.stop(None)

asyncio.run(main())
"""


def test_a_grpc_client_follows_the_published_weights() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WEIGHTED_CLIENT],
        env={k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)
    # 90:10 published; a 1000-call sample lands near 900 (the test allows far more than chance would).
    assert served["heavy"] + served["light"] == 1000
    assert 750 <= served["heavy"] <= 980, served


def test_bootstrap_names_the_scheduler_with_mesh_tls(tmp_path: Path) -> None:
    config = bootstrap_config("127.0.0.1:1234", pki_dir=tmp_path, name="job")
    (server,) = config["xds_servers"]
    assert server["server_uri"] == "127.0.0.1:1234" and server["server_features"] == ["xds_v3"]
    (creds,) = server["channel_creds"]
    assert creds["type"] == "tls" and creds["config"]["certificate_file"].endswith("job.crt")
    assert config["node"]["id"].startswith("job@")


async def test_a_stopping_replica_leaves_the_endpoints_and_calls_keep_succeeding(
    mesh: LocalMesh, client_credentials: MeshCredentials, bootstrap: dict[str, Any]
) -> None:
    """Last in the module: a replica is stopped (SIGTERM: it drains, then the supervisor starts it again)."""
    victim = (await nlp_instances(mesh))[0]
    codes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    async with scheduler_channel(mesh) as admin, xds_channel(NLP, client_credentials, bootstrap=bootstrap) as channel:
        watch = AdsStream(admin, "stop-watcher")
        await watch.send(ENDPOINTS, [NLP])
        stub = nlp_pb2_grpc.NlpServiceStub(channel)

        async def caller(index: int) -> None:
            while not stop.is_set():
                try:
                    await embed_through(stub, f"caller {index}")
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        callers = [asyncio.create_task(caller(i)) for i in range(4)]
        await eventually("calls flow", lambda: codes["OK"] >= 20, 60)
        os.kill(victim.pid, signal.SIGTERM)

        def healthy_ids(response: Any) -> set[str]:
            (packed,) = response.resources
            assignment = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(assignment)
            return {
                locality.locality.sub_zone
                for locality in assignment.endpoints
                if all(e.health_status == 1 for e in locality.lb_endpoints)
            }

        while victim.instance_id in healthy_ids(await watch.receive_type(ENDPOINTS)):
            pass
        after_removal = codes["OK"]
        await eventually("calls go on after the replica left", lambda: codes["OK"] >= after_removal + 20, 60)
        stop.set()
        await asyncio.gather(*callers)
        watch.close()
    assert set(codes) == {"OK"}, f"calls failed while a replica stopped: {dict(codes)}"
