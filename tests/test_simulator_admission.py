"""SLO-aware admission in the simulator (simulator/admission.py): refusing early keeps goodput past saturation,
priorities and weights decide who is refused, and with admission off the same overload goes late instead."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from benchmarks import router_loads
from simulator.admission import BatchedAdmission, LlmAdmission
from simulator.calibration import DEFAULT_PATH, Calibration
from simulator.llm import LlmEngineModel
from simulator.mesh import RunResult, simulate
from simulator.scenario import Scenario
from simulator.scenarios import LLM_GPUS, LLM_MODEL, _llm, llm_spec
from simulator.workload import Outcome, Request, RequestClass, Tenant, TokenShape, build_trace, fresh_copy

DURATION_S = 5.0


@functools.cache
def calibration() -> Calibration:
    return Calibration.load(DEFAULT_PATH)


def run(scenario: Scenario, *, admission: bool, seed: int = 1) -> RunResult:
    trace = build_trace(scenario.tenants, scenario.duration_s, seed, gateways=scenario.gateways)
    return simulate(dataclasses.replace(scenario, admission=admission), "ours", fresh_copy(trace), seed=seed)


def goodput(result: RunResult) -> float:
    return sum(r.met_slo for r in result.requests) / result.duration_s


def count(result: RunResult, outcome: Outcome) -> int:
    return sum(r.outcome is outcome for r in result.requests)


def test_admission_refuses_early_and_keeps_goodput_at_twice_the_load() -> None:
    at_1 = router_loads.weighted(calibration(), DURATION_S)
    at_2 = at_1.scaled(2.0)
    on_1, on_2 = run(at_1, admission=True), run(at_2, admission=True)
    off_1, off_2 = run(at_1, admission=False), run(at_2, admission=False)
    # Refused at once, answered with a retry delay: not late, not timed out.
    assert count(on_2, Outcome.REFUSED) > 0.2 * len(on_2.requests)
    assert count(on_2, Outcome.TIMED_OUT) == 0
    refused = [r for r in on_2.requests if r.outcome is Outcome.REFUSED]
    assert all(r.finished == r.arrival and r.extra["retry_after_s"] > 0 for r in refused)
    assert goodput(on_2) >= 0.9 * goodput(on_1), (goodput(on_2), goodput(on_1))
    # Without admission the same overload collapses: the queue holds work that can only go late.
    assert count(off_2, Outcome.REFUSED) == 0
    assert goodput(off_2) < 0.6 * goodput(off_1), (goodput(off_2), goodput(off_1))
    assert goodput(on_2) > 1.5 * goodput(off_2)


def test_weights_decide_who_is_refused_under_overload() -> None:
    result = run(router_loads.weighted(calibration(), DURATION_S).scaled(2.0), admission=True)
    refused = {
        t: sum(r.tenant == t and r.outcome is Outcome.REFUSED for r in result.requests) for t in ("gold", "bronze")
    }
    share = result.tenant_busy_s["gold"] / sum(result.tenant_busy_s.values())
    # Equal offered rates; gold (weight 2) is refused less and served more than bronze (weight 1).
    assert refused["gold"] < refused["bronze"], refused
    # Within 10% of the weights (2/3) under this overload.
    assert abs(share / (2 / 3) - 1) <= 0.1, share


def llm_two_priorities(rate: float) -> Scenario:
    """Only the LLM, on the llm_mixed fleet: two tenants with the same SLO, priority 0 and 1, equal rates (40/s
    each overloads it: without admission most requests miss their TTFT)."""
    llm = _llm(calibration())
    shape = TokenShape(128, 32)
    tenants = tuple(
        Tenant(
            name,
            rate=rate,
            request_class=RequestClass(name, 120.0, 120.0, slo_ttft_s=2.0, slo_tpot_s=0.5, priority=priority),
            models=(LLM_MODEL,),
            tokens=shape,
        )
        for name, priority in (("urgent", 0), ("bulk", 1))
    )
    return Scenario("llm_priorities", "", LLM_GPUS, (llm_spec(llm, copies=4),), tenants, DURATION_S)


def test_high_priority_keeps_its_slo_while_low_priority_is_refused() -> None:
    scenario = llm_two_priorities(40.0)
    result, off = run(scenario, admission=True), run(scenario, admission=False)

    def of(tenant: str) -> list[Request]:
        return [r for r in result.requests if r.tenant == tenant]

    urgent, bulk = of("urgent"), of("bulk")
    urgent_met = sum(r.met_slo for r in urgent) / len(urgent)
    urgent_met_off = sum(r.met_slo for r in off.requests if r.tenant == "urgent") / len(urgent)
    assert urgent_met >= 0.8 and urgent_met > urgent_met_off + 0.15, (urgent_met, urgent_met_off)
    bulk_refused = sum(r.outcome is Outcome.REFUSED for r in bulk)
    urgent_refused = sum(r.outcome is Outcome.REFUSED for r in urgent)
    assert bulk_refused > 0.4 * len(bulk) and bulk_refused > 2.5 * urgent_refused, (bulk_refused, urgent_refused)


def test_without_admission_the_same_overload_goes_late() -> None:
    scenario = llm_two_priorities(40.0)
    off, on = run(scenario, admission=False), run(scenario, admission=True)
    assert count(off, Outcome.REFUSED) == 0
    late = sum(r.outcome is not Outcome.REFUSED and not r.met_slo for r in off.requests)
    late_on = sum(r.outcome is not Outcome.REFUSED and not r.met_slo for r in on.requests)
    assert late > 0.3 * len(off.requests), late
    assert late_on < late / 3, (late_on, late)
    assert goodput(on) > goodput(off)


def test_admission_off_leaves_a_run_as_it_was() -> None:
    scenario = router_loads.weighted(calibration(), DURATION_S)
    trace = build_trace(scenario.tenants, scenario.duration_s, 3)
    default = simulate(scenario, "p2c", fresh_copy(trace), seed=3)
    off = simulate(dataclasses.replace(scenario, admission=False), "p2c", fresh_copy(trace), seed=3)
    assert [(r.outcome, r.finished, r.replica) for r in default.requests] == [
        (r.outcome, r.finished, r.replica) for r in off.requests
    ]


def request(i: int, tenant: str = "t", *, arrival: float = 0.0, prompt: int = 0, priority: int = 0) -> Request:
    r = Request(i, tenant, "m", arrival, slo_s=0.1, deadline_s=1.0, priority=priority)
    if prompt:
        r.prompt_tokens, r.output_tokens, r.slo_ttft_s, r.slo_tpot_s = prompt, 8, 0.05, 1.0
    return r


def test_batched_admission_learns_first_and_never_refuses_an_empty_queue() -> None:
    admission = BatchedAdmission({"t": 1.0}, max_batch_size=8)
    # Before it has seen MIN_BATCHES batches nothing is refused, however long the queue.
    for i in range(100):
        assert admission.check(request(i), 0.0, None) is None
    for _ in range(3):
        admission.observe(8, 0.08)
    assert admission.check(request(100), 0.0, None) is not None
    admission.queued.clear()
    assert admission.check(request(101), 0.0, None) is None


def test_batched_admission_counts_other_tenants_by_weight() -> None:
    admission = BatchedAdmission({"gold": 2.0, "bronze": 1.0})
    admission.queued.update({"gold": 10, "bronze": 10})
    # gold: its own 10, and bronze's share while gold's 11 run: ceil(11 / 2) = 6.
    assert admission.units_ahead("gold") == 16
    # bronze: its own 10, and all of gold's 10 (weight 2 takes up to 22 meanwhile).
    assert admission.units_ahead("bronze") == 20


def test_llm_admission_estimates_ttft_from_prefill_ahead_by_priority() -> None:
    llm = _llm(calibration())
    engine = LlmEngineModel(llm, speed=1.0)
    admission = LlmAdmission()
    first = request(0, prompt=1024, priority=1)
    assert admission.ttft_estimate(engine, first) is None
    assert admission.check(engine, first, 0.0) is None
    assert engine.add(first)
    for i in range(1, 9):
        assert engine.add(request(i, arrival=0.0, prompt=1024, priority=1))
    low = request(9, arrival=0.001, prompt=1024, priority=1)
    high = request(10, arrival=0.001, prompt=1024, priority=0)
    low_ttft, high_ttft = admission.ttft_estimate(engine, low), admission.ttft_estimate(engine, high)
    assert low_ttft is not None and high_ttft is None  # nothing of its priority or above is ahead
    assert low_ttft > llm.step_seconds(1024, 0)
    assert admission.check(engine, low, 0.001) is not None
    assert admission.refused == 1


@pytest.mark.parametrize(
    "argv",
    [["--seeds", "0"], ["--seeds", "6"], ["--duration", "0"], ["--duration", "61"], ["--scenarios", "skewed,nope"]],
)
def test_benchmark_cli_bounds(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        router_loads.parse_args(argv)
    assert raised.value.code == 2


def test_benchmark_cli_defaults_are_bounded() -> None:
    args = router_loads.parse_args([])
    assert args.seeds == 3 and args.duration == router_loads.DEFAULT_DURATION_S
    assert args.scenarios == router_loads.SCENARIOS
