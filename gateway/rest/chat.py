"""``/v1/chat/completions`` (LlmService.Chat) and ``/v1/completions`` (LlmService.Generate), streamed as OpenAI's
server-sent events or answered whole.

What OpenAI's API has and aimass's does not (tools, logprobs, n > 1, JSON response formats, logit bias...) is
refused with 400 naming the parameter, never ignored; arguments OpenAI itself does not know are refused as it
refuses them. The gateway and the replica check the rest (ranges, prompt and context sizes, stop sequences).

A stream's status line goes out only after the first token came: every refusal (key, quota, unknown model, bad
sampling) is a proper HTTP status. An error after that is one SSE ``{"error": ...}`` event, which the OpenAI SDKs
raise. When the HTTP client goes away, the gRPC call is cancelled at once, and with it the generation on the
replica: for streams by the response (starlette stops it on ``http.disconnect``), before the first token and for
whole answers by racing the call against the disconnect (as vLLM's ``with_cancellation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any, Final, Literal, TypeVar

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from aimass.v1 import common_pb2, llm_pb2
from gateway.rest.errors import OpenAIError, bad_request, sse_error
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, request_id, request_meta, upstream

router = APIRouter(tags=["llm"])

T = TypeVar("T")
Response = llm_pb2.ChatResponse | llm_pb2.GenerateResponse
Call = grpc.aio.UnaryStreamCall[Any, Any]

FINISH_REASONS: Final[dict[int, str]] = {
    llm_pb2.FINISH_REASON_STOP: "stop",
    llm_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    llm_pb2.FINISH_REASON_LENGTH: "length",
    # Stopped by the server (draining, deadline about to pass): OpenAI has no word for it; vLLM says "abort".
    llm_pb2.FINISH_REASON_CANCELLED: "abort",
    llm_pb2.FINISH_REASON_ERROR: "error",
}
ROLES: Final[dict[str, llm_pb2.ChatRole.ValueType]] = {
    "system": llm_pb2.CHAT_ROLE_SYSTEM,
    # OpenAI's newer name for system instructions.
    "developer": llm_pb2.CHAT_ROLE_SYSTEM,
    "user": llm_pb2.CHAT_ROLE_USER,
    "assistant": llm_pb2.CHAT_ROLE_ASSISTANT,
}
INT32_MAX: Final = 2**31 - 1


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# OpenAI parameters aimass does not implement: refused (400, naming them) unless left at a value that asks for
# nothing (None, false, empty, or the one allowed value).
UNSUPPORTED: Final[dict[str, Callable[[Any], bool]]] = {
    "tools": _unset,
    "functions": _unset,
    "function_call": lambda v: v is None or v == "none",
    "tool_choice": lambda v: v is None or v == "none",
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "logit_bias": _unset,
    "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
    "audio": _unset,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _unset,
    "reasoning_effort": _unset,
    "web_search_options": _unset,
    "echo": lambda v: v is None or v is False,
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
}
# Accepted and without effect here: bookkeeping on OpenAI's side, or tool settings without tools.
HARMLESS: Final = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingBody(BaseModel):
    """What chat and completions share. Unknown fields are kept and judged by ``check_extras``."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=512)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    # vLLM's extension; -1 (vLLM's "off") and 0 both mean no top-k filter.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    max_tokens: TokenCount | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1

    def check_extras(self) -> None:
        if self.n != 1:
            raise bad_request(f"n is {self.n}; this server generates one choice per request (n=1)", param="n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            allowed = UNSUPPORTED.get(name)
            if allowed is None:
                raise bad_request(f"Unrecognized request argument supplied: {name}", param=name)
            if not allowed(value):
                raise bad_request(f"{name} is not supported by this server; leave it out", param=name)

    def sampling(self, max_tokens: int | None) -> llm_pb2.SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        optional: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0) if self.top_k is not None else None,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return llm_pb2.SamplingParams(
            max_tokens=max_tokens or 0,
            stop=stops,
            **{name: value for name, value in optional.items() if value is not None},
        )


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(SamplingBody):
    messages: Annotated[list[ChatMessageBody], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None


class CompletionBody(SamplingBody):
    prompt: str | list[Any]
    # OpenAI's default for completions (chat's is what the context leaves).
    max_tokens: TokenCount | None = 16


def chat_messages(messages: list[ChatMessageBody]) -> list[llm_pb2.ChatMessage]:
    """OpenAI messages as aimass's: roles system (developer), user, assistant; content a string or text parts."""
    converted = []
    for i, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise bad_request(
                f"messages[{i}].role is {message.role!r}; this server takes system, developer, user and assistant "
                "(no tools)",
                param=f"messages[{i}].role",
            )
        for extra, value in (message.model_extra or {}).items():
            if not _unset(value):
                raise bad_request(
                    f"messages[{i}].{extra} is not supported by this server", param=f"messages[{i}].{extra}"
                )
        content = message.content
        if content is None:
            raise bad_request(f"messages[{i}].content is missing", param=f"messages[{i}].content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f"messages[{i}].content[{j}] is a {part.get('type')!r} part; this server takes text parts "
                        '({"type": "text", "text": "..."}) only',
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        converted.append(llm_pb2.ChatMessage(role=role, content=content))
    return converted


def prompt_of(body: CompletionBody) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request(
                "prompt must be a string or a list of one string (no batches, no token ids)", param="prompt"
            )
        prompt = prompt[0]
    return prompt


# -- disconnects -----------------------------------------------------------------------------------------------


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T], call: Call) -> T:
    """``work``'s result, unless the HTTP client goes away first: then the gRPC call is cancelled (the replica
    stops generating) and the request ends with 499, which nobody reads."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    call.cancel()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await task
    raise OpenAIError(499, "the client closed the connection", code="client_closed")


class CancellingStream(StreamingResponse):
    """SSE whose gRPC call is cancelled whenever the response ends: finished, failed, or the client gone (starlette
    stops sending on ``http.disconnect``; the generator may be left suspended, so the call is cancelled here)."""

    def __init__(self, content: AsyncIterator[str], call: Call, headers: Mapping[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.call = call
        self.content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.cancel()
            with contextlib.suppress(Exception):
                await self.content.aclose()  # type: ignore[attr-defined]


SSE_HEADERS: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _rest(call: Call) -> list[Any]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def usage_of(last: Response) -> dict[str, int]:
    usage = last.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class Chunks:
    """Pre-rendered pieces of one stream's SSE events: only the text delta is serialised per token."""

    def __init__(self, kind: Literal["chat", "completion"], ident: str, created: int, model: str) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.head = f'data: {{"id":"{ident}","object":"{obj}","created":{created},"model":{json.dumps(model)},'
        if kind == "chat":
            self.role = self.head + (
                '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                '"logprobs":null,"finish_reason":null}]}\n\n'
            )
            self.before_text = self.head + '"choices":[{"index":0,"delta":{"content":'
        else:
            self.role = ""
            self.before_text = self.head + '"choices":[{"index":0,"text":'
        self.after_text = ',"logprobs":null,"finish_reason":null}]}\n\n'
        if kind == "chat":
            self.after_text = "}" + self.after_text

    def text(self, delta: str) -> str:
        return self.before_text + json.dumps(delta) + self.after_text

    def finish(self, delta: str, reason: str) -> str:
        if self.kind == "chat":
            content = f'{{"content":{json.dumps(delta)}}}' if delta else "{}"
            choice = f'{{"index":0,"delta":{content},"logprobs":null,"finish_reason":"{reason}"}}'
        else:
            choice = f'{{"index":0,"text":{json.dumps(delta)},"logprobs":null,"finish_reason":"{reason}"}}'
        return self.head + f'"choices":[{choice}]}}\n\n'

    def usage(self, last: Response) -> str:
        return self.head + f'"choices":[],"usage":{json.dumps(usage_of(last))}}}\n\n'


async def stream_events(call: Call, first: Response, chunks: Chunks, include_usage: bool) -> AsyncIterator[str]:
    if chunks.role:
        yield chunks.role
    response = first
    try:
        while True:
            if response.finish_reason:
                yield chunks.finish(response.delta, FINISH_REASONS.get(response.finish_reason, "stop"))
                if include_usage:
                    yield chunks.usage(response)
                break
            if response.delta:
                yield chunks.text(response.delta)
            nxt: Any = await call.read()
            if nxt is grpc.aio.EOF:
                # The replica always ends with a finish_reason; a stream cut short is said as an error.
                yield sse_error(OpenAIError(502, "the generation ended without a finish reason", code="incomplete"))
                break
            response = nxt
    except grpc.aio.AioRpcError as err:
        yield sse_error(err)
    yield "data: [DONE]\n\n"


async def _first(request: Request, call: Call) -> Any:
    first = await until_disconnected(request, call.read(), call)
    if first is grpc.aio.EOF:
        raise OpenAIError(502, "the generation ended before it began", code="incomplete")
    return first


async def _answer(
    request: Request, kind: Literal["chat", "completion"], body: SamplingBody, call: Call
) -> JSONResponse | CancellingStream:
    first = await _first(request, call)
    model = first.model.name or body.model
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id(request)}"
    created = int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(call, first, Chunks(kind, ident, created, model), include_usage)
        return CancellingStream(events, call, SSE_HEADERS)
    responses = [first, *(await until_disconnected(request, _rest(call), call))]
    last = responses[-1]
    text = "".join(r.delta for r in responses)
    reason = FINISH_REASONS.get(last.finish_reason, "stop")
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return JSONResponse(
        {
            "id": ident,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage_of(last),
        }
    )


def _model_ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatBody, request: Request, mesh: Annotated[Upstream, Depends(upstream)]
) -> JSONResponse | CancellingStream:
    body.check_extras()
    messages = chat_messages(body.messages)
    chat = llm_pb2.ChatRequest(
        meta=request_meta(request),
        model=_model_ref(body.model),
        messages=messages,
        sampling=body.sampling(body.max_completion_tokens or body.max_tokens),
    )
    call = mesh.llm.Chat(chat, metadata=call_metadata(request), timeout=call_timeout(request))
    return await _answer(request, "chat", body, call)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionBody, request: Request, mesh: Annotated[Upstream, Depends(upstream)]
) -> JSONResponse | CancellingStream:
    body.check_extras()
    generate = llm_pb2.GenerateRequest(
        meta=request_meta(request),
        model=_model_ref(body.model),
        prompt=prompt_of(body),
        sampling=body.sampling(body.max_tokens),
    )
    call = mesh.llm.Generate(generate, metadata=call_metadata(request), timeout=call_timeout(request))
    return await _answer(request, "completion", body, call)
