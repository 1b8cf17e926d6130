"""LLM serving under real arrivals: a public production trace replayed open-loop against aimass (client → gateway →
LLM replica → vLLM) and against vLLM's own OpenAI server, on the same model, dtype, KV cache and cores.

The trace is Azure's LLM inference trace 2023, conversation (../shared/traces/, CC BY 4.0: Patel et al.,
"Splitwise", ISCA 2024): arrival times as recorded, prompt and output token counts divided by ``--token-scale`` so a
CPU can carry the load (the factor is printed beside every figure). ``--rates`` compresses time: at 2x the same
``--duration`` seconds of replay carry the requests of twice as much trace. Open loop: each request is sent at its
arrival time whether or not earlier ones have finished, as real users do; nothing waits for a free slot on the
client side.

Prompts are text of exactly the trace's (scaled) token count under the model's tokenizer, different for every
request (a unique opening, so no prefix cache makes one side's work smaller); decoding is greedy with ``max_tokens``
the trace's output count, so both sides compute the same tokens. Both servers stay up all along, only one is
replayed against at a time, and the sides alternate (their order flips at every rate) so drift on a shared machine
hits both alike.

A request meets the SLO when its time to first token is at most ``--slo-ttft`` seconds and its time per output
token after the first at most ``--slo-tpot`` seconds; a request that fails or times out misses it. Reported per side
and rate: SLO attainment, TTFT and TPOT p50/p99, tokens/s, and goodput (requests meeting the SLO per second of
replay).

    python -m benchmarks.trace_replay [--duration 60] [--rates 0.5,1,2] [--token-scale 8] \
        [--write docs/benchmarks.md] [--plot docs/trace_replay.png]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from aimass.local_mesh import free_port
from aimass.runtime.config import LlmConfig
from aimass.v1 import llm_pb2, llm_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, publish, utc_now
from services.llm.weights import PACKAGED_MODELS, ensure_converted
from simulator.trace import TRACE, Window, read_rows, window_rows

NAME = "trace-replay"
# A request still unanswered this long after its arrival counts as failed (the replay must end by itself).
REQUEST_TIMEOUT_S = 180.0
SIDES = ("aimass", "vllm")
SIDE_LABELS = {"aimass": "aimass (gateway → replica)", "vllm": "vLLM OpenAI server"}


def variant_env(spec: str) -> tuple[str, dict[str, str]]:
    """``name:KEY=VALUE,KEY=VALUE`` → the variant's name and its mesh's environment."""
    name, _, settings = spec.partition(":")
    if not name or name in SIDES or not settings:
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, dict(setting.split("=", 1) for setting in settings.split(","))


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def load_trace(path: Path, *, duration_s: float, rate: float, token_scale: float) -> list[TraceRequest]:
    """The requests arriving in the first ``duration_s`` seconds of replay at ``rate``x the trace's speed (the
    reader is simulator.trace's, shared with the simulator's trace scenario)."""
    window = Window(0.0, duration_s * rate, time_scale=rate, token_scale=token_scale)
    return [TraceRequest(r.arrival, r.prompt_tokens, r.output_tokens) for r in window_rows(read_rows(path), window)]


class PromptMaker:
    """Texts of an exact token count under the model's tokenizer, each with a unique opening."""

    FILLER = (
        "The history of lighthouses is a story of engineering, weather and patience. Keepers trimmed wicks, "
        "wound clockwork and logged every passing ship, while engineers argued over lenses, towers and fog "
        "signals. Rainforests hold more species than any other land habitat; their canopy shades a floor where "
        "fungi recycle every fallen leaf. Trains changed how cities grew, how time was kept and how food "
        "reached markets far from farms. "
    )

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.filler_ids: list[int] = self.tokenizer.encode(self.FILLER * 40)

    def make(self, index: int, tokens: int) -> str:
        opening: list[int] = self.tokenizer.encode(f"Request {index}: summarise the notes below.\n")
        ids = (opening + self.filler_ids)[:tokens]
        text = str(self.tokenizer.decode(ids))
        # Decoding and encoding again may merge tokens at the seam; trim or pad until the count is exact.
        while len(self.tokenizer.encode(text)) > tokens:
            ids = ids[:-1]
            text = str(self.tokenizer.decode(ids))
        return text


@dataclass
class Outcome:
    """One request as its client saw it."""

    sent_s: float
    ttft_s: float | None = None
    finished_s: float | None = None
    tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.finished_s is None or self.tokens < 2:
            return None
        return (self.finished_s - self.sent_s - self.ttft_s) / (self.tokens - 1)

    def meets(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        if self.error or self.ttft_s is None or self.finished_s is None:
            return False
        tpot = self.tpot_s
        return self.ttft_s <= slo_ttft_s and (tpot is None or tpot <= slo_tpot_s)


# One request: (prompt, max_tokens, outcome to fill in).
Sender = Callable[[str, int, Outcome], Awaitable[None]]


def aimass_sender(stub: llm_pb2_grpc.LlmServiceAsyncStub, model: str) -> Sender:
    async def send(prompt: str, max_tokens: int, outcome: Outcome) -> None:
        request = llm_pb2.GenerateRequest(
            prompt=prompt,
            sampling=llm_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        )
        request.model.name = model
        async for response in stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            if response.delta and outcome.ttft_s is None:
                outcome.ttft_s = time.perf_counter() - outcome.sent_s
            if response.HasField("usage"):
                outcome.tokens = response.usage.completion_tokens
        outcome.finished_s = time.perf_counter()

    return send


def vllm_sender(client: httpx.AsyncClient, model: str) -> Sender:
    async def send(prompt: str, max_tokens: int, outcome: Outcome) -> None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread()).decode()[:200]}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") and outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - outcome.sent_s
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
        outcome.finished_s = time.perf_counter()

    return send


async def replay(requests: Sequence[TraceRequest], prompts: Sequence[str], send: Sender) -> tuple[list[Outcome], float]:
    """Every request at its arrival time (open loop); returns the outcomes and the replay's wall time."""
    outcomes: list[Outcome] = []
    started = time.perf_counter()

    async def one(request: TraceRequest, prompt: str) -> None:
        await asyncio.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
        outcome = Outcome(sent_s=time.perf_counter())
        outcomes.append(outcome)
        try:
            await asyncio.wait_for(send(prompt, request.output_tokens, outcome), REQUEST_TIMEOUT_S)
        except (grpc.aio.AioRpcError, httpx.HTTPError, RuntimeError, TimeoutError) as exc:
            outcome.error = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__

    await asyncio.gather(*(one(r, p) for r, p in zip(requests, prompts, strict=True)))
    return outcomes, time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Figures:
    requests: int
    failed: int
    attainment: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    tokens_per_s: float
    goodput_rps: float
    # Answered requests that missed the SLO on their first token, and (first token in time) on their pace.
    late_first_token: int
    slow_decode: int

    @classmethod
    def median(cls, rounds: Sequence[Figures]) -> Figures:
        """Each figure's median over rounds (rounds alternate between sides, so noise hits both alike)."""
        return cls(**{f.name: statistics.median(getattr(r, f.name) for r in rounds) for f in dataclasses.fields(cls)})

    @classmethod
    def of(cls, outcomes: Sequence[Outcome], wall_s: float, slo_ttft_s: float, slo_tpot_s: float) -> Figures:
        # A request that never produced a token counts with an infinite TTFT, so p99 cannot look better by failing.
        ttfts = [o.ttft_s if o.ttft_s is not None and not o.error else math.inf for o in outcomes]
        tpots = [t for o in outcomes if not o.error and (t := o.tpot_s) is not None]
        met = sum(o.meets(slo_ttft_s, slo_tpot_s) for o in outcomes)
        return cls(
            requests=len(outcomes),
            failed=sum(bool(o.error) for o in outcomes),
            attainment=met / len(outcomes) if outcomes else math.nan,
            ttft_p50_s=percentile(ttfts, 0.50),
            ttft_p99_s=percentile(ttfts, 0.99),
            tpot_p50_s=percentile(tpots, 0.50),
            tpot_p99_s=percentile(tpots, 0.99),
            tokens_per_s=sum(o.tokens for o in outcomes if not o.error) / wall_s,
            goodput_rps=met / wall_s,
            late_first_token=sum(1 for o in outcomes if not o.error and (o.ttft_s or math.inf) > slo_ttft_s),
            slow_decode=sum(
                1
                for o in outcomes
                if not o.error and (o.ttft_s or math.inf) <= slo_ttft_s and not o.meets(slo_ttft_s, slo_tpot_s)
            ),
        )


@dataclass
class VllmServer:
    """vLLM's own OpenAI-compatible server (the installed vLLM), on a loopback port, as a user would start it."""

    folder: Path
    model: str
    config: LlmConfig
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        env = {
            **os.environ,
            # The same cores and KV cache as the aimass replica (aimass.runtime.config.LlmConfig's defaults).
            "VLLM_CPU_OMP_THREADS_BIND": self.config.cpu_threads_bind or f"{cores[0]}-{cores[-1]}",
            "VLLM_CPU_KVCACHE_SPACE": str(self.config.cpu_kv_cache_gib),
        }
        command = [
            # What `vllm serve` runs (that command itself cannot find the vllm-cpu build's package metadata).
            sys.executable,
            "-m",
            "vllm.entrypoints.launchers.api_server.entry",
            "--model",
            str(self.folder),
            "--served-model-name",
            self.model,
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.config.max_model_len),
            "--enforce-eager",
            "--seed",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-uvicorn-access-log",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited: see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM's server did not start in {timeout_s:.0f} s: see {self.log_path}")

    def stop(self, *, keep_log: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)


def label_of(side: str, args: argparse.Namespace) -> str:
    if side in SIDE_LABELS:
        return SIDE_LABELS[side]
    settings = dict(args.variant)[side]
    return f"aimass, {', '.join(f'{k}={v}' for k, v in settings.items())}"


def fmt_s(seconds: float) -> str:
    return "—" if math.isnan(seconds) else ("∞" if math.isinf(seconds) else f"{seconds:.2f}")


def report(
    results: dict[tuple[str, float], Figures], args: argparse.Namespace, rates: Sequence[float], sides: Sequence[str]
) -> str:
    rows = []
    for rate in rates:
        for side in sides:
            f = results[(side, rate)]
            rows.append(
                (
                    f"{rate:g}x",
                    label_of(side, args),
                    str(f.requests),
                    f"{f.attainment:.0%}",
                    f"{f.late_first_token} / {f.slow_decode} / {f.failed}",
                    fmt_s(f.ttft_p50_s),
                    fmt_s(f.ttft_p99_s),
                    f"{f.tpot_p50_s * 1000:.0f}",
                    f"{f.tpot_p99_s * 1000:.0f}",
                    f"{f.tokens_per_s:.0f}",
                    f"{f.goodput_rps:.2f}",
                )
            )
    table = markdown_table(
        (
            "rate",
            "side",
            "requests",
            "SLO met",
            "missed: late first token / slow decode / failed",
            "TTFT p50 s",
            "TTFT p99 s",
            "TPOT p50 ms",
            "TPOT p99 ms",
            "tokens/s",
            "goodput req/s",
        ),
        rows,
    )
    verdicts = []
    for rate in rates:
        ours, peer = results[("aimass", rate)], results[("vllm", rate)]
        attained = ours.attainment >= peer.attainment
        tail = ours.ttft_p99_s <= peer.ttft_p99_s
        verdicts.append(
            f"- {rate:g}x: SLO attainment {ours.attainment:.0%} vs {peer.attainment:.0%}"
            f" ({'met' if attained else 'missed'}: aimass ≥ vLLM); TTFT p99 {fmt_s(ours.ttft_p99_s)} s vs"
            f" {fmt_s(peer.ttft_p99_s)} s ({'met' if tail else 'missed'}: aimass ≤ vLLM)."
        )
    plot_line = ["", f"![TTFT and SLO attainment vs load]({args.plot.name})"] if args.plot else []
    return "\n".join(
        [
            "## LLM trace replay (Azure LLM inference 2023, conversation) vs vLLM's own server",
            "",
            f"`{command_line()}` on {machine()}, {utc_now()}. {args.duration:g} s of open-loop replay per rate, side"
            f" and round, median of {args.rounds} rounds (each figure on its own); real arrival times compressed by"
            f" the rate; token counts divided by **{args.token_scale:g}**;"
            f" greedy; SLO: TTFT ≤ {args.slo_ttft:g} s and time per output token ≤ {args.slo_tpot:g} s. Same model"
            f" ({args.model}, float32), KV cache and cores on both sides; both servers up, replayed in turn, order"
            " flipped at every rate and round. vLLM's server runs with its own defaults; aimass with its defaults.",
            "",
            table,
            "",
            *verdicts,
            *plot_line,
        ]
    )


def plot(
    results: dict[tuple[str, float], Figures],
    rates: Sequence[float],
    path: Path,
    token_scale: float,
    sides: Sequence[str],
    args: argparse.Namespace,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for index, side in enumerate(sides):
        style = {"aimass": "o-", "vllm": "s--"}.get(side, f"{'^vDx'[index % 4]}:")
        label = label_of(side, args)
        color = f"C{index}"  # one colour per side in both panels
        left.plot(rates, [results[(side, r)].attainment * 100 for r in rates], style, color=color, label=label)
        right.plot(rates, [results[(side, r)].ttft_p99_s for r in rates], style, color=color, label=label)
        right.plot(rates, [results[(side, r)].ttft_p50_s for r in rates], style, color=color, alpha=0.35)
    left.set(xlabel="load (x trace rate)", ylabel="SLO attainment %", ylim=(0, 105), title="SLO attainment")
    right.set(xlabel="load (x trace rate)", ylabel="seconds", title="TTFT p99 (faint: p50)")
    right.set_yscale("log")
    for axis in (left, right):
        axis.set_xticks(list(rates))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Azure conversation trace, tokens ÷ {token_scale:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.rates.split(",")]
    config = LlmConfig(model=args.model)
    folder = ensure_converted(PACKAGED_MODELS[args.model], config.cache_dir)
    maker = PromptMaker(folder)
    workloads = {}
    for rate in rates:
        trace = load_trace(args.trace, duration_s=args.duration, rate=rate, token_scale=args.token_scale)
        workloads[rate] = (trace, [maker.make(i, r.prompt_tokens) for i, r in enumerate(trace)])
        print(f"{rate:g}x: {len(trace)} requests in {args.duration:g} s", flush=True)

    sides = [*SIDES, *(name for name, _ in args.variant)]
    meshes = {
        side: Mesh(f"trace-replay-{side}", replicas={"llm": 1}, env={"AIMASS_LLM__MODEL": args.model, **env})
        for side, env in [("aimass", {}), *args.variant]
    }
    server = VllmServer(folder, args.model, config)
    print(f"starting vLLM's OpenAI server and `aimass up` with one LLM replica ({len(meshes)}x)", flush=True)
    results: dict[tuple[str, float], Figures] = {}
    server.start()
    for mesh in meshes.values():
        mesh.start()
    finished = False
    try:
        server.wait_ready(600)
        for mesh in meshes.values():
            mesh.wait_ready(600)
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=server.url, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)
                )
            )
            senders = {"vllm": vllm_sender(client, args.model)}
            for side, mesh in meshes.items():
                channel = await stack.enter_async_context(mesh.aio_channel())
                senders[side] = aimass_sender(llm_pb2_grpc.LlmServiceStub(channel), args.model)
            for side in sides:  # warm-up: a few requests each, not measured
                warm, texts = workloads[rates[0]]
                await replay(
                    [TraceRequest(0.0, r.prompt_tokens, r.output_tokens) for r in warm[:4]], texts[:4], senders[side]
                )
            rounds: dict[tuple[str, float], list[Figures]] = {}
            for round_index, (index, rate) in itertools.product(range(args.rounds), enumerate(rates)):
                trace, texts = workloads[rate]
                for side in sides if (index + round_index) % 2 == 0 else sides[::-1]:
                    outcomes, wall = await replay(trace, texts, senders[side])
                    figures = Figures.of(outcomes, wall, args.slo_ttft, args.slo_tpot)
                    rounds.setdefault((side, rate), []).append(figures)
                    print(
                        f"round {round_index + 1} {rate:g}x {side:6}: SLO {figures.attainment:4.0%}"
                        f"  TTFT p50 {fmt_s(figures.ttft_p50_s)} s"
                        f" p99 {fmt_s(figures.ttft_p99_s)} s  TPOT p50 {figures.tpot_p50_s * 1000:.0f} ms"
                        f" p99 {figures.tpot_p99_s * 1000:.0f} ms  {figures.tokens_per_s:.0f} tok/s"
                        f"  failed {figures.failed}/{figures.requests}, late first token {figures.late_first_token},"
                        f" slow decode {figures.slow_decode}  ({wall:.0f} s)"
                        + (
                            f"  errors {dict(collections.Counter(o.error for o in outcomes if o.error))}"
                            if figures.failed
                            else ""
                        ),
                        flush=True,
                    )
            results = {key: Figures.median(got) for key, got in rounds.items()}
        finished = True
    finally:
        server.stop(keep_log=not finished)
        for mesh in meshes.values():
            mesh.stop()
    if args.plot is not None:
        plot(results, rates, args.plot, args.token_scale, sides, args)
    publish(report(results, args, rates, sides), args.write, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of replay per rate, side and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per rate and side; each figure is their median")
    parser.add_argument("--rates", default="0.5,1,2", help="comma-separated multiples of the trace's arrival rate")
    parser.add_argument("--token-scale", type=float, default=16.0, help="divide the trace's token counts by this")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds to the first token")
    parser.add_argument("--slo-tpot", type=float, default=0.2, help="seconds per output token after the first")
    parser.add_argument("--model", default=LlmConfig().model, choices=sorted(PACKAGED_MODELS))
    parser.add_argument(
        "--variant",
        type=variant_env,
        action="append",
        default=[],
        help="NAME:KEY=VALUE[,KEY=VALUE]: one more aimass mesh with these settings, replayed in turn with the others"
        " (e.g. seqs16:AIMASS_LLM__MAX_NUM_SEQS=16)",
    )
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    parser.add_argument("--plot", type=Path, default=None, help="write the attainment/TTFT plot here (PNG)")
    asyncio.run(main_async(parser.parse_args()))


# vLLM starts its engine in child processes that may import this module again; only the parent benchmarks.
if __name__ == "__main__":
    main()
