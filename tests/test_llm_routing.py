"""LLM-aware routing in ``ours``: the gateway's prefix index (gateway/prefix_affinity.py), the router's KV, waiting
and affinity terms on crafted views, and a live mesh of two vLLM replicas where a conversation's turns stay on the
replica that holds its prefix, and leave it when that replica is busy."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest

from aimass.local_mesh import LocalMesh
from aimass.runtime.discovery import Instance
from aimass.runtime.identity import mesh_channel
from aimass.runtime.metadata import REPLICA_KEY, metadata_value
from aimass.v1 import common_pb2, llm_pb2, llm_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from gateway.prefix_affinity import (
    BLOCK_CHARS,
    PrefixIndex,
    PromptPrefix,
    chained_hashes,
    prompt_prefix,
)
from gateway.replicas import Replica
from gateway.router import (
    AFFINITY_WEIGHT,
    PowerOfTwoRouter,
    RoundRobinRouter,
    RoutesByPrefix,
    ScoreRouter,
)
from gateway.view import LoadView
from tests.conftest import start_mesh
from tests.security import as_gateway, credentials

LLM = "aimass.v1.LlmService"
CHAT = f"/{LLM}/Chat"
GENERATE = f"/{LLM}/Generate"


# --- the index ---


def test_hashes_are_chained_over_whole_blocks() -> None:
    text = "".join(chr(ord("a") + i) * BLOCK_CHARS for i in range(4))
    hashes = chained_hashes(text)
    assert len(hashes) == 4 and len(set(hashes)) == 4
    # A partial trailing block is not hashed (the engine caches whole blocks only); the leading ones are the same.
    assert chained_hashes(text + "x" * (BLOCK_CHARS - 1)) == hashes
    assert chained_hashes(text + "x" * BLOCK_CHARS)[:4] == hashes
    # Changing the first block changes every hash after it: a block's hash covers all blocks before it.
    changed = chained_hashes("Z" + text[1:])
    assert all(a != b for a, b in zip(changed, hashes, strict=True))
    # Changing the third block keeps the first two.
    third = chained_hashes(text[: 2 * BLOCK_CHARS] + "Z" + text[2 * BLOCK_CHARS + 1 :])
    assert third[:2] == hashes[:2] and third[2] != hashes[2] and third[3] != hashes[3]
    assert chained_hashes(text, seed="other model") != hashes
    assert chained_hashes(text, max_blocks=2) == hashes[:2]
    assert chained_hashes("short") == ()


def chat(*turns: tuple[llm_pb2.ChatRole.ValueType, str], model: str = "") -> bytes:
    return llm_pb2.ChatRequest(
        model=common_pb2.ModelRef(name=model),
        messages=[llm_pb2.ChatMessage(role=role, content=content) for role, content in turns],
    ).SerializeToString()


SYSTEM = (llm_pb2.CHAT_ROLE_SYSTEM, "You are a patient assistant who answers questions about rivers. " * 6)
ASK = (llm_pb2.CHAT_ROLE_USER, "How long is the Danube?")
ANSWER = (llm_pb2.CHAT_ROLE_ASSISTANT, "About 2,850 km, from the Black Forest to the Black Sea. " * 5)
AGAIN = (llm_pb2.CHAT_ROLE_USER, "And the Rhine?")


def test_a_chat_turn_starts_with_the_previous_turns_prefix() -> None:
    first = prompt_prefix(CHAT, chat(SYSTEM, ASK))
    second = prompt_prefix(CHAT, chat(SYSTEM, ASK, ANSWER, AGAIN))
    assert first is not None and second is not None
    assert len(second) > len(first) and second.blocks[: len(first)] == first.blocks
    # Another system prompt, another model or the raw prompt of Generate: no shared prefix.
    other = prompt_prefix(CHAT, chat((llm_pb2.CHAT_ROLE_SYSTEM, "Be brief. " * 40), ASK))
    assert other is not None and other.blocks[0] != first.blocks[0]
    elsewhere = prompt_prefix(CHAT, chat(SYSTEM, ASK, model="another-llm"))
    assert elsewhere is not None and elsewhere.blocks[0] != first.blocks[0]
    raw = llm_pb2.GenerateRequest(prompt=SYSTEM[1]).SerializeToString()
    generated = prompt_prefix(GENERATE, raw)
    assert generated is not None and generated.blocks[0] != first.blocks[0]


def test_only_llm_prompts_with_a_whole_block_have_a_prefix() -> None:
    assert prompt_prefix(f"/{LLM}/CountTokens", chat(SYSTEM, ASK)) is None
    assert prompt_prefix("/aimass.v1.NlpService/Classify", chat(SYSTEM, ASK)) is None
    assert prompt_prefix(CHAT, chat((llm_pb2.CHAT_ROLE_USER, "Hi"))) is None
    # Bytes that do not parse: no prefix (the replica answers INVALID_ARGUMENT itself).
    assert prompt_prefix(CHAT, b"\xff\xff\xff") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prefix_of(*blocks: str) -> PromptPrefix:
    return PromptPrefix(chained_hashes("".join(b * BLOCK_CHARS for b in blocks)))


def test_cached_blocks_counts_the_leading_blocks_each_replica_holds() -> None:
    index = PrefixIndex()
    index.record(prefix_of("a", "b"), "r0")
    index.record(prefix_of("a", "b", "c", "d"), "r1")
    index.record(prefix_of("a", "x", "y"), "r2")
    assert index.cached_blocks(prefix_of("a", "b", "c", "e")) == {"r0": 2, "r1": 3, "r2": 1}
    assert index.cached_blocks(prefix_of("z", "b")) == {}
    affinity = index.affinity(prefix_of("a", "b", "c", "d"), ["r0", "r1", "r2", "r3"])
    assert affinity == {"r0": 0.5, "r1": 1.0, "r2": 0.25, "r3": 0.0}


def test_the_index_is_bounded_least_recently_recorded_first() -> None:
    index = PrefixIndex(max_entries=4)
    index.record(prefix_of("a", "b"), "r0")
    index.record(prefix_of("c", "d"), "r1")
    assert len(index) == 4
    index.record(prefix_of("a", "b"), "r0")  # recorded again: now the most recent
    index.record(prefix_of("e"), "r2")
    assert len(index) == 4
    # "d" went: the least recently recorded prefix loses its last block first (as an engine's cache does).
    assert index.cached_blocks(prefix_of("c", "d")) == {"r1": 1}
    assert index.cached_blocks(prefix_of("a", "b")) == {"r0": 2}
    assert index.cached_blocks(prefix_of("e")) == {"r2": 1}


def test_a_block_keeps_only_its_most_recent_replicas() -> None:
    index = PrefixIndex(replicas_per_block=2)
    for replica in ("r0", "r1", "r2"):
        index.record(prefix_of("a"), replica)
    assert index.cached_blocks(prefix_of("a")) == {"r1": 1, "r2": 1}
    # A replica crowded out of a shared first block (a common system prompt) keeps the deeper blocks only it was
    # sent: a chained hash names the whole prefix before it.
    index.record(prefix_of("a", "b"), "r0")
    index.record(prefix_of("a"), "r1")
    index.record(prefix_of("a"), "r2")
    assert index.cached_blocks(prefix_of("a", "b", "c")) == {"r0": 2, "r1": 1, "r2": 1}


def test_entries_expire() -> None:
    clock = Clock()
    index = PrefixIndex(ttl_s=60, clock=clock)
    index.record(prefix_of("a", "b"), "r0")
    clock.now += 30
    index.record(prefix_of("a"), "r1")
    clock.now += 40  # r0's blocks are 70 s old, r1's 40 s
    assert index.cached_blocks(prefix_of("a", "b")) == {"r1": 1}
    index.record(prefix_of("q"), "r2")  # recording drops what expired
    assert len(index) == 2
    clock.now += 61
    assert index.cached_blocks(prefix_of("a")) == {}


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        PrefixIndex(max_entries=0)


# --- the router's terms, on crafted views ---


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    made = [
        Replica(
            Instance(f"r{i}", "llm", (LLM,), f"127.0.0.1:{6100 + i}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{6100 + i}"),
        )
        for i in range(2)
    ]
    yield made
    for replica in made:
        await replica.channel.close()


def llm_view(**per_replica: dict[str, float]) -> LoadView:
    """A fresh view of LLM replicas, each with the given ModelLoad fields (kv_cache_usage, waiting_requests)."""
    view = scheduler_pb2.RoutingView(
        version=1,
        replicas=[
            scheduler_pb2.ReplicaView(
                instance_id=iid,
                models=[
                    scheduler_pb2.ModelLoad(
                        model=common_pb2.ModelRef(name="llm"),
                        device_id="n/cpu",
                        loaded=True,
                        max_batch_size=4,
                        **fields,  # type: ignore[arg-type]
                    )
                ],
            )
            for iid, fields in per_replica.items()
        ],
    )
    loads = LoadView()
    loads.connected = True
    assert loads.apply(view)
    return loads


CONVERSATION = prefix_of("s", "y", "s", "t", "e", "m")
LONGER = prefix_of("s", "y", "s", "t", "e", "m", "q", "u", "e", "s")  # the next turn: 6 of 10 blocks cached


def test_only_ours_takes_the_prefix() -> None:
    assert isinstance(ScoreRouter(), RoutesByPrefix)
    assert not isinstance(RoundRobinRouter(), RoutesByPrefix)
    assert not isinstance(PowerOfTwoRouter(), RoutesByPrefix)


async def test_a_conversation_stays_where_its_prefix_is(replicas: list[Replica]) -> None:
    router = ScoreRouter(llm_view(r0={}, r1={}), random.Random(1))
    home = router.choose_by_prefix(LLM, replicas, CONVERSATION)
    # Idle replicas tie on delay: shuffled ties alone would split the turns; the prefix keeps them together.
    assert {router.choose_by_prefix(LLM, replicas, LONGER) for _ in range(20)} == {home}
    # Without a prefix, ties spread.
    assert {router.choose(LLM, replicas) for _ in range(20)} == set(replicas)


async def test_affinity_yields_past_a_bounded_factor_of_the_best_delay(replicas: list[Replica]) -> None:
    def choice(inflight: int, prefix: PromptPrefix) -> Replica:
        """Where ``prefix`` goes when r0 holds CONVERSATION and has ``inflight`` calls, r1 none."""
        router = ScoreRouter(llm_view(r0={}, r1={}), random.Random(1))
        router.prefixes.record(CONVERSATION, "r0")
        replicas[0].inflight = inflight
        return router.choose_by_prefix(LLM, replicas, prefix)

    # All 6 blocks held: r0's delay counts a third, so it wins up to 3x r1's delay (2 in flight) ...
    assert choice(0, CONVERSATION) is replicas[0]
    assert choice(2, CONVERSATION) is replicas[0]
    # ... and at 4x the affinity yields: the turn goes to the idle replica.
    assert choice(3, CONVERSATION) is replicas[1]
    # 6 of 10 blocks cached bounds the factor lower: 1 / (1 - 2/3 * 0.6) = 1.67x, so 2x r1's delay is too much.
    assert 1 / (1 - AFFINITY_WEIGHT * 0.6) < 2
    assert choice(0, LONGER) is replicas[0]
    assert choice(1, LONGER) is replicas[1]


async def test_kv_pressure_and_waiting_requests_push_a_turn_away(replicas: list[Replica]) -> None:
    # A full KV cache doubles the delay (within the 3x of a whole cached prefix: the turn stays) ...
    router = ScoreRouter(llm_view(r0={"kv_cache_usage": 1.0}, r1={}), random.Random(2))
    router.prefixes.record(CONVERSATION, "r0")
    assert router.choose_by_prefix(LLM, replicas, CONVERSATION) is replicas[0]
    # ... and with the engine's sequence slots all taken and as many requests waiting, 4x: it goes.
    router = ScoreRouter(llm_view(r0={"kv_cache_usage": 1.0, "waiting_requests": 4}, r1={}), random.Random(2))
    router.prefixes.record(CONVERSATION, "r0")
    assert router.choose_by_prefix(LLM, replicas, CONVERSATION) is replicas[1]
    # Waiting requests alone weigh on the plain choice too.
    router = ScoreRouter(llm_view(r0={"waiting_requests": 8}, r1={}), random.Random(2))
    assert {router.choose(LLM, replicas) for _ in range(10)} == {replicas[1]}


async def test_affinity_holds_without_a_view(replicas: list[Replica]) -> None:
    router = ScoreRouter(LoadView(), random.Random(3))  # the scheduler is away: p2c's queue length
    router.prefixes.record(CONVERSATION, "r1")
    assert {router.choose_by_prefix(LLM, replicas, CONVERSATION) for _ in range(10)} == {replicas[1]}
    replicas[1].inflight = 5
    assert router.choose_by_prefix(LLM, replicas, CONVERSATION) is replicas[0]


async def test_explain_reports_the_affinity(replicas: list[Replica]) -> None:
    router = ScoreRouter(llm_view(r0={"kv_cache_usage": 0.25, "waiting_requests": 1}, r1={}), random.Random(4))
    router.prefixes.record(CONVERSATION, "r0")
    choice = router.choose_by_prefix(LLM, replicas, LONGER)
    assert choice is replicas[0]
    facts = router.explain(replicas[0])
    assert facts["aimass.route.prefix_blocks"] == 10
    assert facts["aimass.route.prefix_cached_blocks"] == 6
    assert facts["aimass.route.prefix_affinity"] == pytest.approx(0.6)
    assert facts["aimass.route.kv_cache_usage"] == 0.25 and facts["aimass.route.waiting_requests"] == 1
    assert router.explain(replicas[1])["aimass.route.prefix_cached_blocks"] == 0
    # A choice without a prefix explains none.
    router.choose(LLM, replicas)
    assert "aimass.route.prefix_blocks" not in router.explain(replicas[0])


# --- live: two vLLM replicas behind the gateway ---

MODEL = "smollm2-135m-instruct"
# Four sequences per engine: sixteen requests sent straight to one replica leave twelve waiting there.
MAX_NUM_SEQS = 4
BUSY_REQUESTS = 16
# Short answers keep each turn around a second on this CPU; the prompt's prefix is what the test is about.
ANSWER_TOKENS = 12
# Three, so that round-robin would move each conversation from turn to turn (an even count would not).
TOPICS = ("rivers", "volcanoes", "lighthouses")


@pytest.fixture(scope="module")
def llm_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    env = {
        "AIMASS_LLM__MAX_NUM_SEQS": str(MAX_NUM_SEQS),
        "AIMASS_LLM__MAX_WAITING": "32",
        "AIMASS_LLM__MAX_MODEL_LEN": "1024",
        # Load reports every 100 ms, so the gateway's view follows the engines closely.
        "AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.1",
        "AIMASS_GATEWAY__ROUTER": "ours",
    }
    mesh = start_mesh(tmp_path_factory.mktemp("llm-routing"), {"llm": 2}, env)
    yield mesh
    mesh.stop()


class Conversation:
    """A chat whose every turn resends all before it (as chat clients do), with a long system prompt."""

    def __init__(self, topic: str) -> None:
        # ~2,100 characters: each turn adds under one 256-character block to eight or more cached ones.
        system = f"You are a patient expert on {topic}. Answer in one short sentence, plainly and correctly. " * 24
        self.messages = [llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content=system)]
        self.topic = topic
        self.served_by: list[str] = []

    async def turn(self, stub: llm_pb2_grpc.LlmServiceAsyncStub, question: str) -> str:
        """Asks ``question`` through the gateway; the replica that answered (its trailer)."""
        self.messages.append(llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=question))
        request = llm_pb2.ChatRequest(
            messages=self.messages, sampling=llm_pb2.SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS)
        )
        call = stub.Chat(request, timeout=60)
        answer = "".join([response.delta async for response in call])
        self.messages.append(llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_ASSISTANT, content=answer))
        replica = metadata_value(await call.trailing_metadata(), REPLICA_KEY)
        assert replica, "the replica did not name itself"
        self.served_by.append(replica)
        return replica


async def llm_loads(
    mesh: LocalMesh, test: Callable[[dict[str, scheduler_pb2.ModelLoad]], bool]
) -> dict[str, tuple[str, scheduler_pb2.ModelLoad]]:
    """instance id → (address, the LLM's load) in the first view of the scheduler (as gateways get it) where
    ``test`` holds of the loads by instance id."""
    async with mesh_channel(mesh.scheduler, credentials("operator"), server_role="scheduler") as channel:
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        request = scheduler_pb2.WatchViewRequest(subscriber_id="test-llm-routing", min_interval_ms=20)
        async for response in scheduler.WatchView(request, timeout=60):
            loads = {
                replica.instance_id: (replica.address, load)
                for replica in response.view.replicas
                for load in replica.models
                if load.model.name == MODEL and load.loaded
            }
            if test({iid: load for iid, (_, load) in loads.items()}):
                return loads
    raise AssertionError("the view stream ended")


@pytest.mark.slow
async def test_each_conversation_stays_on_the_replica_that_holds_its_prefix(llm_pair: LocalMesh) -> None:
    await llm_loads(llm_pair, lambda loads: len(loads) == 2)
    async with llm_pair.aio_channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        conversations = [Conversation(topic) for topic in TOPICS]
        # First turns together: the gateway's in-flight counts spread them over both replicas.
        homes = await asyncio.gather(*(c.turn(stub, f"What is one fact about {c.topic}?") for c in conversations))
        assert len(set(homes)) == 2, f"three first turns sent together all went to {homes[0]}"
        # Later turns, again all at once: each goes where its conversation's prefix is cached, although the two
        # replicas are equally loaded and a tie would otherwise be broken at random.
        for question in ("Tell me another fact.", "Which one surprised people most?"):
            await asyncio.gather(*(c.turn(stub, question) for c in conversations))
    for conversation in conversations:
        assert len(set(conversation.served_by)) == 1, f"{conversation.topic}: turns went to {conversation.served_by}"


@pytest.mark.slow
async def test_the_affinity_yields_to_a_busy_replica(llm_pair: LocalMesh) -> None:
    loads = await llm_loads(llm_pair, lambda loads: len(loads) == 2)
    async with llm_pair.aio_channel() as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        conversation = Conversation("harbours")
        home = await conversation.turn(stub, "What is a harbour?")
        assert await conversation.turn(stub, "And a quay?") == home
        # The home replica gets work from elsewhere (another gateway, say): its engine runs four sequences and
        # holds twelve waiting, which the scheduler's view shows.
        address = loads[home][0]
        async with as_gateway(address, "llm") as direct:
            busy_stub = llm_pb2_grpc.LlmServiceStub(direct)
            busy = [
                busy_stub.Generate(
                    llm_pb2.GenerateRequest(
                        prompt=f"Story {i}: once upon a time", sampling=llm_pb2.SamplingParams(max_tokens=600)
                    ),
                    timeout=120,
                )
                for i in range(BUSY_REQUESTS)
            ]
            try:
                await llm_loads(llm_pair, lambda now: now[home].waiting_requests >= BUSY_REQUESTS - MAX_NUM_SEQS - 2)
                await asyncio.sleep(0.5)  # the gateway's view (pushed at most every 100 ms) catches up
                # Four times the other's delay: more than a cached prefix makes up for, so the turn goes elsewhere.
                elsewhere = await conversation.turn(stub, "And a jetty?")
                assert elsewhere != home
            finally:
                for call in busy:
                    call.cancel()
        # The prefix now sits on both; with the home replica idle again the next turn may go to either, but it
        # stays on one of the two that hold it (no third exists here), and it is served.
        assert await conversation.turn(stub, "Thanks. One more: a pier?") in {home, elsewhere}
