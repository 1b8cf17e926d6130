"""The chaos scenarios (loadtest/chaos.py), short: each fault injected into a real mesh under a few seconds of steady
load through the gateway; no request may be lost, and unary calls another replica could serve must be answered OK.

One mesh (`aimass up`: two NLP and two LLM replicas, its state and log on a small tmpfs) serves the scenarios that
leave it whole afterwards, one after another; Consul's and the partitioned host's scenarios start meshes of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import chaos

pytestmark = pytest.mark.slow

SCENARIOS = {s.name: s for s in chaos.MAIN_SCENARIOS}
# Enough load to see a dip and its end, short enough for `make test`.
LOAD = chaos.LoadSpec("", "", unary_clients=4, rate=8.0, deadline_s=10.0)


@pytest.fixture(scope="module")
def main_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[chaos.ChaosMesh]:
    with chaos.started_main_mesh(
        tmp_path_factory.mktemp("chaos") / "main", llm=True, small=not chaos.can_mount()
    ) as mesh:
        yield mesh


def check(result: chaos.Tally, *, unary_all_ok: bool = True, recovers: bool = True) -> None:
    """No call lost; with ``unary_all_ok``, every unary call answered OK (another replica could serve it); with
    ``recovers``, the unary rate back before the run ended."""
    summary = f"{result.scenario}: {result}"
    assert result.sent > 50, f"too little load to tell: {summary}"
    assert result.lost == 0, f"lost calls: {result.lost_codes}, e.g. {result.samples}; {summary}"
    if unary_all_ok:
        assert not [c for c in result.retryable_codes if c.startswith("unary ")], summary
    if recovers:
        assert result.recovery_s is not None, f"throughput never came back: {summary}"


async def run(mesh: chaos.ChaosMesh, name: str) -> chaos.Tally:
    return await chaos.run_main_scenario(mesh, SCENARIOS[name], chaos.SHORT, LOAD)


async def test_sigkill_a_replica(main_mesh: chaos.ChaosMesh) -> None:
    result = await run(main_mesh, "sigkill-replica")
    check(result)
    assert "served again" in result.notes


# Frozen longer than a call's deadline: a call caught on the frozen replica is answered only if the gateway notices
# the silent peer (keepalive: ping every 2 s, 2 s to answer) and retries it elsewhere within the deadline.
FROZEN = chaos.Timing(warm_s=3.0, fault_s=9.0, settle_s=2.0, whole_timeout_s=240.0)
FROZEN_LOAD = chaos.LoadSpec("", "", unary_clients=4, rate=8.0, deadline_s=7.0)


async def test_sigstop_a_replica(main_mesh: chaos.ChaosMesh) -> None:
    result = await chaos.run_main_scenario(main_mesh, SCENARIOS["sigstop-replica"], FROZEN, FROZEN_LOAD)
    if result.lost and set(result.lost_codes) == {"unary DEADLINE_EXCEEDED"}:
        # grpc 1.85 ignores grpc.keepalive_timeout_ms for a ping that gets no answer: without
        # grpc.http2.ping_timeout_ms (default 60 s) the gateway's channel to a frozen replica stays up, and calls
        # already sent to it wait out their deadline (gateway/app.py replica_channel_options): reported.
        pytest.xfail(f"calls on the frozen replica waited out their deadline: {result.lost_codes}")
    check(result)


async def test_restart_the_gateway(main_mesh: chaos.ChaosMesh) -> None:
    result = await run(main_mesh, "restart-gateway")
    known = {"unary CANCELLED"}
    if result.lost and set(result.lost_codes) <= known:
        # Calls that reach the gateway after its server began to stop are CANCELLED by grpc-core, not refused
        # UNAVAILABLE (which clients retry): reported to the gateway's owner; anything else lost fails here.
        pytest.xfail(f"the gateway's drain cancels calls that race its stop: {result.lost_codes}")
    check(result)


async def test_kill_the_scheduler(main_mesh: chaos.ChaosMesh) -> None:
    check(await run(main_mesh, "kill-scheduler"))


async def test_fill_the_disk(main_mesh: chaos.ChaosMesh) -> None:
    if chaos.can_mount():
        pytest.skip(chaos.can_mount())
    result = await run(main_mesh, "fill-disk")
    check(result)


async def test_sigterm_mid_stream_drains(main_mesh: chaos.ChaosMesh) -> None:
    result = await run(main_mesh, "sigterm-mid-stream")
    # What this fault tests is the drain: every stream on llm-0 finished, no call lost, every unary call OK. The
    # unary (NLP) rate is not its business: on two cores it dips for as long as the supervisor's new llm-0 loads vLLM
    # (a minute or two, CPU contention, measured in docs/reliability.md), and the short run ends during that load.
    check(result, recovers=False)
    assert "drained and exited" in result.notes


async def test_drop_consul(tmp_path: Path) -> None:
    (result,) = await chaos.run_consul(tmp_path, chaos.SHORT, LOAD)
    check(result)


async def test_partition_a_host(tmp_path: Path) -> None:
    (result,) = await asyncio.wait_for(chaos.partition_host(tmp_path, chaos.SHORT, LOAD), 400)
    if result.skipped:
        pytest.skip(result.skipped)
    check(result)
