"""The real vLLM engine's step costs, measured in-process, for the simulator's LLM replica model (simulator/llm.py).

The engine is the replica's (services.llm.engine.LlmEngine with ``LlmConfig()``'s defaults: model, dtype, KV cache,
max_num_seqs, stream interval). Requests go straight to its AsyncLLM as token ids, greedy with ``ignore_eos`` so
every request decodes exactly its ``max_tokens`` (the service's own Sampling has no ignore_eos: a benchmark knob,
not an API). Every prompt is fresh random token ids, so vLLM's prefix cache never shortens a prefill.

Measured, after a warm-up:
- prefill: time to first token of one request alone (``max_tokens`` 1) at several prompt sizes (the step that
  prefills it and samples its first token, plus the engine's per-request overhead);
- decode: ``b`` requests started together, of the reference shape (its prompt and output tokens: the same context
  lengths as the reference runs decode over); a step's time is (last token - first token) / (tokens - 1), the
  median over the requests, for b in 1..32;
- the KV cache's capacity in tokens (vLLM's block count x block size, or the configured bytes over the model's
  per-token KV bytes when the engine does not say), its block size and the step token budget;
- the reference figures the simulator must reproduce (tests/test_simulator_llm.py): closed-loop clients at c=1 and
  c=8 on a fixed shape (``--ref-prompt`` prompt tokens, ``--ref-output`` output tokens): median TTFT and output
  tokens per second of wall time.

The machine is shared: every figure is measured once per round, over ``--rounds`` rounds (fewer if ``--max-minutes``
pass first), and each figure is its fastest round's: other processes only ever add time (vLLM's spinning threads
stall when descheduled), so the fastest is the closest to the engine undisturbed, for the step costs and the
reference figures alike (as benchmarks/service_times.py keeps its lowest pass). Every round's figures and the CPUs
others used during it are kept in the file.

The report (``--write docs/benchmarks.md``) sets the real engine's reference figures beside what the simulator's
LLM replica model makes of the measured steps (simulator.llm.closed_loop), as ratios; ``--report-only`` renders it
from the file without measuring.

    python -m benchmarks.llm_calibration [--out simulator/calibration.json] [--rounds 6] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from aimass.runtime.config import LlmConfig
from benchmarks.common import (
    command_line,
    cpu_model,
    machine,
    markdown_table,
    memory_gib,
    publish,
    system_busy_seconds,
    utc_now,
    wait_quiet,
)
from services.llm.engine import LlmEngine
from simulator.llm import closed_loop, llm_profile, ttft_tpot

NAME = "llm-calibration"

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "simulator" / "calibration.json"
PREFILL_SIZES = (16, 64, 128, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
# Token ids drawn for prompts: clear of the special tokens at the start of SmolLM2's vocabulary.
TOKEN_RANGE = (100, 40_000)


@dataclass
class Timed:
    """One request as the caller saw it: seconds from submission to each streamed chunk, and tokens in each."""

    sent: float
    chunks: list[tuple[float, int]]

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def finished(self) -> float:
        return self.chunks[-1][0]


class Driver:
    def __init__(self, engine: LlmEngine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)

    def prompt(self, tokens: int) -> list[int]:
        return [self.rng.randrange(*TOKEN_RANGE) for _ in range(tokens)]

    async def one(self, prompt_tokens: int, max_tokens: int) -> Timed:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # The engine object behind LlmEngine: the service's Sampling cannot ask for ignore_eos.
        core = self.engine._engine
        assert core is not None
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        prompt = TokensPrompt(prompt_token_ids=self.prompt(prompt_tokens))
        timed = Timed(time.perf_counter(), [])
        async for output in core.generate(prompt, params, f"cal-{uuid.uuid4().hex[:12]}"):
            new = len(output.outputs[0].token_ids)
            if new:
                timed.chunks.append((time.perf_counter(), new))
        if timed.tokens != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {timed.tokens}")
        return timed

    async def together(self, count: int, prompt_tokens: int, max_tokens: int) -> list[Timed]:
        return list(await asyncio.gather(*(self.one(prompt_tokens, max_tokens) for _ in range(count))))

    async def closed_loop(self, clients: int, per_client: int, prompt_tokens: int, max_tokens: int) -> dict[str, float]:
        """``clients`` loops, each sending its next request when the previous one ends."""
        done: list[Timed] = []

        async def client() -> None:
            for _ in range(per_client):
                done.append(await self.one(prompt_tokens, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
        return {
            "ttft_s": statistics.median(t.ttft for t in done),
            "ttft_min_s": min(t.ttft for t in done),
            "ttft_max_s": max(t.ttft for t in done),
            "tokens_per_s": sum(t.tokens for t in done) / wall,
            "requests": len(done),
            "wall_s": wall,
        }


@dataclass
class Round:
    prefill: dict[int, float]
    decode: dict[int, float]
    reference: dict[int, dict[str, float]]
    # CPUs that processes other than this one and its engine's kept busy during the round, on average.
    others_cpus: float

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_seconds": {str(n): round(t, 6) for n, t in self.prefill.items()},
            "decode_step_seconds": {str(b): round(t, 6) for b, t in self.decode.items()},
            "reference": {f"c{c}": {k: round(v, 6) for k, v in run.items()} for c, run in self.reference.items()},
            "others_cpus": round(self.others_cpus, 2),
        }

    def line(self) -> str:
        return (
            "prefill "
            + ", ".join(f"{n}: {t * 1000:.0f}" for n, t in self.prefill.items())
            + " ms; decode step "
            + ", ".join(f"b{b}: {t * 1000:.1f}" for b, t in self.decode.items())
            + " ms; "
            + "; ".join(
                f"c={c}: TTFT {run['ttft_s'] * 1000:.0f} ms ({run['ttft_min_s'] * 1000:.0f}-"
                f"{run['ttft_max_s'] * 1000:.0f}), {run['tokens_per_s']:.1f} tok/s"
                for c, run in self.reference.items()
            )
            + f"; others used {self.others_cpus:.2f} CPUs"
        )


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its children (vLLM's engine core and worker)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def one_round(driver: Driver, args: argparse.Namespace) -> Round:
    busy, own, wall = system_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    prefill = {size: (await driver.one(size, 1)).ttft for size in PREFILL_SIZES}
    decode: dict[int, float] = {}
    for batch in DECODE_BATCHES:
        timed = await driver.together(batch, args.ref_prompt, args.ref_output)
        decode[batch] = statistics.median(decode_step(t) for t in timed)
    reference = {
        clients: await driver.closed_loop(clients, args.ref_requests, args.ref_prompt, args.ref_output)
        for clients in (1, 8)
    }
    others = (system_busy_seconds() - busy) - (own_cpu_seconds() - own)
    return Round(prefill, decode, reference, max(0.0, others / (time.perf_counter() - wall)))


def decode_step(timed: Timed) -> float:
    first, last = timed.chunks[0][0], timed.chunks[-1][0]
    return (last - first) / (timed.tokens - 1)


def kv_capacity(engine: LlmEngine, config: LlmConfig) -> dict[str, Any]:
    """Block size, blocks and tokens of the KV cache, and the step token budget, as the engine reports them."""
    core = engine._engine
    assert core is not None
    vllm_config = core.vllm_config
    cache = vllm_config.cache_config
    block_size = int(cache.block_size)
    model = core.model_config
    layers = model.get_num_layers(vllm_config.parallel_config)
    kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
    head = model.get_head_size()
    # K and V, per layer, per KV head, float32 on the CPU.
    bytes_per_token = 2 * layers * kv_heads * head * 4
    configured = config.cpu_kv_cache_gib * 2**30
    blocks = cache.num_gpu_blocks
    source = "vLLM's num_gpu_blocks"
    if not blocks:
        blocks = configured // (bytes_per_token * block_size)
        source = f"{config.cpu_kv_cache_gib} GiB / {bytes_per_token} bytes per token"
    return {
        "block_size": block_size,
        "blocks": int(blocks),
        "tokens": int(blocks) * block_size,
        "bytes_per_token": bytes_per_token,
        "kv_cache_bytes": configured,
        "source": source,
        "max_num_batched_tokens": int(vllm_config.scheduler_config.max_num_batched_tokens),
        "max_num_seqs": int(vllm_config.scheduler_config.max_num_seqs),
        "max_model_len": int(model.max_model_len),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = LlmConfig()
    engine = LlmEngine(config)
    print("starting vLLM in-process with the replica's defaults (tens of seconds)", flush=True)
    started = time.perf_counter()
    await asyncio.to_thread(engine.load)
    load_seconds = time.perf_counter() - started
    busy_before, wall_before = system_busy_seconds(), time.perf_counter()
    try:
        driver = Driver(engine)
        capacity = kv_capacity(engine, config)
        print(f"KV cache: {capacity}", flush=True)
        for _ in range(2):
            await driver.one(128, 8)
        # Rounds: every figure once per round, for --rounds rounds or --max-minutes. On a shared machine other
        # processes only ever add time (vLLM's spinning threads stall when descheduled), so each figure is its
        # fastest round: the closest to the engine undisturbed, for the step costs and the reference alike.
        rounds: list[Round] = []
        deadline = time.monotonic() + args.max_minutes * 60
        while len(rounds) < args.rounds and (len(rounds) < 2 or time.monotonic() < deadline):
            rounds.append(await one_round(driver, args))
            print(f"round {len(rounds)}: {rounds[-1].line()}", flush=True)
        prefill = {str(n): round(min(r.prefill[n] for r in rounds), 6) for n in PREFILL_SIZES}
        decode = {str(b): round(min(r.decode[b] for r in rounds), 6) for b in DECODE_BATCHES}
        reference: dict[str, dict[str, float]] = {}
        for clients in (1, 8):
            runs = [r.reference[clients] for r in rounds]
            best = max(runs, key=lambda run: run["tokens_per_s"])
            # The spread of TTFTs within a run stays with each round (``rounds``).
            reference[f"c{clients}"] = {
                "ttft_s": round(min(run["ttft_s"] for run in runs), 6),
                "tokens_per_s": round(best["tokens_per_s"], 6),
                "requests": best["requests"],
                "wall_s": round(best["wall_s"], 6),
            }
    finally:
        others = (system_busy_seconds() - busy_before) / (time.perf_counter() - wall_before)
        engine.shutdown()
    return {
        "about": (
            "The replica's vLLM engine (LlmConfig defaults) measured in-process by `python -m "
            "benchmarks.llm_calibration`: prefill_seconds = time to first token of one request alone by prompt "
            "tokens; decode_step_seconds = one decode step's time by running batch size (requests started "
            f"together, {args.ref_prompt}-token prompts, {args.ref_output} output tokens, greedy, ignore_eos); "
            "each figure the fastest of the rounds (others on the machine only add time). reference: "
            "closed-loop clients at c=1 and c=8, each request "
            f"{args.ref_prompt} prompt and {args.ref_output} output tokens: median TTFT (the lowest round's) and "
            "output tokens/s over wall time (the highest round's): what simulator/llm.py must reproduce."
        ),
        "model": config.model,
        "dtype": "float32",
        "measured_at": utc_now(),
        "host": {"machine": machine(), "cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model()},
        "memory_gib": round(memory_gib(), 1),
        "rounds": [r.to_json() for r in rounds],
        "load_seconds": round(load_seconds, 2),
        "weights_bytes": engine.weights_bytes,
        "kv_cache": capacity,
        "prefill_seconds": prefill,
        "decode_step_seconds": decode,
        "reference": {
            "prompt_tokens": args.ref_prompt,
            "output_tokens": args.ref_output,
            "requests_per_client": args.ref_requests,
            **reference,
        },
        # Busy CPUs on the whole machine during the measurement (this engine included), for judging noise.
        "machine_busy_cpus": round(others, 2),
    }


def report(section: dict[str, Any], command: str) -> str:
    """The measured steps, and the real engine's reference figures beside the simulated ones."""
    profile = llm_profile(section, host=str(section["host"].get("cpu_model", "?")))
    ref = section["reference"]
    rows = []
    for clients in (1, 8):
        real = ref[f"c{clients}"]
        requests, wall = closed_loop(
            profile, clients, int(ref["requests_per_client"]), int(ref["prompt_tokens"]), int(ref["output_tokens"])
        )
        ttft, _ = ttft_tpot(requests)
        sim_ttft, sim_rate = statistics.median(ttft), sum(r.tokens_out for r in requests) / wall
        rows.append(
            [
                f"c={clients}",
                f"{real['ttft_s'] * 1000:.0f}",
                f"{sim_ttft * 1000:.0f}",
                f"**{sim_ttft / real['ttft_s']:.2f}**",
                f"{real['tokens_per_s']:.1f}",
                f"{sim_rate:.1f}",
                f"**{sim_rate / real['tokens_per_s']:.2f}**",
            ]
        )
    kv = section["kv_cache"]
    rounds = section.get("rounds", [])
    return "\n".join(
        [
            "## LLM calibration: the real vLLM engine's steps and the simulator's LLM replica"
            f" ({section['measured_at']})",
            "",
            f"`{command}` on {section['host']['machine']}. The replica's engine ({section['model']},"
            f" {section['dtype']}, LlmConfig defaults) in-process; each figure is the fastest of {len(rounds)} rounds"
            " (others on the machine only add time; the CPUs they used in each round: "
            f"{', '.join(str(r['others_cpus']) for r in rounds) or '?'}). The machine is shared: only figures from"
            " one run mean anything side by side.",
            "",
            markdown_table(
                ["prompt tokens", *section["prefill_seconds"]],
                [["prefill (TTFT alone), ms", *(f"{t * 1000:.0f}" for t in section["prefill_seconds"].values())]],
            ),
            "",
            markdown_table(
                ["running batch", *section["decode_step_seconds"]],
                [["decode step, ms", *(f"{t * 1000:.1f}" for t in section["decode_step_seconds"].values())]],
            ),
            "",
            f"KV cache: {kv['blocks']} blocks of {kv['block_size']} tokens = {kv['tokens']} tokens"
            f" ({kv['bytes_per_token']} bytes per token, {kv['source']}); step budget {kv['max_num_batched_tokens']}"
            f" tokens, up to {kv['max_num_seqs']} sequences.",
            "",
            f"Closed-loop clients, each request {ref['prompt_tokens']} prompt and {ref['output_tokens']} output"
            f" tokens ({ref['requests_per_client']} per client), real engine vs simulator (simulator/llm.py stepping"
            " on the measured costs); tests/test_simulator_llm.py holds the ratios within 0.85-1.15:",
            "",
            markdown_table(
                ["clients", "real TTFT ms", "sim TTFT ms", "sim / real", "real tok/s", "sim tok/s", "sim / real"], rows
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="calibration file whose llm section to write")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each figure is its fastest round's")
    parser.add_argument("--ref-prompt", type=int, default=128)
    parser.add_argument("--ref-output", type=int, default=64)
    parser.add_argument("--ref-requests", type=int, default=3, help="requests per client in each reference run")
    parser.add_argument("--max-minutes", type=float, default=12.0, help="stop measuring rounds after this long")
    parser.add_argument("--wait-quiet", type=float, default=30.0, help="wait this long for other busy processes")
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's llm-calibration section")
    parser.add_argument("--report-only", action="store_true", help="report the file's llm section, measure nothing")
    args = parser.parse_args()
    if args.report_only:
        section = json.loads(args.out.read_text())["llm"]
        publish(report(section, section.get("command", command_line())), args.write, NAME)
        return
    busy = wait_quiet(args.wait_quiet)
    if busy:
        print(f"measuring while others are busy: {', '.join(busy)}", flush=True)
    section = asyncio.run(measure(args))
    section["command"] = command_line()
    document = json.loads(args.out.read_text()) if args.out.exists() else {}
    document["llm"] = section
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote the llm section of {args.out}")
    publish(report(section, section["command"]), args.write, NAME)


# vLLM starts its engine in child processes that may import this module again; only the parent measures.
if __name__ == "__main__":
    main()
