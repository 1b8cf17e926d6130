"""ClusterService through the gateway's public port, on the session's `aimass up` mesh: devices, replicas, per-service
traffic and tenants' usage; what each key may see; WatchCluster's stream; and `aimass cluster`."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import grpc
import pytest

from aimass.client import keyed_channel
from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2, nlp_pb2, nlp_pb2_grpc, scheduler_pb2
from gateway.traffic import LATENCY_SAMPLES, TrafficRecorder, percentile
from tests.conftest import BIN
from tests.eventually import eventually_value
from tests.security import key_for

NLP = "aimass.v1.NlpService"


def cluster_of(mesh: LocalMesh, api_key: str | None = None) -> cluster_pb2.ClusterStatus:
    with mesh.channel(api_key) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        return stub.GetCluster(cluster_pb2.GetClusterRequest(), timeout=10).cluster


def sentiment(mesh: LocalMesh, api_key: str | None = None, calls: int = 1) -> None:
    with mesh.channel(api_key) as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        for _ in range(calls):
            stub.Sentiment(nlp_pb2.SentimentRequest(texts=["what a lovely day"]), timeout=30)


def traffic(cluster: cluster_pb2.ClusterStatus, service: str) -> cluster_pb2.ServiceTraffic:
    return next(s for s in cluster.services if s.service == service)


def with_devices_and_replicas(mesh: LocalMesh) -> cluster_pb2.ClusterStatus:
    """The snapshot once the scheduler's view has the node agent's devices and a loaded NLP replica."""

    def ready() -> cluster_pb2.ClusterStatus | None:
        cluster = cluster_of(mesh)
        nlp_loaded = any(NLP in r.services and any(m.loaded for m in r.models) for r in cluster.replicas)
        return cluster if cluster.nodes and nlp_loaded and not cluster.stale else None

    return eventually_value("a view with devices and the NLP replica", ready, timeout_s=30)


@pytest.fixture(scope="module")
def tenant_keys() -> dict[str, str]:
    """Two tenants' infer-only keys (one with limits), an operator-ish models:admin key, and one without infer."""
    return {
        "a": key_for("cluster-a", requests_per_second=500, max_concurrent=40, llm_tokens_per_minute=9000),
        "b": key_for("cluster-b"),
        "models-admin": key_for("cluster-ops", [keys.SCOPE_INFER, keys.SCOPE_MODELS_ADMIN]),
        "no-infer": key_for("cluster-a", [keys.SCOPE_AUDIT_READ]),
    }


def test_devices_replicas_and_service_traffic(mesh: LocalMesh) -> None:
    before = with_devices_and_replicas(mesh)
    sentiment(mesh, calls=6)
    cluster = cluster_of(mesh)

    # The node agent's CPU profile: one CPU device per node with the host's memory.
    devices = [device for node in cluster.nodes for device in node.devices]
    assert cluster.nodes[0].source == scheduler_pb2.READING_SOURCE_CPU_PROFILE
    cpu = next(d for d in devices if d.info.kind == common_pb2.DEVICE_KIND_CPU)
    assert cpu.device_id.endswith("/cpu") and cpu.info.memory_total_bytes > 0 and cpu.info.memory_used_bytes > 0

    # Every live replica, with its models' load; the admin key sees addresses.
    nlp = [r for r in cluster.replicas if NLP in r.services]
    assert {r.address for r in nlp} == set(mesh.addresses("nlp"))
    assert all(r.state == common_pb2.SERVING_STATE_SERVING for r in nlp)
    loaded = [m for r in nlp for m in r.models if m.loaded]
    assert loaded and all(m.device_id and m.memory_bytes > 0 for m in loaded)
    assert [r.instance_id for r in cluster.replicas] == sorted(r.instance_id for r in cluster.replicas)

    # The six calls are in NlpService's traffic, with their latencies.
    nlp_traffic = traffic(cluster, NLP)
    assert nlp_traffic.requests >= traffic(before, NLP).requests + 6
    assert nlp_traffic.requests_per_second > 0 and nlp_traffic.p99_latency_ms >= nlp_traffic.p50_latency_ms > 0
    assert nlp_traffic.healthy_replicas == len(nlp) and nlp_traffic.in_flight == 0
    # ClusterService's own calls are not counted; the internal services are not listed.
    assert "aimass.v1.ClusterService" not in {s.service for s in cluster.services}
    assert "aimass.v1.SchedulerService" not in {s.service for s in cluster.services}
    assert 0 < cluster.traffic_window_seconds <= 60 and cluster.gateways == 1
    assert not cluster.stale and cluster.view_version > 0 and cluster.generated_unix_ms > 0


def test_a_tenant_sees_its_own_usage_only_and_no_addresses(mesh: LocalMesh, tenant_keys: dict[str, str]) -> None:
    sentiment(mesh, tenant_keys["a"], calls=3)
    sentiment(mesh, tenant_keys["b"])
    mine = cluster_of(mesh, tenant_keys["a"])

    assert [t.tenant_id for t in mine.tenants] == ["cluster-a"]
    row = mine.tenants[0]
    assert row.limits.requests_per_second == 500 and row.limits.max_concurrent == 40
    assert row.limits.llm_tokens_per_minute == 9000 and row.requests_per_second > 0
    # Where things run is for operators: no replica address, node host or foreign process's name.
    assert mine.replicas and all(not r.address for r in mine.replicas)
    assert mine.nodes and all(not n.host for n in mine.nodes)
    assert all(not p.process_name and not p.pid for n in mine.nodes for d in n.devices for p in d.processes)
    assert "cluster-b" not in str(mine)

    # models:admin sees addresses, still only its own tenant's usage.
    ops = cluster_of(mesh, tenant_keys["models-admin"])
    assert [t.tenant_id for t in ops.tenants] == ["cluster-ops"]
    assert all(r.address for r in ops.replicas) and all(n.host for n in ops.nodes)


def test_tenants_admin_sees_every_tenant(mesh: LocalMesh, tenant_keys: dict[str, str]) -> None:
    sentiment(mesh, tenant_keys["b"])
    everyone = cluster_of(mesh)  # the admin key: every scope
    shown = [t.tenant_id for t in everyone.tenants]
    assert {"cluster-a", "cluster-b", "admin"} <= set(shown) and shown == sorted(shown)
    b = next(t for t in everyone.tenants if t.tenant_id == "cluster-b")
    assert b.limits.requests_per_second == 0  # unlimited
    # The scheduler accounts the requests replicas served per tenant (fair-share counters).
    accounted = eventually_value(
        "cluster-b's requests accounted by the scheduler",
        lambda: next((t for t in cluster_of(mesh).tenants if t.tenant_id == "cluster-b" and t.usage.requests), None),
    )
    assert accounted.usage.tenant_id == "cluster-b"


def test_keys_are_checked_as_on_every_public_call(mesh: LocalMesh, tenant_keys: dict[str, str]) -> None:
    bad_key = "aimass_notarealkey_0000000000000000000000000000"
    with keyed_channel(mesh.gateway, bad_key) as channel, pytest.raises(grpc.RpcError) as unknown:
        cluster_pb2_grpc.ClusterServiceStub(channel).GetCluster(cluster_pb2.GetClusterRequest(), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with mesh.channel(tenant_keys["no-infer"]) as channel, pytest.raises(grpc.RpcError) as scopeless:
        cluster_pb2_grpc.ClusterServiceStub(channel).GetCluster(cluster_pb2.GetClusterRequest(), timeout=10)
    assert scopeless.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "infer" in (scopeless.value.details() or "")


def test_watch_streams_snapshots_until_cancelled(mesh: LocalMesh) -> None:
    with mesh.channel() as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        call = stub.WatchCluster(cluster_pb2.WatchClusterRequest(interval_ms=500), timeout=30)
        started = time.monotonic()
        first, second = next(call).cluster, next(call).cluster
        assert second.generated_unix_ms - first.generated_unix_ms >= 400 and time.monotonic() - started < 5
        assert second.nodes and second.replicas and second.services
        call.cancel()
        with pytest.raises(grpc.RpcError) as stopped:
            next(call)
        assert stopped.value.code() == grpc.StatusCode.CANCELLED

        # The call's deadline ends it too.
        bounded = stub.WatchCluster(cluster_pb2.WatchClusterRequest(interval_ms=500), timeout=1.2)
        received = 0
        with pytest.raises(grpc.RpcError) as expired:
            for _ in bounded:
                received += 1
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 2 <= received <= 4


@pytest.mark.parametrize("interval_ms", [-1, 100, 60_001])
def test_an_interval_out_of_range_is_invalid(mesh: LocalMesh, interval_ms: int) -> None:
    with mesh.channel() as channel:
        call = cluster_pb2_grpc.ClusterServiceStub(channel).WatchCluster(
            cluster_pb2.WatchClusterRequest(interval_ms=interval_ms), timeout=10
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "500 to 60000" in (refused.value.details() or "")


def test_a_model_filter_keeps_the_replicas_holding_it(mesh: LocalMesh) -> None:
    with_devices_and_replicas(mesh)
    with mesh.channel() as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        vader = stub.GetCluster(cluster_pb2.GetClusterRequest(model=common_pb2.ModelRef(name="vader")), timeout=10)
        nothing = stub.GetCluster(cluster_pb2.GetClusterRequest(model=common_pb2.ModelRef(name="no-such")), timeout=10)
    assert vader.cluster.replicas and all(NLP in r.services for r in vader.cluster.replicas)
    assert not nothing.cluster.replicas and nothing.cluster.nodes


def aimass_cluster(mesh: LocalMesh, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "aimass"), "cluster", "--gateway", mesh.gateway, *args]
    if api_key is not None:
        command += ["--api-key", api_key]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_cli_prints_the_tables_and_json(mesh: LocalMesh, tenant_keys: dict[str, str]) -> None:
    with_devices_and_replicas(mesh)
    shown = aimass_cluster(mesh)  # the admin key file
    assert shown.returncode == 0, shown.stderr
    for heading in ("DEVICES", "REPLICAS", "SERVICES", "TENANTS", "MEMORY TOTAL", "P99 MS", "LLM TOKENS/MIN"):
        assert heading in shown.stdout
    assert NLP in shown.stdout and "/cpu" in shown.stdout and "cluster-a" in shown.stdout

    as_tenant = aimass_cluster(mesh, "--json", api_key=tenant_keys["b"])
    assert as_tenant.returncode == 0, as_tenant.stderr
    snapshot = json.loads(as_tenant.stdout)
    assert [t["tenant_id"] for t in snapshot["tenants"]] == ["cluster-b"]
    assert int(snapshot["nodes"][0]["devices"][0]["info"]["memory_total_bytes"]) > 0

    refused = aimass_cluster(mesh, api_key="aimass_notarealkey_0000000000000000000000000000")
    assert refused.returncode == 1 and refused.stderr.startswith("UNAUTHENTICATED")


def test_cli_watch_prints_until_interrupted(mesh: LocalMesh) -> None:
    command = [str(BIN / "aimass"), "cluster", "--gateway", mesh.gateway, "--watch", "--interval", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        headers = 0
        deadline = time.monotonic() + 30
        while headers < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            headers += line.startswith("cluster at ")
        assert headers == 2
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_traffic_window_slides_and_stays_bounded() -> None:
    clock = Clock()
    recorder = TrafficRecorder({NLP}, clock=clock)
    assert recorder.service_of(f"/{NLP}/Sentiment") == NLP and recorder.service_of("/made.Up/X") is None
    for index in range(100):
        recorder.started(NLP, "acme")
        clock.now += 0.01
        recorder.finished(NLP, "acme", clock.now - 0.01 * (index + 1), failed=index % 10 == 0)
    figures = recorder.service(NLP)
    assert figures.requests == 100 and figures.errors == 10 and figures.in_flight == 0
    assert figures.p50_latency_ms == pytest.approx(500, abs=11) and figures.p99_latency_ms == pytest.approx(990, abs=11)
    assert recorder.tenant("acme").requests == 100
    clock.now += 61  # the window passed: nothing left, and the rate is over the whole window
    assert recorder.service(NLP).requests == 0 and recorder.service(NLP).p99_latency_ms == 0
    assert recorder.window_s == 60
    for _ in range(LATENCY_SAMPLES + 10):
        recorder.started(NLP, "acme")
        recorder.finished(NLP, "acme", clock.now, failed=False)
    assert len(recorder._services[NLP].latencies) == LATENCY_SAMPLES
    assert percentile([], 0.99) == 0.0 and percentile([1.0, 2.0], 0.5) == 1.0
