"""aimass.v1.LlmService: check the request, tokenise, stream from the engine, account the work.

Thin by design: the limits live in sampling.py, generation in engine.py. A client that cancels, disconnects or
runs out of deadline makes gRPC cancel this handler; the cancellation closes the engine stream, which aborts the
request inside vLLM at once (its KV cache and batch slot are freed on the next step).

With tracing on, each generation is a "model inference" span (GenAI semantic-convention attributes: model, token
counts, finish reason) with a "first token" event; vLLM's own queue and batching happen inside it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import prometheus_client
from opentelemetry.trace import Span, Status, StatusCode

from aimass.runtime import tracing
from aimass.runtime.config import LlmConfig
from aimass.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from aimass.runtime.interceptors import MAX_TENANT_COUNTS, OTHER_TENANTS
from aimass.runtime.models import serving_model
from aimass.runtime.scope import current_scope, deadline_of
from aimass.tenancy.fair_share import VirtualTokenCounters
from aimass.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from services.llm.protocol import GenerationEngine
from services.llm.sampling import chat_messages, check_prompt_chars, checked_sampling, request_sampling

Context = grpc.aio.ServicerContext[Any, Any]
Response = TypeVar("Response", llm_pb2.ChatResponse, llm_pb2.GenerateResponse)

# A priority class outranks any tenant's fair-share rank (ranks are weighted token counts, far below this).
PRIORITY_CLASS_SPAN = 10**12

TIME_TO_FIRST_TOKEN = prometheus_client.Histogram(
    "aimass_llm_time_to_first_token_seconds",
    "From the request's arrival at the replica to its first generated token.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Rates of these are tokens per second: rate(aimass_llm_generated_tokens_total[1m]).
GENERATED_TOKENS = prometheus_client.Counter(
    "aimass_llm_generated_tokens_total", "Completion tokens generated (cancelled requests included).", ["model"]
)
PROMPT_TOKENS = prometheus_client.Counter("aimass_llm_prompt_tokens_total", "Prompt tokens processed.", ["model"])

FINISH_REASONS = {
    "length": llm_pb2.FINISH_REASON_LENGTH,
    "abort": llm_pb2.FINISH_REASON_CANCELLED,
}


@dataclasses.dataclass
class TenantWork:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclasses.dataclass
class ServiceCounters:
    """What the service did since start; load reports turn these into rates and deltas."""

    in_flight: int = 0
    completed: int = 0
    last_used_unix_ms: int = 0
    # Tenant → work since the last load report (drained by the report).
    tenant_work: collections.defaultdict[str, TenantWork] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(TenantWork)
    )

    def work_of(self, tenant: str) -> TenantWork:
        """``tenant``'s work since the last report; past MAX_TENANT_COUNTS tenants, counted together (bounded)."""
        if tenant not in self.tenant_work and len(self.tenant_work) >= MAX_TENANT_COUNTS:
            tenant = OTHER_TENANTS
        return self.tenant_work[tenant]

    def take_tenant_work(self) -> dict[str, TenantWork]:
        work, self.tenant_work = self.tenant_work, collections.defaultdict(TenantWork)
        return dict(work)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, engine: GenerationEngine, config: LlmConfig) -> None:
        self.engine = engine
        self.config = config
        self.fairness = VirtualTokenCounters()
        # Running in the engine plus waiting in its queue; beyond this, RESOURCE_EXHAUSTED.
        self.capacity = config.max_num_seqs + config.max_waiting
        self.counters = ServiceCounters()

    def _model(self, requested: common_pb2.ModelRef, method: str) -> common_pb2.ModelRef:
        serving_model(
            requested,
            self.engine.model_name,
            f"LlmService.{method}",
            loaded=self.engine.loaded,
            what=self.engine.model_name,
        )
        if requested.version and requested.version != self.engine.version:
            raise NotFound(
                f"model {self.engine.model_name!r} has no version {requested.version!r}; "
                f"available: {self.engine.version}",
                reason="MODEL_VERSION_NOT_FOUND",
            )
        return common_pb2.ModelRef(name=self.engine.model_name, version=self.engine.version)

    async def Chat(self, request: llm_pb2.ChatRequest, context: Context) -> AsyncIterator[llm_pb2.ChatResponse]:
        model = self._model(request.model, "Chat")
        messages = chat_messages(request.messages, self.config)
        checked_sampling(request.sampling, self.config)  # before any tokeniser time is spent
        with self._admitted():
            prompt_ids = await self.engine.encode_chat(messages, deadline=deadline_of(context))
            async for response in self._stream(llm_pb2.ChatResponse, prompt_ids, request, model, context):
                yield response

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        model = self._model(request.model, "Generate")
        if not request.prompt:
            raise InvalidArgument("prompt is empty; send the text to continue", reason="EMPTY_PROMPT")
        check_prompt_chars(len(request.prompt), "prompt", self.config)
        checked_sampling(request.sampling, self.config)
        with self._admitted():
            prompt_ids = await self.engine.encode(request.prompt, deadline=deadline_of(context))
            async for response in self._stream(llm_pb2.GenerateResponse, prompt_ids, request, model, context):
                yield response

    async def CountTokens(self, request: llm_pb2.CountTokensRequest, context: Context) -> llm_pb2.CountTokensResponse:
        model = self._model(request.model, "CountTokens")
        if bool(request.prompt) == bool(request.messages):
            raise InvalidArgument("set exactly one of prompt and messages", reason="PROMPT_OR_MESSAGES")
        # Bounded like the prompts of Chat and Generate: characters checked first, then the tokeniser's pool and
        # queue (RESOURCE_EXHAUSTED when full) under the call's deadline.
        if request.messages:
            ids = await self.engine.encode_chat(
                chat_messages(request.messages, self.config), deadline=deadline_of(context)
            )
        else:
            check_prompt_chars(len(request.prompt), "prompt", self.config)
            ids = await self.engine.encode(request.prompt, deadline=deadline_of(context))
        return llm_pb2.CountTokensResponse(model=model, token_count=len(ids), context_length=self.engine.context_length)

    def _admitted(self) -> _Admission:
        if self.counters.in_flight >= self.capacity:
            raise ResourceExhausted(
                f"the LLM replica is full: {self.counters.in_flight} requests running or waiting (limit "
                f"{self.capacity}); retry later or on another replica",
                reason="QUEUE_FULL",
                metadata={"limit": str(self.capacity)},
                retry_after_ms=500,
            )
        return _Admission(self.counters)

    async def _stream(
        self,
        response_type: Callable[..., Response],
        prompt_ids: list[int],
        request: llm_pb2.ChatRequest | llm_pb2.GenerateRequest,
        model: common_pb2.ModelRef,
        context: Context,
    ) -> AsyncIterator[Response]:
        received = time.perf_counter()
        sampling = request_sampling(
            request.sampling,
            prompt_tokens=len(prompt_ids),
            context_length=self.engine.context_length,
            config=self.config,
        )
        scope = current_scope()
        request_id = request.meta.request_id or scope.request_id
        tenant = scope.tenant
        # vLLM runs lower numbers first: the priority class (capped for the tenant) first, then within it tenants
        # take turns by the service they received (aimass.tenancy.fair_share).
        rank, estimate = self.fairness.admit(tenant, scope.weight, len(prompt_ids), sampling.max_tokens)
        priority = scope.rank(request.meta.priority) * PRIORITY_CLASS_SPAN + rank
        completion_tokens = 0
        first_token_ms = 0.0
        first = True
        span = _inference_span(response_type, model, len(prompt_ids), sampling.max_tokens, request.meta.priority)
        finish_reason = ""
        try:
            async for chunk in self.engine.stream(prompt_ids, sampling, request_id=request_id, priority=priority):
                completion_tokens += chunk.new_tokens
                if chunk.new_tokens and not first_token_ms:
                    first_token_ms = (time.perf_counter() - received) * 1000
                    TIME_TO_FIRST_TOKEN.labels(model.name).observe(first_token_ms / 1000)
                    if span is not None:
                        span.add_event("first token", {"aimass.llm.time_to_first_token_ms": first_token_ms})
                fields: dict[str, Any] = {"delta": chunk.text}
                if first:
                    fields["model"] = model
                    first = False
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
                    fields["finish_reason"] = _finish_reason(chunk.finish_reason, chunk.stop_string)
                    fields["stop_sequence"] = chunk.stop_string or ""
                    fields["usage"] = llm_pb2.Usage(
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=completion_tokens,
                        time_to_first_token_ms=first_token_ms,
                        total_time_ms=(time.perf_counter() - received) * 1000,
                    )
                yield response_type(**fields)
        except Exception as exc:
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if span is not None:
                span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
                span.set_attribute("gen_ai.response.finish_reasons", [finish_reason or "cancelled"])
                span.end()
            # Cancelled calls count too: their tokens were computed for this tenant.
            self.fairness.finish(tenant, estimate, len(prompt_ids), completion_tokens)
            work = self.counters.work_of(tenant)
            work.requests += 1
            work.prompt_tokens += len(prompt_ids)
            work.completion_tokens += completion_tokens
            GENERATED_TOKENS.labels(model.name).inc(completion_tokens)
            PROMPT_TOKENS.labels(model.name).inc(len(prompt_ids))


def _inference_span(
    response_type: Callable[..., Any],
    model: common_pb2.ModelRef,
    prompt_tokens: int,
    max_tokens: int,
    priority: common_pb2.Priority.ValueType,
) -> Span | None:
    """The generation's span (a child of the request's server span), or None when tracing is off."""
    tracer = tracing.tracer()
    if tracer is None:
        return None
    return tracer.start_span(
        tracing.INFERENCE_SPAN,
        attributes={
            "gen_ai.operation.name": "chat" if response_type is llm_pb2.ChatResponse else "text_completion",
            "gen_ai.request.model": model.name,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "aimass.priority": common_pb2.Priority.Name(priority),
        },
    )


def _finish_reason(reason: str, stop_string: str | None) -> llm_pb2.FinishReason.ValueType:
    if reason == "stop":
        return llm_pb2.FINISH_REASON_STOP_SEQUENCE if stop_string else llm_pb2.FINISH_REASON_STOP
    return FINISH_REASONS.get(reason, llm_pb2.FINISH_REASON_ERROR)


class _Admission:
    """Holds one slot of the replica's capacity for the duration of a call."""

    def __init__(self, counters: ServiceCounters) -> None:
        self.counters = counters

    def __enter__(self) -> None:
        self.counters.in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self.counters.in_flight -= 1
        self.counters.completed += 1
        self.counters.last_used_unix_ms = int(time.time() * 1000)
