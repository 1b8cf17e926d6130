"""The OpenAI-compatible REST front door's LLM endpoints, called with the real `openai` SDK (sync and async) against
a mesh started by `aimass up` (tests/conftest.front_door_mesh): chat and completions, streamed and whole, and a
dropped SSE connection stopping the generation on the replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam

from aimass.local_mesh import LocalMesh, free_port
from aimass.runtime.config import RestConfig, Settings
from gateway.rest.app import create_app
from tests.metrics import scrape, value

MODEL = "smollm2-135m-instruct"
CAPITAL: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]
LONG_STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a very long story about a dragon who learns to cook."}
]


@pytest.fixture(scope="module")
def client(front_door_mesh: LocalMesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=front_door_mesh.rest_url, api_key=front_door_mesh.api_key, timeout=120) as sdk:
        yield sdk


@pytest.fixture
async def async_client(front_door_mesh: LocalMesh) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=front_door_mesh.rest_url, api_key=front_door_mesh.api_key, timeout=120
    ) as sdk:
        yield sdk


def test_chat_answers_in_openai_shape(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=20)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_with_greedy_decoding(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=COUNTING, temperature=0, max_completion_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=COUNTING,
            temperature=0,
            max_completion_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Role first, then text, then the finish reason, then (include_usage) one chunk of usage and no choices.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL and c.id == chunks[0].id for c in chunks)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length" == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and "3" in streamed
    assert whole.usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 40


def test_a_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=5, stream=True))
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_sampling_parameters_reach_the_engine(client: openai.OpenAI) -> None:
    # A stop sequence ends the answer before it (and is not included); a seed makes sampling repeatable.
    stopped = client.chat.completions.create(
        model=MODEL, messages=COUNTING, temperature=0, max_tokens=60, stop=["5"]
    ).choices[0]
    assert stopped.finish_reason == "stop" and "5" not in (stopped.message.content or "")
    assert "4" in (stopped.message.content or "")

    def sample(seed: int) -> str | None:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=LONG_STORY,
                max_tokens=24,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                presence_penalty=0.5,
                frequency_penalty=0.5,
            )
            .choices[0]
            .message.content
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again and first != other


def test_messages_as_text_parts_and_developer_role(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."}, *CAPITAL],
        temperature=0,
        max_tokens=12,
    )
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}],
            },
        ],
        temperature=0,
        max_tokens=12,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_completions_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=["The capital of France is"], temperature=0, max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert "Paris" in whole.choices[0].text
    # OpenAI's default for completions: 16 tokens.
    default = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", temperature=0)
    assert default.usage is not None and default.usage.completion_tokens == 16
    assert default.choices[0].finish_reason == "length"


async def test_async_sdk_streams_chat(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=20, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "Paris" in text
    # Eight at once share the engine's batches and give each the greedy answer it gives alone.
    together = await asyncio.gather(
        *(
            async_client.chat.completions.create(model=MODEL, messages=COUNTING, temperature=0, max_tokens=16)
            for _ in range(8)
        )
    )
    assert len({r.choices[0].message.content for r in together}) == 1


def test_priority_header(client: openai.OpenAI) -> None:
    high = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=4, extra_headers={"aimass-priority": "high"}
    )
    assert high.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=CAPITAL, max_tokens=4, extra_headers={"aimass-priority": "urgent!"}
        )
    assert refused.value.param == "aimass-priority" and "low, normal, high or critical" in refused.value.message


def running_requests(mesh: LocalMesh) -> float:
    return value(scrape(mesh.metrics_address("llm-0")), "aimass_llm_running_requests")


def generated_tokens(mesh: LocalMesh) -> float:
    return value(scrape(mesh.metrics_address("llm-0")), "aimass_llm_generated_tokens_total")


async def wait_for(test: object, timeout_s: float) -> float:
    """Seconds until ``test()`` holds (polled every 20 ms); fails past ``timeout_s``."""
    started = time.monotonic()
    while not test():  # type: ignore[operator]
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_dropped_sse_connection_stops_the_generation(front_door_mesh: LocalMesh) -> None:
    before = generated_tokens(front_door_mesh)
    body = {"model": MODEL, "messages": LONG_STORY, "max_tokens": 600, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {front_door_mesh.api_key}"}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{front_door_mesh.rest_url}/chat/completions", json=body, headers=headers) as reply,
    ):
        assert reply.status_code == 200
        events = 0
        async for line in reply.aiter_lines():
            events += line.startswith("data: ")
            if events == 10:
                break
        await wait_for(lambda: running_requests(front_door_mesh) == 1, 10)
        # Leaving the block closes the connection mid-stream, as a client that goes away does.
    stopped_after = await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
    # The replica's own count of what it generated for the call: far fewer than the 600 asked for (the engine
    # reports every step, so the gauge drops with the step after the abort).
    await asyncio.sleep(0.5)
    generated = generated_tokens(front_door_mesh) - before
    assert 9 <= generated < 200, generated
    print(
        f"REST disconnect: generation aborted {stopped_after * 1000:.0f} ms after the client left;",
        f"{generated:.0f} tokens generated",
    )


async def test_a_client_that_leaves_before_the_whole_answer_stops_it(front_door_mesh: LocalMesh) -> None:
    before = generated_tokens(front_door_mesh)
    body = {"model": MODEL, "messages": LONG_STORY, "max_tokens": 600, "temperature": 0}
    headers = {"authorization": f"Bearer {front_door_mesh.api_key}"}
    async with httpx.AsyncClient(timeout=60) as http:
        request = asyncio.ensure_future(
            http.post(f"{front_door_mesh.rest_url}/chat/completions", json=body, headers=headers)
        )
        await wait_for(lambda: running_requests(front_door_mesh) == 1, 10)
        request.cancel()  # httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
    await asyncio.sleep(0.5)
    assert generated_tokens(front_door_mesh) - before < 300


@pytest.fixture
async def short_deadline_rest(front_door_mesh: LocalMesh) -> AsyncIterator[str]:
    """A second REST front door, in this process, on the same gateway (its adapter listener, with the session's
    "rest" certificate), whose calls have a 2-second deadline."""
    port = free_port()
    adapter = f"127.0.0.1:{front_door_mesh.gateway_adapter_port}"
    settings = Settings(rest=RestConfig(port=port, gateway=adapter, request_timeout_s=2))
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started, 10)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await serving


async def test_an_error_after_the_stream_started_is_raised_by_the_sdk(
    front_door_mesh: LocalMesh, short_deadline_rest: str
) -> None:
    async with openai.AsyncOpenAI(base_url=short_deadline_rest, api_key=front_door_mesh.api_key, max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=LONG_STORY, temperature=0, max_tokens=600, stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                received.append(chunk)
        # The status (200) went out with the first token; the deadline passed mid-stream and came as an SSE error.
        assert len(received) > 3 and not any(c.choices and c.choices[0].finish_reason for c in received)
        assert failed.value.code == "deadline_exceeded"
        # The same deadline before anything was sent: a status, 504, not to be retried (it would run out again).
        with pytest.raises(openai.InternalServerError) as whole:
            await sdk.chat.completions.create(model=MODEL, messages=LONG_STORY, temperature=0, max_tokens=600)
        assert whole.value.status_code == 504 and whole.value.response.headers["x-should-retry"] == "false"
    await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
