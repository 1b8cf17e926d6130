"""Where a training job runs: policy only, no I/O (as scheduler/placement.py is for models).

A job goes to a trainer with a free job slot on a node whose device has the memory the job needs free, the node with
the most free memory first; with none, the job waits in the queue. Memory comes from the node agent's NVML readings
(CPU RAM without a GPU), less what jobs placed there since are expected to take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aimass.runtime.discovery import Instance
from aimass.v1 import common_pb2, scheduler_pb2

TRAINER_KIND = "trainer"


@dataclass(frozen=True)
class TrainerSlot:
    instance: Instance
    running: int
    capacity: int
    # Bytes free on the trainer's device, less what running jobs there are expected to take; None: no readings.
    free_bytes: int | None

    @property
    def has_room(self) -> bool:
        return self.running < self.capacity


def free_bytes(node: scheduler_pb2.NodeView | None, use_gpu: bool) -> int | None:
    """The most memory free on one device of the node: a GPU's when the trainer uses GPUs, else the CPU's (RAM)."""
    if node is None:
        return None
    wanted = common_pb2.DEVICE_KIND_GPU if use_gpu else common_pb2.DEVICE_KIND_CPU
    free = [
        d.info.memory_total_bytes - d.info.memory_used_bytes
        for d in node.devices
        if d.info.kind == wanted and d.info.memory_total_bytes
    ]
    return max(free) if free else None


def trainer_slots(
    instances: Sequence[Instance],
    nodes: Mapping[str, scheduler_pb2.NodeView],
    running: Mapping[str, Sequence[int]],
) -> list[TrainerSlot]:
    """The serving trainers, each with its jobs running (``running``: instance id -> those jobs' expected bytes)."""
    slots = []
    for instance in instances:
        if instance.kind != TRAINER_KIND or not instance.serving:
            continue
        jobs = running.get(instance.instance_id, ())
        node = nodes.get(instance.labels.get("node", ""))
        # Replicas and trainers label their device "cpu" or "gpu:<index>" (aimass.runtime.load_report.local_device_id),
        # "<node>/" before it in some views.
        free = free_bytes(node, use_gpu=instance.labels.get("device", "").rpartition("/")[2].startswith("gpu"))
        capacity = int(instance.labels.get("max_jobs", "1") or 1)
        slots.append(TrainerSlot(instance, len(jobs), max(capacity, 1), None if free is None else free - sum(jobs)))
    return slots


def choose_trainer(slots: Sequence[TrainerSlot], need_bytes: int) -> TrainerSlot | None:
    """The trainer for a job needing ``need_bytes``, or None (the job waits)."""
    fits = [s for s in slots if s.has_room and (s.free_bytes is None or s.free_bytes >= need_bytes)]
    if not fits:
        return None
    # Known free memory first, most of it first; then the least busy; the instance id keeps it deterministic.
    return min(
        fits,
        key=lambda s: (s.free_bytes is None, -(s.free_bytes or 0), s.running / s.capacity, s.instance.instance_id),
    )


def why_waiting(slots: Sequence[TrainerSlot], need_bytes: int) -> str:
    """A person's account of why no trainer takes the job now."""
    if not slots:
        return "no trainer is running (aimass up starts one)"
    if not any(s.has_room for s in slots):
        return f"every trainer is busy ({sum(s.running for s in slots)} jobs running)"
    most = max((s.free_bytes or 0) for s in slots if s.has_room)
    return (
        f"waiting for {need_bytes / 2**20:,.0f} MiB free on a trainer's device (most free now: {most / 2**20:,.0f} MiB)"
    )
