"""The server runtime under a real NLP service in-process: deadlines, cancellation, bounded queues, admission,
malformed requests and graceful drain, each seen as a client sees it (a replica's only client: a gateway, over mesh
mTLS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.runtime.config import BatchingConfig, NlpConfig, ServerConfig, Settings
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.runtime.server import ServerRunner, server_options
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc
from services.nlp.app import NlpApp, build_runner
from services.nlp.engine import NlpEngine
from tests.security import as_gateway

SLOW_BATCH_DELAY_MS = 400.0


def settings_for(*, max_inflight: int = 512, queue_size: int = 2048, delay_ms: float = 4.0) -> Settings:
    return Settings(
        nlp=NlpConfig(
            server=ServerConfig(port=0, max_inflight=max_inflight, tenant_share=1.0, drain_delay_s=0.1),
            embed_batching=BatchingConfig(
                max_batch_size=64, max_queue_delay_ms=delay_ms, max_queue_size=queue_size, wait_when_idle=True
            ),
        )
    )


async def running(engine: NlpEngine, settings: Settings) -> AsyncIterator[tuple[ServerRunner, grpc.aio.Channel]]:
    runner = build_runner(settings, register=False, engine=engine)
    await runner.start()
    channel = as_gateway(runner.address, "nlp")
    try:
        yield runner, channel
    finally:
        await channel.close()
        await runner.drain()


def servicer_of(runner: ServerRunner) -> NlpApp:
    assert isinstance(runner.app, NlpApp)
    return runner.app


@pytest.fixture
async def slow_batches(nlp_engine: NlpEngine) -> AsyncIterator[tuple[ServerRunner, grpc.aio.Channel]]:
    """Batches wait SLOW_BATCH_DELAY_MS to fill, so requests demonstrably sit in the queue."""
    async for pair in running(nlp_engine, settings_for(queue_size=4, delay_ms=SLOW_BATCH_DELAY_MS)):
        yield pair


async def test_deadline_shorter_than_queue_wait_is_exceeded_and_never_executed(
    slow_batches: tuple[ServerRunner, grpc.aio.Channel],
) -> None:
    runner, channel = slow_batches
    batcher = servicer_of(runner).servicer.embed_batcher
    executed_before = batcher.stats.executed_requests
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(nlp_pb2.EmbedRequest(texts=["too late"]), timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(SLOW_BATCH_DELAY_MS / 1000 + 0.3)
    stats = batcher.stats
    assert stats.executed_requests == executed_before, "the expired request still reached the model"
    assert stats.dropped_cancelled + stats.dropped_expired >= 1
    assert batcher.queue_depth == 0


async def test_client_cancel_removes_the_queued_request(slow_batches: tuple[ServerRunner, grpc.aio.Channel]) -> None:
    runner, channel = slow_batches
    batcher = servicer_of(runner).servicer.embed_batcher
    before = batcher.stats
    call = nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["never mind"]))
    for _ in range(50):
        if batcher.queue_depth:
            break
        await asyncio.sleep(0.01)
    assert batcher.queue_depth == 1
    call.cancel()
    for _ in range(100):
        if batcher.stats.dropped_cancelled > before.dropped_cancelled:
            break
        await asyncio.sleep(0.01)
    assert batcher.stats.dropped_cancelled == before.dropped_cancelled + 1
    assert batcher.queue_depth == 0
    await asyncio.sleep(SLOW_BATCH_DELAY_MS / 1000 + 0.2)
    assert batcher.stats.executed_requests == before.executed_requests


async def test_full_queue_answers_resource_exhausted_with_pushback(
    slow_batches: tuple[ServerRunner, grpc.aio.Channel],
) -> None:
    _, channel = slow_batches
    stub = nlp_pb2_grpc.NlpServiceStub(channel)
    # The queue holds 4 texts: two requests of two texts fill it while the batch waits to fill.
    first = asyncio.ensure_future(stub.Embed(nlp_pb2.EmbedRequest(texts=["a b", "c d"]), timeout=10))
    second = asyncio.ensure_future(stub.Embed(nlp_pb2.EmbedRequest(texts=["e f", "g h"]), timeout=10))
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(nlp_pb2.EmbedRequest(texts=["one too many"]), timeout=10)
    err = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in (err.details() or "")
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("grpc-retry-pushback-ms") == "100"
    info = common_pb2.ErrorInfo.FromString(trailers[ERROR_INFO_KEY])
    assert info.reason == "QUEUE_FULL"
    # The accepted requests are not lost.
    for done in await asyncio.gather(first, second):
        assert len(done.embeddings) == 2


async def test_admission_limit_answers_resource_exhausted(nlp_engine: NlpEngine) -> None:
    settings = settings_for(max_inflight=2, delay_ms=SLOW_BATCH_DELAY_MS)
    async for _, channel in running(nlp_engine, settings):
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        calls = [stub.Embed(nlp_pb2.EmbedRequest(texts=[f"text {i}"]), timeout=10) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(refused) == 1
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity (2 requests in flight, limit 2)" in (refused[0].details() or "")
        # Health answers even while the server is full.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_malformed_request_bytes_are_invalid_argument_and_server_keeps_serving(nlp_engine: NlpEngine) -> None:
    async for _, channel in running(nlp_engine, settings_for()):
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/aimass.v1.NlpService/Embed")
        for garbage, why in [(b"\x1a\x05ab", "truncated"), (b"\x1a\x02\xff\xfe", "invalid UTF-8 in texts")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(garbage, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
            assert "not a valid aimass.v1.EmbedRequest" in (caught.value.details() or ""), why
        reply = await nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["still here"]), timeout=10)
        assert reply.dimensions == 384


async def test_drain_finishes_accepted_work_and_turns_health_not_serving(nlp_engine: NlpEngine) -> None:
    runner = build_runner(settings_for(delay_ms=300), register=False, engine=nlp_engine)
    await runner.start()
    channel = as_gateway(runner.address, "nlp")
    try:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        accepted = [stub.Embed(nlp_pb2.EmbedRequest(texts=[f"queued {i}"]), timeout=20) for i in range(6)]
        gathered = asyncio.gather(*accepted)
        await asyncio.sleep(0.1)  # all six are queued in the batcher, waiting for the batch delay
        drain = asyncio.ensure_future(runner.drain())
        await asyncio.sleep(0.05)
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        results = await gathered
        assert [len(r.embeddings) for r in results] == [1] * 6
        await drain
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(nlp_pb2.EmbedRequest(texts=["after stop"]), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await runner.drain()


def test_servers_and_the_gateways_replica_channels_open_a_stream_window_beyond_grpcs_64_kib() -> None:
    # A photo or an audio clip over 64 KiB must not wait a WINDOW_UPDATE round trip at each hop (issue 17).
    from aimass.client.channels import channel_options
    from aimass.runtime.config import GatewayConfig
    from gateway.app import replica_channel_options

    assert dict(server_options(ServerConfig()))["grpc.http2.lookahead_bytes"] == 1 << 20
    assert dict(server_options(ServerConfig(stream_window_bytes=4 << 20)))["grpc.http2.lookahead_bytes"] == 4 << 20
    assert dict(replica_channel_options(GatewayConfig()))["grpc.http2.lookahead_bytes"] == 1 << 20
    assert dict(channel_options(1))["grpc.http2.lookahead_bytes"] == 1 << 20
