"""Streaming through the gateway: server streaming and bidirectional calls pass through as streams, with
metadata, deadlines, errors and cancellation carried to the replica.

A small probe replica implements two of the LLM and speech services' streaming methods so the gateway (the part
under test) forwards real streams to a real server whose behaviour the tests control. It is a replica like the
others: mesh mTLS with a certificate of its kind ("probe", from the session's CA), serving gateways only, and
registered with the mesh's registry (in the scheduler) under that certificate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass import pki
from aimass.local_mesh import LocalMesh
from aimass.runtime.discovery import Instance, RemoteRegistry
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, MeshPolicy
from aimass.runtime.metadata import TENANT_KEY
from aimass.runtime.server import mesh_listener
from aimass.v1 import llm_pb2, llm_pb2_grpc, speech_pb2, speech_pb2_grpc
from tests.security import key_for, keyed, settings

Context = grpc.aio.ServicerContext[Any, Any]
PROBE_KIND = "probe"
PROBE_SERVICES = ("aimass.v1.LlmService", "aimass.v1.SpeechService")
# A tenant of its own, so the test knows which tenant its key names.
TENANT = "streaming-test-tenant"


class ProbeLlm(llm_pb2_grpc.LlmServiceServicer):
    """Streams the prompt back word by word and records what reached it."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self.time_remaining: float | None = None
        self.cancelled = asyncio.Event()

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        self.metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.time_remaining = context.time_remaining()
        pause = 0.2 if request.prompt.startswith("slow") else 0.0
        try:
            for word in request.prompt.split():
                if word == "fail":
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the probe was asked to fail mid-stream")
                yield llm_pb2.GenerateResponse(delta=word)
                await asyncio.sleep(pause)
            yield llm_pb2.GenerateResponse(finish_reason=llm_pb2.FINISH_REASON_STOP)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class ProbeSpeech(speech_pb2_grpc.SpeechServiceServicer):
    """Answers every audio chunk with a partial naming its size, then an end marker when the client closes."""

    async def StreamTranscribe(
        self, request_iterator: AsyncIterator[speech_pb2.StreamTranscribeRequest], context: Context
    ) -> AsyncIterator[speech_pb2.StreamTranscribeResponse]:
        async for request in request_iterator:
            if request.HasField("audio"):
                yield speech_pb2.StreamTranscribeResponse(
                    partial=speech_pb2.TranscriptSegment(text=f"{len(request.audio)} bytes")
                )
        yield speech_pb2.StreamTranscribeResponse(end=speech_pb2.StreamTranscribeEnd())


@pytest.fixture(scope="module")
async def probe(mesh: LocalMesh) -> AsyncIterator[ProbeLlm]:
    llm = ProbeLlm()  # type: ignore[abstract]  # the probe implements only the streaming methods under test
    # A replica's listener: the probe's certificate (role = its kind, which the gateway checks when it dials), and
    # its services for gateways only.
    pki.issue(settings().pki_dir, role=PROBE_KIND, name=PROBE_KIND)
    identity = MeshCredentials.load(settings().pki_dir, PROBE_KIND)
    listener = mesh_listener(identity, MeshPolicy.serving(PROBE_SERVICES, (ROLE_GATEWAY,)))
    assert listener.credentials is not None
    server = grpc.aio.server(interceptors=listener.interceptors)
    llm_pb2_grpc.add_LlmServiceServicer_to_server(llm, server)
    speech_pb2_grpc.add_SpeechServiceServicer_to_server(ProbeSpeech(), server)  # type: ignore[abstract]
    port = server.add_secure_port("127.0.0.1:0", listener.credentials)
    await server.start()
    # Registered as a replica registers: with its own certificate, which may register instances of its kind only.
    registry = RemoteRegistry(mesh.scheduler, identity)
    await registry.register(Instance("probe-streams", PROBE_KIND, PROBE_SERVICES, f"127.0.0.1:{port}"), ttl_s=600)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:  # health needs no key
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            reply = await health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.LlmService"), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
    yield llm
    await registry.deregister("probe-streams")
    await registry.close()
    await server.stop(0)


@pytest.fixture
async def gateway_channel(mesh: LocalMesh) -> AsyncIterator[grpc.aio.Channel]:
    """The gateway, with the API key of TENANT on every call."""
    async with keyed(mesh.gateway, key_for(TENANT)) as channel:
        yield channel


async def test_server_stream_passes_through_with_metadata_and_deadline(
    probe: ProbeLlm, gateway_channel: grpc.aio.Channel
) -> None:
    stub = llm_pb2_grpc.LlmServiceStub(gateway_channel)
    call = stub.Generate(
        llm_pb2.GenerateRequest(prompt="one two three"),
        timeout=20,
        # A label of the caller's own, and a tenant it claims (not the one of its key).
        metadata=(("x-caller-label", "blue"), (TENANT_KEY, "someone-else")),
    )
    replies = [reply async for reply in call]
    assert [r.delta for r in replies] == ["one", "two", "three", ""]
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    assert probe.metadata["x-caller-label"] == "blue"
    # The replica gets the tenant of the key the gateway verified, never the caller's claim, nor its key.
    assert probe.metadata[TENANT_KEY] == TENANT
    assert "authorization" not in probe.metadata
    assert "x-request-id" in probe.metadata  # filled in by the gateway
    assert probe.time_remaining is not None and 15 < probe.time_remaining <= 20.5  # grpc rounds timeouts up
    assert await call.code() == grpc.StatusCode.OK
    assert dict(await call.trailing_metadata() or ())[TENANT_KEY] == TENANT


async def test_error_mid_stream_reaches_the_client(probe: ProbeLlm, gateway_channel: grpc.aio.Channel) -> None:
    call = llm_pb2_grpc.LlmServiceStub(gateway_channel).Generate(llm_pb2.GenerateRequest(prompt="ok fail"), timeout=20)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            received.append(reply.delta)
    assert received == ["ok"]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "the probe was asked to fail mid-stream"


async def test_client_cancel_reaches_the_replica(probe: ProbeLlm, gateway_channel: grpc.aio.Channel) -> None:
    probe.cancelled.clear()
    call = llm_pb2_grpc.LlmServiceStub(gateway_channel).Generate(
        llm_pb2.GenerateRequest(prompt="slow " + "word " * 50), timeout=60
    )
    first = await call.read()
    assert isinstance(first, llm_pb2.GenerateResponse) and first.delta == "slow"
    call.cancel()
    await asyncio.wait_for(probe.cancelled.wait(), 5)


async def test_deadline_expiry_cancels_the_replica_stream(probe: ProbeLlm, gateway_channel: grpc.aio.Channel) -> None:
    probe.cancelled.clear()
    call = llm_pb2_grpc.LlmServiceStub(gateway_channel).Generate(
        llm_pb2.GenerateRequest(prompt="slow " + "word " * 50), timeout=0.5
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(probe.cancelled.wait(), 5)


async def test_bidirectional_stream_passes_through(probe: ProbeLlm, gateway_channel: grpc.aio.Channel) -> None:
    async def chunks() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(config=speech_pb2.StreamTranscribeConfig(sample_rate_hz=16000))
        for size in (3200, 3200, 1600):
            yield speech_pb2.StreamTranscribeRequest(audio=b"\0" * size)

    stub = speech_pb2_grpc.SpeechServiceStub(gateway_channel)
    events = [event async for event in stub.StreamTranscribe(chunks(), timeout=20)]
    assert [e.partial.text for e in events[:-1]] == ["3200 bytes", "3200 bytes", "1600 bytes"]
    assert events[-1].HasField("end")
