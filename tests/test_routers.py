"""Each routing policy's choice on crafted views (no servers: a Replica needs only an instance and a channel)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from aimass.runtime.discovery import Instance
from aimass.v1 import common_pb2, scheduler_pb2
from gateway.replicas import Replica
from gateway.router import PowerOfTwoRouter, RoundRobinRouter, ScoreRouter, make_router
from gateway.view import LoadView, replica_loads

SERVICE = "aimass.v1.NlpService"


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    made = [
        Replica(
            Instance(f"r{i}", "nlp", (SERVICE,), f"127.0.0.1:{6000 + i}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{6000 + i}"),
        )
        for i in range(3)
    ]
    yield made
    for replica in made:
        await replica.channel.close()


def model_load(**fields: object) -> scheduler_pb2.ModelLoad:
    return scheduler_pb2.ModelLoad(
        model=common_pb2.ModelRef(name="m"),
        device_id=str(fields.pop("device_id", "n/gpu:0")),
        loaded=True,
        max_batch_size=8,
        **fields,  # type: ignore[arg-type]
    )


def view_of(
    version: int, loads: dict[str, scheduler_pb2.ModelLoad], devices: dict[str, tuple[float, int, int]]
) -> scheduler_pb2.RoutingView:
    """``devices``: device id → (utilisation %, memory used, memory total)."""
    return scheduler_pb2.RoutingView(
        version=version,
        replicas=[scheduler_pb2.ReplicaView(instance_id=iid, models=[load]) for iid, load in loads.items()],
        nodes=[
            scheduler_pb2.NodeView(
                node_id="n",
                devices=[
                    scheduler_pb2.NodeDevice(
                        device_id=did,
                        info=common_pb2.DeviceInfo(
                            utilization_percent=u, memory_used_bytes=used, memory_total_bytes=total
                        ),
                    )
                    for did, (u, used, total) in devices.items()
                ],
            )
        ],
    )


def fresh(view: scheduler_pb2.RoutingView) -> LoadView:
    loads = LoadView()
    loads.connected = True
    assert loads.apply(view)
    return loads


async def test_round_robin_takes_turns(replicas: list[Replica]) -> None:
    router = RoundRobinRouter()
    assert [router.choose(SERVICE, replicas).instance.instance_id for _ in range(6)] == ["r0", "r1", "r2"] * 2


async def test_p2c_prefers_the_shorter_queue_of_the_two_drawn(replicas: list[Replica]) -> None:
    replicas[0].inflight, replicas[1].inflight, replicas[2].inflight = 0, 5, 9
    router = PowerOfTwoRouter(rng=random.Random(7))
    picks = Counter(router.choose(SERVICE, replicas).instance.instance_id for _ in range(300))
    # r2 (the longest queue) can never win a pair; r0 wins every pair it is drawn in (2 of 3 pairs).
    assert picks["r2"] == 0
    assert picks["r0"] > picks["r1"] > 0


async def test_p2c_counts_the_queue_the_replica_reported(replicas: list[Replica]) -> None:
    view = fresh(view_of(1, {"r0": model_load(queue_depth=20), "r1": model_load(), "r2": model_load()}, {}))
    router = PowerOfTwoRouter(view, random.Random(1))
    assert all(router.choose(SERVICE, replicas[:2]).instance.instance_id == "r1" for _ in range(20))


async def test_ours_sends_work_where_it_expects_it_to_finish_first(replicas: list[Replica]) -> None:
    loads = {
        # Each replica completed what it could in the last window: r0 and r1 100 requests per busy second, r2 a
        # tenth of that (a slower device, or a throttled process).
        "r0": model_load(device_id="n/gpu:0", requests_per_second=50),
        "r1": model_load(device_id="n/gpu:1", kv_cache_usage=0.1, requests_per_second=50),
        "r2": model_load(device_id="n/gpu:2", requests_per_second=10),
    }
    devices = {"n/gpu:0": (50.0, 1, 10), "n/gpu:1": (50.0, 2, 10), "n/gpu:2": (100.0, 9, 10)}
    view = fresh(view_of(3, loads, devices))
    assert view.capacity("r0") == pytest.approx(100) and view.capacity("r2") == pytest.approx(10)
    router = ScoreRouter(view, random.Random(0))
    replicas[0].inflight = 4  # this gateway's requests under way there
    assert router.choose(SERVICE, replicas).instance.instance_id == "r1"
    # Piling requests on r1 moves the next one to r0, whose 4 clear sooner than r1's 8 now; r2 at a tenth of the
    # speed stays last.
    replicas[1].inflight = 8
    assert router.choose(SERVICE, replicas).instance.instance_id == "r0"


def test_a_gpu_is_trusted_by_its_compute_until_it_shows_less() -> None:
    loads = {
        "r0": model_load(device_id="n/gpu:0", requests_per_second=30),  # 30 TFLOPS but throttled: 60 per busy s
        "r1": model_load(device_id="n/gpu:1", requests_per_second=50),  # 10 TFLOPS, 100 per busy second
        "r2": model_load(device_id="n/gpu:2"),  # 30 TFLOPS, idle so far
    }
    devices = {"n/gpu:0": (50.0, 1, 10), "n/gpu:1": (50.0, 1, 10), "n/gpu:2": (0.0, 1, 10)}
    view = view_of(1, loads, devices)
    for device, tflops in zip(view.nodes[0].devices, (30.0, 10.0, 30.0), strict=True):
        device.info.compute_tflops = tflops
    loads_view = fresh(view)
    # The fleet completes 10 requests per busy second per TFLOPS (the median): r2 is expected to do 300.
    assert loads_view.capacity("r2") == pytest.approx(300)
    assert loads_view.capacity("r1") == pytest.approx(100)
    # r0's compute promises 300, but it has shown 60: it stays at what it showed.
    assert loads_view.capacity("r0") == pytest.approx(60)


def test_capacity_is_learnt_smoothly_and_drifts_back_when_idle() -> None:
    view = LoadView()
    view.connected = True
    busy = {"r0": model_load(device_id="n/gpu:0", requests_per_second=30), "r1": model_load(device_id="n/gpu:1")}
    devices = {"n/gpu:0": (30.0, 1, 10), "n/gpu:1": (0.0, 1, 10)}
    view.apply(view_of(1, busy, devices))
    # r1 is idle (too little utilisation to measure): it counts as the typical replica meanwhile.
    assert view.capacity("r0") == pytest.approx(100) and view.capacity("r1") == pytest.approx(100)
    slower = {"r0": model_load(device_id="n/gpu:0", requests_per_second=15), "r1": model_load(device_id="n/gpu:1")}
    view.apply(view_of(2, slower, devices))
    assert view.capacity("r0") == pytest.approx(100 + 0.3 * (50 - 100))


async def test_ours_avoids_a_cold_replica(replicas: list[Replica]) -> None:
    cold = model_load(device_id="n/gpu:1")
    cold.loaded = False
    loads = {"r0": model_load(device_id="n/gpu:0", queue_depth=6), "r1": cold}
    router = ScoreRouter(fresh(view_of(1, loads, {})), random.Random(0))
    assert router.choose(SERVICE, replicas[:2]).instance.instance_id == "r0"


async def test_ours_among_cold_replicas_prefers_the_most_free_memory(replicas: list[Replica]) -> None:
    loads = {f"r{i}": model_load(device_id=f"n/gpu:{i}") for i in range(3)}
    for load in loads.values():
        load.loaded = False
    # r1's device is the emptiest: its model loads there without evicting others first.
    devices = {"n/gpu:0": (0.0, 70, 80), "n/gpu:1": (0.0, 10, 80), "n/gpu:2": (0.0, 40, 80)}
    router = ScoreRouter(fresh(view_of(1, loads, devices)), random.Random(0))
    assert {router.choose(SERVICE, replicas).instance.instance_id for _ in range(10)} == {"r1"}


async def test_ours_trusts_a_reporting_replica_over_one_missing_from_the_view(replicas: list[Replica]) -> None:
    # r2 has no load report (just joined, or its reports stopped because it is stuck or gone).
    loads = {"r0": model_load(device_id="n/gpu:0"), "r1": model_load(device_id="n/gpu:1")}
    router = ScoreRouter(fresh(view_of(1, loads, {})), random.Random(0))
    chosen = Counter(router.choose(SERVICE, replicas).instance.instance_id for _ in range(100))
    assert chosen["r2"] == 0
    # Equally idle replicas share the load instead of the first taking every request.
    assert chosen["r0"] > 20 and chosen["r1"] > 20


async def test_ours_falls_back_to_p2c_without_a_fresh_view(replicas: list[Replica]) -> None:
    view = fresh(view_of(2, {"r0": model_load(queue_depth=50), "r1": model_load()}, {}))
    view.connected = False  # the scheduler went away: the last view stays but is not trusted for scoring
    replicas[0].inflight, replicas[1].inflight = 0, 3
    router = ScoreRouter(view, random.Random(0))
    # p2c on gateway in-flight + last reported queue: r1 (3) beats r0 (0 + 50).
    assert router.choose(SERVICE, replicas[:2]).instance.instance_id == "r1"
    assert not view.fresh and view.version == 2


def test_an_older_view_is_ignored() -> None:
    view = fresh(view_of(5, {"r0": model_load(queue_depth=1)}, {}))
    assert not view.apply(view_of(4, {"r0": model_load(queue_depth=9)}, {}))
    load = view.load_of("r0")
    assert load is not None and load.queue_depth == 1


def test_replica_loads_join_models_with_their_device() -> None:
    loads = replica_loads(view_of(1, {"r0": model_load(device_id="n/gpu:0", in_flight=3)}, {"n/gpu:0": (50.0, 3, 4)}))
    assert loads["r0"].utilization == 0.5 and loads["r0"].free_memory_fraction == pytest.approx(0.25)
    assert loads["r0"].in_flight == 3 and loads["r0"].slots == 8


def test_unknown_router_names_the_choices() -> None:
    with pytest.raises(ValueError, match="ours, p2c, round_robin"):
        make_router("fastest")
