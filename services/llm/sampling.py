"""Request checks for LlmService: chat messages, sampling ranges and the context budget, each refused with
INVALID_ARGUMENT naming the field and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from aimass.runtime.config import LlmConfig
from aimass.runtime.errors import InvalidArgument
from aimass.v1 import llm_pb2
from services.llm.protocol import Sampling

ROLE_NAMES = {
    llm_pb2.CHAT_ROLE_SYSTEM: "system",
    llm_pb2.CHAT_ROLE_USER: "user",
    llm_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}


def chat_messages(messages: Sequence[llm_pb2.ChatMessage], config: LlmConfig) -> list[dict[str, str]]:
    """The messages in the form chat templates take, after checking roles, order and size."""
    if not messages:
        raise InvalidArgument("messages is empty; send at least one user message", reason="EMPTY_MESSAGES")
    if len(messages) > config.max_messages:
        raise InvalidArgument(
            f"messages has {len(messages)} entries; the limit is {config.max_messages}",
            reason="TOO_MANY_MESSAGES",
            metadata={"limit": str(config.max_messages)},
        )
    rendered: list[dict[str, str]] = []
    total_chars = 0
    for i, message in enumerate(messages):
        role = ROLE_NAMES.get(message.role)
        if role is None:
            what = "unset" if message.role == llm_pb2.CHAT_ROLE_UNSPECIFIED else f"{message.role}, not a ChatRole"
            raise InvalidArgument(
                f"messages[{i}].role is {what}; use CHAT_ROLE_SYSTEM, CHAT_ROLE_USER or CHAT_ROLE_ASSISTANT",
                reason="BAD_ROLE",
            )
        if role == "system" and i > 0:
            raise InvalidArgument(
                f"messages[{i}] is a system message; only the first message may be", reason="BAD_ROLE"
            )
        total_chars += len(message.content)
        rendered.append({"role": role, "content": message.content})
    check_prompt_chars(total_chars, "messages", config)
    return rendered


def check_prompt_chars(chars: int, field: str, config: LlmConfig) -> None:
    # Checked before tokenising, so an enormous prompt costs no tokeniser time.
    if chars > config.max_prompt_chars:
        raise InvalidArgument(
            f"{field} is {chars} characters; the limit is {config.max_prompt_chars}",
            reason="PROMPT_TOO_LONG",
            metadata={"limit": str(config.max_prompt_chars)},
        )


def _check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    # NaN compares false with everything, so it must be refused on its own (vLLM would fail it as INTERNAL).
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidArgument(
            f"sampling.{field} is {value:g}; allowed a finite number in {bracket}{low:g}, {high:g}]",
            reason="SAMPLING_OUT_OF_RANGE",
            metadata={"field": f"sampling.{field}"},
        )


def request_sampling(
    sampling: llm_pb2.SamplingParams, *, prompt_tokens: int, context_length: int, config: LlmConfig
) -> Sampling:
    """The request's sampling, checked against its prompt's length (unset fields keep the model's defaults)."""
    fields = checked_sampling(sampling, config)
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens; the model's context is {context_length} tokens "
            "(prompt and completion together)",
            reason="CONTEXT_LENGTH_EXCEEDED",
            metadata={"prompt_tokens": str(prompt_tokens), "context_length": str(context_length)},
        )
    room = context_length - prompt_tokens
    if sampling.max_tokens > room:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens and sampling.max_tokens is {sampling.max_tokens}; together "
            f"they exceed the model's context of {context_length} tokens (at most {room} more tokens fit)",
            reason="CONTEXT_LENGTH_EXCEEDED",
            metadata={"prompt_tokens": str(prompt_tokens), "context_length": str(context_length)},
        )
    return Sampling(max_tokens=sampling.max_tokens or min(config.default_max_tokens, room), **fields)


def checked_sampling(sampling: llm_pb2.SamplingParams, config: LlmConfig) -> dict[str, Any]:
    """Every sampling field the request set, checked (NaN, infinities, ranges, stop strings) without the prompt:
    the servicer calls it before tokenising, so a bad request costs no tokeniser or engine time."""
    if sampling.max_tokens < 0:
        raise InvalidArgument(f"sampling.max_tokens is {sampling.max_tokens}; it must be >= 0", reason="BAD_MAX_TOKENS")
    kwargs: dict[str, Any] = {}
    if sampling.HasField("temperature"):
        _check_range("temperature", sampling.temperature, 0, 2)
        kwargs["temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        _check_range("top_p", sampling.top_p, 0, 1, low_open=True)
        kwargs["top_p"] = sampling.top_p
    if sampling.HasField("top_k"):
        if sampling.top_k < 0:
            raise InvalidArgument(
                f"sampling.top_k is {sampling.top_k}; it must be >= 0", reason="SAMPLING_OUT_OF_RANGE"
            )
        kwargs["top_k"] = sampling.top_k
    for field in ("presence_penalty", "frequency_penalty"):
        if sampling.HasField(field):
            value = getattr(sampling, field)
            _check_range(field, value, -2, 2)
            kwargs[field] = value
    if sampling.HasField("seed"):
        # vLLM reads -1 as "no seed" (random), which would break the promise of reproducible sampling.
        if sampling.seed < 0:
            raise InvalidArgument(
                f"sampling.seed is {sampling.seed}; it must be >= 0 (leave it unset for random sampling)",
                reason="SAMPLING_OUT_OF_RANGE",
                metadata={"field": "sampling.seed"},
            )
        kwargs["seed"] = sampling.seed
    if sampling.stop:
        if len(sampling.stop) > config.max_stop_sequences:
            raise InvalidArgument(
                f"sampling.stop has {len(sampling.stop)} strings; the limit is {config.max_stop_sequences}",
                reason="TOO_MANY_STOP_SEQUENCES",
            )
        for i, stop in enumerate(sampling.stop):
            if not stop or len(stop) > config.max_stop_chars:
                raise InvalidArgument(
                    f"sampling.stop[{i}] is {len(stop)} characters; allowed 1..{config.max_stop_chars}",
                    reason="BAD_STOP_SEQUENCE",
                )
        kwargs["stop"] = tuple(sampling.stop)
    return kwargs
