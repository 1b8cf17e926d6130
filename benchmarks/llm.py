"""LLM figures: the served path (client → gateway → LLM replica → vLLM) vs vLLM's AsyncLLM in-process, and
continuous batching (8 concurrent streams vs the same 8 one after another).

The same engine class and configuration run both sides: one engine in this process, one in the LLM replica of a
mesh started by `aimass up`. Both stay loaded, but only one works at a time: rounds alternate in-process and served
at each concurrency (1, then 8), so machine noise hits both alike, and the median round counts. Each side runs the
same greedy chats (so the same tokens); tokens/s is completion tokens over wall time, time to first token is
measured by the caller (send → first non-empty text).

    python -m benchmarks.llm [--prompts 16] [--max-tokens 64] [--rounds 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aimass.runtime.config import LlmConfig
from aimass.v1 import llm_pb2, llm_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, median, publish, utc_now
from services.llm.engine import LlmEngine
from services.llm.protocol import Sampling

NAME = "llm"
THROUGHPUT_GOAL = 0.90
TTFT_GOAL_MS = 10.0
BATCHING_GOAL = 3.0
TOPICS = (
    "the ocean",
    "volcanoes",
    "honey bees",
    "the moon",
    "bicycles",
    "coffee",
    "rainforests",
    "chess",
    "lighthouses",
    "glaciers",
    "trains",
    "owls",
    "deserts",
    "violins",
    "bread",
    "comets",
)


def prompts(count: int) -> list[str]:
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(count)]


@dataclass(frozen=True)
class Call:
    tokens: int
    ttft_s: float


@dataclass(frozen=True)
class Run:
    calls: list[Call]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50_ms(self) -> float:
        return median(c.ttft_s for c in self.calls) * 1000


async def run_at(concurrency: int, texts: Sequence[str], one: Callable[[str], Awaitable[Call]]) -> Run:
    """Every text once, ``concurrency`` in flight at a time."""
    queue = list(reversed(texts))
    calls: list[Call] = []

    async def worker() -> None:
        while queue:
            calls.append(await one(queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(calls, time.perf_counter() - started)


Caller = Callable[[str], Awaitable[Call]]


def in_process_caller(engine: LlmEngine, max_tokens: int) -> Caller:
    async def one(text: str) -> Call:
        started = time.perf_counter()
        ids = await engine.encode_chat([{"role": "user", "content": text}])
        params = Sampling(temperature=0.0, max_tokens=max_tokens)
        tokens, ttft = 0, 0.0
        async for chunk in engine.stream(ids, params, request_id="bench", priority=0):
            if chunk.new_tokens and not ttft:
                ttft = time.perf_counter() - started
            tokens += chunk.new_tokens
        return Call(tokens, ttft)

    return one


def served_caller(stub: llm_pb2_grpc.LlmServiceAsyncStub, max_tokens: int) -> Caller:
    async def one(text: str) -> Call:
        started = time.perf_counter()
        request = llm_pb2.ChatRequest(
            messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=text)],
            sampling=llm_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
        )
        tokens, ttft = 0, 0.0
        async for response in stub.Chat(request, timeout=300):
            if response.delta and not ttft:
                ttft = time.perf_counter() - started
            if response.HasField("usage"):
                tokens = response.usage.completion_tokens
        return Call(tokens, ttft)

    return one


async def alternate(
    local: Caller, served: Caller, texts: Sequence[str], rounds: int
) -> tuple[dict[int, Run], dict[int, Run]]:
    """Median-throughput run per side and concurrency, over ``rounds`` alternating rounds."""
    for one in (local, served):
        await run_at(1, texts[:2], one)  # warm-up
    runs: dict[tuple[str, int], list[Run]] = {}
    for round_index in range(rounds):
        for concurrency in (1, 8):
            for side, one in (("local", local), ("served", served)):
                run = await run_at(concurrency, texts, one)
                runs.setdefault((side, concurrency), []).append(run)
                print(f"round {round_index + 1} {side} c={concurrency}: {run.tokens_per_s:.1f} tok/s", flush=True)

    def middle(side: str, concurrency: int) -> Run:
        ordered = sorted(runs[(side, concurrency)], key=lambda r: r.tokens_per_s)
        return ordered[len(ordered) // 2]

    return {c: middle("local", c) for c in (1, 8)}, {c: middle("served", c) for c in (1, 8)}


def report(
    local: dict[int, Run], mesh: dict[int, Run], texts: int, max_tokens: int, stream_interval: int, rounds: int
) -> str:
    rows = []
    for c in (1, 8):
        rows.append(
            (
                f"c={c}",
                f"{local[c].tokens_per_s:.1f}",
                f"{mesh[c].tokens_per_s:.1f}",
                f"{mesh[c].tokens_per_s / local[c].tokens_per_s:.2f}",
                f"{local[c].ttft_p50_ms:.0f}",
                f"{mesh[c].ttft_p50_ms:.0f}",
                f"{mesh[c].ttft_p50_ms - local[c].ttft_p50_ms:+.1f}",
            )
        )
    table = markdown_table(
        (
            "concurrency",
            "in-process tok/s",
            "via gateway tok/s",
            "ratio",
            "in-process TTFT p50 ms",
            "via gateway TTFT p50 ms",
            "added ms",
        ),
        rows,
    )
    ratio = mesh[8].tokens_per_s / local[8].tokens_per_s
    added = mesh[1].ttft_p50_ms - local[1].ttft_p50_ms
    batching_local = local[8].tokens_per_s / local[1].tokens_per_s
    batching_mesh = mesh[8].tokens_per_s / mesh[1].tokens_per_s
    return "\n".join(
        [
            "## LLM (vLLM AsyncLLM, SmolLM2-135M-Instruct)",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}. {texts} greedy chats of up to {max_tokens} tokens per"
            " concurrency level, the same on both sides; both engines loaded, used in turn; median of"
            f" {rounds} alternating rounds; {stream_interval} token(s) per streamed message after the first.",
            "",
            table,
            "",
            f"- Through the gateway vs in-process at c=8: **{ratio:.2f}** of the tokens/s"
            f" (goal ≥ {THROUGHPUT_GOAL:.2f}: {'met' if ratio >= THROUGHPUT_GOAL else 'missed'});"
            f" time to first token at c=1 **{added:+.1f} ms**"
            f" (goal ≤ +{TTFT_GOAL_MS:.0f} ms: {'met' if added <= TTFT_GOAL_MS else 'missed'}).",
            f"- Continuous batching, 8 concurrent streams vs the same 8 one after another: **{batching_mesh:.1f}x**"
            f" tokens/s through the gateway, {batching_local:.1f}x in-process (goal ≥ {BATCHING_GOAL:.0f}x:"
            f" {'met' if batching_mesh >= BATCHING_GOAL else 'missed'}).",
        ]
    )


async def main_async(args: argparse.Namespace) -> None:
    texts = prompts(args.prompts)
    engine = LlmEngine(LlmConfig(stream_interval=args.stream_interval))
    mesh = Mesh("llm", replicas={"llm": 1}, env={"AIMASS_LLM__STREAM_INTERVAL": str(args.stream_interval)})
    print("starting vLLM in-process, then `aimass up` with one LLM replica (tens of seconds each)", flush=True)
    await asyncio.to_thread(engine.load)
    mesh.start()
    try:
        mesh.wait_ready(600)
        async with mesh.aio_channel() as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            local, remote = await alternate(
                in_process_caller(engine, args.max_tokens), served_caller(stub, args.max_tokens), texts, args.rounds
            )
    finally:
        mesh.stop()
        engine.shutdown()
    text = report(local, remote, len(texts), args.max_tokens, args.stream_interval, args.rounds)
    publish(text, args.write, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed message (both sides)")
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's llm section")
    asyncio.run(main_async(parser.parse_args()))


# vLLM starts its engine in child processes that may import this module again; only the parent benchmarks.
if __name__ == "__main__":
    main()
