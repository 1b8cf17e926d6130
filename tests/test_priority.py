"""Request priorities and tenant fair share on a real NLP replica in-process: contended, a HIGH request overtakes
the LOW ones waiting in the batcher's queue, and a light tenant's request overtakes a heavy tenant's backlog; a
priority outside the enum is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import BatchingConfig, NlpConfig, ServerConfig, Settings
from aimass.runtime.metadata import TENANT_KEY
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc
from services.nlp.app import NlpApp, build_runner
from services.nlp.engine import NlpEngine
from tests.security import as_gateway

LOW_REQUESTS = 12
CALL_TIMEOUT_S = 15.0
POLL_S = 0.001


@pytest.fixture
async def contended(nlp_engine: NlpEngine) -> AsyncIterator[tuple[ServerRunner, nlp_pb2_grpc.NlpServiceAsyncStub]]:
    """One Embed request per batch and one batch at a time: everything sent at once has to queue."""
    settings = Settings(
        nlp=NlpConfig(
            server=ServerConfig(port=0, drain_delay_s=0.05),
            embed_batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_concurrent_batches=1),
        )
    )
    runner = build_runner(settings, register=False, engine=nlp_engine)
    await runner.start()
    # Called as the gateway calls it (mesh mTLS): a replica serves nobody else, and trusts the tenant it names.
    channel = as_gateway(runner.address, "nlp")
    try:
        yield runner, nlp_pb2_grpc.NlpServiceStub(channel)
    finally:
        await channel.close()
        await runner.drain()


def embed_batcher(runner: ServerRunner) -> DynamicBatcher[Any, Any]:
    assert isinstance(runner.app, NlpApp)
    return runner.app.servicer.embed_batcher


async def backlog_queued(batcher: DynamicBatcher[Any, Any], submitted_before: int, finished: list[str]) -> int:
    """Once the backlog's LOW_REQUESTS calls have all reached the batcher: how many wait (most must)."""
    for _ in range(int(CALL_TIMEOUT_S / POLL_S)):
        if batcher.stats.submitted - submitted_before >= LOW_REQUESTS:
            break
        await asyncio.sleep(POLL_S)
    queued = batcher.queue_depth
    assert queued >= LOW_REQUESTS // 2, f"the replica was never contended (finished: {finished})"
    return queued


def embed_request(text: str, priority: common_pb2.Priority.ValueType) -> nlp_pb2.EmbedRequest:
    return nlp_pb2.EmbedRequest(meta=common_pb2.RequestMeta(priority=priority), texts=[text])


async def embed_in_order(
    stub: nlp_pb2_grpc.NlpServiceAsyncStub,
    finished: list[str],
    label: str,
    *,
    priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_NORMAL,
    tenant: str = "",
) -> nlp_pb2.EmbedResponse:
    """One Embed call; ``label`` joins ``finished`` when it is answered, so a test sees the order of completion.
    ``tenant`` travels as the gateway's scope metadata (it names the tenant of the caller's key)."""
    reply = await stub.Embed(
        embed_request(f"request {label} about serving models", priority),
        timeout=CALL_TIMEOUT_S,
        metadata=((TENANT_KEY, tenant),) if tenant else (),
    )
    finished.append(label)
    return reply


async def test_high_priority_overtakes_queued_low_priority_requests(
    contended: tuple[ServerRunner, nlp_pb2_grpc.NlpServiceAsyncStub],
) -> None:
    runner, stub = contended
    batcher = embed_batcher(runner)
    finished: list[str] = []

    submitted_before = batcher.stats.submitted
    lows = [
        asyncio.create_task(embed_in_order(stub, finished, f"low-{i}", priority=common_pb2.PRIORITY_LOW))
        for i in range(LOW_REQUESTS)
    ]
    # Every LOW request has reached the batcher: one is executing, most of the others wait behind it.
    queued_when_sent = await backlog_queued(batcher, submitted_before, finished)

    high = await embed_in_order(stub, finished, "high", priority=common_pb2.PRIORITY_HIGH)
    assert high.dimensions == 384
    replies = await asyncio.gather(*lows)

    assert all(len(r.embeddings) == 1 for r in replies)
    assert len(finished) == LOW_REQUESTS + 1
    # Only what was already executing (and at most one more batch taken meanwhile) finishes before it.
    assert finished.index("high") < 3, (finished, queued_when_sent)
    assert batcher.queue_depth == 0 and batcher.stats.dropped_displaced == 0


async def test_a_light_tenant_is_not_starved_by_a_heavy_one(
    contended: tuple[ServerRunner, nlp_pb2_grpc.NlpServiceAsyncStub],
) -> None:
    runner, stub = contended
    batcher = embed_batcher(runner)
    finished: list[str] = []

    submitted_before = batcher.stats.submitted
    heavy = [
        asyncio.create_task(embed_in_order(stub, finished, f"heavy-{i}", tenant="heavy")) for i in range(LOW_REQUESTS)
    ]
    queued_when_sent = await backlog_queued(batcher, submitted_before, finished)

    # Same priority, sent after the whole backlog: first come, first served would finish it last.
    light = await embed_in_order(stub, finished, "light", tenant="light")
    assert light.dimensions == 384
    await asyncio.gather(*heavy)
    assert finished.index("light") < 3, (finished, queued_when_sent)


async def test_priority_outside_the_enum_is_invalid_argument(
    contended: tuple[ServerRunner, nlp_pb2_grpc.NlpServiceAsyncStub],
) -> None:
    _, stub = contended
    bad = common_pb2.RequestMeta(priority=9)  # type: ignore[arg-type]  # proto3 enums are open on the wire
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: stub.Embed(nlp_pb2.EmbedRequest(meta=bad, texts=["x"]), timeout=5),
        lambda: stub.Sentiment(nlp_pb2.SentimentRequest(meta=bad, texts=["x"]), timeout=5),
        lambda: stub.Entities(nlp_pb2.EntitiesRequest(meta=bad, texts=["x"]), timeout=5),
        lambda: stub.Classify(nlp_pb2.ClassifyRequest(meta=bad, texts=["x"], labels=["a", "b"]), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("meta.priority is 9, which is not a Priority value")
    reply = await stub.Embed(embed_request("still serving", common_pb2.PRIORITY_CRITICAL), timeout=CALL_TIMEOUT_S)
    assert reply.dimensions == 384
