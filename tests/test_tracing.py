"""OpenTelemetry traces: one connected trace from a client through the gateway into a replica's batcher and model,
received by a fake OTLP collector on loopback; sampling; a collector that is down blocks nothing.

In-process tests use an in-memory exporter; the mesh tests run `aimass up` exporting to tests/fake_otlp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from pydantic import ValidationError

from aimass import pki
from aimass.client import Client
from aimass.local_mesh import LocalMesh
from aimass.runtime import tracing
from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import BatchingConfig, NlpConfig, ServerConfig, Settings, TelemetryConfig
from aimass.runtime.discovery import Instance, RemoteRegistry
from aimass.runtime.errors import DeadlineExceeded
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, MeshPolicy
from aimass.runtime.server import mesh_listener
from aimass.v1 import llm_pb2, llm_pb2_grpc, nlp_pb2, nlp_pb2_grpc, scenarios_pb2, scenarios_pb2_grpc
from services.nlp.app import build_runner
from services.nlp.engine import NlpEngine
from tests import security
from tests.conftest import start_mesh
from tests.fake_otlp import FakeCollector, ReceivedSpan, trace_of
from tests.security import as_gateway

EMBED = "/aimass.v1.NlpService/Embed"
SERVER, CLIENT = 2, 3  # opentelemetry.proto SpanKind values
STATUS_ERROR = 2
# Every process exports at this interval in the mesh tests, so spans arrive within a fraction of a second.
EXPORT_INTERVAL_MS = 100


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- config --------------------------------------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_endpoints_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().telemetry.otlp_endpoint == ""
    assert tracing.make_tracing(TelemetryConfig(), "nlp") is None
    monkeypatch.setenv("AIMASS_TELEMETRY__OTLP_ENDPOINT", "http://otel-collector:4317")
    monkeypatch.setenv("AIMASS_TELEMETRY__SAMPLE_RATIO", "0.25")
    telemetry = Settings().telemetry
    assert (telemetry.otlp_endpoint, telemetry.sample_ratio) == ("http://otel-collector:4317", 0.25)
    for good in ("127.0.0.1:4317", "https://collector.example:4317", "[::1]:4317"):
        assert TelemetryConfig(otlp_endpoint=good).otlp_endpoint == good
    for bad in ("grpc://collector:4317", "collector", "http://collector", "http://:4317"):
        with pytest.raises(ValidationError):
            TelemetryConfig(otlp_endpoint=bad)
    with pytest.raises(ValidationError):
        TelemetryConfig(sample_ratio=1.5)


# -- in-process: sampling, context, batcher spans, server spans ---------------------------------------------------


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    """Tracing installed in this process with sample ratio 1, spans kept in memory; uninstalled afterwards."""
    exporter = InMemorySpanExporter()
    installed = tracing.Tracing(
        TelemetryConfig(otlp_endpoint="127.0.0.1:1"), "test", processor=SimpleSpanProcessor(exporter)
    )
    tracing.install(installed)
    try:
        yield exporter
    finally:
        tracing.install(None)
        installed.provider.shutdown()


def remote_parent(*, sampled: bool) -> Any:
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(context))


def test_sample_ratio_applies_to_new_traces_and_callers_decisions_are_followed() -> None:
    exporter = InMemorySpanExporter()
    never = tracing.Tracing(
        TelemetryConfig(otlp_endpoint="127.0.0.1:1", sample_ratio=0), "test", processor=SimpleSpanProcessor(exporter)
    )
    never.tracer.start_span("new trace").end()
    assert exporter.get_finished_spans() == ()
    never.tracer.start_span("caller sampled", context=remote_parent(sampled=True)).end()
    assert [s.name for s in exporter.get_finished_spans()] == ["caller sampled"]
    always = tracing.Tracing(
        TelemetryConfig(otlp_endpoint="127.0.0.1:1", sample_ratio=1), "test", processor=SimpleSpanProcessor(exporter)
    )
    always.tracer.start_span("caller not sampled", context=remote_parent(sampled=False)).end()
    always.tracer.start_span("new trace").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["caller sampled", "new trace"]
    assert exporter.get_finished_spans()[-1].resource.attributes["service.name"] == "aimass-test"


def test_forwarded_metadata_carries_the_new_context_once() -> None:
    caller = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("x-request-id", "r1"))
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("gateway", context=remote_parent(sampled=True)) as span:
        metadata = tracing.with_trace_context(caller, trace.set_span_in_context(span), tracing.trace_header_names())
    parents = [value for key, value in metadata if key == "traceparent"]
    assert len(parents) == 1
    assert parents[0] == f"00-0af7651916cd43dd8448eb211c80319c-{span.get_span_context().span_id:016x}-01"
    assert ("x-request-id", "r1") in metadata


def spans_named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_batcher_records_queue_wait_batch_execution_and_inference(memory: InMemorySpanExporter) -> None:
    def execute(requests: Sequence[int]) -> list[int]:
        time.sleep(0.02)
        return [r * 10 for r in requests]

    # The fixed-delay batcher: the two gathered requests share a batch, the late one expires while it waits.
    batcher: DynamicBatcher[int, int] = DynamicBatcher(execute, name="traced", max_queue_delay_s=0.01, adaptive=False)
    await batcher.start()
    tracer = trace.get_tracer("test", tracer_provider=tracing.installed().provider)  # type: ignore[union-attr]
    try:
        with tracer.start_as_current_span("request") as request:
            assert list(await asyncio.gather(batcher.submit(1), batcher.submit(2))) == [10, 20]
        with tracer.start_as_current_span("late request"), pytest.raises(DeadlineExceeded):
            await batcher.submit(3, deadline=asyncio.get_running_loop().time() + 0.001)
        assert await batcher.submit(4) == 40  # outside any span: nothing recorded
    finally:
        await batcher.close()
    spans = memory.get_finished_spans()
    request_id = request.get_span_context().span_id
    queued = [
        s for s in spans_named(spans, tracing.QUEUE_SPAN) if s.attributes and "aimass.dropped" not in s.attributes
    ]
    executed = spans_named(spans, tracing.BATCH_SPAN)
    inferred = spans_named(spans, tracing.INFERENCE_SPAN)
    assert len(queued) == len(executed) == len(inferred) == 2
    for span in (*queued, *executed):
        assert span.parent is not None and span.parent.span_id == request_id
    for execution, inference in zip(executed, inferred, strict=True):
        assert execution.attributes is not None and execution.attributes["aimass.batch.requests"] == 2
        assert inference.parent is not None and inference.parent.span_id == execution.context.span_id
        assert execution.start_time is not None and inference.start_time is not None
        assert execution.end_time is not None and inference.end_time is not None
        assert execution.start_time <= inference.start_time < inference.end_time <= execution.end_time
        assert inference.end_time - inference.start_time >= 15_000_000  # execute's 20 ms sleep
    for queue, execution in zip(queued, executed, strict=True):
        assert queue.end_time == execution.start_time
    (dropped,) = [
        s for s in spans_named(spans, tracing.QUEUE_SPAN) if s.attributes and "aimass.dropped" in s.attributes
    ]
    assert dropped.attributes is not None and dropped.attributes["aimass.dropped"] == "expired"
    assert dropped.status.status_code == StatusCode.ERROR
    assert not [s for s in spans if s.name == tracing.BATCH_SPAN and s.parent and s.parent.span_id != request_id]


@pytest.fixture
async def traced_replica(
    nlp_engine: NlpEngine, memory: InMemorySpanExporter
) -> AsyncIterator[tuple[grpc.aio.Channel, InMemorySpanExporter]]:
    """An NLP replica in-process with tracing on: one request at a time, batches that wait 300 ms to fill."""
    settings = Settings(
        nlp=NlpConfig(
            server=ServerConfig(port=0, max_inflight=1, drain_delay_s=0.05),
            embed_batching=BatchingConfig(max_queue_delay_ms=300, wait_when_idle=True),
        )
    )
    runner = build_runner(settings, register=False, engine=nlp_engine)
    await runner.start()
    channel = as_gateway(runner.address, "nlp")  # a replica's caller: a gateway, over mesh mTLS
    try:
        yield channel, memory
    finally:
        await channel.close()
        await runner.drain()


async def test_server_spans_record_the_code_clients_see(
    traced_replica: tuple[grpc.aio.Channel, InMemorySpanExporter],
) -> None:
    channel, memory = traced_replica
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    accepted = asyncio.ensure_future(
        stub.Embed(nlp_pb2.EmbedRequest(texts=["queued"]), timeout=10, metadata=(("traceparent", parent),))
    )
    await asyncio.sleep(0.1)  # it waits in the batcher and holds the only admission slot
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Embed(nlp_pb2.EmbedRequest(texts=["one too many"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await accepted
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.Embed(nlp_pb2.EmbedRequest(texts=[""]), timeout=10)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    servers = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == [EMBED, EMBED, EMBED], "health checks and the like are not traced"
    ok, full, bad = sorted(servers, key=lambda s: s.start_time or 0)
    # The caller's trace continues; the refused and invalid calls started traces of their own, with their codes.
    # (Semantic conventions: a server span's status is ERROR only for server faults, not for the caller's.)
    assert ok.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    codes = [s.attributes["rpc.grpc.status_code"] if s.attributes else None for s in (ok, full, bad)]
    assert codes == [0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert ok.context.trace_id != full.context.trace_id != bad.context.trace_id
    children = [
        s for s in memory.get_finished_spans() if s.parent is not None and s.parent.span_id == ok.context.span_id
    ]
    assert sorted(s.name for s in children) == [tracing.BATCH_SPAN, tracing.QUEUE_SPAN]


def test_shutdown_is_bounded_when_the_collector_is_down() -> None:
    config = TelemetryConfig(otlp_endpoint=f"127.0.0.1:{closed_port()}", export_timeout_s=1.0, export_interval_ms=50)
    down = tracing.Tracing(config, "test")
    for index in range(100):
        down.tracer.start_span(f"span {index}").end()
    time.sleep(0.2)  # the exporter is retrying by now
    started = time.monotonic()
    down.shutdown()
    assert time.monotonic() - started < config.export_timeout_s + 1.0
    leftover = [t for t in threading.enumerate() if t.name == "aimass-trace-flush" and t.is_alive()]
    assert not leftover


# -- a mesh exporting to a fake collector -------------------------------------------------------------------------


def telemetry_env(collector: FakeCollector, *, sample_ratio: float) -> dict[str, str]:
    return {
        "AIMASS_TELEMETRY__OTLP_ENDPOINT": collector.endpoint,
        "AIMASS_TELEMETRY__SAMPLE_RATIO": str(sample_ratio),
        "AIMASS_TELEMETRY__EXPORT_INTERVAL_MS": str(EXPORT_INTERVAL_MS),
        "AIMASS_TELEMETRY__EXPORT_TIMEOUT_S": "1",
    }


def client_tracer(collector: FakeCollector) -> TracerProvider:
    """The test acts as an instrumented application: its own provider, exporting to the same collector."""
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint, insecure=True)))
    return provider


def one_span(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"{service} {name!r}: {len(found)} spans in {[(s.service, s.name) for s in spans]}"
    return found[0]


EXPECTED = {
    ("test-client", "client request"),
    ("aimass-gateway", EMBED),
    ("aimass-gateway", tracing.ROUTE_SPAN),
    ("aimass-nlp", EMBED),
    ("aimass-nlp", tracing.QUEUE_SPAN),
    ("aimass-nlp", tracing.BATCH_SPAN),
    ("aimass-nlp", tracing.INFERENCE_SPAN),
}


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, FakeCollector]]:
    """`aimass up` (gateway, scheduler, one NLP replica) tracing every request to a fake collector."""
    collector = FakeCollector().start()
    try:
        mesh = start_mesh(tmp_path_factory.mktemp("traced"), {"nlp": 1}, telemetry_env(collector, sample_ratio=1.0))
    except BaseException:
        collector.stop()
        raise
    try:
        yield mesh, collector
    finally:
        mesh.stop()
        collector.stop()


@pytest.mark.slow
def test_one_connected_trace_from_the_client_to_the_model(traced_mesh: tuple[LocalMesh, FakeCollector]) -> None:
    mesh, collector = traced_mesh
    provider = client_tracer(collector)
    try:
        with Client(mesh.gateway, timeout_s=30) as client:
            client.embed(["warm up"])
            with provider.get_tracer("test").start_as_current_span("client request") as root:
                client.embed(["one trace, end to end"])
    finally:
        provider.shutdown()
    trace_id = f"{root.get_span_context().trace_id:032x}"
    spans = trace_of(
        collector.wait_for(lambda got: {(s.service, s.name) for s in trace_of(got, trace_id)} >= EXPECTED, 15),
        trace_id,
    )
    by_id = {span.span_id: span for span in spans}
    roots = [span for span in spans if not span.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("test-client", "client request")]
    assert all(span.parent_span_id in by_id for span in spans if span.parent_span_id), "the trace is connected"

    gateway_server = [s for s in spans if s.service == "aimass-gateway" and s.kind == SERVER]
    gateway_client = [s for s in spans if s.service == "aimass-gateway" and s.kind == CLIENT]
    assert len(gateway_server) == len(gateway_client) == 1
    gateway, call = gateway_server[0], gateway_client[0]
    assert gateway.name == EMBED and gateway.parent_span_id == roots[0].span_id
    route = one_span(spans, "aimass-gateway", tracing.ROUTE_SPAN)
    assert route.parent_span_id == gateway.span_id
    assert route.attributes["aimass.router"] == "ours"
    assert route.attributes["aimass.route.candidates"] == 1
    assert str(route.attributes["aimass.replica"]).startswith("nlp-")
    assert "aimass.route.view_version" in route.attributes
    assert call.parent_span_id == gateway.span_id
    assert call.name == EMBED and call.attributes["aimass.replica"] == route.attributes["aimass.replica"]
    replica = one_span(spans, "aimass-nlp", EMBED)
    assert replica.kind == SERVER and replica.parent_span_id == call.span_id
    queue = one_span(spans, "aimass-nlp", tracing.QUEUE_SPAN)
    execution = one_span(spans, "aimass-nlp", tracing.BATCH_SPAN)
    inference = one_span(spans, "aimass-nlp", tracing.INFERENCE_SPAN)
    assert queue.parent_span_id == execution.parent_span_id == replica.span_id
    assert inference.parent_span_id == execution.span_id
    assert execution.attributes["aimass.batcher"] == "embed"
    # Nested in time as in parentage (one host, one clock).
    assert gateway.start_ns <= route.start_ns <= route.end_ns <= call.start_ns
    assert call.start_ns <= replica.start_ns and replica.end_ns <= call.end_ns <= gateway.end_ns
    assert replica.start_ns <= queue.start_ns <= queue.end_ns <= execution.start_ns
    assert execution.start_ns <= inference.start_ns <= inference.end_ns <= execution.end_ns <= replica.end_ns
    assert {span.resource["service.namespace"] for span in spans if span.service.startswith("aimass-")} == {"aimass"}

    # A caller that decided not to sample: the mesh follows it (checked once later spans have arrived).
    with mesh.channel() as channel:
        nlp_pb2_grpc.NlpServiceStub(channel).Embed(
            nlp_pb2.EmbedRequest(texts=["not sampled"]), timeout=30, metadata=(("traceparent", UNSAMPLED),)
        )


UNSAMPLED = "00-11111111111111111111111111111111-2222222222222222-00"
PROBE_KIND = "probe"


class ProbeLlm(llm_pb2_grpc.LlmServiceServicer):
    """A streaming replica that records the metadata reaching it."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str]] = []

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        self.metadata = [(key, str(value)) for key, value in context.invocation_metadata() or ()]
        for word in request.prompt.split():
            if word == "fail":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the probe was asked to fail")
            yield llm_pb2.GenerateResponse(delta=word)


@pytest.mark.slow
async def test_streams_through_the_gateway_carry_its_context(traced_mesh: tuple[LocalMesh, FakeCollector]) -> None:
    mesh, collector = traced_mesh
    probe = ProbeLlm()  # type: ignore[abstract]  # only the method under test
    # A replica like the others: mesh mTLS with a certificate of its kind, serving gateways only, and registered
    # with the mesh's registry (in the scheduler) under that certificate.
    pki.issue(security.settings().pki_dir, role=PROBE_KIND, name=PROBE_KIND)
    identity = MeshCredentials.load(security.settings().pki_dir, PROBE_KIND)
    listener = mesh_listener(identity, MeshPolicy.serving(("aimass.v1.LlmService",), (ROLE_GATEWAY,)))
    assert listener.credentials is not None
    server = grpc.aio.server(interceptors=listener.interceptors)
    llm_pb2_grpc.add_LlmServiceServicer_to_server(probe, server)
    port = server.add_secure_port("127.0.0.1:0", listener.credentials)
    await server.start()
    registry = RemoteRegistry(mesh.scheduler, identity)
    await registry.register(
        Instance("probe-llm", PROBE_KIND, ("aimass.v1.LlmService",), f"127.0.0.1:{port}"), ttl_s=600
    )
    try:
        async with mesh.aio_channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(100):
                reply = await health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.LlmService"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            ok_trace, failed_trace = "44444444444444444444444444444444", "55555555555555555555555555555555"
            for trace_id, prompt in ((ok_trace, "one two"), (failed_trace, "one fail")):
                parent = f"00-{trace_id}-6666666666666666-01"
                call = stub.Generate(
                    llm_pb2.GenerateRequest(prompt=prompt), timeout=10, metadata=(("traceparent", parent),)
                )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    _ = [reply.delta async for reply in call]
                parents = [value for key, value in probe.metadata if key == "traceparent"]
                assert len(parents) == 1 and parents[0].startswith(f"00-{trace_id}-") and parents[0] != parent
                assert await call.code() == (
                    grpc.StatusCode.OK if prompt == "one two" else grpc.StatusCode.FAILED_PRECONDITION
                )
        spans = await asyncio.to_thread(
            collector.wait_for,
            lambda got: all(len(trace_of(got, t)) >= 3 for t in (ok_trace, failed_trace)),
            15,
        )
        for trace_id in (ok_trace, failed_trace):
            gateway = {s.kind: s for s in trace_of(spans, trace_id) if s.name == "/aimass.v1.LlmService/Generate"}
            assert gateway[SERVER].parent_span_id == "6666666666666666"
            assert gateway[CLIENT].parent_span_id == gateway[SERVER].span_id
            failed = trace_id == failed_trace
            assert (gateway[CLIENT].status == STATUS_ERROR) is failed
            assert gateway[CLIENT].attributes.get("rpc.grpc.status_code") == (
                grpc.StatusCode.FAILED_PRECONDITION.value[0] if failed else None
            )
    finally:
        await registry.deregister("probe-llm")
        await registry.close()
        await server.stop(0)


STAGES = {"/aimass.v1.NlpService/Sentiment", "/aimass.v1.NlpService/Entities", "/aimass.v1.NlpService/Classify"}


@pytest.mark.slow
async def test_a_composite_call_is_one_trace_with_each_stage_a_call_of_its_own(
    traced_mesh: tuple[LocalMesh, FakeCollector],
) -> None:
    """gateway/composition.py (the assistant's and scenarios' stages): a scenario's three steps are three forwarded
    calls under the composite call's span, each reaching its replica in the same trace."""
    mesh, collector = traced_mesh
    trace_id = "77777777777777777777777777777777"
    parent = f"00-{trace_id}-8888888888888888-01"
    request = scenarios_pb2.RunScenarioRequest(
        name="review-triage", inputs={"review": scenarios_pb2.ScenarioValue(text="The courier from Berlin was late.")}
    )
    async with mesh.aio_channel() as channel:
        stub = scenarios_pb2_grpc.ScenarioServiceStub(channel)
        events = [e async for e in stub.RunScenario(request, timeout=60, metadata=(("traceparent", parent),))]
    assert events[-1].WhichOneof("event") == "end"
    got = await asyncio.to_thread(
        collector.wait_for,
        lambda got: (
            {(s.service, s.name) for s in trace_of(got, trace_id)}
            >= {("aimass-nlp", m) for m in STAGES} | {("aimass-gateway", "/aimass.v1.ScenarioService/RunScenario")}
        ),
        15,
    )
    spans = trace_of(got, trace_id)
    composite = [s for s in spans if s.service == "aimass-gateway" and s.kind == SERVER]
    assert [s.name for s in composite] == ["/aimass.v1.ScenarioService/RunScenario"], [
        (s.service, s.name, s.kind) for s in spans
    ]
    assert composite[0].parent_span_id == "8888888888888888"
    calls = {s.name: s for s in spans if s.service == "aimass-gateway" and s.kind == CLIENT}
    assert set(calls) == STAGES
    assert all(call.parent_span_id == composite[0].span_id for call in calls.values())
    replicas = {s.name: s for s in spans if s.service == "aimass-nlp" and s.kind == SERVER}
    assert all(replicas[method].parent_span_id == calls[method].span_id for method in STAGES)


@pytest.mark.slow
def test_a_collector_that_goes_down_blocks_nothing(traced_mesh: tuple[LocalMesh, FakeCollector]) -> None:
    """Runs last on the traced mesh: it stops the collector, then the mesh."""
    mesh, collector = traced_mesh
    collector.stop()
    latencies = []
    with Client(mesh.gateway, timeout_s=30) as client:
        for index in range(30):
            started = time.perf_counter()
            assert len(client.embed([f"collector down {index}"]).embeddings) == 1
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)  # across several export intervals: exports fail meanwhile
    assert max(latencies) < 1.0, f"slowest request {max(latencies):.3f}s with the collector down"
    started = time.monotonic()
    assert mesh.stop() == 0
    stopping = time.monotonic() - started
    assert stopping < 15, f"the mesh took {stopping:.1f}s to stop with the collector down"
    # Spans of the unsampled caller (test above) never came, though later ones did.
    assert not trace_of(collector.spans(), UNSAMPLED.split("-")[1])


@pytest.mark.slow
def test_sample_ratio_zero_sends_nothing_unless_the_caller_sampled(tmp_path: Path) -> None:
    with FakeCollector() as collector:
        mesh = start_mesh(tmp_path, {"nlp": 1}, telemetry_env(collector, sample_ratio=0.0))
        try:
            with Client(mesh.gateway, timeout_s=30) as client:
                for index in range(5):
                    client.embed([f"untraced {index}"])
            # A caller's sampled trace is still followed; once it has arrived, anything else would have too.
            sampled_trace = "33333333333333333333333333333333"
            with mesh.channel() as channel:
                nlp_pb2_grpc.NlpServiceStub(channel).Embed(
                    nlp_pb2.EmbedRequest(texts=["sampled upstream"]),
                    timeout=30,
                    metadata=(("traceparent", f"00-{sampled_trace}-4444444444444444-01"),),
                )
            # Each process exports on its own interval: wait until both have sent their part of the trace.
            collector.wait_for(
                lambda got: (
                    {s.service for s in trace_of(got, sampled_trace)} == {"aimass-gateway", "aimass-nlp"}
                    and any(s.name == tracing.INFERENCE_SPAN for s in trace_of(got, sampled_trace))
                ),
                timeout_s=15,
            )
            time.sleep(3 * EXPORT_INTERVAL_MS / 1000)
            assert {s.trace_id for s in collector.spans()} == {sampled_trace}, "unsampled requests were exported"
        finally:
            mesh.stop()
