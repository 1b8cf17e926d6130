"""The server runtime's admission and deadlines, seen by real gRPC clients of a real server on loopback.

The server is the runtime's own interceptor chain (ServerRunner._interceptors' order: telemetry, deadlines, the
request scope, admission, error mapping) in front of a small servicer whose calls wait until the test releases them,
so the test controls exactly how many calls are in flight. Tenants arrive as a gateway sends them (x-aimass-tenant),
which a replica trusts; without one, a caller counts per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import prometheus_client
import pytest

from aimass.local_mesh import free_port
from aimass.runtime.config import BatchingConfig, DeadlineConfig, NlpConfig, ServerConfig
from aimass.runtime.errors import InvalidArgument
from aimass.runtime.interceptors import (
    UNKNOWN_METHOD,
    AdmissionInterceptor,
    DeadlineInterceptor,
    ErrorMappingInterceptor,
    ScopeInterceptor,
    TelemetryInterceptor,
    metric_method,
)
from aimass.runtime.metadata import ERROR_INFO_KEY, TENANT_KEY
from aimass.runtime.scope import current_scope
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc
from services.nlp.engine import NlpEngine
from tests.eventually import eventually
from tests.inprocess_mesh import InProcessMesh, mesh_settings
from tests.security import key_for

UNARY = "/aimass.v1.NlpService/Sentiment"
STREAM = "/aimass.v1.LlmService/Chat"


@dataclass
class Held:
    """Calls in the servicer: each waits for ``release``; what it saw and whether it was cancelled is kept."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    cancelled: int = 0
    deadlines: list[float | None] = field(default_factory=list)

    async def wait(self) -> None:
        self.running += 1
        self.deadlines.append(current_scope().deadline)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


class AnswersEveryMethod(grpc.GenericRpcHandler):
    """As the gateway's forwarder does, a handler for any method name (unknown ones answer UNIMPLEMENTED), so
    calls to made-up methods pass through the interceptors and their metrics."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        async def reject(requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {handler_call_details.method}")

        return grpc.stream_stream_rpc_method_handler(reject)


def handlers(held: Held) -> tuple[grpc.GenericRpcHandler, ...]:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"bad":
            raise InvalidArgument("bad request")
        await held.wait()
        return b"done"

    async def stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b"first"
        await held.wait()
        yield b"last"

    return (
        grpc.method_handlers_generic_handler(
            "aimass.v1.NlpService", {"Sentiment": grpc.unary_unary_rpc_method_handler(unary)}
        ),
        grpc.method_handlers_generic_handler(
            "aimass.v1.LlmService", {"Chat": grpc.unary_stream_rpc_method_handler(stream)}
        ),
        AnswersEveryMethod(),
    )


@dataclass
class Server:
    address: str
    held: Held
    admission: AdmissionInterceptor
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self) -> grpc.aio.Channel:
        # A connection of its own: channels to one target otherwise share grpc's global subchannel (one connection).
        channel = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return channel


@contextlib.asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[Server]:
    held = Held()
    admission = AdmissionInterceptor(
        config.max_inflight, max_streams=config.max_streams, tenant_share=config.tenant_share, trust_tenant=True
    )
    server = grpc.aio.server(
        interceptors=[
            TelemetryInterceptor(access_log_enabled=False),
            DeadlineInterceptor(config.unary_deadline, config.stream_deadline, config.deadline_rules),
            ScopeInterceptor(),
            admission,
            ErrorMappingInterceptor(),
        ]
    )
    server.add_generic_rpc_handlers(handlers(held))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = Server(f"127.0.0.1:{port}", held, admission)
    try:
        yield running
    finally:
        held.release.set()
        for channel in running.channels:
            await channel.close()
        await server.stop(1)


def call_unary(channel: grpc.aio.Channel, tenant: str = "", *, timeout: float | None = 10, body: bytes = b"x") -> Any:
    metadata = ((TENANT_KEY, tenant),) if tenant else None
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
    return method(body, timeout=timeout, metadata=metadata)


def open_stream(channel: grpc.aio.Channel, tenant: str = "", *, timeout: float | None = 10) -> Any:
    metadata = ((TENANT_KEY, tenant),) if tenant else None
    method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(STREAM)
    return method(b"x", timeout=timeout, metadata=metadata)


def reason_of(err: grpc.aio.AioRpcError) -> str:
    trailers = dict(err.trailing_metadata() or ())
    return common_pb2.ErrorInfo.FromString(trailers[ERROR_INFO_KEY]).reason


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_one_tenant_holds_at_most_its_share_and_others_still_get_in() -> None:
    async with serving(ServerConfig(max_inflight=4, tenant_share=0.5)) as server:
        channel = server.channel()
        greedy = [asyncio.ensure_future(call_unary(channel, "greedy")) for _ in range(2)]
        await eventually("server.held.running == 2", lambda: server.held.running == 2)
        err = await refused(call_unary(channel, "greedy"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'greedy' already has 2 requests in flight" in (err.details() or "")
        assert reason_of(err) == "TENANT_INFLIGHT_LIMIT"
        # Another tenant still has the other half.
        polite = [asyncio.ensure_future(call_unary(channel, "polite")) for _ in range(2)]
        await eventually("server.held.running == 4", lambda: server.held.running == 4)
        # Now the server as a whole is full, for everyone.
        err = await refused(call_unary(channel, "third"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(err) == "SERVER_FULL"
        assert "at capacity (4 requests in flight, limit 4)" in (err.details() or "")
        server.held.release.set()
        assert [await c for c in (*greedy, *polite)] == [b"done"] * 4
        # Slots are given back: nothing is counted for anyone once the calls are over.
        assert server.admission.inflight == 0 and not server.admission.unary.by_holder


async def test_streams_have_their_own_pool_so_idle_streams_cannot_starve_unary_calls() -> None:
    async with serving(ServerConfig(max_inflight=4, max_streams=2, tenant_share=1.0)) as server:
        channel = server.channel()
        streams = [open_stream(channel, f"streamer-{i}") for i in range(2)]
        for stream in streams:
            assert await stream.read() == b"first"
        err = await refused(open_stream(channel, "streamer-3").read())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity (2 streams in flight, limit 2)" in (err.details() or "")
        # Every stream slot is taken, yet unary calls are admitted and answered.
        unary = asyncio.ensure_future(call_unary(channel, "someone"))
        await eventually("server.held.running == 3", lambda: server.held.running == 3)
        server.held.release.set()
        assert await unary == b"done"
        for stream in streams:
            assert await stream.read() == b"last"


async def test_without_a_tenant_each_connection_counts_on_its_own() -> None:
    async with serving(ServerConfig(max_inflight=4, tenant_share=0.5)) as server:
        flooding, other = server.channel(), server.channel()
        held = [asyncio.ensure_future(call_unary(flooding)) for _ in range(2)]
        await eventually("server.held.running == 2", lambda: server.held.running == 2)
        err = await refused(call_unary(flooding))
        assert "this connection already has 2 requests in flight" in (err.details() or "")
        # A caller on another connection is not held back by the first one's calls.
        answer = asyncio.ensure_future(call_unary(other))
        await eventually("server.held.running == 3", lambda: server.held.running == 3)
        server.held.release.set()
        assert await answer == b"done" and [await c for c in held] == [b"done", b"done"]


async def test_a_call_without_a_deadline_gets_the_servers_default_and_is_stopped_there() -> None:
    config = ServerConfig(unary_deadline=DeadlineConfig(default_s=0.3, max_s=0))
    async with serving(config) as server:
        started = time.monotonic()
        err = await refused(call_unary(server.channel(), timeout=None))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "ran past the server's default for /aimass.v1.NlpService/Sentiment (0.3 s" in (err.details() or "")
        assert time.monotonic() - started < 5
        # The handler was cancelled, not left running, and the slot was given back.
        await eventually("server.held.cancelled == 1", lambda: server.held.cancelled == 1)
        assert server.admission.inflight == 0
        # The handler (and any batcher it queued in) saw that deadline in its request scope.
        (seen,) = server.held.deadlines
        assert seen is not None


async def test_a_deadline_longer_than_the_methods_maximum_is_cut_to_it() -> None:
    config = ServerConfig(unary_deadline=DeadlineConfig(default_s=0, max_s=0.3))
    async with serving(config) as server:
        err = await refused(call_unary(server.channel(), timeout=60))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "the most /aimass.v1.NlpService/Sentiment may run (0.3 s; the call asked for 60 s)" in (
            err.details() or ""
        )
        # A caller's own, shorter deadline stands and reads as usual.
        started = time.monotonic()
        err = await refused(call_unary(server.channel(), timeout=0.1))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 0.3


async def test_streams_are_held_to_their_own_deadline_and_per_method_rules_win() -> None:
    config = ServerConfig(
        unary_deadline=DeadlineConfig(default_s=30, max_s=60),
        stream_deadline=DeadlineConfig(default_s=30, max_s=60),
        method_deadlines={"/aimass.v1.LlmService/": DeadlineConfig(default_s=0.3, max_s=1)},
    )
    async with serving(config) as server:
        stream = open_stream(server.channel(), timeout=None)
        assert await stream.read() == b"first"  # what came before the deadline was delivered
        err = await refused(stream.read())
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "/aimass.v1.LlmService/Chat ran past the server's default" in (err.details() or "")
        await eventually("server.held.cancelled == 1", lambda: server.held.cancelled == 1)


async def test_errors_and_successes_are_unchanged_under_deadlines() -> None:
    async with serving(ServerConfig()) as server:
        channel = server.channel()
        err = await refused(call_unary(channel, body=b"bad"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "bad request"
        server.held.release.set()
        assert await call_unary(channel) == b"done"


async def test_made_up_method_names_share_one_metric_series() -> None:
    async with serving(ServerConfig()) as server:
        channel = server.channel()
        for i in range(50):
            for name in (f"/aimass.v1.NlpService/Nope{i}", f"/made.up.Service{i}/Call"):
                made_up: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(name)
                err = await refused(made_up(b"", timeout=5))
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        exposition = prometheus_client.generate_latest().decode()
        assert "Nope" not in exposition and "made.up" not in exposition
    assert metric_method("/aimass.v1.NlpService/Embed") == "/aimass.v1.NlpService/Embed"
    assert metric_method("/aimass.v1.NlpService/Nope") == UNKNOWN_METHOD
    assert metric_method("garbage") == UNKNOWN_METHOD


async def test_through_the_gateway_one_tenant_cannot_take_every_slot(nlp_engine: NlpEngine) -> None:
    """The real gateway in front of a real NLP replica whose batches wait 1.5 s to fill (so all five calls overlap):
    a tenant with three calls in flight is refused its third (its share of the gateway's four slots is two), while
    another tenant's two go through, and everything admitted is answered."""
    settings = mesh_settings(free_port())
    gateway = settings.gateway.model_copy(
        update={"server": settings.gateway.server.model_copy(update={"max_inflight": 4, "tenant_share": 0.5})}
    )
    mesh = InProcessMesh(settings.model_copy(update={"gateway": gateway}), nlp_engine)
    slow = NlpConfig(embed_batching=BatchingConfig(max_batch_size=64, max_queue_delay_ms=1500))
    await mesh.start(nlp=slow)
    greedy, polite = mesh.channel(key_for("greedy")), mesh.channel(key_for("polite"))
    try:
        embed = nlp_pb2.EmbedRequest(texts=["held a while"])
        calls = [nlp_pb2_grpc.NlpServiceStub(greedy).Embed(embed, timeout=20) for _ in range(3)]
        calls += [nlp_pb2_grpc.NlpServiceStub(polite).Embed(embed, timeout=20) for _ in range(2)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(refused) == 1, results
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(refused[0]) == (
            "TENANT_INFLIGHT_LIMIT"
        )
        assert "tenant 'greedy' already has 2 requests in flight" in (refused[0].details() or "")
        assert sum(isinstance(r, nlp_pb2.EmbedResponse) for r in results[3:]) == 2  # the other tenant: both served
    finally:
        await greedy.close()
        await polite.close()
        await mesh.stop()
