"""HTTP/2 hygiene on a real replica server: streams per connection are capped (the rest wait, none fail), a peer
that floods pings loses its connection while a polite one keeps it, and idle connections are closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.runtime.config import NlpConfig, ServerConfig, Settings
from aimass.runtime.identity import mesh_channel
from aimass.runtime.server import ServerRunner
from services.nlp.app import build_runner
from services.nlp.engine import NlpEngine
from tests.security import credentials

STREAMS = 2


@pytest.fixture
async def replica(nlp_engine: NlpEngine) -> AsyncIterator[ServerRunner]:
    config = ServerConfig(
        port=0,
        drain_delay_s=0,
        drain_grace_s=1,
        max_concurrent_streams=STREAMS,
        min_ping_interval_s=5,
        max_ping_strikes=1,
        max_connection_idle_s=0.5,
    )
    runner = build_runner(Settings(nlp=NlpConfig(server=config, device="cpu")), register=False, engine=nlp_engine)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.drain()


def channel_to(runner: ServerRunner, *options: tuple[str, int]) -> grpc.aio.Channel:
    return mesh_channel(runner.address, credentials("gateway"), server_role="nlp", options=options)


async def first_status(
    stream: grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
) -> None:
    await stream.read()


async def test_streams_beyond_the_cap_wait_or_are_refused_never_run(replica: ServerRunner) -> None:
    async with channel_to(replica) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        streams = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(STREAMS + 3)]
        firsts = {asyncio.ensure_future(first_status(s)): s for s in streams}
        done, pending = await asyncio.wait(firsts, timeout=1.5)
        opened = [task for task in done if task.exception() is None]
        refused = [task.exception() for task in done if task.exception() is not None]
        # Never more open at once than the server allows; the others wait in the client's transport or are refused
        # (REFUSED_STREAM: UNAVAILABLE, safe to retry) before they run.
        assert len(opened) == STREAMS, (opened, refused)
        assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE for e in refused)
        # Freed slots serve the next streams: those still waiting take them; once all of the first ones are gone, a
        # new stream opens (a refused one is retried, as a client with a retry policy does).
        for stream in streams:
            stream.cancel()
        for task in pending:
            task.cancel()
        async with asyncio.timeout(10):
            while True:
                late = health.Watch(health_pb2.HealthCheckRequest())
                try:
                    await late.read()
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    await asyncio.sleep(0.05)
        late.cancel()


async def test_a_ping_flood_costs_its_sender_the_connection(replica: ServerRunner) -> None:
    flood = (
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )
    async with channel_to(replica, *flood) as rude, channel_to(replica) as polite:
        rude_stream = health_pb2_grpc.HealthStub(rude).Watch(health_pb2.HealthCheckRequest())
        polite_stream = health_pb2_grpc.HealthStub(polite).Watch(health_pb2.HealthCheckRequest())
        await rude_stream.read()
        await polite_stream.read()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(rude_stream.read(), timeout=10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        # The polite client's stream is still open.
        assert not polite_stream.done()
        polite_stream.cancel()


async def test_idle_connections_are_closed(replica: ServerRunner) -> None:
    async with channel_to(replica) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while channel.get_state() == grpc.ChannelConnectivity.READY:
                    await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        # The server closed it (GOAWAY); the client reconnects by itself on the next call.
        assert channel.get_state() != grpc.ChannelConnectivity.READY
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
