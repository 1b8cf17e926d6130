"""Hedged requests at the gateway (gateway/hedging.py, gateway/forwarder.py).

The policy's parts on their own, with real objects: the streaming quantile, the budget's token bucket, the delay
rules, stalled replicas, and which methods are hedged (read from the protos' ``idempotency_level``). Then a real mesh
(`aimass up` on loopback, two NLP replicas with their models): one replica is frozen with SIGSTOP while a bounded
load calls Embed through the gateway. With hedging on (the default) no call waits for the frozen replica; with it
off, the calls caught there wait out the freeze, which shows the measurement can fail. The gateways route round
robin: every other call goes to the frozen replica, so calls are surely caught there (the default router sends new
calls elsewhere once the frozen one holds a few, and only the calls it held at the instant of the SIGSTOP would be).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pydantic
import pytest

from aimass.local_mesh import LocalMesh
from aimass.runtime import contract
from aimass.runtime.config import GatewayConfig, HedgingConfig, Settings
from aimass.v1 import common_pb2, llm_pb2, llm_pb2_grpc, nlp_pb2, nlp_pb2_grpc, registry_pb2, registry_pb2_grpc
from gateway.hedging import HedgeBudget, HedgingPolicy, LatencyQuantile, MethodHedging, Stalls
from tests.conftest import start_mesh
from tests.metrics import scrape, value
from tests.test_forwarder import TENANT, counted, embed, rpc_error, trailers, until
from tests.test_forwarder import Mesh as ProbeMesh
from tests.test_forwarder import probe_mesh as probe_mesh_running

log = logging.getLogger(__name__)

EMBED = "/aimass.v1.NlpService/Embed"

# The load: closed-loop clients, each call with a deadline far beyond the freeze.
CONCURRENCY = 4
DEADLINE_S = 20.0
# Calls before the freeze: the adaptive delay needs HedgingConfig.min_samples latencies of the method.
WARM_UP_CALLS = 120
FREEZE_S = 3.0
# Generous: the hedge delay is capped at 500 ms (max_delay_ms) and an Embed takes tens of milliseconds; a call that
# waited for the frozen replica takes the whole freeze (3 s).
HEDGED_MAX_S = 1.0


# --- the policy's parts ------------------------------------------------------------------------------------------


def test_latency_quantile_is_the_nearest_rank_of_recent_latencies() -> None:
    latencies = LatencyQuantile(0.95, size=100, refresh_every=1)
    assert latencies.value() is None
    for ms in range(1, 101):
        latencies.observe(ms / 1000)
    assert latencies.value() == pytest.approx(0.095)
    # The ring keeps the last 100: a slower regime replaces the old one entirely.
    for ms in range(201, 301):
        latencies.observe(ms / 1000)
    assert len(latencies) == 100
    assert latencies.value() == pytest.approx(0.295)


def test_latency_quantile_refreshes_every_few_observations() -> None:
    latencies = LatencyQuantile(0.5, size=64, refresh_every=8)
    for _ in range(64):
        latencies.observe(0.010)
    # Fewer than refresh_every new observations: the cached estimate stands, then it moves.
    for _ in range(7):
        latencies.observe(1.0)
    assert latencies.value() == pytest.approx(0.010)
    for _ in range(64):
        latencies.observe(1.0)
    assert latencies.value() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="quantile"):
        LatencyQuantile(1.0)


def test_budget_caps_hedges_to_a_fraction_of_calls_plus_a_burst() -> None:
    budget = HedgeBudget(0.05, burst=2)
    assert budget.take() and budget.take()
    assert not budget.available() and not budget.take()
    for _ in range(19):
        budget.deposit()
    assert not budget.take(), "19 calls at 5% do not earn a hedge"
    budget.deposit()
    assert budget.take()
    # Over many calls, hedges never exceed 5% of them plus the burst.
    hedges = 0
    for _ in range(10_000):
        budget.deposit()
        hedges += budget.take()
    assert hedges <= 0.05 * 10_000 + 2
    # Deposits stop at the burst: a long quiet spell does not save up more.
    for _ in range(10_000):
        budget.deposit()
    assert budget.tokens == 2


def method_hedging(**overrides: float) -> MethodHedging:
    settings: dict[str, float] = {"fixed_delay_s": 0.0, "min_delay_s": 0.02, "max_delay_s": 0.5, "min_samples": 10}
    settings.update(overrides)
    return MethodHedging(
        method=EMBED,
        latencies=LatencyQuantile(0.9, size=100, refresh_every=1),
        budget=HedgeBudget(0.05, 20),
        fixed_delay_s=settings["fixed_delay_s"],
        min_delay_s=settings["min_delay_s"],
        max_delay_s=settings["max_delay_s"],
        min_samples=int(settings["min_samples"]),
    )


def test_delay_is_the_quantile_clamped_and_needs_enough_latencies() -> None:
    hedging = method_hedging()
    for _ in range(9):
        hedging.latencies.observe(0.1)
    assert hedging.delay_s() is None, "no adaptive delay before min_samples latencies"
    hedging.latencies.observe(0.1)
    assert hedging.delay_s() == pytest.approx(0.1)
    for _ in range(100):
        hedging.latencies.observe(0.001)
    assert hedging.delay_s() == pytest.approx(0.02), "floored at min_delay"
    for _ in range(100):
        hedging.latencies.observe(3.0)
    assert hedging.delay_s() == pytest.approx(0.5), "capped at max_delay"
    fixed = method_hedging(fixed_delay_s=0.2)
    assert fixed.delay_s() == pytest.approx(0.2), "a fixed delay needs no latencies"


def test_a_call_whose_deadline_is_shorter_than_the_delay_is_not_hedged() -> None:
    hedging = method_hedging(fixed_delay_s=0.2)
    assert hedging.should_wait(None) == pytest.approx(0.2)
    assert hedging.should_wait(1.0) == pytest.approx(0.2)
    assert hedging.should_wait(0.15) is None
    # Every call counts into the budget, hedged or not.
    spent = HedgeBudget(0.5, 1)
    spent.take()
    hedging.budget = spent
    hedging.should_wait(0.1)
    hedging.should_wait(None)
    assert spent.available()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ReplicaKey:
    """Any object serves as a replica here: Stalls only keys by identity (weakly), never reads one."""


def test_a_silent_replica_is_suspect_and_left_out_for_a_while_once_excluded() -> None:
    clock = Clock()
    stalls = Stalls(eject_s=1.0, clock=clock)
    frozen, busy = ReplicaKey(), ReplicaKey()
    stalls.answered(busy, 99.5)
    # busy answered another call after ours was sent (at 99.0): it is alive, just slow on this one.
    assert not stalls.silent_since(busy, sent_at=99.0, now=100.0)
    assert stalls.silent_since(frozen, sent_at=99.0, now=100.0)
    assert not stalls, "suspect only: left out once it does not answer a health check (the forwarder asks)"
    stalls.exclude(frozen, 100.0)
    assert stalls and stalls.stalled(frozen, 100.5) and not stalls.stalled(busy, 100.5)
    assert not stalls.silent_since(frozen, sent_at=99.0, now=100.5), "already left out"
    assert not stalls.stalled(frozen, 101.0), "left out for eject_s only"
    stalls.exclude(frozen, 101.2)
    stalls.answered(frozen, 101.3)
    assert not stalls.stalled(frozen, 101.4), "an answer brings it back at once"
    assert not Stalls(eject_s=0).silent_since(frozen, sent_at=0, now=1), "0 turns it off"


def test_only_unary_methods_marked_idempotent_in_the_protos_are_hedged() -> None:
    idempotent = contract.idempotent_methods()
    assert {EMBED, "/aimass.v1.VisionService/DetectFaces", "/aimass.v1.SpeechService/Transcribe"} <= idempotent
    assert "/aimass.v1.LlmService/CountTokens" in idempotent
    for mutation in (
        "/aimass.v1.ModelService/LoadModel",
        "/aimass.v1.ModelService/UnloadModel",
        "/aimass.v1.AdminService/CreateKey",
        "/aimass.v1.DeploymentService/DeployModel",
        "/aimass.v1.TrainingService/StartTraining",
    ):
        if mutation in contract.methods():
            assert mutation not in idempotent
    policy = HedgingPolicy(HedgingConfig())
    for method, kind in contract.methods().items():
        unary = not kind.client_streaming and not kind.server_streaming
        assert (policy.for_method(method) is not None) == (unary and method in idempotent), method
    assert policy.for_method("/aimass.v1.ModelService/LoadModel") is None
    # A stream is never hedged, even when the method is marked.
    streamed = {m for m, k in contract.methods().items() if k.server_streaming or k.client_streaming}
    assert not policy.methods & streamed
    assert not HedgingPolicy(HedgingConfig(enabled=False)).methods


def test_hedging_config_is_one_typed_section_of_the_gateways(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewayConfig().hedging.enabled, "on by default"
    monkeypatch.setenv("AIMASS_GATEWAY__HEDGING__ENABLED", "false")
    monkeypatch.setenv("AIMASS_GATEWAY__HEDGING__MIN_DELAY_MS", "35")
    settings = Settings()
    assert not settings.gateway.hedging.enabled
    assert settings.gateway.hedging.min_delay_ms == 35
    with pytest.raises(pydantic.ValidationError, match="min_delay_ms"):
        HedgingConfig(min_delay_ms=600, max_delay_ms=500)
    with pytest.raises(pydantic.ValidationError, match="max_extra_load"):
        HedgingConfig(max_extra_load=1.5)


# --- the forwarder's race, against probe replicas -----------------------------------------------------------------
# A real gateway and scheduler in this process, and probe replicas as processes (tests/test_forwarder.py: each does
# what the request's first text says, e.g. "hold-once:<tag>:<s>" holds the call on the first replica that gets it
# only, and marks when a held call is cancelled). Hedges after a fixed 100 ms; the budget never refills, so a test
# can spend it.

HEDGE_DELAY_MS = 100.0
PROBE_BUDGET = 4


@pytest.fixture(scope="module")
async def probe_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProbeMesh]:
    hedging = HedgingConfig(delay_ms=HEDGE_DELAY_MS, max_extra_load=0, burst=PROBE_BUDGET)
    # Round robin (probe_mesh's): both probes of a pair take first attempts, whatever the view holds of probes.
    async with probe_mesh_running(tmp_path_factory.mktemp("hedging-probe-marks"), hedging=hedging) as started:
        yield started


@pytest.fixture
async def probe_pair(probe_mesh: ProbeMesh) -> AsyncIterator[list[int]]:
    try:
        yield await probe_mesh.start_probes(2)
    finally:
        await probe_mesh.stop_probes()


@pytest.fixture
async def probe_channel(probe_mesh: ProbeMesh) -> AsyncIterator[grpc.aio.Channel]:
    from tests.security import key_for, keyed

    async with keyed(probe_mesh.gateway.address, key_for(TENANT)) as opened:
        yield opened


def hedge_counts() -> tuple[float, float]:
    return counted("aimass_gateway_hedges_total", method=EMBED), counted(
        "aimass_gateway_hedges_won_total", method=EMBED
    )


async def test_a_held_call_is_answered_by_a_hedge_and_the_held_attempt_cancelled(
    probe_mesh: ProbeMesh, probe_pair: list[int], probe_channel: grpc.aio.Channel
) -> None:
    sent, won = hedge_counts()
    # Held 60 s on whichever probe gets it first; the hedge, on the other, is answered at once.
    call = nlp_pb2_grpc.NlpServiceStub(probe_channel).Embed(embed("hold-once:hedged:60"), timeout=20)
    await call
    (holder,) = probe_mesh.held_by("hedged")
    answered = await trailers(call)
    assert answered["x-probe-pid"] != str(holder) and int(answered["x-probe-pid"]) in probe_pair
    # The loser is cancelled at once: its replica stops the work.
    await until(lambda: probe_mesh.cancelled("hedged"), "the held attempt was never cancelled", 5)
    assert hedge_counts() == (sent + 1, won + 1)
    # The same call, once more: both probes are alive and answer; a quick call is not hedged.
    again = nlp_pb2_grpc.NlpServiceStub(probe_channel).Embed(embed("hello"), timeout=20)
    await again
    assert hedge_counts() == (sent + 1, won + 1)
    assert probe_mesh.alive() == set(probe_pair)


async def test_a_deadline_shorter_than_the_delay_is_not_hedged(
    probe_mesh: ProbeMesh, probe_pair: list[int], probe_channel: grpc.aio.Channel
) -> None:
    sent, _ = hedge_counts()
    err = await rpc_error(
        nlp_pb2_grpc.NlpServiceStub(probe_channel).Embed(embed("hold-once:short:60"), timeout=HEDGE_DELAY_MS / 2000)
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert hedge_counts()[0] == sent
    assert len(probe_mesh.held_by("short")) == 1


async def test_with_one_replica_nothing_is_hedged(probe_mesh: ProbeMesh, probe_channel: grpc.aio.Channel) -> None:
    await probe_mesh.start_probes(1)
    try:
        sent, _ = hedge_counts()
        denied = counted("aimass_gateway_hedges_denied_total", method=EMBED, reason="no_other_replica")
        # Held 0.5 s: past the delay, and no other replica to send it to.
        await nlp_pb2_grpc.NlpServiceStub(probe_channel).Embed(embed("hold:alone:0.5"), timeout=20)
        assert hedge_counts()[0] == sent
        assert counted("aimass_gateway_hedges_denied_total", method=EMBED, reason="no_other_replica") == denied + 1
    finally:
        await probe_mesh.stop_probes()


async def test_streams_and_methods_not_marked_idempotent_are_never_hedged(
    probe_mesh: ProbeMesh, probe_pair: list[int], probe_channel: grpc.aio.Channel
) -> None:
    generate = "/aimass.v1.LlmService/Generate"
    assert generate not in contract.idempotent_methods()
    # A Generate stream held on its replica for well past the delay: no second replica ever sees it.
    stream = llm_pb2_grpc.LlmServiceStub(probe_channel).Generate(
        llm_pb2.GenerateRequest(prompt="hold:stream-held"), timeout=20
    )
    await until(lambda: bool(probe_mesh.held_by("stream-held")), "the stream never reached its hold", 10)
    await asyncio.sleep(HEDGE_DELAY_MS * 5 / 1000)
    assert len(probe_mesh.held_by("stream-held")) == 1
    stream.cancel()
    assert counted("aimass_gateway_hedges_total", method=generate) == 0
    assert counted("aimass_gateway_hedges_denied_total", method=generate, reason="budget") == 0


async def test_the_budget_caps_hedges(
    probe_mesh: ProbeMesh, probe_pair: list[int], probe_channel: grpc.aio.Channel
) -> None:
    budget = probe_mesh.app.forwarder.hedging.for_method(EMBED).budget
    left = int(budget.tokens)  # what earlier tests left of PROBE_BUDGET (max_extra_load=0: it never refills)
    sent, _ = hedge_counts()
    denied = counted("aimass_gateway_hedges_denied_total", method=EMBED, reason="budget")
    nlp = nlp_pb2_grpc.NlpServiceStub(probe_channel)
    # One held call more than the budget allows hedges for (one after the other: a replica holding calls is left
    # out for the moments until it answers a health check): the last one waits until its deadline.
    codes: Counter[str] = Counter()
    for i in range(left + 1):
        try:
            await nlp.Embed(embed(f"hold-once:budget-{i}:60"), timeout=3)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            codes[err.code().name] += 1
    assert codes == Counter({"OK": left, "DEADLINE_EXCEEDED": 1})
    assert hedge_counts()[0] == sent + left
    assert counted("aimass_gateway_hedges_denied_total", method=EMBED, reason="budget") == denied + 1
    assert not budget.available()


# --- a replica frozen under load ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    @property
    def max_s(self) -> float:
        return max(self.latencies)


def nlp_pids(mesh: LocalMesh) -> list[int]:
    with mesh.scheduler_channel() as channel:
        listed = registry_pb2_grpc.RegistryServiceStub(channel).ListInstances(
            registry_pb2.ListInstancesRequest(), timeout=5
        )
    return sorted(i.pid for i in listed.instances if i.kind == "nlp" and i.state == common_pb2.SERVING_STATE_SERVING)


async def embed_loop(
    stub: nlp_pb2_grpc.NlpServiceAsyncStub, outcome: Outcome, client: int, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        outcome.calls += 1
        request = nlp_pb2.EmbedRequest(texts=[f"client {client} asks for call {outcome.calls}"])
        started = time.perf_counter()
        try:
            await stub.Embed(request, timeout=DEADLINE_S)
            outcome.codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            outcome.codes[err.code().name] += 1
        outcome.latencies.append(time.perf_counter() - started)


async def warm_up(stub: nlp_pb2_grpc.NlpServiceAsyncStub) -> None:
    async def client(index: int) -> None:
        for call in range(WARM_UP_CALLS // CONCURRENCY):
            await stub.Embed(nlp_pb2.EmbedRequest(texts=[f"warm-up {index}.{call}"]), timeout=DEADLINE_S)

    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))


async def load_with_freeze(mesh: LocalMesh) -> Outcome:
    """Warms the gateway up, then runs CONCURRENCY clients calling Embed while one NLP replica is SIGSTOPped for
    FREEZE_S; the latencies and status codes of the calls made around the freeze."""
    pids = nlp_pids(mesh)
    assert len(pids) == 2, f"expected two NLP replicas serving, the registry lists {pids}"
    victim = pids[0]
    async with mesh.aio_channel() as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        await warm_up(stub)

        outcome = Outcome()
        stop = asyncio.Event()
        clients = [asyncio.create_task(embed_loop(stub, outcome, i, stop)) for i in range(CONCURRENCY)]
        try:
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGSTOP)
            try:
                await asyncio.sleep(FREEZE_S)
            finally:
                os.kill(victim, signal.SIGCONT)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*clients)
    return outcome


@pytest.fixture
def hedged_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = start_mesh(tmp_path, {"nlp": 2}, {"AIMASS_GATEWAY__ROUTER": "round_robin"}, metrics=True)
    yield mesh
    mesh.stop()


@pytest.fixture
def unhedged_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = start_mesh(
        tmp_path,
        {"nlp": 2},
        {"AIMASS_GATEWAY__ROUTER": "round_robin", "AIMASS_GATEWAY__HEDGING__ENABLED": "false"},
        metrics=True,
    )
    yield mesh
    mesh.stop()


@pytest.mark.slow
async def test_a_frozen_replica_does_not_hold_calls_when_hedging_is_on(hedged_mesh: LocalMesh) -> None:
    outcome = await load_with_freeze(hedged_mesh)
    assert outcome.codes == Counter({"OK": outcome.calls}), f"calls failed: {dict(outcome.codes)}"
    samples = scrape(hedged_mesh.metrics_address("gateway"))
    hedges = value(samples, "aimass_gateway_hedges_total", method=EMBED)
    won = value(samples, "aimass_gateway_hedges_won_total", method=EMBED)
    calls = value(samples, "aimass_requests_total", method=EMBED)
    log.info(
        "hedging on: %d calls around the freeze, slowest %.3f s; %.0f hedges sent, %.0f won, %.0f Embed calls in all",
        outcome.calls,
        outcome.max_s,
        hedges,
        won,
        calls,
    )
    assert won >= 1, f"no hedge won ({hedges:.0f} sent): the frozen replica held no call, the test says nothing"
    assert outcome.max_s <= HEDGED_MAX_S, (
        f"a call took {outcome.max_s:.2f} s with one replica frozen for {FREEZE_S:.0f} s "
        f"({hedges:.0f} hedges sent, {won:.0f} won, {outcome.calls} calls)"
    )
    # The budget: at most 5% of the method's calls plus the burst (20), whatever happened.
    config = HedgingConfig()
    assert calls >= outcome.calls
    assert hedges <= config.max_extra_load * calls + config.burst
    # Nothing else was hedged: only Embed was called.
    assert value(samples, "aimass_gateway_hedges_total") == hedges


@pytest.mark.slow
async def test_without_hedging_calls_caught_on_a_frozen_replica_wait(unhedged_mesh: LocalMesh) -> None:
    outcome = await load_with_freeze(unhedged_mesh)
    assert outcome.codes == Counter({"OK": outcome.calls}), f"calls failed: {dict(outcome.codes)}"
    log.info("hedging off: %d calls around the freeze, slowest %.3f s", outcome.calls, outcome.max_s)
    assert outcome.max_s > HEDGED_MAX_S, (
        f"the slowest call took {outcome.max_s:.2f} s without hedging: no call was caught on the frozen replica"
    )
    assert value(scrape(unhedged_mesh.metrics_address("gateway")), "aimass_gateway_hedges_total") == 0
