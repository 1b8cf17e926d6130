"""The simulator: its clock, its traces, its fleet under the real routers and placement table, and its report."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from scheduler.devices import GIB, SimulatedFleet, SimulatedGpu
from simulator.calibration import Calibration, ModelProfile
from simulator.engine import EventLoop
from simulator.fleet import BatchingSpec, SimReplica
from simulator.mesh import RunResult, simulate
from simulator.report import percentile, plot, slo_attainment, summarize
from simulator.scenario import ModelSpec, Scenario
from simulator.scenarios import make_scenario
from simulator.workload import (
    Bursts,
    Outcome,
    Request,
    RequestClass,
    Tenant,
    ZipfSampler,
    build_trace,
    fresh_copy,
    mmpp_arrivals,
    poisson_arrivals,
    zipf_weights,
)

SERVICE = "aimass.v1.NlpService"
CLASS = RequestClass("interactive", slo_s=0.2, deadline_s=1.0)


def profile(name: str, *, footprint: int = 100 << 20, load_s: float = 0.5) -> ModelProfile:
    # 10 ms alone, 30 ms for 8, 80 ms for 32: batching pays, as with the real encoders.
    return ModelProfile(name, SERVICE, ((1, 0.010), (8, 0.030), (32, 0.080)), load_s, footprint, True, "test")


def scenario(
    gpus: tuple[SimulatedGpu, ...], models: tuple[ModelSpec, ...], tenants: tuple[Tenant, ...], duration_s: float
) -> Scenario:
    # Reports every 100 ms: the placement table's LRU clock and the routers' view follow the fleet closely.
    return Scenario("test", "test", gpus, models, tenants, duration_s, gateways=1, report_interval_s=0.1)


# -- the event loop -------------------------------------------------------------------------------------------


def test_events_run_in_time_order_and_the_clock_follows() -> None:
    loop = EventLoop()
    seen: list[tuple[str, float]] = []
    for name, t in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)]:
        loop.at(t, lambda n=name: seen.append((n, loop.now)))  # type: ignore[misc]
    cancelled = loop.at(1.5, lambda: seen.append(("cancelled", loop.now)))
    cancelled.cancel()
    assert loop.run() == 3.0
    # Same instant: scheduling order; a cancelled event never runs.
    assert seen == [("a", 1.0), ("a2", 1.0), ("b", 2.0), ("c", 3.0)]
    with pytest.raises(ValueError, match="clock is already at"):
        loop.at(2.0, lambda: None)


def test_actions_schedule_more_and_run_stops_at_until() -> None:
    loop = EventLoop()
    ticks: list[float] = []
    loop.every(0.25, lambda: ticks.append(loop.now), start=0.0, until=10.0)

    def later() -> None:
        loop.after(0.3, lambda: ticks.append(-loop.now))

    loop.at(0.1, later)
    assert loop.run(until=1.0) == 1.0
    assert ticks == [0.0, 0.25, -0.4, 0.5, 0.75, 1.0]
    loop.run(until=1.2)
    assert ticks[-1] == 1.0


# -- traces ---------------------------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_asked_rate() -> None:
    times = poisson_arrivals(200.0, 500.0, random.Random(7))
    # 100,000 expected; the count's standard deviation is ~316 (0.3%).
    assert len(times) / 500.0 == pytest.approx(200.0, rel=0.015)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(1.0, abs=0.03)  # exponential gaps
    assert times == sorted(times) and times[0] > 0 and times[-1] < 500.0


def test_bursty_arrivals_average_to_the_modulated_rate_and_are_burstier() -> None:
    bursts = Bursts(burst_rate=500.0, mean_on_s=1.0, mean_off_s=4.0)
    tenant = Tenant("t", rate=50.0, request_class=CLASS, models=("m",), bursts=bursts)
    times = mmpp_arrivals(50.0, bursts, 2000.0, random.Random(3))
    assert tenant.mean_rate == pytest.approx(0.2 * 500 + 0.8 * 50)
    assert len(times) / 2000.0 == pytest.approx(tenant.mean_rate, rel=0.1)
    per_second = Counter(int(t) for t in times)
    counts = [per_second.get(s, 0) for s in range(2000)]
    mean = sum(counts) / len(counts)
    variance = sum((c - mean) ** 2 for c in counts) / len(counts)
    assert variance / mean > 10  # Poisson would be ~1


def test_zipf_popularity_is_skewed_as_asked() -> None:
    weights = zipf_weights(5, 1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[0] / weights[4] == pytest.approx(5.0)
    sampler = ZipfSampler(["a", "b", "c", "d", "e"], 1.0, random.Random(11))
    drawn = Counter(sampler.draw() for _ in range(60_000))
    for name, weight in zip("abcde", weights, strict=True):
        assert drawn[name] / 60_000 == pytest.approx(weight, abs=0.01)
    assert drawn["a"] > drawn["b"] > drawn["c"] > drawn["d"] > drawn["e"]


def test_a_trace_is_reproducible_and_spread_over_gateways() -> None:
    tenants = (Tenant("t", 100.0, CLASS, ("m1", "m2")), Tenant("u", 50.0, CLASS, ("m2",)))
    one, two = build_trace(tenants, 20.0, 5, gateways=2), build_trace(tenants, 20.0, 5, gateways=2)
    assert [(r.arrival, r.model, r.gateway) for r in one] == [(r.arrival, r.model, r.gateway) for r in two]
    assert {r.gateway for r in one} == {0, 1}
    assert [r.id for r in one] == list(range(len(one)))


# -- calibration ----------------------------------------------------------------------------------------------


def test_batch_times_interpolate_extrapolate_and_scale_by_speed() -> None:
    p = profile("m")
    assert p.seconds(8) == pytest.approx(0.030)
    assert p.seconds(20) == pytest.approx(0.030 + 0.050 * 12 / 24)
    assert p.seconds(64) == pytest.approx(0.080 + 0.050 / 24 * 32)
    assert p.seconds(8, speed=3.0) == pytest.approx(0.010)
    derived = p.derive("big", compute=2.0, memory=3.0, reason="twice the layers")
    assert derived.seconds(8) == pytest.approx(0.060) and derived.footprint_bytes == 300 << 20
    assert not derived.measured and "derived from m" in derived.provenance


def test_measured_dips_are_smoothed_and_the_committed_calibration_loads() -> None:
    entry = {"service": SERVICE, "batch_seconds": {"1": 0.02, "2": 0.01}, "load_seconds": 1, "footprint_bytes": 5}
    calibration = Calibration({"models": {"m": entry}})
    assert calibration.measured("m").batch_seconds == ((1, 0.02), (2, 0.02))
    committed = Calibration.load()
    for name in ("all-MiniLM-L6-v2", "efficientnet-lite0", "en_core_web_sm"):
        assert committed.measured(name).measured
    skewed = make_scenario("skewed", committed, 5.0)
    assert {s.profile.measured for s in skewed.models} == {True, False}


# -- the fleet under the real routers ----------------------------------------------------------------------------


@functools.cache
def slow_replica_share(router: str) -> tuple[float, RunResult]:
    """Two fast replicas and one 40x slower (a request alone there takes 250 ms, past the 200 ms SLO)."""
    slow = SimulatedGpu("slow", 16 * GIB, 0.04)
    gpus = (SimulatedGpu("fast", 16 * GIB, 1.6), SimulatedGpu("fast", 16 * GIB, 1.6), slow)
    tenants = (Tenant("t", rate=120.0, request_class=CLASS, models=("m",)),)
    sim = scenario(gpus, (ModelSpec(profile("m"), BatchingSpec(max_batch_size=8), copies=3),), tenants, 10.0)
    trace = build_trace(sim.tenants, sim.duration_s, seed=2)
    result = simulate(sim, router, fresh_copy(trace), seed=2)
    routed = [r for r in result.requests if r.replica]
    return sum(r.replica == "node2-replica" for r in routed) / len(routed), result


def test_ours_and_p2c_send_a_much_slower_replica_less_than_round_robin() -> None:
    rr, _ = slow_replica_share("round_robin")
    p2c, _ = slow_replica_share("p2c")
    ours, result = slow_replica_share("ours")
    assert rr == pytest.approx(1 / 3, abs=0.01)
    assert p2c < rr - 0.05 and ours < rr - 0.05
    # ``ours`` routed on a fresh view built from the replicas' reports, as in production.
    assert result.views_applied > 100
    # Round-robin's third on the slow replica misses its SLO.
    assert summarize(slow_replica_share("round_robin")[1]).slo_attainment < 0.7
    assert summarize(result).slo_attainment > 0.9


def test_a_model_no_replica_holds_is_placed_evicting_the_least_recently_used() -> None:
    # Room for two 6 GiB models on the one GPU; "a" and "b" start there, "c" is asked for at 2 s.
    gpus = (SimulatedGpu("small", 13 * GIB, 1.0),)
    models = tuple(ModelSpec(profile(n, footprint=6 * GIB), copies=1 if n != "c" else 0) for n in "abc")
    sim = scenario(gpus, models, (), 3.0)

    def request(i: int, model: str, at: float) -> Request:
        return Request(i, "t", model, at, CLASS.slo_s, CLASS.deadline_s)

    # "b" was used last at 0.1 s, "a" at 1.5 s: "b" is the least recently used (name order would pick "a").
    trace = [request(0, "a", 0.05), request(1, "b", 0.1), request(2, "a", 1.5), request(3, "c", 2.0)]
    result = simulate(sim, "ours", trace)
    assert result.placements_initial == 2 and result.placements_on_demand == 1 and result.evictions == 1
    assert result.replicas[0].models == ("a", "c")
    cold = trace[3]
    assert cold.outcome is Outcome.OK and cold.latency is not None
    # The cold request waited for the load (0.5 s) before its batch.
    assert 0.5 <= cold.latency < 0.6


def test_a_full_queue_rejects_and_a_missed_deadline_times_out() -> None:
    gpus = (SimulatedGpu("slow", 16 * GIB, 0.05),)
    spec = ModelSpec(profile("m"), BatchingSpec(max_batch_size=1, queue_capacity=3), copies=1)
    sim = scenario(gpus, (spec,), (), 1.0)
    trace = [Request(i, "t", "m", 0.01 + i * 0.001, 0.2, 0.5) for i in range(6)]
    result = simulate(sim, "p2c", trace)
    # One at a time, 0.2 s each at speed 0.05: #0 runs at once and just meets its SLO, #1 waits for it (late),
    # #2 and #3 are still waiting or running at their deadline, and #4 and #5 find the queue of 3 full.
    assert [r.outcome for r in result.requests] == [Outcome.OK] * 2 + [Outcome.TIMED_OUT] * 2 + [Outcome.REJECTED] * 2
    assert [r.met_slo for r in result.requests[:2]] == [True, False]
    assert result.requests[2].latency == pytest.approx(0.5)
    assert slo_attainment(result.requests) == pytest.approx(1 / 6)


def test_utilisation_readings_split_a_long_batch_over_the_windows_it_spans() -> None:
    loop = EventLoop()
    node = SimulatedFleet("n", [SimulatedGpu("slow", 16 * GIB, 0.004)])
    replica = SimReplica("r", node, loop, lambda _: None, {"m": BatchingSpec()})
    replica.add_model(profile("m"), BatchingSpec(max_queue_delay_s=0.004), pid=1, loaded=True)
    assert replica.submit(Request(0, "t", "m", 0.0, 1.0, 10.0))
    readings: list[float] = []
    loop.every(1.0, lambda: readings.append(replica.utilization_since_last()), start=1.0, until=3.5)
    loop.run()
    # One batch of 0.010 / 0.004 = 2.5 s, from 4 ms (the batcher's delay) to 2.504 s.
    assert readings == pytest.approx([0.996, 1.0, 0.504])
    assert node.read()[0].info.memory_used_bytes == 100 << 20


# -- the report -------------------------------------------------------------------------------------------------


def finished(i: int, latency: float | None, outcome: Outcome, slo: float = 0.1) -> Request:
    r = Request(i, "t" if i % 2 else "u", "m", 10.0, slo, 1.0, outcome=outcome)
    r.finished = None if latency is None else 10.0 + latency
    return r


def test_slo_attainment_and_percentiles_on_hand_made_requests() -> None:
    requests = [finished(i, (i + 1) / 100, Outcome.OK) for i in range(10)]  # 10..100 ms, all within 100 ms
    requests += [
        finished(10, 0.150, Outcome.OK),
        finished(11, 1.0, Outcome.TIMED_OUT),
        finished(12, None, Outcome.REJECTED),
    ]
    # 10 of 13 met the SLO: the late one, the timed-out one and the rejected one did not.
    assert slo_attainment(requests) == pytest.approx(10 / 13)
    values = [0.01 * k for k in range(1, 11)] + [0.15, 1.0]
    assert percentile(values, 0.5) == pytest.approx(0.06)  # 6th of 12
    assert percentile(values, 0.99) == pytest.approx(1.0)
    assert percentile(values, 0.0) == pytest.approx(0.01) and math.isnan(percentile([], 0.5))
    result = RunResult("s", "ours", 1.0, requests, [], {"t": 3.0, "u": 1.0}, 0, 0, 0, 0, 0, 0.0, 0)
    summary = summarize(result)
    assert summary.slo_attainment == pytest.approx(10 / 13)
    assert summary.p50_s == pytest.approx(0.06) and summary.p99_s == pytest.approx(1.0)
    assert (summary.late, summary.timed_out, summary.rejected) == (1, 1, 1)
    assert summary.tenants["t"].service_share == pytest.approx(0.75)


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    _, result = slow_replica_share("ours")
    path = plot([result], [summarize(result)], tmp_path / "sim.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[2] in (3, 4)
