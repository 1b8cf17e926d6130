"""Where training jobs go: a free slot on a trainer whose device has the memory the job needs, most free memory
first; otherwise the job waits, and the reason says why."""

from __future__ import annotations

from aimass.runtime.discovery import Instance
from aimass.v1 import common_pb2, scheduler_pb2
from scheduler.lifecycle.job_placement import TrainerSlot, choose_trainer, trainer_slots, why_waiting

GIB = 1 << 30


def trainer(name: str, node: str, *, device: str = "cpu", max_jobs: str = "1", serving: bool = True) -> Instance:
    return Instance(
        instance_id=name,
        kind="trainer",
        services=("aimass.v1.TrainerService",),
        address=f"127.0.0.1:{len(name)}",
        labels={"node": node, "device": f"{node}/{device}", "max_jobs": max_jobs},
        state=common_pb2.SERVING_STATE_SERVING if serving else common_pb2.SERVING_STATE_DRAINING,
    )


def node(name: str, *, cpu_free: int, gpu_free: int | None = None) -> scheduler_pb2.NodeView:
    devices = [
        scheduler_pb2.NodeDevice(
            device_id=f"{name}/cpu",
            info=common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_CPU, memory_total_bytes=64 * GIB, memory_used_bytes=64 * GIB - cpu_free
            ),
        )
    ]
    if gpu_free is not None:
        devices.append(
            scheduler_pb2.NodeDevice(
                device_id=f"{name}/gpu:0",
                info=common_pb2.DeviceInfo(
                    kind=common_pb2.DEVICE_KIND_GPU, memory_total_bytes=80 * GIB, memory_used_bytes=80 * GIB - gpu_free
                ),
            )
        )
    return scheduler_pb2.NodeView(node_id=name, devices=devices)


def test_the_trainer_with_the_most_free_memory_takes_the_job() -> None:
    nodes = {"a": node("a", cpu_free=4 * GIB), "b": node("b", cpu_free=10 * GIB)}
    slots = trainer_slots([trainer("t-a", "a"), trainer("t-b", "b")], nodes, {})
    chosen = choose_trainer(slots, 2 * GIB)
    assert chosen is not None and chosen.instance.instance_id == "t-b"


def test_jobs_placed_count_against_free_memory_and_slots() -> None:
    nodes = {"a": node("a", cpu_free=4 * GIB)}
    # One job of 3 GiB runs there already: 1 GiB is left for another, and the only slot of t-a is taken.
    slots = trainer_slots([trainer("t-a", "a", max_jobs="2")], nodes, {"t-a": [3 * GIB]})
    assert slots[0].free_bytes == 1 * GIB and slots[0].has_room
    assert choose_trainer(slots, 2 * GIB) is None
    assert "2,048 MiB free" in why_waiting(slots, 2 * GIB)
    busy = trainer_slots([trainer("t-a", "a")], nodes, {"t-a": [GIB]})
    assert choose_trainer(busy, GIB) is None and "busy" in why_waiting(busy, GIB)


def test_a_gpu_trainer_is_placed_by_its_gpu_memory() -> None:
    nodes = {"g": node("g", cpu_free=1 * GIB, gpu_free=20 * GIB)}
    slots = trainer_slots([trainer("t-g", "g", device="gpu:0")], nodes, {})
    assert slots[0].free_bytes == 20 * GIB
    assert choose_trainer(slots, 8 * GIB) == slots[0]


def test_without_readings_or_trainers() -> None:
    # No node agent: memory unknown, the free slot decides.
    slots = trainer_slots([trainer("t-x", "nowhere")], {}, {})
    assert slots == [TrainerSlot(slots[0].instance, 0, 1, None)] and choose_trainer(slots, 100 * GIB) == slots[0]
    # Draining trainers and other kinds are not candidates.
    assert trainer_slots([trainer("t-d", "a", serving=False)], {}, {}) == []
    assert "no trainer" in why_waiting([], GIB)
