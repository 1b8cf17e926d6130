"""LlmService on the real vLLM engine (SmolLM2-135M-Instruct), through the gateway of a mesh started by
`aimass up`, as a client in any language would use it. The engine starts once for the module."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest

from aimass.bootstrap import ensure_certificates
from aimass.client import AsyncClient, Client, error_info
from aimass.local_mesh import LocalMesh
from aimass.runtime.config import default_llm_cache_dir
from aimass.runtime.identity import mesh_channel
from aimass.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    llm_pb2,
    llm_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.llm.weights import PACKAGED_MODELS, model_folder
from tests.conftest import start_mesh
from tests.metrics import scrape, value
from tests.security import credentials, key_for

MODEL = "smollm2-135m-instruct"
# Small enough to make the engine queue and a too-long prompt cheap to build.
MAX_NUM_SEQS = 4
MAX_WAITING = 8
CONTEXT = 1024
# More than any other test here sends at once (test_a_heavy_tenant_does_not_starve_a_light_one: 10).
TOKENIZE_QUEUE = 12
CAPITAL = "What is the capital of France?"
# Greedy decoding keeps going on this one, so max_tokens decides the length.
COUNTING = "Count from 1 to 200, separated by commas."
LONG_STORY = "Write a very long story about a dragon who learns to cook. Use at least 2000 words."
GREEDY = llm_pb2.SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llm_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    env = {
        "AIMASS_LLM__MAX_NUM_SEQS": str(MAX_NUM_SEQS),
        "AIMASS_LLM__MAX_WAITING": str(MAX_WAITING),
        "AIMASS_LLM__MAX_MODEL_LEN": str(CONTEXT),
        # One tokeniser thread and a short queue, so a flood of CountTokens calls fills it.
        "AIMASS_LLM__TOKENIZE_THREADS": "1",
        "AIMASS_LLM__MAX_TOKENIZE_QUEUE": str(TOKENIZE_QUEUE),
        # The scheduler asks for load reports every 100 ms, so its view follows the engine closely.
        "AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.1",
    }
    mesh = start_mesh(tmp_path_factory.mktemp("llm"), {"llm": 1}, env, metrics=True)
    yield mesh
    mesh.stop()


async def scheduler_sees(
    mesh: LocalMesh, test: Callable[[scheduler_pb2.ModelLoad], bool], timeout_s: float
) -> tuple[scheduler_pb2.ModelLoad, scheduler_pb2.RoutingView]:
    """The first load of the LLM in the scheduler's pushed view that passes ``test`` (the view as gateways see it)."""

    async def watch() -> tuple[scheduler_pb2.ModelLoad, scheduler_pb2.RoutingView]:
        # As an operator (the view is the mesh's own, behind mTLS).
        async with mesh_channel(mesh.scheduler, credentials("operator"), server_role="scheduler") as channel:
            scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            request = scheduler_pb2.WatchViewRequest(subscriber_id="test-llm", min_interval_ms=20)
            async for response in scheduler.WatchView(request):
                for replica in response.view.replicas:
                    for load in replica.models:
                        if load.model.name == MODEL and test(load):
                            return load, response.view
        raise AssertionError("the view stream ended")

    return await asyncio.wait_for(watch(), timeout_s)


def idle(load: scheduler_pb2.ModelLoad) -> bool:
    return load.running_requests == 0 and load.waiting_requests == 0 and load.in_flight == 0


@pytest.fixture
async def channel(llm_mesh: LocalMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with llm_mesh.aio_channel() as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> llm_pb2_grpc.LlmServiceAsyncStub:
    return llm_pb2_grpc.LlmServiceStub(channel)


def user(text: str) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=text)


def chat_request(
    text: str,
    *,
    system: str = "",
    sampling: llm_pb2.SamplingParams = GREEDY,
    max_tokens: int = 0,
    priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_UNSPECIFIED,
) -> llm_pb2.ChatRequest:
    messages = [llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content=system)] if system else []
    params = llm_pb2.SamplingParams()
    params.CopyFrom(sampling)
    if max_tokens:
        params.max_tokens = max_tokens
    return llm_pb2.ChatRequest(
        messages=[*messages, user(text)], sampling=params, meta=common_pb2.RequestMeta(priority=priority)
    )


async def collect(
    stub: llm_pb2_grpc.LlmServiceAsyncStub, request: llm_pb2.ChatRequest, **kwargs: object
) -> list[llm_pb2.ChatResponse]:
    return [response async for response in stub.Chat(request, timeout=120, **kwargs)]  # type: ignore[arg-type]


def text_of(responses: Sequence[llm_pb2.ChatResponse]) -> str:
    return "".join(r.delta for r in responses)


async def test_greedy_chat_is_deterministic_and_right(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    first = await collect(stub, chat_request(CAPITAL, max_tokens=30))
    second = await collect(stub, chat_request(CAPITAL, max_tokens=30))
    assert text_of(first) == text_of(second)
    assert "Paris" in text_of(first)
    # The first response names the model; only the last carries the finish reason and usage.
    assert first[0].model.name == MODEL
    assert all(not r.HasField("usage") for r in first[:-1])
    assert first[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    usage = first[-1].usage
    assert usage.completion_tokens > 0
    assert 0 < usage.time_to_first_token_ms <= usage.total_time_ms


async def test_usage_counts_the_templated_prompt(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    request = chat_request(CAPITAL, max_tokens=4)
    counted = await stub.CountTokens(llm_pb2.CountTokensRequest(messages=request.messages), timeout=30)
    responses = await collect(stub, request)
    assert counted.context_length == CONTEXT
    assert responses[-1].usage.prompt_tokens == counted.token_count
    # The chat template wraps the question, so the chat counts more tokens than the bare text.
    bare = await stub.CountTokens(llm_pb2.CountTokensRequest(prompt=CAPITAL), timeout=30)
    assert counted.token_count > bare.token_count > 0


async def test_max_tokens_is_honoured(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    responses = await collect(stub, chat_request(COUNTING, max_tokens=7))
    assert responses[-1].usage.completion_tokens == 7
    assert responses[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH


async def test_stop_sequence_ends_the_answer_before_it(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    sampling = llm_pb2.SamplingParams(temperature=0, stop=["Paris"])
    responses = await collect(stub, chat_request(CAPITAL, sampling=sampling, max_tokens=30))
    text = text_of(responses)
    assert "Paris" not in text and text.strip(), text
    assert responses[-1].finish_reason == llm_pb2.FINISH_REASON_STOP_SEQUENCE
    assert responses[-1].stop_sequence == "Paris"


async def test_the_system_prompt_reaches_the_model(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    # The answer is only in the system prompt: the model can give it only if the system message reached it.
    question = "What is the secret password? Answer with the password only."
    system = "You are a helpful assistant. The secret password is 'tangerine'."
    told = await collect(stub, chat_request(question, system=system, max_tokens=20))
    assert "tangerine" in text_of(told).lower(), text_of(told)
    untold = text_of(await collect(stub, chat_request(question, max_tokens=20)))
    assert "tangerine" not in untold.lower(), untold
    # And it was counted: the prompt the engine ran is the one CountTokens sees, system message included.
    counted = await stub.CountTokens(
        llm_pb2.CountTokensRequest(messages=chat_request(question, system=system).messages), timeout=30
    )
    assert told[-1].usage.prompt_tokens == counted.token_count


async def test_generate_continues_a_raw_prompt(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    request = llm_pb2.GenerateRequest(
        prompt="1, 2, 3, 4,", sampling=llm_pb2.SamplingParams(temperature=0, max_tokens=6)
    )
    responses = [r async for r in stub.Generate(request, timeout=60)]
    assert responses[0].model.name == MODEL
    assert "5" in "".join(r.delta for r in responses)
    assert responses[-1].usage.completion_tokens == 6


async def test_eight_concurrent_streams_complete_in_order(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    prompts = [f"Name {n} fruits, one per line." for n in range(2, 10)]
    alone = text_of(await collect(stub, chat_request(prompts[0], max_tokens=24)))
    together = await asyncio.gather(*(collect(stub, chat_request(p, max_tokens=24)) for p in prompts))
    for responses in together:
        assert responses[0].model.name == MODEL
        assert responses[-1].finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
        assert [bool(r.finish_reason) for r in responses] == [False] * (len(responses) - 1) + [True]
    # Sharing the engine's batches does not change a greedy answer: its tokens arrive in the same order.
    assert text_of(together[0]) == alone


async def test_cancel_mid_stream_frees_the_engine(llm_mesh: LocalMesh, stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    call = stub.Chat(chat_request(LONG_STORY, max_tokens=600), timeout=120)
    received = 0
    async for _ in call:
        received += 1
        if received == 5:
            break
    busy, _ = await scheduler_sees(llm_mesh, lambda load: load.running_requests == 1, 10)
    assert busy.kv_cache_usage > 0 and busy.in_flight == 1
    call.cancel()
    started = time.monotonic()
    await scheduler_sees(llm_mesh, idle, 5)
    # Reports come every 100 ms and views every 20 ms; the abort itself takes one engine step.
    assert time.monotonic() - started < 2.0


async def test_deadline_expiry_aborts_generation(llm_mesh: LocalMesh, stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Chat(chat_request(LONG_STORY, max_tokens=600), timeout=1.5):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    await scheduler_sees(llm_mesh, idle, 5)
    assert time.monotonic() - started < 2.0


async def test_high_priority_overtakes_a_queue_of_low_priority(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    finished: list[str] = []

    async def run(name: str, priority: common_pb2.Priority.ValueType) -> None:
        responses = await collect(stub, chat_request(COUNTING, max_tokens=40, priority=priority))
        assert responses[-1].usage.completion_tokens == 40
        finished.append(name)

    # Twice the engine's batch of low-priority requests: half run, half wait.
    lows = [asyncio.create_task(run(f"low{i}", common_pb2.PRIORITY_LOW)) for i in range(2 * MAX_NUM_SEQS)]
    await asyncio.sleep(0.5)
    await run("high", common_pb2.PRIORITY_HIGH)
    await asyncio.gather(*lows)
    # Without priorities the high request would finish last; with them it takes the first free slot.
    assert finished.index("high") <= MAX_NUM_SEQS + 1, finished


async def test_a_heavy_tenant_does_not_starve_a_light_one(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    finished: list[str] = []

    # Each tenant calls with a key of its own: the tenant comes from the key.
    keys = {tenant: key_for(tenant) for tenant in ("heavy", "light")}

    async def run(name: str, tenant: str) -> None:
        auth = (("authorization", f"Bearer {keys[tenant]}"),)
        await collect(stub, chat_request(COUNTING, max_tokens=40), metadata=auth)
        finished.append(name)

    # The heavy tenant fills the engine and its queue; the light tenant's one request arrives after all of them.
    heavy = [asyncio.create_task(run(f"heavy{i}", "heavy")) for i in range(2 * MAX_NUM_SEQS + 2)]
    await asyncio.sleep(0.5)
    await run("light", "light")
    await asyncio.gather(*heavy)
    # First come, first served would finish it last; by fair share it takes the first free slot.
    assert finished.index("light") <= MAX_NUM_SEQS + 1, finished


async def test_full_replica_answers_resource_exhausted(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    async def run() -> grpc.StatusCode:
        try:
            await collect(stub, chat_request(COUNTING, max_tokens=24))
        except grpc.aio.AioRpcError as err:
            assert "full" in (err.details() or ""), err.details()
            return err.code()
        return grpc.StatusCode.OK

    capacity = MAX_NUM_SEQS + MAX_WAITING
    codes = await asyncio.gather(*(run() for _ in range(capacity + 6)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert codes.count(grpc.StatusCode.OK) >= capacity - 2
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_tenant_work_reaches_the_scheduler(llm_mesh: LocalMesh, stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    acme_key = (("authorization", f"Bearer {key_for('acme')}"),)
    responses = await collect(stub, chat_request(CAPITAL, max_tokens=5), metadata=acme_key)
    usage = responses[-1].usage

    def acme_of(view: scheduler_pb2.RoutingView) -> scheduler_pb2.TenantUsage | None:
        return next((t for t in view.tenants if t.tenant_id == "acme"), None)

    async def acme_counted() -> tuple[scheduler_pb2.TenantUsage, scheduler_pb2.RoutingView]:
        while True:
            _, view = await scheduler_sees(llm_mesh, lambda load: True, 5)
            acme = acme_of(view)
            if acme is not None:
                return acme, view
            await asyncio.sleep(0.05)

    acme, view = await asyncio.wait_for(acme_counted(), 10)
    assert (acme.requests, acme.prompt_tokens, acme.completion_tokens) == (
        1,
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    # Fair-share counters (VTC): prompt tokens weigh 1, completion tokens 2, divided by the tenant's weight (1).
    assert acme.virtual_tokens == pytest.approx(usage.prompt_tokens + 2 * usage.completion_tokens)
    (replica,) = [r for r in view.replicas if any(m.model.name == MODEL for m in r.models)]
    assert replica.address == llm_mesh.addresses("llm")[0]
    assert replica.models[0].device_id == f"{replica.node_id}/cpu"
    assert replica.models[0].modality == models_pb2.MODALITY_LLM  # its memory budget (scheduler.model_budgets)


async def test_llm_metrics_count_tokens_and_time_to_first_token(
    llm_mesh: LocalMesh, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    before = scrape(llm_mesh.metrics_address("llm-0"))
    responses = await collect(stub, chat_request(CAPITAL, max_tokens=6))
    usage = responses[-1].usage
    after = scrape(llm_mesh.metrics_address("llm-0"))
    grown = value(after, "aimass_llm_generated_tokens_total", model=MODEL) - value(
        before, "aimass_llm_generated_tokens_total", model=MODEL
    )
    assert grown == usage.completion_tokens
    ttft = "aimass_llm_time_to_first_token_seconds_count"
    assert value(after, ttft, model=MODEL) == value(before, ttft, model=MODEL) + 1
    assert value(after, "aimass_llm_prompt_tokens_total", model=MODEL) >= usage.prompt_tokens
    assert ("aimass_llm_kv_cache_usage_ratio", frozenset()) in after


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (llm_pb2.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["messages is empty"]),
        (
            llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(content="hi")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["messages[0].role is unset"],
        ),
        (
            llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role=7, content="hi")]),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            ["messages[0].role", "not a ChatRole"],
        ),
        (
            llm_pb2.ChatRequest(messages=[user("hi"), llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content="x")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["messages[1]", "system"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(temperature=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.temperature is 3", "[0, 2]"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(top_p=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.top_p", "(0, 1]"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(temperature=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.temperature is nan", "finite number in [0, 2]"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(top_p=float("inf"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.top_p is inf", "(0, 1]"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(presence_penalty=float("-inf"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.presence_penalty is -inf", "[-2, 2]"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(frequency_penalty=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.frequency_penalty is nan"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(seed=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.seed is -1", "must be >= 0"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(top_k=-2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.top_k is -2", "must be >= 0"],
        ),
        (
            chat_request("hi", sampling=llm_pb2.SamplingParams(stop=["a"] * 5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["sampling.stop", "limit is 4"],
        ),
        (
            chat_request("word " * 1500),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["tokens", f"context is {CONTEXT} tokens"],
        ),
        (
            chat_request("hi", max_tokens=CONTEXT),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["max_tokens is 1024", f"context of {CONTEXT} tokens"],
        ),
        (
            llm_pb2.ChatRequest(model=common_pb2.ModelRef(name="gpt-17"), messages=[user("hi")]),
            grpc.StatusCode.NOT_FOUND,
            ["'gpt-17'", MODEL],
        ),
        (
            llm_pb2.ChatRequest(model=common_pb2.ModelRef(name=MODEL, version="9"), messages=[user("hi")]),
            grpc.StatusCode.NOT_FOUND,
            ["no version '9'"],
        ),
    ],
)
async def test_bad_chat_requests_are_refused_clearly(
    stub: llm_pb2_grpc.LlmServiceAsyncStub, request_: llm_pb2.ChatRequest, code: grpc.StatusCode, words: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub, request_)
    assert raised.value.code() == code
    for word in words:
        assert word in (raised.value.details() or ""), raised.value.details()


async def test_bad_generate_and_count_requests(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(llm_pb2.GenerateRequest(prompt=""), timeout=10):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in (
        raised.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CountTokens(llm_pb2.CountTokensRequest(prompt="a", messages=[user("b")]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in (raised.value.details() or "")


async def test_nan_sampling_in_generate_is_invalid_argument(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    request = llm_pb2.GenerateRequest(prompt="1, 2, 3,", sampling=llm_pb2.SamplingParams(temperature=float("nan")))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(request, timeout=30):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.temperature is nan; allowed a finite number in [0, 2]" in (raised.value.details() or "")


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4_000  # 180,000 characters


async def test_count_tokens_goes_through_the_bounded_tokeniser(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    # 40 long prompts at once against one tokeniser thread and a queue of TOKENIZE_QUEUE: the excess is refused
    # at once with RESOURCE_EXHAUSTED (retryable), everything admitted is counted, and the replica still answers.
    async def count() -> grpc.StatusCode | int:
        try:
            reply = await stub.CountTokens(llm_pb2.CountTokensRequest(prompt=LONG_PROMPT), timeout=60)
        except grpc.aio.AioRpcError as err:
            assert "tokeniser is full" in (err.details() or "") and f"limit {TOKENIZE_QUEUE}" in (err.details() or "")
            return err.code()
        return reply.token_count

    results = await asyncio.gather(*(count() for _ in range(40)))
    refused = [r for r in results if isinstance(r, grpc.StatusCode)]
    counted = [r for r in results if not isinstance(r, grpc.StatusCode)]
    assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert len(counted) >= TOKENIZE_QUEUE and len(set(counted)) == 1 and counted[0] > 30_000, results
    after = await stub.CountTokens(llm_pb2.CountTokensRequest(prompt=CAPITAL), timeout=30)
    assert after.token_count > 0


async def test_a_prompt_past_its_deadline_is_not_tokenised(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    # The tokeniser is busy with long prompts; a call whose deadline passes while it waits gets DEADLINE_EXCEEDED.
    busy = [stub.CountTokens(llm_pb2.CountTokensRequest(prompt=LONG_PROMPT), timeout=60) for _ in range(6)]
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CountTokens(llm_pb2.CountTokensRequest(prompt=LONG_PROMPT), timeout=0.1)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.gather(*busy)


async def test_model_service_lists_the_llm_with_its_context(llm_mesh: LocalMesh, channel: grpc.aio.Channel) -> None:
    models = models_pb2_grpc.ModelServiceStub(channel)
    listed = await models.ListModels(models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_LLM), timeout=10)
    (info,) = [m for m in listed.models if m.name == MODEL]
    assert info.versions[0].context_length == CONTEXT
    assert "aimass.v1.LlmService/Chat" in info.methods
    described = await models.DescribeModel(
        models_pb2.DescribeModelRequest(model=common_pb2.ModelRef(name=MODEL)), timeout=10
    )
    assert len(described.model.replicas) == 1 and described.model.replicas[0].loaded
    # The registry entry names its device and its default model (gateways route requests naming none by it).
    async with mesh_channel(llm_mesh.scheduler, credentials("operator"), server_role="scheduler") as control:
        listed_instances = await registry_pb2_grpc.RegistryServiceStub(control).ListInstances(
            registry_pb2.ListInstancesRequest(), timeout=10
        )
    (llm,) = [i for i in listed_instances.instances if i.kind == "llm" and any(m.name == MODEL for m in i.models)]
    assert llm.labels["device"] == "cpu" and llm.labels["default-model-LlmService-Chat"] == MODEL


TWIN = "smollm2-twin"


@pytest.fixture(scope="module")
def twin_replica(llm_mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A second LLM process serving the same weights under another model name, as one would add a model."""
    folder = model_folder(PACKAGED_MODELS[MODEL], default_llm_cache_dir())
    # A process started by hand: its own certificate, and the registry the scheduler hosts.
    ensure_certificates(llm_mesh.settings(), {"llm-twin": "llm"})
    env = {
        **os.environ,
        "AIMASS_STATE_DIR": str(llm_mesh.state_dir),
        "AIMASS_MESH__IDENTITY": "llm-twin",
        "AIMASS_REGISTRY__ADDRESS": llm_mesh.scheduler,
        "AIMASS_SCHEDULER__ADDRESS": llm_mesh.scheduler,
        "AIMASS_LLM__SERVER__PORT": "0",
        "AIMASS_LLM__MODEL": TWIN,
        "AIMASS_LLM__MODEL_PATH": str(folder),
        "AIMASS_LLM__MAX_MODEL_LEN": str(CONTEXT),
        "AIMASS_LLM__CPU_KV_CACHE_GIB": "1",
    }
    log = (tmp_path_factory.mktemp("twin") / "llm.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "services.llm"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        with llm_mesh.scheduler_channel() as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            while not any(
                TWIN in [m.name for m in i.models] and i.state == common_pb2.SERVING_STATE_SERVING
                for i in registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=5).instances
            ):
                assert process.poll() is None, "the second LLM replica exited while starting"
                assert time.monotonic() < deadline, "the second LLM replica did not register in time"
                time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


async def test_gateway_routes_each_model_to_its_replica(
    twin_replica: None, stub: llm_pb2_grpc.LlmServiceAsyncStub, channel: grpc.aio.Channel
) -> None:
    async def ask(model: str) -> str:
        request = chat_request(CAPITAL, max_tokens=8)
        request.model.name = model
        responses = await collect(stub, request)
        return responses[0].model.name

    # Round-robin alone would send half of each to the wrong process (NOT_FOUND there).
    served = await asyncio.gather(*(ask(model) for model in (MODEL, TWIN) * 3))
    assert served == [MODEL, TWIN] * 3
    models = models_pb2_grpc.ModelServiceStub(channel)
    listed = await models.ListModels(models_pb2.ListModelsRequest(modality=models_pb2.MODALITY_LLM), timeout=10)
    assert [m.name for m in listed.models] == [MODEL, TWIN]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ask("gpt-17")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_python_client_streams_a_chat(llm_mesh: LocalMesh) -> None:
    with Client(llm_mesh.gateway, timeout_s=60) as client:
        pieces = list(client.chat([("user", CAPITAL)], temperature=0, max_tokens=20))
        assert "Paris" in "".join(p.delta for p in pieces)
        assert pieces[-1].usage.completion_tokens > 0
        with pytest.raises(ValueError, match="role 'robot'"):
            list(client.chat([("robot", "hi")]))


async def test_async_client_streams_a_chat(llm_mesh: LocalMesh) -> None:
    async with AsyncClient(llm_mesh.gateway, timeout_s=60) as client:
        text = "".join([p.delta async for p in client.chat(CAPITAL, temperature=0, max_tokens=20, priority="high")])
    assert "Paris" in text


async def llm_tenant(mesh: LocalMesh, tenant: str, **limits: Any) -> llm_pb2_grpc.LlmServiceAsyncStub:
    """A tenant with ``limits`` and a stub calling the gateway with a key of its own."""
    async with mesh.aio_channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.SetTenant(admin_pb2.SetTenantRequest(tenant_id=tenant, **limits), timeout=10)
        key = (await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant_id=tenant, scopes=["infer"]), timeout=10)).secret
    return llm_pb2_grpc.LlmServiceStub(mesh.aio_channel(key))


async def test_llm_token_quotas_count_what_was_generated(llm_mesh: LocalMesh) -> None:
    """Per minute and per day, mesh-wide from the replicas' own counts: past the limit the tenant's next LLM call is
    refused (QUOTA_EXCEEDED, which quota, when it frees) while other tenants go on."""
    limit = 150
    minute = await llm_tenant(llm_mesh, "token-minute", llm_tokens_per_minute=limit)
    used, refused = 0, None
    for _ in range(10):
        try:
            responses = await collect(minute, chat_request(COUNTING, max_tokens=30))
        except grpc.aio.AioRpcError as err:
            refused = err
            break
        used += responses[-1].usage.prompt_tokens + responses[-1].usage.completion_tokens
        # The replica reports every 100 ms here; the view reaches the gateway within another 100.
        await asyncio.sleep(0.5)
    assert refused is not None, f"never refused after {used} tokens"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert info is not None and info.reason == "QUOTA_EXCEEDED"
    assert info.metadata["quota"] == "llm_tokens_per_minute" and info.metadata["limit"] == str(limit)
    assert 0 < int(info.metadata["retry_after_ms"]) <= 61_000
    # Counted from what was generated: refused once over the limit, and not before reaching it.
    assert limit <= used < limit + 80, used
    # The day's quota counts the same tokens; another tenant is not affected by either.
    day = await llm_tenant(llm_mesh, "token-day", llm_tokens_per_day=40)
    await collect(day, chat_request(COUNTING, max_tokens=30))
    await asyncio.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as over_day:
        await collect(day, chat_request(COUNTING, max_tokens=30))
    day_info = error_info(over_day.value)
    assert day_info is not None and day_info.metadata["quota"] == "llm_tokens_per_day"
    # Hours to wait: said in the error, and no automatic retry asked for.
    assert dict(over_day.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "-1"
    other = await llm_tenant(llm_mesh, "token-free")
    assert (await collect(other, chat_request(CAPITAL, max_tokens=8)))[-1].usage.completion_tokens > 0


async def test_sigterm_lets_streams_in_flight_finish(
    llm_mesh: LocalMesh, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    """Last in this module: the replica drains and exits (the supervisor then starts a new one)."""
    with llm_mesh.scheduler_channel() as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        instances = registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=5).instances
    (pid,) = [i.pid for i in instances if i.kind == "llm" and MODEL in [m.name for m in i.models]]
    request = chat_request(COUNTING, max_tokens=60)
    request.model.name = MODEL
    call = stub.Chat(request, timeout=120)
    first = await call.read()
    assert isinstance(first, llm_pb2.ChatResponse)
    responses = [first]
    os.kill(pid, signal.SIGTERM)
    while (response := await call.read()) is not grpc.aio.EOF:
        assert isinstance(response, llm_pb2.ChatResponse)
        responses.append(response)
    assert responses[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 60
