"""What prefix affinity buys: a conversation's second turn on the replica that served its first (its prefix in
vLLM's cache) vs on the other replica (no cache), and where ``ours`` sends it through the gateway.

Starts a mesh with two LLM replicas (`aimass up`). Each conversation has its own long system prompt (nothing of it is
cached anywhere before) and a first turn on one replica; its second turn (the whole first turn plus an answer and a
question) then goes, one call at a time:

- ``home``: straight to the replica of the first turn (as a gateway calls it), where the prefix is cached;
- ``away``: straight to the other replica, which must prefill all of it;
- ``gateway``: first and second turn through the gateway (``ours``): the share of second turns it sent home.

Sides alternate conversation by conversation and the replica of the first turn alternates too, so machine noise and
any difference between the two engines hit both sides alike; the figure per side is the median of its calls, the
ratio is taken within each round and the median round reported. Time to first token is the replica's own
(``Usage.time_to_first_token_ms``: from receiving the call to the first token, prefill included) and one token is
generated, so the call is its prefill. The gateway's added work per LLM call (reading the prompt, hashing its
blocks, the index lookup and record) is timed in this process on the same prompts.

    python -m benchmarks.llm_prefix_affinity [--rounds 3] [--conversations 8] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from aimass.runtime.discovery import Instance
from aimass.runtime.identity import mesh_channel
from aimass.runtime.metadata import REPLICA_KEY, metadata_value
from aimass.v1 import llm_pb2, llm_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, median, publish, utc_now
from gateway.prefix_affinity import prompt_prefix
from gateway.replicas import Replica
from gateway.router import ScoreRouter

NAME = "llm_prefix_affinity"
CHAT = "/aimass.v1.LlmService/Chat"
# Goals: a second turn where its prefix is cached starts at least this much faster; ours sends all second turns home.
SPEEDUP_GOAL = 1.5
HOME_SHARE_GOAL = 1.0
SIDES = ("home", "away")
TOPICS = ("rivers", "volcanoes", "lighthouses", "bicycles", "glaciers", "violins", "comets", "bread", "owls", "chess")


def system_prompt(topic: str, salt: str) -> str:
    # ~3,600 characters (~700 tokens): a prefill this small model takes a noticeable time over on a CPU.
    return f"[{salt}] You are a patient expert on {topic}. Answer in one short sentence, plainly and correctly. " * 40


def first_turn(topic: str, salt: str) -> list[llm_pb2.ChatMessage]:
    return [
        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content=system_prompt(topic, salt)),
        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=f"What is one fact about {topic}?"),
    ]


def second_turn(messages: Sequence[llm_pb2.ChatMessage], answer: str) -> list[llm_pb2.ChatMessage]:
    return [
        *messages,
        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_ASSISTANT, content=answer),
        llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="Tell me another one."),
    ]


@dataclass(frozen=True)
class Turn:
    answer: str
    replica: str
    ttft_ms: float


async def ask(stub: llm_pb2_grpc.LlmServiceAsyncStub, messages: Sequence[llm_pb2.ChatMessage], tokens: int) -> Turn:
    request = llm_pb2.ChatRequest(messages=messages, sampling=llm_pb2.SamplingParams(temperature=0, max_tokens=tokens))
    call = stub.Chat(request, timeout=120)
    responses = [response async for response in call]
    replica = metadata_value(await call.trailing_metadata(), REPLICA_KEY)
    return Turn("".join(r.delta for r in responses), replica, responses[-1].usage.time_to_first_token_ms)


@dataclass
class Round:
    ttft_ms: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})
    gateway_ttft_ms: list[float] = field(default_factory=list)
    gateway_home: list[bool] = field(default_factory=list)

    def speedup(self) -> float:
        return median(self.ttft_ms["away"]) / median(self.ttft_ms["home"])


async def run_round(
    index: int,
    conversations: int,
    direct: Sequence[llm_pb2_grpc.LlmServiceAsyncStub],
    gateway: llm_pb2_grpc.LlmServiceAsyncStub,
) -> Round:
    measured = Round()
    for i in range(conversations):
        topic = TOPICS[i % len(TOPICS)]
        # Direct: the first turn on replica i % 2, the second home or away, alternating.
        first = first_turn(topic, f"round {index} direct {i}")
        home = i % 2
        turn = await ask(direct[home], first, 8)
        side = SIDES[(i // 2 + index) % 2]
        target = home if side == "home" else 1 - home
        measured.ttft_ms[side].append((await ask(direct[target], second_turn(first, turn.answer), 1)).ttft_ms)
        # Through the gateway: where does ours send the second turn?
        first = first_turn(topic, f"round {index} gateway {i}")
        turn = await ask(gateway, first, 8)
        second = await ask(gateway, second_turn(first, turn.answer), 1)
        measured.gateway_ttft_ms.append(second.ttft_ms)
        measured.gateway_home.append(second.replica == turn.replica)
    return measured


def decision_cost_us(messages: Sequence[llm_pb2.ChatMessage], repeat: int = 2000) -> float:
    """Microseconds per LLM call of the gateway's prefix work: peek the prompt, hash it, look it up, record it."""
    data = llm_pb2.ChatRequest(messages=messages).SerializeToString()
    router = ScoreRouter(rng=random.Random(0))
    # No channel: the decision never calls a replica.
    replicas = [
        Replica(Instance(f"r{i}", "llm", ("aimass.v1.LlmService",), f"127.0.0.1:{i + 1}"), None)  # type: ignore[arg-type]
        for i in (0, 1)
    ]
    started = time.perf_counter()
    for _ in range(repeat):
        prefix = prompt_prefix(CHAT, data)
        assert prefix is not None
        router.choose_by_prefix("aimass.v1.LlmService", replicas, prefix)
    return (time.perf_counter() - started) / repeat * 1e6


def report(rounds: Sequence[Round], conversations: int, costs: dict[str, float]) -> str:
    def p50(side: str) -> float:
        return median(ms for r in rounds for ms in r.ttft_ms[side])

    speedup = median(r.speedup() for r in rounds)
    home_share = sum(h for r in rounds for h in r.gateway_home) / sum(len(r.gateway_home) for r in rounds)
    gateway_p50 = median(ms for r in rounds for ms in r.gateway_ttft_ms)
    rows = [
        ["second turn, home (prefix cached)", f"{p50('home'):.0f}", ""],
        ["second turn, away (no cache)", f"{p50('away'):.0f}", ""],
        [
            "away / home, median round",
            f"{speedup:.2f}x",
            f"≥ {SPEEDUP_GOAL:.1f}x: {'met' if speedup >= SPEEDUP_GOAL else 'NOT met'}",
        ],
        ["second turn through the gateway (ours)", f"{gateway_p50:.0f}", ""],
        [
            "second turns ours sent home",
            f"{home_share:.0%}",
            f"{HOME_SHARE_GOAL:.0%}: {'met' if home_share >= HOME_SHARE_GOAL else 'NOT met'}",
        ],
    ]
    cost_rows = [[size, f"{us:.0f}"] for size, us in costs.items()]
    return "\n".join(
        [
            "## LLM prefix affinity (`ours`)",
            "",
            f"{utc_now()} · {machine()} · `{command_line()}`",
            "",
            f"Two LLM replicas (SmolLM2-135M, vLLM CPU); {len(rounds)} rounds of {conversations} conversations, one "
            "call at a time. Time to first token is the replica's own (prefill of the ~4,000-character second turn, "
            "one token generated). Sides alternate conversation by conversation on a shared, noisy machine: only "
            "the ratio measured side by side means much.",
            "",
            markdown_table(["", "TTFT p50 (ms)", "goal"], rows),
            "",
            "The gateway's prefix work per LLM call (peek the prompt, hash its 256-character blocks, look up and "
            "record), in-process:",
            "",
            markdown_table(["chat prompt", "µs per call"], cost_rows),
        ]
    )


async def main_async(args: argparse.Namespace) -> str:
    mesh = Mesh(
        NAME,
        replicas={"llm": 2},
        env={
            "AIMASS_LLM__MAX_MODEL_LEN": "2048",
            "AIMASS_SCHEDULER__REPORT_INTERVAL_S": "0.1",
            "AIMASS_GATEWAY__ROUTER": "ours",
        },
    )
    print("starting `aimass up` with two LLM replicas (a minute or two)", flush=True)
    mesh.start()
    try:
        mesh.wait_ready(600)
        channels: list[grpc.aio.Channel] = []
        for address in mesh.addresses("llm"):
            access = mesh.access(address)
            channels.append(mesh_channel(address, access["mesh_credentials"], server_role=access["server_role"]))
        direct = [llm_pb2_grpc.LlmServiceStub(channel) for channel in channels]
        async with mesh.aio_channel() as gateway_channel:
            gateway = llm_pb2_grpc.LlmServiceStub(gateway_channel)
            # Warm both engines (first calls compile and allocate).
            for stub in (*direct, gateway):
                await ask(stub, first_turn("warming", "warm"), 2)
            rounds = []
            for index in range(args.rounds):
                rounds.append(await run_round(index, args.conversations, direct, gateway))
                print(f"round {index + 1}: away/home {rounds[-1].speedup():.2f}x", flush=True)
        for channel in channels:
            await channel.close()
    finally:
        mesh.stop()
    small = first_turn("rivers", "cost")
    large = [*small, *(llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="word " * 1000) for _ in range(6))]
    costs = {
        f"{sum(len(m.content) for m in small):,} characters": decision_cost_us(small),
        f"{sum(len(m.content) for m in large):,} characters (past the 32 KiB hashed)": decision_cost_us(large),
    }
    return report(rounds, args.conversations, costs)


def main() -> None:
    cli = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    cli.add_argument(
        "--conversations",
        type=int,
        default=8,
        help="conversations per round (default 8; a multiple of 4 balances the sides)",
    )
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = cli.parse_args()
    if not 1 <= args.rounds <= 10 or not 2 <= args.conversations <= 20:
        cli.error("rounds must be 1..10 and conversations 2..20 (the whole run stays bounded)")
    publish(asyncio.run(main_async(args)), args.write, NAME)


if __name__ == "__main__":
    main()
