"""The trace replay benchmark's parts (benchmarks/trace_replay.py): the public trace read as recorded, prompts of
exact token counts under the real tokenizer, and SLO accounting that a failed request cannot flatter."""

from __future__ import annotations

import math

import pytest

from aimass.runtime.config import LlmConfig
from benchmarks.trace_replay import Figures, Outcome, PromptMaker, load_trace, variant_env
from services.llm.weights import PACKAGED_MODELS, ensure_converted
from simulator.trace import TRACE


def test_the_trace_is_read_as_recorded_and_scaled() -> None:
    one = load_trace(TRACE, duration_s=60, rate=1.0, token_scale=1.0)
    # The first row of the public file: 2023-11-16 18:15:46.68, 374 prompt tokens, 44 generated.
    assert (one[0].arrival_s, one[0].prompt_tokens, one[0].output_tokens) == (0.0, 374, 44)
    assert [r.arrival_s for r in one] == sorted(r.arrival_s for r in one)
    assert one[-1].arrival_s < 60 and len(one) == 191
    # Twice the rate: the same 60 s carry the first 120 s of the trace, at half the spacing.
    two = load_trace(TRACE, duration_s=60, rate=2.0, token_scale=1.0)
    assert len(two) > len(one)
    assert two[1].arrival_s == pytest.approx(one[1].arrival_s / 2)
    scaled = load_trace(TRACE, duration_s=60, rate=1.0, token_scale=8.0)
    assert scaled[0].prompt_tokens == round(374 / 8) and scaled[0].output_tokens == round(44 / 8)
    assert min(r.output_tokens for r in scaled) >= 1


def test_prompts_have_the_exact_token_count_and_differ() -> None:
    config = LlmConfig()
    maker = PromptMaker(ensure_converted(PACKAGED_MODELS[config.model], config.cache_dir))
    texts = [maker.make(index, tokens) for index, tokens in enumerate((12, 47, 300, 1200))]
    for text, tokens in zip(texts, (12, 47, 300, 1200), strict=True):
        assert len(maker.tokenizer.encode(text)) == tokens
    assert len(set(texts)) == len(texts)


def test_slo_accounting() -> None:
    fast = Outcome(sent_s=0.0, ttft_s=0.2, finished_s=2.2, tokens=11)  # TPOT 0.2 s: just met
    slow_start = Outcome(sent_s=0.0, ttft_s=1.5, finished_s=2.0, tokens=5)
    slow_decode = Outcome(sent_s=0.0, ttft_s=0.5, finished_s=10.0, tokens=11)
    failed = Outcome(sent_s=0.0, error="RESOURCE_EXHAUSTED")
    figures = Figures.of([fast, slow_start, slow_decode, failed], wall_s=10.0, slo_ttft_s=1.0, slo_tpot_s=0.2)
    assert figures.requests == 4 and figures.failed == 1
    assert figures.attainment == pytest.approx(0.25)
    assert figures.goodput_rps == pytest.approx(0.1)
    # The failed request counts as never answered: the p99 TTFT cannot look better by refusing work.
    assert math.isinf(figures.ttft_p99_s)
    assert figures.tokens_per_s == pytest.approx((11 + 5 + 11) / 10.0)


def test_variants_name_their_settings() -> None:
    assert variant_env("seqs16:AIMASS_LLM__MAX_NUM_SEQS=16,AIMASS_LLM__MAX_WAITING=64") == (
        "seqs16",
        {"AIMASS_LLM__MAX_NUM_SEQS": "16", "AIMASS_LLM__MAX_WAITING": "64"},
    )
    for bad in ("noequals", "vllm:A=1", ":A=1"):
        with pytest.raises(Exception, match="expected NAME:KEY=VALUE"):
            variant_env(bad)
