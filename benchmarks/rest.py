"""The OpenAI-compatible REST front door vs the gRPC path through the gateway vs vLLM's own OpenAI server.

Three ways to the same model and engine configuration, measured side by side in one run:

- **REST**: openai SDK → aimass REST front door (HTTP/SSE) → gateway (gRPC) → LLM replica → vLLM AsyncLLM;
- **gRPC**: aimass.v1 LlmService.Chat → gateway → LLM replica → vLLM AsyncLLM;
- **vLLM server**: openai SDK → `python -m vllm.entrypoints.openai.api_server` (the installed vLLM) started with the
  replica's engine arguments (services/llm/engine.py: float32, eager, max_num_seqs, max_model_len, priority
  scheduling, seed 0, the same KV-cache space and thread binding).

Greedy chats with fixed prompts and max_tokens; tokens/s is completion tokens over wall time, TTFT is measured by
the caller (send → first non-empty text). Rounds alternate the three sides at c=1 then c=8 so noise hits all alike;
tok/s is the median round's, TTFT p50/p99 over every call of every round. Then the REST hop on a cheap call:
``GET /v1/models`` vs ModelService.ListModels through the gateway, one at a time; and CPU seconds per 1,000
tokens of the REST process, the gateway and the replica (from /proc), to say where the time goes.

    python -m benchmarks.rest [--rounds 3] [--max-tokens 32] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

from aimass.local_mesh import free_port
from aimass.runtime.config import LlmConfig
from aimass.v1 import llm_pb2_grpc, models_pb2, models_pb2_grpc
from benchmarks.common import (
    Mesh,
    child_pids,
    command_line,
    cpu_seconds,
    machine,
    markdown_table,
    median,
    publish,
    system_busy_seconds,
    utc_now,
)
from benchmarks.llm import Call, Caller, Run, prompts, run_at, served_caller
from services.llm.engine import _cores_string
from services.llm.weights import PACKAGED_MODELS, ensure_converted

NAME = "rest"
MODEL = "smollm2-135m-instruct"
TTFT_GOAL_MS = 10.0
SIDES = ("rest", "grpc", "vllm")
# Pause before each path runs (see the order rotation in measure()).
SETTLE_S = 2.0
LABELS = {"rest": "aimass REST", "grpc": "aimass gRPC", "vllm": "vLLM OpenAI server"}


def openai_caller(client: openai.AsyncOpenAI, max_tokens: int) -> Caller:
    async def one(text: str) -> Call:
        started = time.perf_counter()
        ttft, tokens = 0.0, 0
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if not ttft and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return Call(tokens, ttft)

    return one


@dataclass
class Side:
    runs: dict[int, list[Run]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def middle(self, concurrency: int) -> Run:
        ordered = sorted(self.runs[concurrency], key=lambda r: r.tokens_per_s)
        return ordered[len(ordered) // 2]

    def ttft_ms(self, concurrency: int, quantile: float) -> float:
        values = sorted(c.ttft_s for run in self.runs[concurrency] for c in run.calls)
        return values[min(len(values) - 1, int(quantile * len(values)))] * 1000


def vllm_server(port: int, config: LlmConfig, log: Path) -> subprocess.Popen[bytes]:
    """vLLM's own OpenAI server with the LLM replica's engine arguments (services/llm/engine.py)."""
    folder = ensure_converted(PACKAGED_MODELS[config.model], config.cache_dir)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": config.cpu_threads_bind or _cores_string(sorted(os.sched_getaffinity(0))),
    }
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--model={folder}",
        f"--served-model-name={config.model}",
        "--dtype=float32",
        f"--max-num-seqs={config.max_num_seqs}",
        f"--max-model-len={config.max_model_len}",
        f"--stream-interval={config.stream_interval}",
        "--scheduling-policy=priority",
        "--enforce-eager",
        "--seed=0",
        "--disable-uvicorn-access-log",
    ]
    with log.open("wb") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def process_pids(mesh: Mesh, server: subprocess.Popen[bytes]) -> dict[str, int]:
    assert mesh.process is not None
    found = {"vllm": server.pid}
    for pid in child_pids(mesh.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"gateway.rest" in cmdline:
            found["rest"] = pid
        elif b"gateway" in cmdline:
            found["gateway"] = pid
        elif b"services.llm" in cmdline:
            found["replica"] = pid
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (vLLM's engine core and its worker are children)."""
    total = 0.0
    try:
        total += cpu_seconds(pid)
        children = child_pids(pid)
    except OSError:
        return total
    return total + sum(tree_cpu(child) for child in children)


async def measure(
    callers: dict[str, Caller], pids: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, Side], float]:
    sides = {name: Side() for name in SIDES}
    for one in callers.values():
        await run_at(1, prompts(2), one)  # warm-up (first-request paths, connections)
    others: list[float] = []
    for round_index in range(args.rounds):
        for step, (concurrency, count) in enumerate(((1, args.c1_prompts), (8, args.c8_prompts))):
            # Each path goes first, second and third in turn, after a pause: a CPU engine that has just finished a
            # run keeps a core busy for a moment, and whoever ran next paid for it (REST, always first, did).
            shift = (round_index * 2 + step) % len(SIDES)
            for name in SIDES[shift:] + SIDES[:shift]:
                await asyncio.sleep(SETTLE_S)
                # Whose CPU this side costs: the REST process, the gateway and the replica (engine included), or
                # vLLM's server with its engine core.
                watched: dict[str, int] = {p: pids[p] for p in ("rest", "gateway", "replica", "vllm") if p in pids}
                before = {p: tree_cpu(pid) for p, pid in watched.items()}
                mine_before, busy_before = cpu_seconds(os.getpid()), system_busy_seconds()
                run = await run_at(concurrency, prompts(count), callers[name])
                after = {p: tree_cpu(pid) for p, pid in watched.items()}
                # What processes outside the benchmark (its client, the mesh, both engines) used meanwhile.
                ours = sum(after.values()) - sum(before.values()) + cpu_seconds(os.getpid()) - mine_before
                others.append(max(0.0, (system_busy_seconds() - busy_before - ours) / run.wall_s * 100))
                side = sides[name]
                side.runs.setdefault(concurrency, []).append(run)
                side.tokens += run.tokens
                for process in after:
                    side.cpu[process] = side.cpu.get(process, 0.0) + after[process] - before[process]
                print(
                    f"round {round_index + 1} {name} c={concurrency}: {run.tokens_per_s:.1f} tok/s, "
                    f"TTFT p50 {median(c.ttft_s for c in run.calls) * 1000:.0f} ms",
                    flush=True,
                )
    return sides, median(others)


async def hop_cost(
    rest: openai.AsyncOpenAI, models: models_pb2_grpc.ModelServiceAsyncStub, calls: int
) -> dict[str, float]:
    """p50 latency (ms) of the cheapest call through each door, one at a time, alternating."""
    timings: dict[str, list[float]] = {"rest": [], "grpc": []}
    for _ in range(calls):
        started = time.perf_counter()
        await rest.models.list()
        timings["rest"].append(time.perf_counter() - started)
        started = time.perf_counter()
        await models.ListModels(models_pb2.ListModelsRequest(), timeout=30)
        timings["grpc"].append(time.perf_counter() - started)
    return {name: median(values) * 1000 for name, values in timings.items()}


def report(sides: dict[str, Side], hop: dict[str, float], args: argparse.Namespace, others_pct: float) -> str:
    rows = []
    for concurrency in (1, 8):
        for name in SIDES:
            side = sides[name]
            rows.append(
                (
                    f"c={concurrency}",
                    LABELS[name],
                    f"{side.middle(concurrency).tokens_per_s:.1f}",
                    f"{side.ttft_ms(concurrency, 0.5):.0f}",
                    f"{side.ttft_ms(concurrency, 0.99):.0f}",
                )
            )
    table = markdown_table(("concurrency", "path", "tok/s (median round)", "TTFT p50 ms", "TTFT p99 ms"), rows)
    rest, grpc_side, vllm = sides["rest"], sides["grpc"], sides["vllm"]
    lines = []
    for concurrency in (1, 8):
        vs_vllm = rest.middle(concurrency).tokens_per_s / vllm.middle(concurrency).tokens_per_s
        vs_grpc = rest.middle(concurrency).tokens_per_s / grpc_side.middle(concurrency).tokens_per_s
        ttft_vllm = rest.ttft_ms(concurrency, 0.5) - vllm.ttft_ms(concurrency, 0.5)
        ttft_grpc = rest.ttft_ms(concurrency, 0.5) - grpc_side.ttft_ms(concurrency, 0.5)
        lines.append(
            f"- c={concurrency}: REST vs vLLM's server **{vs_vllm:.2f}x** tok/s (goal ≥ 1.00:"
            f" {'met' if vs_vllm >= 1 else 'missed'}), TTFT p50 **{ttft_vllm:+.1f} ms** (goal ≤ +{TTFT_GOAL_MS:.0f} ms:"
            f" {'met' if ttft_vllm <= TTFT_GOAL_MS else 'missed'}); REST vs gRPC {vs_grpc:.2f}x tok/s,"
            f" TTFT {ttft_grpc:+.1f} ms."
        )

    def per_k(side: Side, process: str) -> str:
        return f"{side.cpu.get(process, 0.0) / max(side.tokens, 1) * 1000:.2f}"

    cpu_rows = [
        (
            LABELS[name],
            per_k(sides[name], "rest"),
            per_k(sides[name], "gateway"),
            per_k(sides[name], "replica"),
            per_k(sides[name], "vllm"),
        )
        for name in SIDES
    ]
    cpu_table = markdown_table(
        ("path", "REST process", "gateway", "LLM replica (with engine core)", "vLLM server (with engine core)"),
        cpu_rows,
    )
    return "\n".join(
        [
            "## OpenAI-compatible REST vs gRPC vs vLLM's OpenAI server",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}. Greedy chats (fixed prompts, max_tokens"
            f" {args.max_tokens}): {args.c1_prompts} per round at c=1, {args.c8_prompts} at c=8, {args.rounds}"
            f" rounds, the three paths taking turns to go first with {SETTLE_S:g} s pauses; every engine:"
            " SmolLM2-135M-Instruct on vLLM-CPU, float32, eager,"
            " the LLM replica's max_num_seqs, max_model_len, priority scheduling, KV space and thread binding. All"
            " three engines' processes stay up; one path runs at a time. Clients: the openai SDK (REST, vLLM) and"
            f" the generated aio stub (gRPC). Other processes used {others_pct:.0f}% of a CPU meanwhile (median).",
            "",
            table,
            "",
            *lines,
            f"- The REST hop on a cheap call, one at a time: `GET /v1/models` {hop['rest']:.1f} ms vs"
            f" ModelService.ListModels through the gateway {hop['grpc']:.1f} ms p50:"
            f" **{hop['rest'] - hop['grpc']:+.1f} ms** for HTTP parsing, JSON and the extra loopback gRPC call.",
            "",
            "CPU seconds per 1,000 generated tokens, by process, while each path ran (all rounds):",
            "",
            cpu_table,
        ]
    )


async def main_async(args: argparse.Namespace) -> None:
    config = LlmConfig(max_model_len=args.max_model_len)
    port = free_port()
    handle, log_name = tempfile.mkstemp(prefix="aimass-bench-vllm-server-", suffix=".log")
    os.close(handle)
    log = Path(log_name)
    mesh = Mesh("rest", replicas={"llm": 1}, env={"AIMASS_LLM__MAX_MODEL_LEN": str(args.max_model_len)})
    print("starting `aimass up` with one LLM replica and vLLM's OpenAI server (tens of seconds each)", flush=True)
    server = vllm_server(port, config, log)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 600)
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health", server, log, 600)
        pids = process_pids(mesh, server)
        async with (
            openai.AsyncOpenAI(base_url=mesh.rest_url, api_key=mesh.api_key, max_retries=0, timeout=300) as rest,
            openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as direct,
            mesh.aio_channel() as channel,
        ):
            callers = {
                "rest": openai_caller(rest, args.max_tokens),
                "grpc": served_caller(llm_pb2_grpc.LlmServiceStub(channel), args.max_tokens),
                "vllm": openai_caller(direct, args.max_tokens),
            }
            sides, others = await measure(callers, pids, args)
            hop = await hop_cost(rest, models_pb2_grpc.ModelServiceStub(channel), args.hop_calls)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        mesh.stop()
        await asyncio.to_thread(log.unlink, missing_ok=True)
    publish(report(sides, hop, args, others), args.write, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--c1-prompts", type=int, default=3)
    parser.add_argument("--c8-prompts", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--hop-calls", type=int, default=60)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's rest section")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
