"""An LLM replica, step by step as vLLM's scheduler runs it: continuous batching, chunked prefill, a KV cache of
fixed blocks with admission and preemption, and per-request time to first token (TTFT) and time per output token.

Each engine step (``LlmEngineModel.plan`` then ``finish``), as vLLM v1's scheduler does:
1. Running requests first, in order: each needs its uncomputed tokens (one for a decoding request; the rest of its
   prompt, in chunks, for one still prefilling) within the step's token budget (``max_num_batched_tokens``). When
   the KV cache lacks the blocks for them, the lowest-priority, newest running request is preempted (its blocks
   freed, back to the head of the waiting queue, recomputed from scratch later) until they fit, or the request
   itself is the one preempted.
2. Then waiting requests, highest priority (lowest value) and oldest first, while the step has budget, the
   running set is under ``max_num_seqs`` and the cache has blocks for the chunk; a request that does not fit waits
   (no preemption for admission).
3. A request whose computed tokens reach its length (prompt + tokens generated so far) samples its next token at
   the end of the step; its first sampled token is its TTFT, its last ends it and frees its blocks. A block holds
   ``block_size`` tokens of one request.

Step time = f(prefill tokens in the step, decoding requests in the step) on the calibration host
(``LlmProfile.step_seconds``), divided by the device's speed. ``f`` is interpolated from the real engine's measured
prefill times (one request alone, by prompt tokens) and decode step times (by batch size), see
benchmarks/llm_calibration.py; a mixed step costs both, less the fixed per-step cost they share. Prefilling several
sequences in one step costs less than one sequence as long as them all: the measured curve's n^2 part (attention,
fitted) is counted per sequence.

The replica reports what NVML and vLLM's own metrics would: memory = weights + the KV cache it reserves, utilisation
= busy fraction of the window, requests running and waiting, KV blocks in use; never its speed.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy

from simulator.calibration import ModelProfile
from simulator.engine import EventLoop
from simulator.workload import Outcome, Request

LLM_SERVICE = "aimass.v1.LlmService"


@dataclass(frozen=True)
class StepCosts:
    """The calibration host's step times, from the real engine's measurements."""

    # (prompt tokens, seconds to first token of one request alone), ascending.
    prefill: tuple[tuple[int, float], ...]
    # (decoding requests, seconds per step), ascending.
    decode: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if len(self.prefill) < 2 or len(self.decode) < 1:
            raise ValueError("need at least two prefill sizes and one decode batch size")

    @property
    def shared_seconds(self) -> float:
        """The fixed cost of a step that prefill and decode measurements both include: the prefill curve's
        intercept at 0 tokens (a straight line through its two smallest sizes), at most the smallest decode step."""
        (n0, t0), (n1, t1) = self.prefill[0], self.prefill[1]
        intercept = t0 - (t1 - t0) / (n1 - n0) * n0
        return max(0.0, min(intercept, self.decode[0][1]))

    @functools.cached_property
    def attention(self) -> float:
        """Seconds per token squared of one sequence's prefill: the n^2 term of a least-squares fit of the measured
        prefill times to a + b n + c n^2 (attention over the sequence itself), at least 0."""
        if len(self.prefill) < 3:
            return 0.0
        n = numpy.array([p[0] for p in self.prefill], dtype=float)
        t = numpy.array([p[1] for p in self.prefill], dtype=float)
        coefficients, *_ = numpy.linalg.lstsq(numpy.stack([numpy.ones_like(n), n, n * n], axis=1), t, rcond=None)
        return max(0.0, float(coefficients[2]))

    def prefill_seconds(self, chunks: Sequence[tuple[int, int]]) -> float:
        """A step's prefill of ``chunks`` (tokens already computed, tokens now) of several sequences: the measured
        time of one sequence of their total length, with its n^2 attention part swapped for each chunk's own (a
        chunk attends to its sequence's tokens before it and itself, not to the other sequences')."""
        total = sum(n for _, n in chunks)
        own = sum((done + n) ** 2 - done**2 for done, n in chunks)
        return _interpolate(self.prefill, total) + self.attention * (own - total**2)

    def seconds(self, prefill_tokens: int, decodes: int, chunks: Sequence[tuple[int, int]] | None = None) -> float:
        """One step: ``prefill_tokens`` (in ``chunks``, default one sequence from its start) and ``decodes``."""
        if prefill_tokens < 0 or decodes < 0 or prefill_tokens + decodes == 0:
            raise ValueError(f"an empty or negative step: {prefill_tokens} prefill tokens, {decodes} decodes")
        if chunks is not None and sum(n for _, n in chunks) != prefill_tokens:
            raise ValueError(f"chunks of {sum(n for _, n in chunks)} tokens for {prefill_tokens} prefill tokens")
        if prefill_tokens == 0:
            return _interpolate(self.decode, decodes)
        prefill = self.prefill_seconds(chunks if chunks is not None else [(0, prefill_tokens)])
        if decodes == 0:
            return prefill
        return prefill + _interpolate(self.decode, decodes) - self.shared_seconds


def _interpolate(points: Sequence[tuple[int, float]], x: int) -> float:
    """Linear between measured points; below the first, on the line through the first two (floored at a tenth of
    the first's time); beyond the last, by the last segment's slope."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i < len(points) and xs[i] == x:
        return points[i][1]
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    if i == 0:
        (n0, t0), (n1, t1) = points[0], points[1]
        return max(t0 / 10, t0 - (t1 - t0) / (n1 - n0) * (n0 - x))
    (n0, t0), (n1, t1) = (points[-2], points[-1]) if i == len(points) else (points[i - 1], points[i])
    return t0 + (t1 - t0) / (n1 - n0) * (x - n0)


def _monotone(points: Mapping[str, float]) -> tuple[tuple[int, float], ...]:
    # More tokens never take less time; a measured dip is noise, raised to the smaller size's time.
    ordered = sorted((int(n), float(t)) for n, t in points.items())
    result: list[tuple[int, float]] = []
    for n, t in ordered:
        result.append((n, max(t, result[-1][1]) if result else t))
    return tuple(result)


@dataclass(frozen=True)
class LlmProfile(ModelProfile):
    """An LLM: a ModelProfile (service, load time, footprint, provenance; ``batch_seconds`` is b requests of the
    reference shape run together, for the report's table and offered-work estimates) plus its engine's step costs
    and KV cache."""

    costs: StepCosts
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_cache_bytes: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_waiting: int = 256
    # The real engine's closed-loop figures on the reference shape (c → {"ttft_s", "tokens_per_s"}), when measured.
    reference: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kv_blocks(self) -> int:
        return self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size) if self.kv_bytes_per_token else 0

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    def step_seconds(
        self, prefill_tokens: int, decodes: int, speed: float = 1.0, chunks: Sequence[tuple[int, int]] | None = None
    ) -> float:
        return self.costs.seconds(prefill_tokens, decodes, chunks) / speed

    def derive_llm(
        self, name: str, *, compute: float, weights: float, kv_per_token: float, kv_cache_bytes: int, reason: str
    ) -> LlmProfile:
        """A model not measured here: step times x ``compute``, weights x ``weights``, KV bytes per token x
        ``kv_per_token``, and its own KV cache reservation."""
        if min(compute, weights, kv_per_token) <= 0:
            raise ValueError(f"derived LLM {name}: ratios must be > 0")
        costs = StepCosts(
            tuple((n, t * compute) for n, t in self.costs.prefill),
            tuple((n, t * compute) for n, t in self.costs.decode),
        )
        weights_bytes = round(self.weights_bytes * weights)
        return LlmProfile(
            name=name,
            service=self.service,
            batch_seconds=tuple((n, t * compute) for n, t in self.batch_seconds),
            load_seconds=self.load_seconds * weights,
            footprint_bytes=weights_bytes + kv_cache_bytes,
            measured=False,
            provenance=f"derived from {self.name}: compute x{compute:g}, weights x{weights:g} ({reason})",
            costs=costs,
            weights_bytes=weights_bytes,
            kv_bytes_per_token=round(self.kv_bytes_per_token * kv_per_token),
            kv_cache_bytes=kv_cache_bytes,
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_waiting=self.max_waiting,
        )


def llm_profile(section: Mapping[str, Any], host: str = "") -> LlmProfile:
    """The measured LLM of calibration.json's "llm" section (benchmarks/llm_calibration.py writes it)."""
    costs = StepCosts(_monotone(section["prefill_seconds"]), _monotone(section["decode_step_seconds"]))
    kv = section["kv_cache"]
    reference = section.get("reference", {})
    prompt, output = int(reference.get("prompt_tokens", 128)), int(reference.get("output_tokens", 64))
    # b requests of the reference shape started together: one prefill step of b prompts, then decode steps.
    batch_seconds = tuple(
        (b, costs.seconds(b * prompt, 0) + (output - 1) * costs.seconds(0, b)) for b in (1, 2, 4, 8, 16, 32)
    )
    weights = int(section["weights_bytes"])
    kv_bytes = int(kv["kv_cache_bytes"])
    return LlmProfile(
        name=str(section["model"]),
        service=LLM_SERVICE,
        batch_seconds=batch_seconds,
        load_seconds=float(section["load_seconds"]),
        footprint_bytes=weights + kv_bytes,
        measured=True,
        provenance=f"measured (vLLM steps, {section.get('dtype', '?')}, on {host}, {section.get('measured_at', '?')})",
        costs=costs,
        weights_bytes=weights,
        kv_bytes_per_token=int(kv["bytes_per_token"]),
        kv_cache_bytes=int(kv["blocks"]) * int(kv["block_size"]) * int(kv["bytes_per_token"]),
        block_size=int(kv["block_size"]),
        max_num_batched_tokens=int(kv["max_num_batched_tokens"]),
        max_num_seqs=int(kv["max_num_seqs"]),
        reference=reference,
    )


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine."""

    request: Request
    prompt: int
    output: int
    generated: int = 0
    computed: int = 0
    blocks: int = 0
    # Tokens scheduled in the step being run.
    scheduled: int = 0

    @property
    def length(self) -> int:
        return self.prompt + self.generated

    @property
    def key(self) -> tuple[int, float, int]:
        return (self.request.priority, self.request.arrival, self.request.id)


@dataclass
class Step:
    prefill_tokens: int
    decodes: int
    seconds: float
    sequences: list[EngineRequest]


class LlmEngineModel:
    """One engine's scheduler state; the device that runs it calls ``plan`` (the next step, or None when idle) and,
    ``step.seconds`` later, ``finish`` (requests that ended)."""

    def __init__(self, profile: LlmProfile, speed: float = 1.0) -> None:
        if profile.kv_blocks < 1:
            raise ValueError(f"{profile.name}: no KV cache blocks")
        self.profile = profile
        self.speed = speed
        self.free_blocks = profile.kv_blocks
        self.waiting: list[EngineRequest] = []
        self.running: list[EngineRequest] = []
        self.by_request: dict[int, EngineRequest] = {}
        self.preemptions = 0
        self.steps = 0
        self.tokens_generated = 0
        self.step: Step | None = None

    # -- requests --------------------------------------------------------------------------------------------

    def add(self, request: Request) -> bool:
        """Queues ``request``; False when the engine's waiting queue is full (RESOURCE_EXHAUSTED) or it can never
        fit (longer than the KV cache, or no tokens)."""
        if request.prompt_tokens < 1 or request.output_tokens < 1:
            raise ValueError(f"request {request.id}: needs prompt and output tokens, got {request.prompt_tokens}")
        if len(self.waiting) >= self.profile.max_waiting:
            return False
        if request.prompt_tokens + request.output_tokens > self.profile.kv_tokens:
            return False
        sequence = EngineRequest(request, request.prompt_tokens, request.output_tokens)
        self.by_request[request.id] = sequence
        bisect.insort(self.waiting, sequence, key=lambda s: s.key)
        return True

    def abort(self, request: Request) -> None:
        """The caller gave up: the request leaves the queue or the batch and frees its blocks at once (a step
        running now still takes its time; it samples nothing for it)."""
        sequence = self.by_request.pop(request.id, None)
        if sequence is None:
            return
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence in self.running:
            self.running.remove(sequence)
        self.free_blocks += sequence.blocks
        sequence.blocks = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def blocks_used(self) -> int:
        return self.profile.kv_blocks - self.free_blocks

    # -- steps -----------------------------------------------------------------------------------------------

    def _blocks_for(self, sequence: EngineRequest, tokens: int) -> int:
        return max(0, math.ceil((sequence.computed + tokens) / self.profile.block_size) - sequence.blocks)

    def _preempt(self, sequence: EngineRequest) -> None:
        self.running.remove(sequence)
        self.free_blocks += sequence.blocks
        sequence.blocks = sequence.computed = sequence.scheduled = 0
        sequence.request.preemptions += 1
        self.preemptions += 1
        bisect.insort(self.waiting, sequence, key=lambda s: s.key)

    def plan(self, now: float) -> Step | None:
        budget = self.profile.max_num_batched_tokens
        scheduled: list[EngineRequest] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            tokens = min(sequence.length - sequence.computed, budget)
            need = self._blocks_for(sequence, tokens)
            while need > self.free_blocks:
                # The lowest-priority, newest running request gives its blocks back (recomputed later).
                victim = max(self.running, key=lambda s: s.key)
                if victim in scheduled:
                    scheduled.remove(victim)
                    budget += victim.scheduled
                if self.running.index(victim) < index:
                    index -= 1
                self._preempt(victim)
                preempted = True
                if victim is sequence:
                    break
                need = self._blocks_for(sequence, tokens)
            if sequence not in self.running:
                break  # it preempted itself: nothing after it fits either
            sequence.scheduled = tokens
            sequence.blocks += need
            self.free_blocks -= need
            budget -= tokens
            scheduled.append(sequence)
            index += 1
        # As vLLM: a step that had to preempt admits nobody new.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs:
            sequence = self.waiting[0]
            tokens = min(sequence.length - sequence.computed, budget)
            need = self._blocks_for(sequence, tokens)
            if need > self.free_blocks:
                break
            self.waiting.pop(0)
            self.running.append(sequence)
            sequence.scheduled = tokens
            sequence.blocks += need
            self.free_blocks -= need
            budget -= tokens
            scheduled.append(sequence)
        if not scheduled:
            return None
        # A request prefilling (its prompt, or prompt and output again after a preemption) or decoding one token.
        chunks = [(s.computed, s.scheduled) for s in scheduled if s.computed + 1 < s.length or s.generated == 0]
        decodes = len(scheduled) - len(chunks)
        prefill_tokens = sum(n for _, n in chunks)
        seconds = self.profile.step_seconds(prefill_tokens, decodes, self.speed, chunks)
        self.step = Step(prefill_tokens, decodes, seconds, scheduled)
        self.steps += 1
        return self.step

    def finish(self, now: float) -> list[Request]:
        """Ends the step planned last: tokens computed, next tokens sampled; the requests that ended."""
        step = self.step
        assert step is not None, "finish() without a planned step"
        self.step = None
        ended: list[Request] = []
        for sequence in step.sequences:
            tokens, sequence.scheduled = sequence.scheduled, 0
            if self.by_request.get(sequence.request.id) is not sequence:
                continue  # aborted during the step
            sequence.computed += tokens
            if sequence.computed < sequence.length:
                continue  # a prefill chunk: no token sampled yet
            sequence.generated += 1
            self.tokens_generated += 1
            request = sequence.request
            if request.first_token is None:
                request.first_token = now
            request.tokens_out = sequence.generated
            if sequence.generated >= sequence.output:
                self.running.remove(sequence)
                del self.by_request[request.id]
                self.free_blocks += sequence.blocks
                sequence.blocks = 0
                ended.append(request)
        return ended


class StandaloneLlm:
    """One engine on one device of ``speed``, driven on ``loop``: runs steps back to back while it has work, and
    calls ``done`` with each request it ends (outcome OK, ``finished`` set).

    As vLLM's engine loop: an idle engine starts a step as soon as a request arrives (with that request alone, when
    others follow a moment later), and a busy one plans its next step as soon as the last ends, before the callers
    of the requests that ended can send again."""

    def __init__(
        self, profile: LlmProfile, loop: EventLoop, done: Callable[[Request], None] | None = None, speed: float = 1.0
    ) -> None:
        self.engine = LlmEngineModel(profile, speed)
        self.loop = loop
        self.done = done
        self.busy_s = 0.0

    def submit(self, request: Request) -> bool:
        accepted = self.engine.add(request)
        if not accepted:
            request.outcome, request.finished = Outcome.REJECTED, self.loop.now
        elif self.engine.step is None:
            self._next()
        return accepted

    def _next(self) -> None:
        step = self.engine.plan(self.loop.now)
        if step is not None:
            self.busy_s += step.seconds
            self.loop.after(step.seconds, self._finish)

    def _finish(self) -> None:
        ended = self.engine.finish(self.loop.now)
        self._next()
        for request in ended:
            request.outcome, request.finished = Outcome.OK, self.loop.now
            if self.done is not None:
                self.done(request)


def closed_loop(
    profile: LlmProfile, clients: int, requests_per_client: int, prompt: int, output: int, speed: float = 1.0
) -> tuple[list[Request], float]:
    """``clients`` closed-loop clients, each sending its next request (``prompt`` in, ``output`` out) when the
    previous one ends, as benchmarks/llm_calibration.py's reference runs do; the requests and the wall time."""
    loop = EventLoop()
    ids = itertools.count()
    sent = [0] * clients
    finished: list[Request] = []

    def send(client: int) -> None:
        sent[client] += 1
        # The client's index rides in ``gateway`` (there is no gateway here): who sends next when a request ends.
        request = Request(next(ids), "bench", profile.name, loop.now, 3600.0, 3600.0, gateway=client)
        request.prompt_tokens, request.output_tokens = prompt, output
        runner.submit(request)

    def done(request: Request) -> None:
        finished.append(request)
        if sent[request.gateway] < requests_per_client:
            send(request.gateway)

    runner = StandaloneLlm(profile, loop, done, speed)
    for client in range(clients):
        send(client)
    return finished, loop.run()


def ttft_tpot(requests: Iterable[Request]) -> tuple[list[float], list[float]]:
    """TTFT and time per output token after the first, of the requests that finished."""
    ttft, tpot = [], []
    for r in requests:
        if r.outcome is Outcome.OK and r.first_token is not None and r.finished is not None:
            ttft.append(r.first_token - r.arrival)
            if r.tokens_out > 1:
                tpot.append((r.finished - r.first_token) / (r.tokens_out - 1))
    return ttft, tpot
