"""The simulator's LLM replica (simulator/llm.py) against the real engine's measurements, its scheduler (chunked
prefill, KV blocks, preemption, priorities), the shared trace's reader (simulator/trace.py) and the LLM scenarios
through the real routers and placement."""

from __future__ import annotations

import dataclasses
import functools
import statistics
from pathlib import Path

import pytest

from scheduler.devices import GIB, SimulatedFleet, SimulatedGpu
from simulator import trace
from simulator.calibration import Calibration
from simulator.engine import EventLoop
from simulator.fleet import BatchingSpec, SimReplica
from simulator.llm import LLM_SERVICE, LlmProfile, StandaloneLlm, StepCosts, closed_loop, ttft_tpot
from simulator.mesh import simulate
from simulator.report import llm_table
from simulator.scenarios import LLM_MODEL, make_scenario
from simulator.workload import Outcome, Request, build_trace, fresh_copy

TOLERANCE = 0.15


def measured() -> LlmProfile:
    profile = Calibration.load().measured(LLM_MODEL)
    assert isinstance(profile, LlmProfile)
    return profile


def reproduce(profile: LlmProfile, clients: int) -> tuple[float, float]:
    """Median TTFT and output tokens/s of simulated closed-loop clients of the calibration's reference shape."""
    ref = profile.reference
    requests, wall = closed_loop(
        profile, clients, int(ref["requests_per_client"]), int(ref["prompt_tokens"]), int(ref["output_tokens"])
    )
    assert len(requests) == clients * int(ref["requests_per_client"])
    ttft, _ = ttft_tpot(requests)
    return statistics.median(ttft), sum(r.tokens_out for r in requests) / wall


@pytest.mark.parametrize("clients", [1, 8])
def test_the_model_reproduces_the_real_engine_ttft_and_tokens_per_second(clients: int) -> None:
    profile = measured()
    real = profile.reference[f"c{clients}"]
    ttft, tokens_per_s = reproduce(profile, clients)
    assert ttft == pytest.approx(real["ttft_s"], rel=TOLERANCE), f"TTFT {ttft:.3f} s vs real {real['ttft_s']:.3f} s"
    assert tokens_per_s == pytest.approx(real["tokens_per_s"], rel=TOLERANCE), (
        f"{tokens_per_s:.1f} tok/s vs real {real['tokens_per_s']:.1f} tok/s"
    )


def test_a_model_without_continuous_batching_misses_the_real_c8_figures() -> None:
    # The comparison above can fail: one sequence at a time (no continuous batching) is far off the real engine.
    profile = dataclasses.replace(measured(), max_num_seqs=1)
    real = profile.reference["c8"]
    ttft, tokens_per_s = reproduce(profile, 8)
    assert tokens_per_s < real["tokens_per_s"] * (1 - TOLERANCE)
    assert ttft > real["ttft_s"] * (1 + TOLERANCE)


def tiny(*, kv_tokens: int = 4096, budget: int = 2048, max_num_seqs: int = 128) -> LlmProfile:
    # 10 ms + 1 ms per prefill token; decode 20 ms alone, 30 ms for 8; 16-token blocks of 1 byte per token.
    costs = StepCosts(((1, 0.011), (1000, 1.010)), ((1, 0.020), (8, 0.030)))
    return LlmProfile(
        "tiny",
        LLM_SERVICE,
        ((1, 1.0),),
        1.0,
        1000 + kv_tokens,
        True,
        "test",
        costs=costs,
        weights_bytes=1000,
        kv_bytes_per_token=1,
        kv_cache_bytes=kv_tokens,
        block_size=16,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
    )


def llm_request(i: int, at: float, prompt: int, output: int, *, priority: int = 0) -> Request:
    return Request(i, "t", "tiny", at, 60.0, 60.0, prompt_tokens=prompt, output_tokens=output, priority=priority)


def submit(runner: StandaloneLlm, request: Request) -> None:
    runner.submit(request)


def run(profile: LlmProfile, requests: list[Request], speed: float = 1.0) -> StandaloneLlm:
    loop = EventLoop()
    runner = StandaloneLlm(profile, loop, speed=speed)
    for request in requests:
        loop.at(request.arrival, functools.partial(submit, runner, request))
    loop.run()
    return runner


def test_step_costs_combine_prefill_and_decode_sharing_the_fixed_part() -> None:
    costs = tiny().costs
    assert costs.seconds(1000, 0) == pytest.approx(1.010)
    assert costs.seconds(0, 8) == pytest.approx(0.030)
    # The prefill line's intercept (10 ms) is paid once in a mixed step.
    assert costs.shared_seconds == pytest.approx(0.010)
    assert costs.seconds(100, 8) == pytest.approx(0.110 + 0.030 - 0.010)
    with pytest.raises(ValueError, match="empty"):
        costs.seconds(0, 0)


def test_prefilling_several_sequences_counts_attention_per_sequence() -> None:
    # Measured: 10 ms + 1 ms per token + 1 us per token squared (attention over the sequence itself).
    costs = StepCosts(tuple((n, 0.010 + 0.001 * n + 1e-6 * n * n) for n in (100, 200, 400, 800)), ((1, 0.020),))
    assert costs.attention == pytest.approx(1e-6)
    # One sequence of 400 as measured; two of 200 in one step: 400 tokens, but 2 x 200^2 of attention, not 400^2.
    assert costs.prefill_seconds([(0, 400)]) == pytest.approx(0.570)
    assert costs.prefill_seconds([(0, 200), (0, 200)]) == pytest.approx(0.570 - 0.08)
    # A second chunk of 200 after 200 computed attends to 400 tokens: 400^2 - 200^2.
    assert costs.prefill_seconds([(200, 200)]) == pytest.approx(0.210 + 0.120)
    assert costs.seconds(400, 0, [(0, 200), (0, 200)]) == pytest.approx(0.490)
    with pytest.raises(ValueError, match="chunks of 400 tokens for 300"):
        costs.seconds(300, 0, [(0, 200), (0, 200)])


def test_a_long_prompt_is_prefilled_in_chunks_of_the_step_budget_and_speed_scales_time() -> None:
    request = llm_request(0, 0.0, 2500, 3)
    runner = run(tiny(budget=1000), [request])
    # Chunks of 1000, 1000, 500 (1.010 + 1.010 + 0.510 s), then two decode steps of 20 ms.
    assert request.outcome is Outcome.OK
    assert request.ttft == pytest.approx(2.530)
    assert request.finished == pytest.approx(2.570)
    assert request.tpot == pytest.approx(0.020)
    assert runner.engine.steps == 5
    fast = llm_request(0, 0.0, 2500, 3)
    run(tiny(budget=1000), [fast], speed=2.0)
    assert fast.finished == pytest.approx(2.570 / 2)


def test_requests_share_steps_continuous_batching() -> None:
    # An idle engine starts at once with the first request; the seven sent a moment later are prefilled together in
    # the next step, beside the first one's decode (a mixed step: 0.710 + 0.020 - 0.010 s).
    requests = [llm_request(i, 0.0, 100, 10) for i in range(8)]
    run(tiny(), requests)
    first, rest = requests[0], requests[1:]
    assert first.ttft == pytest.approx(0.110)
    for r in rest:
        assert r.ttft == pytest.approx(0.110 + 0.720)
        # Then decode steps of all 8 (30 ms) until the first ends, the others' last one of 7 (~28.6 ms).
        assert r.finished == pytest.approx(0.830 + 8 * 0.030 + (0.020 + 0.030 * 6) / 7)
    assert first.finished == pytest.approx(0.830 + 8 * 0.030)
    # A latecomer joins the running batch: its prefill rides in a mixed step with the decodes.
    early, late = llm_request(0, 0.0, 100, 20), llm_request(1, 0.2, 50, 5)
    run(tiny(), [early, late])
    assert late.ttft is not None and late.ttft < 0.2
    assert early.tpot is not None and early.tpot > 0.020


def test_kv_exhaustion_preempts_the_newest_and_it_still_finishes() -> None:
    # 4 blocks of 16 tokens: two requests of 20 prompt + 30 output tokens (4 blocks each at the end) cannot both
    # keep growing; the newer is preempted (blocks freed, recomputed later) and still completes.
    first, second = llm_request(0, 0.0, 20, 30), llm_request(1, 0.001, 20, 30)
    runner = run(tiny(kv_tokens=64), [first, second])
    assert runner.engine.preemptions >= 1
    assert second.preemptions >= 1 and first.preemptions == 0
    for r in (first, second):
        assert r.outcome is Outcome.OK
        assert r.tokens_out == 30
    assert first.finished is not None and second.finished is not None and first.finished < second.finished
    assert runner.engine.free_blocks == 4 and not runner.engine.has_work
    # A request longer than the whole cache is refused at once rather than queued forever.
    too_long = llm_request(2, 0.0, 60, 10)
    assert not StandaloneLlm(tiny(kv_tokens=64), EventLoop()).submit(too_long)
    assert too_long.outcome is Outcome.REJECTED


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    running = llm_request(0, 0.0, 10, 5)
    low = llm_request(1, 0.001, 10, 5, priority=1)
    high = llm_request(2, 0.002, 10, 5, priority=0)
    run(tiny(max_num_seqs=1), [running, low, high])
    assert running.finished is not None and high.finished is not None and low.finished is not None
    assert running.finished < high.finished < low.finished


def test_an_llm_replica_reports_memory_and_utilisation_not_speed() -> None:
    loop = EventLoop()
    node = SimulatedFleet("n", [SimulatedGpu("T4", 16 * GIB, 1.0)])
    answered: list[Request] = []
    profile = tiny()
    replica = SimReplica("r", node, loop, answered.append, {"tiny": BatchingSpec()})
    replica.add_model(profile, BatchingSpec(max_batch_size=128, queue_capacity=256), pid=1, loaded=True)
    assert replica.submit(llm_request(0, 0.0, 100, 10))
    readings: list[float] = []
    loop.every(0.5, lambda: readings.append(replica.utilization_since_last()), start=0.5, until=1.6)
    mid_run: list[tuple[float, int, int, float]] = []

    def report() -> None:
        load = replica.model_loads()[0][0]
        mid_run.append((load.kv_cache_usage, load.running_requests, load.waiting_requests, load.tokens_per_second))

    loop.at(0.2, report)
    loop.run()
    # At 0.2 s: decoding (110 tokens in 7 of the 256 blocks of 16), 5 tokens out so far (0.110, then every 20 ms).
    assert mid_run == [pytest.approx((7 / 256, 1, 0, 5 / 0.2))]
    # Busy 0.110 + 9 * 0.020 = 0.290 s of the first half second, idle after.
    assert readings == pytest.approx([0.58, 0.0, 0.0])
    assert [r.outcome for r in answered] == [Outcome.OK]
    device = node.read()[0]
    # Weights and the KV cache it reserves, as NVML sees the process's memory.
    assert device.info.memory_used_bytes == profile.weights_bytes + profile.kv_cache_bytes
    loads, _ = replica.model_loads()
    assert loads[0].memory_bytes == profile.footprint_bytes


# -- the trace --------------------------------------------------------------------------------------------------


def test_the_trace_reader_reads_the_shared_trace() -> None:
    rows = trace.read_rows()
    assert len(rows) == 19366
    assert (rows[0].offset_s, rows[0].prompt_tokens, rows[0].output_tokens) == (0.0, 374, 44)
    # 2023-11-16 18:15:50.9951690 - 18:15:46.6805900
    assert rows[1].offset_s == pytest.approx(4.314579, abs=1e-6)
    assert (rows[1].prompt_tokens, rows[1].output_tokens) == (396, 109)
    assert 3000 < rows[-1].offset_s < 3700
    window = trace.Window(start_s=600.0, duration_s=60.0, time_scale=2.0, token_scale=8.0)
    replayed = trace.window_rows(rows, window)
    inside = [r for r in rows if 600.0 <= r.offset_s < 660.0]
    assert len(replayed) == len(inside) > 100
    assert all(0.0 <= r.arrival < 30.0 for r in replayed)
    assert replayed[0].arrival == pytest.approx((inside[0].offset_s - 600.0) / 2)
    assert replayed[0].prompt_tokens == max(4, round(inside[0].prompt_tokens / 8))
    split = trace.split_by_tenant(rows, window, ("a", "b", "c"))
    assert sum(len(v) for v in split.values()) == len(replayed)
    # The rule spreads requests evenly and does not depend on the window.
    assert all(len(v) > len(replayed) / 6 for v in split.values())
    assert trace.tenant_of(inside[0].index, ("a", "b", "c")) == trace.tenant_of(inside[0].index, ("a", "b", "c"))


def test_a_malformed_trace_or_window_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duration_s, time_scale, token_scale > 0"):
        trace.Window(duration_s=0)
    with pytest.raises(ValueError, match="time_scale -1"):
        trace.Window(time_scale=-1)
    rows = trace.read_rows()
    with pytest.raises(ValueError, match="after the trace's last arrival"):
        trace.window_rows(rows, trace.Window(start_s=10_000))
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16,x,1")
    with pytest.raises(ValueError, match=r"line 3: .* is not TIMESTAMP,ContextTokens,GeneratedTokens"):
        trace.read_rows(bad)
    bad.write_text("time,prompt,output\n")
    with pytest.raises(ValueError, match="header 'time,prompt,output'"):
        trace.read_rows(bad)
    with pytest.raises(ValueError, match="No such file"):
        trace.read_rows(tmp_path / "missing.csv")


# -- scenarios through the mesh ---------------------------------------------------------------------------------


def test_the_trace_scenario_replays_the_window_with_tenants_priorities_and_slos() -> None:
    calibration = Calibration.load()
    scenario = make_scenario("llm_trace", calibration, 20.0)
    requests = build_trace(scenario.tenants, scenario.duration_s, seed=1)
    rows = trace.read_rows()
    # 20 s of replay at time x3: 60 s of the trace from 600 s on.
    assert len(requests) == sum(1 for r in rows if 600.0 <= r.offset_s < 660.0)
    assert {r.tenant for r in requests} == {"chat-a", "chat-b", "batch"}
    assert all(r.priority == (1 if r.tenant == "batch" else 0) for r in requests)
    assert all(r.slo_ttft_s > 0 and r.slo_tpot_s > 0 and r.output_tokens > 0 for r in requests)
    result = simulate(scenario, "ours", fresh_copy(requests), seed=1)
    answered = [r for r in result.requests if r.outcome is Outcome.OK]
    assert len(answered) > 0.9 * len(requests)
    assert all(r.tokens_out == r.output_tokens and r.ttft is not None and r.ttft > 0 for r in answered)
    assert "TTFT p50 / p99 ms" in llm_table([result])
    with pytest.raises(ValueError, match="replays a trace"):
        make_scenario("llm_trace", calibration, 20.0, load=2.0)


def test_the_mixed_scenario_shares_gpus_between_the_llm_and_batched_models() -> None:
    scenario = make_scenario("llm_mixed", Calibration.load(), 8.0)
    requests = build_trace(scenario.tenants, scenario.duration_s, seed=3)
    result = simulate(scenario, "p2c", fresh_copy(requests), seed=3)
    by_model: dict[str, list[Request]] = {}
    for r in result.requests:
        by_model.setdefault(r.model, []).append(r)
    assert set(by_model) == {LLM_MODEL, "all-MiniLM-L6-v2", "efficientnet-lite0"}
    for model, own in by_model.items():
        assert sum(r.outcome is Outcome.OK for r in own) > 0.9 * len(own), model
    # Replicas hold the LLM next to the others, and their GPUs were busy with both.
    shared = [s for s in result.replicas if LLM_MODEL in s.models and len(s.models) > 1]
    assert shared and all(s.busy_s > 0 for s in shared)
    assert all(r.tokens_out == r.output_tokens for r in by_model[LLM_MODEL] if r.outcome is Outcome.OK)


def test_a_cancelled_llm_request_leaves_the_batch_and_frees_its_blocks() -> None:
    loop = EventLoop()
    node = SimulatedFleet("n", [SimulatedGpu("T4", 16 * GIB, 1.0)])
    answered: list[Request] = []
    replica = SimReplica("r", node, loop, answered.append, {"tiny": BatchingSpec()})
    slot = replica.add_model(tiny(), BatchingSpec(max_batch_size=128, queue_capacity=256), pid=1, loaded=True)
    kept, dropped = llm_request(0, 0.0, 100, 50), llm_request(1, 0.0, 100, 50)
    assert replica.submit(kept) and replica.submit(dropped)
    engine = slot.engine
    assert engine is not None

    def give_up() -> None:
        # As the mesh does at a deadline: the outcome first, then the replica is told.
        dropped.outcome, dropped.finished = Outcome.TIMED_OUT, loop.now
        replica.cancel(dropped)

    loop.at(0.5, give_up)
    loop.run(until=0.499)
    # Both decoding, about 115 tokens each: 8 blocks of 16 apiece.
    assert slot.running == 2
    used = engine.blocks_used
    loop.run()
    assert used == 16 and engine.blocks_used == 0 and not engine.has_work
    assert answered == [kept] and kept.tokens_out == 50
    assert dropped.outcome is Outcome.TIMED_OUT and dropped.tokens_out < 50


def test_a_derived_llm_scales_steps_weights_and_kv_and_says_so() -> None:
    base = measured()
    big = base.derive_llm(
        "bigger", compute=4.0, weights=3.0, kv_per_token=2.0, kv_cache_bytes=8 * GIB, reason="test ratios"
    )
    assert not big.measured and big.provenance.startswith(f"derived from {base.name}: compute x4")
    assert big.step_seconds(128, 0) == pytest.approx(4 * base.step_seconds(128, 0))
    assert big.step_seconds(0, 8, speed=2.0) == pytest.approx(2 * base.step_seconds(0, 8))
    assert big.footprint_bytes == 3 * base.weights_bytes + 8 * GIB
    assert big.kv_tokens == 8 * GIB // (2 * base.kv_bytes_per_token * base.block_size) * base.block_size
    with pytest.raises(ValueError, match="ratios must be > 0"):
        base.derive_llm("x", compute=0, weights=1, kv_per_token=1, kv_cache_bytes=GIB, reason="")
