"""The LLM service over its engine protocol (services/llm/protocol.py): a replica whose engine is scripted, behind a
real gateway, for what a real vLLM engine cannot be made to do on cue: fail after some output, hang until the
caller gives up. The real engine's behaviour is tested end to end in tests/test_llm.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from aimass.local_mesh import free_port
from aimass.runtime.config import LlmConfig, ServerConfig
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from gateway.app import build_runner as gateway_runner
from scheduler.app import build_runner as scheduler_runner
from services.llm.app import build_runner as llm_runner
from services.llm.protocol import Chunk, EngineLoad, Sampling
from services.nlp.engine import NlpEngine
from tests.inprocess_mesh import InProcessMesh, mesh_settings

MODEL = "scripted-llm"
LLM_SERVICE = "aimass.v1.LlmService"


@dataclass
class Seen:
    request_id: str
    priority: int
    sampling: Sampling
    closed: bool = False


@dataclass
class ScriptedEngine:
    """Generates ``tok0 tok1 ...`` up to max_tokens. Token ids are word lengths, so the first word picks the script:
    a prompt starting with a 7-letter word ("failing") fails after two chunks, one starting with an 8-letter word
    ("stalling") yields one chunk and then waits until the request is aborted."""

    model_name: str = MODEL
    version: str = "1"
    context_length: int = 256
    device: str = "cpu"
    weights_bytes: int = 0
    load_state: EngineLoad = field(default_factory=EngineLoad)
    seen: list[Seen] = field(default_factory=list)
    _loaded: bool = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    async def encode_chat(self, messages: Sequence[dict[str, str]], *, deadline: float | None = None) -> list[int]:
        return await self.encode(" ".join(m["content"] for m in messages))

    async def encode(self, prompt: str, *, deadline: float | None = None) -> list[int]:
        # One id per word; the first word's length picks the script.
        return [len(word) for word in prompt.split()]

    async def stream(
        self, prompt_ids: list[int], sampling: Sampling, *, request_id: str, priority: int
    ) -> AsyncIterator[Chunk]:
        seen = Seen(request_id, priority, sampling)
        self.seen.append(seen)
        fails, stalls = prompt_ids[0] == 7, prompt_ids[0] == 8
        try:
            for index in range(sampling.max_tokens):
                last = index == sampling.max_tokens - 1
                yield Chunk(f"tok{index} ", 1, finish_reason="length" if last else None)
                if fails and index == 1:
                    raise RuntimeError("the engine's core process died")
                if stalls:
                    await asyncio.sleep(3600)
        finally:
            seen.closed = True

    def shutdown(self) -> None:
        self._loaded = False


@pytest.fixture
async def mesh(nlp_engine: NlpEngine) -> AsyncIterator[tuple[InProcessMesh, ScriptedEngine]]:
    """An in-process mesh: the scheduler, one LLM replica running the scripted engine, a gateway routing to it."""
    started = InProcessMesh(mesh_settings(free_port()), nlp_engine)
    engine = ScriptedEngine()
    quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
    settings = started.settings.model_copy(
        update={"llm": LlmConfig(model=MODEL, server=quick, max_num_seqs=2, max_waiting=2)}
    )
    try:
        started.scheduler = scheduler_runner(started.settings)
        await started.scheduler.start()
        replica: ServerRunner = llm_runner(settings, engine=engine)
        await replica.start()
        started.replicas.append(replica)
        gateway = gateway_runner(started.settings)
        await gateway.start()
        started.gateways.append(gateway)
        deadline = time.monotonic() + 20
        while not started.gateway_app().replicas.healthy(LLM_SERVICE):
            assert time.monotonic() < deadline, "the gateway never routed to the LLM replica"
            await asyncio.sleep(0.05)
        yield started, engine
    finally:
        await started.stop()


def generate(
    prompt: str, max_tokens: int, priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_UNSPECIFIED
) -> llm_pb2.GenerateRequest:
    request = llm_pb2.GenerateRequest(prompt=prompt, sampling=llm_pb2.SamplingParams(max_tokens=max_tokens))
    request.model.name = MODEL
    request.meta.priority = priority
    return request


async def test_the_servicer_streams_what_the_engine_yields(mesh: tuple[InProcessMesh, ScriptedEngine]) -> None:
    started, engine = mesh
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        replies = [r async for r in stub.Generate(generate("please tell a story", 3), timeout=10)]
    assert "".join(r.delta for r in replies) == "tok0 tok1 tok2 "
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert replies[-1].usage.prompt_tokens == 4
    assert replies[-1].usage.completion_tokens == 3
    assert replies[0].model.name == MODEL
    # The engine got the service's own types: the request's max_tokens, nothing else set.
    assert engine.seen[-1].sampling == Sampling(max_tokens=3)
    assert engine.seen[-1].closed


async def test_an_engine_failure_after_output_ends_the_stream_with_a_status(
    mesh: tuple[InProcessMesh, ScriptedEngine],
) -> None:
    started, engine = mesh
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        received: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for reply in stub.Generate(generate("failing now please", 8), timeout=10):
                received.append(reply.delta)
    assert received == ["tok0 ", "tok1 "]
    assert raised.value.code() == grpc.StatusCode.INTERNAL, raised.value
    assert engine.seen[-1].closed
    # The replica still serves the next request.
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        replies = [r async for r in stub.Generate(generate("and now?", 2), timeout=10)]
    assert replies[-1].usage.completion_tokens == 2


async def test_a_caller_that_gives_up_aborts_the_engine_request(mesh: tuple[InProcessMesh, ScriptedEngine]) -> None:
    started, engine = mesh
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        call = stub.Generate(generate("stalling forever", 8), timeout=30)
        first = await anext(aiter(call))
        assert first.delta == "tok0 "
        call.cancel()
    deadline = time.monotonic() + 10
    while not engine.seen[-1].closed:
        assert time.monotonic() < deadline, "the engine's request was never aborted after the caller cancelled"
        await asyncio.sleep(0.05)
    # The call's deadline does the same: DEADLINE_EXCEEDED for the caller, the engine's request closed.
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Generate(generate("stalling again", 8), timeout=1.0):
                pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while not engine.seen[-1].closed:
        assert time.monotonic() < deadline, "the engine's request outlived the call's deadline"
        await asyncio.sleep(0.05)


async def test_priorities_reach_the_engine_as_its_order(mesh: tuple[InProcessMesh, ScriptedEngine]) -> None:
    started, engine = mesh
    async with started.channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        by_priority: dict[int, int] = {}
        for priority in (common_pb2.PRIORITY_LOW, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_HIGH):
            [r async for r in stub.Generate(generate("rank me", 1, priority), timeout=10)]
            by_priority[priority] = engine.seen[-1].priority
    # vLLM runs lower numbers first.
    assert (
        by_priority[common_pb2.PRIORITY_HIGH]
        < by_priority[common_pb2.PRIORITY_NORMAL]
        < by_priority[common_pb2.PRIORITY_LOW]
    )
