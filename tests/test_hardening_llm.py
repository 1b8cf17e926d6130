"""LlmService request checks (services/llm/sampling.py) on every sampling field, with boundary and non-finite values:
each bad value is INVALID_ARGUMENT naming the field and what is allowed, before any tokeniser or engine time is
spent. The same checks through the real engine and gateway are in tests/test_llm.py (NaN temperature, the bounded
tokeniser); these cover the whole table of fields fast, with no engine."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aimass.runtime.config import LlmConfig
from aimass.runtime.errors import InvalidArgument
from aimass.v1 import llm_pb2
from services.llm.protocol import Sampling
from services.llm.sampling import checked_sampling, request_sampling

CONFIG = LlmConfig()
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": NAN}, "sampling.temperature is nan; allowed a finite number in [0, 2]"),
        ({"temperature": INF}, "sampling.temperature is inf; allowed a finite number in [0, 2]"),
        ({"temperature": -0.01}, "sampling.temperature is -0.01; allowed a finite number in [0, 2]"),
        ({"temperature": 2.01}, "sampling.temperature is 2.01"),
        ({"top_p": NAN}, "sampling.top_p is nan; allowed a finite number in (0, 1]"),
        ({"top_p": 0.0}, "sampling.top_p is 0; allowed a finite number in (0, 1]"),
        ({"top_p": -INF}, "sampling.top_p is -inf"),
        ({"top_k": -1}, "sampling.top_k is -1; it must be >= 0"),
        ({"presence_penalty": NAN}, "sampling.presence_penalty is nan; allowed a finite number in [-2, 2]"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty is 2.5"),
        ({"frequency_penalty": -INF}, "sampling.frequency_penalty is -inf; allowed a finite number in [-2, 2]"),
        ({"seed": -1}, "sampling.seed is -1; it must be >= 0 (leave it unset for random sampling)"),
        ({"seed": -(2**63)}, "sampling.seed is -9223372036854775808"),
        ({"max_tokens": -5}, "sampling.max_tokens is -5; it must be >= 0"),
        ({"stop": ["a"] * 5}, "sampling.stop has 5 strings; the limit is 4"),
        ({"stop": [""]}, "sampling.stop[0] is 0 characters; allowed 1..64"),
        ({"stop": ["ok", "x" * 65]}, "sampling.stop[1] is 65 characters; allowed 1..64"),
    ],
)
def test_bad_sampling_fields_are_refused_with_what_is_allowed(fields: dict[str, Any], message: str) -> None:
    sampling = llm_pb2.SamplingParams(**fields)
    with pytest.raises(InvalidArgument) as raised:
        checked_sampling(sampling, CONFIG)
    assert message in raised.value.message
    # The full check (with the prompt's length) refuses it the same way.
    with pytest.raises(InvalidArgument) as raised:
        request_sampling(sampling, prompt_tokens=10, context_length=1024, config=CONFIG)
    assert message in raised.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0.0},
        {"temperature": 2.0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": 0},
        {"top_k": 2**31 - 1},  # past the vocabulary: vLLM reads it as no filter
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop": ["x" * 64] * 4},
    ],
)
def test_boundary_values_are_accepted(fields: dict[str, Any]) -> None:
    sampling = request_sampling(llm_pb2.SamplingParams(**fields), prompt_tokens=10, context_length=1024, config=CONFIG)
    explicit = sampling.explicit()
    for name, value in fields.items():
        assert explicit[name] == pytest.approx(value) if isinstance(value, float) else explicit[name] == value
    assert sampling.max_tokens == CONFIG.default_max_tokens


def test_sampling_is_checked_before_the_prompt_length() -> None:
    # A NaN is named even when the prompt alone would overflow the context: the cheap check comes first.
    with pytest.raises(InvalidArgument) as raised:
        request_sampling(
            llm_pb2.SamplingParams(temperature=NAN), prompt_tokens=5000, context_length=1024, config=CONFIG
        )
    assert "sampling.temperature is nan" in raised.value.message


def test_what_vllm_refuses_is_invalid_argument_not_internal() -> None:
    """The backstop behind the checks above: vLLM's own validation errors, raised by its real SamplingParams or
    wrapped in EngineGenerateError when a request is added, become INVALID_ARGUMENT (no engine needs to run)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineGenerateError

    from services.llm.engine import LlmEngine, _refusal

    engine = LlmEngine(LlmConfig())
    try:
        with pytest.raises(InvalidArgument) as raised:
            engine.vllm_sampling(Sampling(max_tokens=16, temperature=NAN))
        assert raised.value.reason == "ENGINE_REFUSED"
        assert "the engine refused the sampling parameters" in raised.value.message
        assert "temperature" in raised.value.message
    finally:
        engine.shutdown()
    cause = ValueError("prompt is longer than the maximum model length")
    try:
        raise EngineGenerateError() from cause
    except EngineGenerateError as wrapped:
        assert _refusal(wrapped) is cause
    assert isinstance(_refusal(VLLMValidationError("bad")), VLLMValidationError)
    assert _refusal(RuntimeError("engine core died")) is None  # a real failure stays INTERNAL
