"""Simulated replicas on heterogeneous simulated GPUs, and the load reports they send.

One replica process per GPU (each simulated node is a single-GPU host, so the scheduler's node → replica mapping
is exact). A replica hosts the models placed on it; each model has its own bounded FIFO queue and dynamic batcher
(up to ``max_batch_size`` requests, closed when full or ``max_queue_delay_s`` after its oldest request arrived, as
aimass.runtime.batcher does). The GPU runs one batch at a time, taking the model whose oldest request has waited
longest. A batch of n requests takes the calibration's time for n on the host divided by the GPU's speed. A model
placed on demand loads for its measured (or derived) load time before its first batch.

An LLM (a ``simulator.llm.LlmProfile``) on a replica is an engine stepping as vLLM does (simulator/llm.py): it
shares the GPU with the replica's other models, one engine step at a time, each step taking its turn like a batch
(the engine's turn dates from the end of its previous step, a batch's from its oldest request).

Memory lives in a ``scheduler.devices.SimulatedFleet`` per node (allocated at load, released at eviction), whose
readings, with the busy fraction of the last report window as utilisation, are what the node agents report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aimass.v1 import common_pb2, scheduler_pb2
from scheduler.devices import SimulatedFleet, SimulatedGpu, gpu_device_id
from simulator.admission import BatchedAdmission, LlmAdmission
from simulator.calibration import ModelProfile
from simulator.engine import Event, EventLoop
from simulator.llm import LlmEngineModel, LlmProfile
from simulator.workload import Outcome, Request

MODEL_VERSION = "1"


@dataclass(frozen=True)
class BatchingSpec:
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.004
    queue_capacity: int = 2048


@dataclass
class ModelSlot:
    """One model on one replica: its queue, batcher state and report-window counters."""

    profile: ModelProfile
    batching: BatchingSpec
    pid: int
    loaded: bool = False
    queue: deque[Request] = field(default_factory=deque)
    # Requests in ``queue`` still pending (timed-out ones stay in the deque until a batch skips them).
    waiting: int = 0
    running: int = 0
    last_used_s: float = 0.0
    window_completed: int = 0
    window_batches: int = 0
    window_units: int = 0
    # An LLM's engine (None for batched models), and since when it has waited for the device.
    engine: LlmEngineModel | None = None
    turn_since: float = 0.0
    # The engine's generated tokens at the last load report.
    reported_tokens: int = 0
    # SLO-aware admission (simulator/admission.py), when the scenario turns it on.
    admission: BatchedAdmission | LlmAdmission | None = None

    def sync(self) -> None:
        """An engine's queue and batch as the slot's waiting and running counts (reports, placement)."""
        if self.engine is not None:
            self.waiting, self.running = len(self.engine.waiting), len(self.engine.running)

    def head(self) -> Request | None:
        while self.queue and self.queue[0].outcome is not Outcome.PENDING:
            self.queue.popleft()
        return self.queue[0] if self.queue else None


@dataclass
class Batch:
    model: str
    requests: list[Request]
    started: float
    seconds: float


class SimReplica:
    def __init__(
        self,
        instance_id: str,
        node: SimulatedFleet,
        loop: EventLoop,
        done: Callable[[Request], None],
        served: Mapping[str, BatchingSpec],
        *,
        admission: Mapping[str, float] | None = None,
    ) -> None:
        self.instance_id = instance_id
        # SLO-aware admission on: the tenants' fair-share weights (simulator/admission.py).
        self.admission = admission
        # Every model this replica can serve (its catalogue), placed here or not: its reports list them all.
        self.served = dict(served)
        self.node = node
        self.gpu: SimulatedGpu = node.devices[0]
        self.device_id = gpu_device_id(node.node_id, 0)
        self.loop = loop
        self.done = done
        self.models: dict[str, ModelSlot] = {}
        self.batch: Batch | None = None
        self._kick_event: Event | None = None
        # Busy seconds: in total (clipped to the measured window) and, for the utilisation reading, of batches that
        # finished since the last reading (counted from that reading on).
        self.busy_s = 0.0
        self.window_busy_s = 0.0
        self._last_reading = 0.0
        self._last_load_report = 0.0
        self.measure_until = float("inf")
        # Device seconds per tenant (each batch's time split evenly over its requests).
        self.tenant_busy_s: dict[str, float] = {}
        self.batches = 0

    @property
    def speed(self) -> float:
        return self.gpu.speed

    # -- models ----------------------------------------------------------------------------------------------

    def add_model(self, profile: ModelProfile, batching: BatchingSpec, pid: int, *, loaded: bool) -> ModelSlot:
        slot = ModelSlot(profile, batching, pid, loaded=loaded)
        if isinstance(profile, LlmProfile):
            slot.engine = LlmEngineModel(profile, self.speed)
        if self.admission is not None:
            slot.admission = (
                LlmAdmission() if slot.engine is not None else BatchedAdmission(self.admission, batching.max_batch_size)
            )
        self.models[profile.name] = slot
        self.node.allocate(0, profile.footprint_bytes, pid=pid, instance_id=self.instance_id)
        return slot

    def finish_loading(self, name: str) -> None:
        slot = self.models.get(name)
        if slot is not None:
            slot.loaded = True
            self.kick()

    def remove_model(self, name: str) -> None:
        slot = self.models.pop(name)
        if slot.waiting or slot.running:
            raise RuntimeError(f"{self.instance_id}: evicting {name} with work queued (placement saw it idle)")
        self.node.release(0, slot.pid)

    def busy_with(self, name: str) -> bool:
        slot = self.models.get(name)
        return slot is not None and (slot.waiting > 0 or slot.running > 0)

    # -- requests --------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> bool:
        """Queues ``request``; False when its model's queue is full (RESOURCE_EXHAUSTED), or when admission judges
        it would miss its SLO (its ``extra["retry_after_s"]`` then holds the retry delay the refusal names)."""
        slot = self.models[request.model]
        retry = self._unmeetable(slot, request)
        if retry is not None:
            request.extra["retry_after_s"] = retry
            return False
        if slot.engine is not None:
            if not slot.engine.has_work:
                slot.turn_since = self.loop.now
            accepted = slot.engine.add(request)
            slot.sync()
            if accepted:
                self.kick()
            return accepted
        if slot.waiting >= slot.batching.queue_capacity:
            return False
        slot.queue.append(request)
        slot.waiting += 1
        self.kick()
        return True

    def _unmeetable(self, slot: ModelSlot, request: Request) -> float | None:
        now = self.loop.now
        if isinstance(slot.admission, LlmAdmission) and slot.engine is not None:
            return slot.admission.check(slot.engine, request, now)
        if isinstance(slot.admission, BatchedAdmission):
            batch = self.batch
            running_for = now - batch.started if batch is not None and batch.model == request.model else None
            return slot.admission.check(request, now, running_for, self._other_work_s(request.model), self._step_s())
        return None

    def _other_work_s(self, model: str) -> float:
        """Device seconds of other models' work ahead: what is left of a batch of theirs running now, and their
        queued units at the pace their admission learnt."""
        batch, now = self.batch, self.loop.now
        seconds = max(0.0, batch.started + batch.seconds - now) if batch is not None and batch.model != model else 0.0
        for name, slot in self.models.items():
            if name != model and isinstance(slot.admission, BatchedAdmission):
                seconds += slot.waiting * slot.admission.drain.unit_s
        return seconds

    def _step_s(self) -> float:
        """Seconds of the LLM engines' steps taken between two batches: the mean step of each engine with work."""
        return sum(
            slot.admission.step_s
            for slot in self.models.values()
            if isinstance(slot.admission, LlmAdmission) and slot.engine is not None and slot.engine.has_work
        )

    def cancel(self, request: Request) -> None:
        """The gateway gave up on ``request`` (deadline): a queued one leaves the queue's budget at once."""
        slot = self.models.get(request.model)
        if slot is not None and slot.engine is not None:
            slot.engine.abort(request)
            slot.sync()
        elif slot is not None and request.extra.get("started") is None:
            slot.waiting -= 1
            if isinstance(slot.admission, BatchedAdmission):
                slot.admission.left_queue(request)

    def kick(self) -> None:
        """Starts the next batch when the GPU is free and some model's batch is ready, or wakes up when one will be."""
        if self.batch is not None:
            return
        now = self.loop.now
        best: tuple[float, float, str] | None = None
        for name, slot in self.models.items():
            if slot.engine is not None:
                if slot.loaded and slot.engine.has_work:
                    key = (now, slot.turn_since, name)
                    if best is None or key < best:
                        best = key
                continue
            if not slot.loaded or slot.waiting == 0:
                continue
            head = slot.head()
            if head is None:
                continue
            full = slot.waiting >= slot.batching.max_batch_size
            ready_at = now if full else max(now, head.arrival + slot.batching.max_queue_delay_s)
            key = (ready_at, head.arrival, name)
            if best is None or key < best:
                best = key
        if best is None:
            return
        ready_at, _, name = best
        if ready_at <= now:
            if self._kick_event is not None:
                self._kick_event.cancel()
                self._kick_event = None
            self._start(name)
        elif self._kick_event is None or self._kick_event.time > ready_at:
            if self._kick_event is not None:
                self._kick_event.cancel()
            self._kick_event = self.loop.at(ready_at, self._wake)

    def _wake(self) -> None:
        self._kick_event = None
        self.kick()

    def _start(self, name: str) -> None:
        slot = self.models[name]
        if slot.engine is not None:
            step = slot.engine.plan(self.loop.now)
            slot.sync()
            if step is not None:
                self.batch = Batch(name, [s.request for s in step.sequences], self.loop.now, step.seconds)
                self.loop.after(step.seconds, self._finish)
            return
        taken: list[Request] = []
        while slot.queue and len(taken) < slot.batching.max_batch_size:
            request = slot.queue.popleft()
            if request.outcome is Outcome.PENDING:
                taken.append(request)
        now = self.loop.now
        for request in taken:
            request.extra["started"] = now
            if isinstance(slot.admission, BatchedAdmission):
                slot.admission.left_queue(request)
        slot.waiting -= len(taken)
        slot.running = len(taken)
        seconds = slot.profile.seconds(len(taken), self.speed)
        self.batch = Batch(name, taken, now, seconds)
        self.loop.after(seconds, self._finish)

    def _finish(self) -> None:
        batch = self.batch
        assert batch is not None
        self.batch = None
        now = self.loop.now
        slot = self.models[batch.model]
        if slot.engine is not None:
            self._finish_step(slot, batch)
            return
        slot.running = 0
        slot.last_used_s = now
        if isinstance(slot.admission, BatchedAdmission):
            slot.admission.observe(len(batch.requests), batch.seconds)
        share = self._charge(slot, batch, completed=len(batch.requests))
        for request in batch.requests:
            request.service_s = share
            self._answer(request, now)
        self.kick()

    def _finish_step(self, slot: ModelSlot, batch: Batch) -> None:
        now = self.loop.now
        assert slot.engine is not None
        ended = slot.engine.finish(now) if slot.engine.step is not None else []
        if isinstance(slot.admission, LlmAdmission):
            slot.admission.observe_step(batch.seconds)
        slot.sync()
        slot.turn_since = slot.last_used_s = now
        share = self._charge(slot, batch, completed=len(ended))
        for request in batch.requests:
            request.service_s += share
        for request in ended:
            if isinstance(slot.admission, LlmAdmission):
                slot.admission.observe(request)
            self._answer(request, now)
        self.kick()

    def _charge(self, slot: ModelSlot, batch: Batch, *, completed: int) -> float:
        """A finished batch or step in the report window's counters, the GPU's busy time and each tenant's share;
        returns each request's share of its seconds."""
        now = self.loop.now
        slot.window_batches += 1
        slot.window_units += len(batch.requests)
        slot.window_completed += completed
        self.batches += 1
        self.window_busy_s += now - max(batch.started, self._last_reading)
        self.busy_s += max(0.0, min(now, self.measure_until) - min(batch.started, self.measure_until))
        share = batch.seconds / len(batch.requests)
        for request in batch.requests:
            self.tenant_busy_s[request.tenant] = self.tenant_busy_s.get(request.tenant, 0.0) + share
        return share

    def _answer(self, request: Request, now: float) -> None:
        if request.outcome is Outcome.PENDING:
            request.outcome = Outcome.OK
            request.finished = now
            self.done(request)

    # -- readings --------------------------------------------------------------------------------------------

    def utilization_since_last(self) -> float:
        """Busy fraction of the GPU since the previous reading (NVML's utilisation over its sample period); a running
        batch counts up to now and the rest of it in the next reading."""
        now = self.loop.now
        busy = self.window_busy_s
        if self.batch is not None:
            busy += now - max(self.batch.started, self._last_reading)
        window = now - self._last_reading
        self.window_busy_s, self._last_reading = 0.0, now
        return min(1.0, max(0.0, busy / window)) if window > 0 else 0.0

    def model_loads(self) -> tuple[list[scheduler_pb2.ModelLoad], float]:
        """Per-model figures as a replica reports them (ModelLoad's documented meaning), its whole catalogue: models
        not placed here say loaded=false; and the window they cover, seconds. Window counters reset."""
        now = self.loop.now
        window_s, self._last_load_report = now - self._last_load_report, now
        loads = []
        for name in sorted(self.served.keys() - self.models.keys()):
            loads.append(
                scheduler_pb2.ModelLoad(
                    model=common_pb2.ModelRef(name=name, version=MODEL_VERSION),
                    device_id=self.device_id,
                    loaded=False,
                    queue_capacity=self.served[name].queue_capacity,
                    max_batch_size=self.served[name].max_batch_size,
                )
            )
        for name, slot in sorted(self.models.items()):
            occupancy = (
                slot.window_units / (slot.window_batches * slot.batching.max_batch_size) if slot.window_batches else 0.0
            )
            load = scheduler_pb2.ModelLoad(
                model=common_pb2.ModelRef(name=name, version=MODEL_VERSION),
                device_id=self.device_id,
                loaded=slot.loaded,
                queue_depth=slot.waiting,
                queue_capacity=slot.batching.queue_capacity,
                in_flight=slot.waiting + slot.running,
                batch_occupancy=occupancy,
                max_batch_size=slot.batching.max_batch_size,
                requests_per_second=slot.window_completed / window_s if window_s > 0 else 0.0,
                memory_bytes=slot.profile.footprint_bytes if slot.loaded else 0,
                last_used_unix_ms=round(slot.last_used_s * 1000) if slot.last_used_s else 0,
            )
            if slot.engine is not None:
                # What the real LLM replica reports from vLLM's scheduler stats.
                engine = slot.engine
                tokens, slot.reported_tokens = engine.tokens_generated - slot.reported_tokens, engine.tokens_generated
                load.kv_cache_usage = engine.blocks_used / engine.profile.kv_blocks
                load.waiting_requests = len(engine.waiting)
                load.running_requests = len(engine.running)
                load.tokens_per_second = tokens / window_s if window_s > 0 else 0.0
            loads.append(load)
            slot.window_completed = slot.window_batches = slot.window_units = 0
        return loads, window_s


def model_names(replica: SimReplica) -> tuple[str, ...]:
    return tuple(sorted(replica.models))


def total_units(replicas: Iterable[SimReplica]) -> int:
    return sum(slot.waiting + slot.running for r in replicas for slot in r.models.values())
