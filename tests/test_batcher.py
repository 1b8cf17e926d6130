"""DynamicBatcher: batch forming, priorities, units, errors, backpressure, cancellation, deadlines, shutdown.

Timing is controlled with a gate (threading.Event) that holds a batch inside execute: while it is held the
single execution slot is busy, so later submits queue up deterministically and the test can inspect the queue.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.errors import AimassError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from aimass.runtime.scope import priority_rank
from aimass.v1 import common_pb2

LOW = common_pb2.PRIORITY_LOW
NORMAL = common_pb2.PRIORITY_NORMAL
HIGH = common_pb2.PRIORITY_HIGH
CRITICAL = common_pb2.PRIORITY_CRITICAL
UNSPECIFIED = common_pb2.PRIORITY_UNSPECIFIED

_names = itertools.count()


class Engine:
    """A real batched execute: records every batch it saw and returns each request times 10."""

    def __init__(self, *, hold_first: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        if not hold_first:
            self.gate.set()

    def __call__(self, requests: Sequence[Any]) -> list[Any]:
        self.batches.append(list(requests))
        self.entered.set()
        if self.hold_first and len(self.batches) == 1:
            assert self.gate.wait(5), "test never released the gate"
        return [r * 10 if isinstance(r, int) else len(r) for r in requests]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5)

    def seen(self) -> list[Any]:
        return [r for batch in self.batches for r in batch]


Factory = Callable[..., Awaitable[DynamicBatcher[Any, Any]]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    """Build started batchers with unique names; release gates and close them after the test."""
    made: list[tuple[DynamicBatcher[Any, Any], Engine]] = []

    async def _make(engine: Engine, **kwargs: Any) -> DynamicBatcher[Any, Any]:
        kwargs.setdefault("name", f"test{next(_names)}")
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(engine, **kwargs)
        await batcher.start()
        made.append((batcher, engine))
        return batcher

    yield _make
    for batcher, engine in made:
        engine.gate.set()
        await batcher.close(drain=False)


async def hold_slot(batcher: DynamicBatcher[Any, Any], engine: Engine) -> asyncio.Task[Any]:
    """Submit a blocker (request 0) and wait until execute is holding it, so the next submits queue up."""
    blocker = asyncio.create_task(batcher.submit(0))
    await engine.wait_entered()
    return blocker


async def queue_tasks(batcher: DynamicBatcher[Any, Any], requests: Sequence[Any]) -> list[asyncio.Task[Any]]:
    tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0)  # one loop turn: every task runs up to its await, i.e. is queued
    return tasks


async def queue_with(
    batcher: DynamicBatcher[Any, Any], argument: str, requests: Sequence[tuple[Any, Any]]
) -> list[asyncio.Task[Any]]:
    """Like queue_tasks, for (request, value of submit's ``argument``) pairs, queued in the order given."""
    tasks = [asyncio.create_task(batcher.submit(r, **{argument: value})) for r, value in requests]
    await asyncio.sleep(0)
    return tasks


async def queue_prioritised(
    batcher: DynamicBatcher[Any, Any], requests: Sequence[tuple[Any, int]]
) -> list[asyncio.Task[Any]]:
    return await queue_with(batcher, "priority", requests)


async def test_concurrent_submits_form_fifo_batches(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=4, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    tasks = await queue_tasks(b, range(1, 11))
    assert b.queue_depth == 10 and b.in_flight == 1

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [r * 10 for r in range(1, 11)]
    assert await blocker == 0
    assert engine.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    s = b.stats
    assert (s.submitted, s.executed_requests, s.executed_items, s.executed_batches) == (11, 11, 11, 4)
    assert b.queue_depth == 0 and b.in_flight == 0


async def test_many_unheld_submits_use_fewer_calls(make: Factory) -> None:
    engine = Engine()
    b = await make(engine, max_batch_size=8, max_queue_delay_s=0.02)
    assert await asyncio.gather(*(b.submit(i) for i in range(50))) == [i * 10 for i in range(50)]
    assert len(engine.batches) < 50
    assert all(len(batch) <= 8 for batch in engine.batches)
    assert engine.seen() == list(range(50))


async def test_size_of_counts_units(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=10, max_queue_delay_s=0.01, size_of=len)
    blocker = asyncio.create_task(b.submit(["x"]))
    await engine.wait_entered()
    reqs = [["a"] * 4, ["b"] * 4, ["c"] * 4, ["d"] * 3]
    tasks = await queue_tasks(b, reqs)
    assert b.queue_depth == 15  # units, not requests

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [4, 4, 4, 3]
    await blocker
    assert [[len(r) for r in batch] for batch in engine.batches[1:]] == [[4, 4], [4, 3]]
    assert b.stats.executed_items == 16


async def test_oversized_request_runs_alone(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=4, max_queue_delay_s=0.01, size_of=len)
    blocker = asyncio.create_task(b.submit(["x"]))
    await engine.wait_entered()
    tasks = await queue_tasks(b, [["a"], ["b"] * 10, ["c"]])

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [1, 10, 1]
    await blocker
    assert [[len(r) for r in batch] for batch in engine.batches[1:]] == [[1], [10], [1]]


async def test_lone_request_waits_at_most_about_the_delay(make: Factory) -> None:
    engine = Engine()
    b = await make(engine, max_batch_size=32, max_queue_delay_s=0.05)
    start = time.monotonic()
    assert await b.submit(7) == 70
    assert time.monotonic() - start < 1.0
    assert engine.batches == [[7]]


@pytest.mark.parametrize("slots", [1, 2])
async def test_idle_batcher_runs_a_lone_request_without_waiting_for_the_delay(make: Factory, slots: int) -> None:
    # Adaptive batching: nothing is executing, so the request goes at once, not 10 s later.
    engine = Engine()
    b = await make(engine, max_batch_size=32, max_queue_delay_s=10.0, max_concurrent_batches=slots)
    assert await asyncio.wait_for(b.submit(7), timeout=5) == 70
    assert await asyncio.wait_for(b.submit(8), timeout=5) == 80
    assert engine.batches == [[7], [8]]


async def test_fixed_delay_mode_holds_a_lone_request_until_the_batch_fills(make: Factory) -> None:
    # adaptive=False (BatchingConfig.wait_when_idle): the classic batcher waits for the batch even when idle.
    engine = Engine()
    b = await make(engine, max_batch_size=2, max_queue_delay_s=10.0, adaptive=False)
    first = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.05)
    assert b.queue_depth == 1 and engine.batches == []
    assert await asyncio.wait_for(b.submit(2), timeout=5) == 20  # the batch is full: it goes
    assert await first == 10
    assert engine.batches == [[1, 2]]


async def test_arrivals_while_a_batch_executes_form_the_next_batch(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=4, max_queue_delay_s=10.0)
    blocker = await hold_slot(b, engine)
    tasks = []
    for r in range(1, 7):  # one at a time, as separate calls arrive
        tasks.append(asyncio.create_task(b.submit(r)))
        await asyncio.sleep(0.01)
    assert b.queue_depth == 6 and len(engine.batches) == 1
    engine.gate.set()
    # Taken as soon as the slot frees (a 10 s fill wait would trip the timeout), as large as allowed.
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=5) == [r * 10 for r in range(1, 7)]
    assert await blocker == 0
    assert engine.batches == [[0], [1, 2, 3, 4], [5, 6]]


async def test_a_second_slot_waits_to_fill_only_while_the_first_executes(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=3, max_queue_delay_s=10.0, max_concurrent_batches=2)
    blocker = await hold_slot(b, engine)
    first = await queue_tasks(b, [1, 2])
    await asyncio.sleep(0.05)
    assert len(engine.batches) == 1  # the free slot waits for the batch to fill while [0] executes
    third = asyncio.create_task(b.submit(3))
    assert await asyncio.wait_for(asyncio.gather(*first, third), timeout=5) == [10, 20, 30]  # full: goes
    assert engine.batches[1] == [1, 2, 3]
    late = await queue_tasks(b, [4])
    await asyncio.sleep(0.05)
    assert b.queue_depth == 1
    engine.gate.set()  # the model goes idle: the wait ends, long before 10 s
    assert await blocker == 0
    assert await asyncio.wait_for(late[0], timeout=5) == 40
    assert engine.batches == [[0], [1, 2, 3], [4]]


async def test_full_batch_goes_without_waiting_for_the_delay(make: Factory) -> None:
    engine = Engine()
    b = await make(engine, max_batch_size=2, max_queue_delay_s=30.0)
    assert list(await asyncio.wait_for(asyncio.gather(b.submit(1), b.submit(2)), timeout=2)) == [10, 20]
    assert engine.batches == [[1, 2]]


async def test_concurrent_batches_are_bounded() -> None:
    release = threading.Event()
    two_running = threading.Event()
    lock = threading.Lock()
    running = peak = 0

    def execute(requests: Sequence[int]) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                two_running.set()
        release.wait(5)
        with lock:
            running -= 1
        return list(requests)

    b: DynamicBatcher[int, int] = DynamicBatcher(
        execute, name=f"test{next(_names)}", max_batch_size=1, max_queue_delay_s=0, max_concurrent_batches=2
    )
    await b.start()
    try:
        tasks = await queue_tasks(b, range(6))
        assert await asyncio.to_thread(two_running.wait, 5)
        assert b.in_flight == 2 and b.queue_depth == 4  # a third batch waits for a slot
        release.set()
        assert await asyncio.gather(*tasks) == list(range(6))
        assert peak == 2
    finally:
        release.set()
        await b.close()


async def test_exception_in_a_slot_fails_only_that_request(make: Factory) -> None:
    def execute(requests: Sequence[int]) -> list[int | Exception]:
        return [ValueError(f"bad {r}") if r % 2 else r for r in requests]

    b: DynamicBatcher[int, int] = DynamicBatcher(execute, name=f"test{next(_names)}", max_batch_size=4)
    await b.start()
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        assert results[0] == 0 and results[2] == 2
        assert isinstance(results[1], ValueError) and str(results[1]) == "bad 1"
        assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"
    finally:
        await b.close()


async def test_execute_raising_fails_the_whole_batch() -> None:
    calls = 0

    def execute(requests: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("CUDA out of memory")
        return list(requests)

    b: DynamicBatcher[int, int] = DynamicBatcher(execute, name=f"test{next(_names)}", max_batch_size=4)
    await b.start()
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "CUDA out of memory" in str(r) for r in results)
        assert await b.submit(5) == 5  # the batcher keeps serving after a failed batch
    finally:
        await b.close()


async def test_wrong_result_count_is_internal_error() -> None:
    def execute(requests: Sequence[int]) -> list[int]:
        return list(requests)[:-1]

    b: DynamicBatcher[int, int] = DynamicBatcher(execute, name="shortcount", max_batch_size=3, max_queue_delay_s=1)
    await b.start()
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        for r in results:
            assert isinstance(r, AimassError)
            assert r.code == grpc.StatusCode.INTERNAL
            assert "returned 2 results for a batch of 3" in r.message
    finally:
        await b.close()


async def test_queue_full_rejects_with_resource_exhausted(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, name="qfull", max_batch_size=8, max_queue_size=3)
    blocker = await hold_slot(b, engine)
    tasks = await queue_tasks(b, [1, 2, 3])
    assert b.queue_depth == 3

    with pytest.raises(ResourceExhausted) as info:
        await b.submit(4)
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "QUEUE_FULL"
    assert err.message == "qfull queue is full (3 items waiting, limit 3); retry later"
    assert "retry_after_ms" in err.metadata
    assert b.stats.rejected_full == 1
    assert REGISTRY.get_sample_value("aimass_batcher_dropped_total", {"batcher": "qfull", "reason": "queue_full"}) == 1

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [10, 20, 30]
    await blocker
    assert 4 not in engine.seen()


async def test_cancelled_queued_request_never_reaches_execute(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8)
    blocker = await hold_slot(b, engine)
    doomed, kept = await queue_tasks(b, [1, 2])
    assert b.queue_depth == 2

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert b.queue_depth == 1  # its units are freed at once, not when the collector reaches it
    assert b.stats.dropped_cancelled == 1

    engine.gate.set()
    assert await kept == 20
    await blocker
    assert 1 not in engine.seen()


async def test_cancel_while_executing_discards_result(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8)
    blocker = await hold_slot(b, engine)
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker
    engine.gate.set()
    assert await b.submit(3) == 30  # the batcher is fine after the discarded result
    assert b.stats.dropped_cancelled == 0
    assert engine.batches[0] == [0]


async def test_deadline_expires_in_queue(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, name="expiry", max_batch_size=8)
    blocker = await hold_slot(b, engine)
    loop = asyncio.get_running_loop()

    with pytest.raises(DeadlineExceeded) as info:
        await b.submit(5, deadline=loop.time() + 0.02)  # fails while the slot is still held
    assert "ms in queue; deadline passed before execution" in info.value.message
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert b.stats.dropped_expired == 1
    assert b.queue_depth == 0
    assert REGISTRY.get_sample_value("aimass_batcher_dropped_total", {"batcher": "expiry", "reason": "expired"}) == 1

    engine.gate.set()
    await blocker
    assert 5 not in engine.seen()


async def test_deadline_already_passed_raises_at_once(make: Factory) -> None:
    engine = Engine()
    b = await make(engine)
    with pytest.raises(DeadlineExceeded):
        await b.submit(1, deadline=asyncio.get_running_loop().time() - 0.001)
    assert engine.batches == []
    assert b.stats.dropped_expired == 1


async def test_close_drains_queued_work_and_rejects_new(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=2, max_queue_delay_s=10.0)
    blockers = await queue_tasks(b, [0, -1])  # a full batch: starts without the 10 s delay, then is held
    await engine.wait_entered()
    tasks = await queue_tasks(b, [1, 2, 3])

    closing = asyncio.create_task(b.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as info:
        await b.submit(9)
    assert "is shutting down" in info.value.message
    assert not closing.done()

    engine.gate.set()
    await asyncio.wait_for(closing, timeout=2)
    assert [t.result() for t in tasks] == [10, 20, 30]
    assert [t.result() for t in blockers] == [0, -10]
    assert engine.batches == [[0, -1], [1, 2], [3]]  # [3] alone: closing does not wait for the batch to fill


async def test_close_without_drain_fails_queued(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8)
    blocker = await hold_slot(b, engine)
    tasks = await queue_tasks(b, [1, 2])

    closing = asyncio.create_task(b.close(drain=False))
    for t in tasks:
        with pytest.raises(Unavailable):
            await t
    assert b.stats.dropped_shutdown == 2 and b.queue_depth == 0

    engine.gate.set()
    await closing
    assert await blocker == 0  # what was executing still completes
    assert 1 not in engine.seen() and 2 not in engine.seen()


async def test_submit_before_start_is_unavailable() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(Engine(), name=f"test{next(_names)}")
    with pytest.raises(Unavailable):
        await b.submit(1)
    await b.close()


async def test_batch_size_histogram_observes_units(make: Factory) -> None:
    engine = Engine()
    b = await make(engine, name="hist", max_batch_size=4, max_queue_delay_s=1.0, size_of=len)
    assert await b.submit(["a"] * 4) == 4
    assert REGISTRY.get_sample_value("aimass_batch_size_count", {"batcher": "hist"}) == 1
    assert REGISTRY.get_sample_value("aimass_batch_size_sum", {"batcher": "hist"}) == 4


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(Engine(), name="bad", max_batch_size=0)


# -- priorities -------------------------------------------------------------------------------------------------


async def test_contended_batches_take_higher_priorities_first(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=3, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    # Arrival order: three LOW, a NORMAL (the default), then HIGH, CRITICAL and an UNSPECIFIED (= NORMAL).
    low = await queue_prioritised(b, [(1, LOW), (2, LOW), (3, LOW)])
    normal = asyncio.create_task(b.submit(4))
    rest = await queue_prioritised(b, [(5, HIGH), (6, CRITICAL), (7, UNSPECIFIED)])
    assert b.queue_depth == 7

    engine.gate.set()
    assert await asyncio.gather(*low, normal, *rest) == [10, 20, 30, 40, 50, 60, 70]
    await blocker
    assert engine.batches == [[0], [6, 5, 4], [7, 1, 2], [3]]


async def test_fifo_within_a_priority(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=2, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    tasks = await queue_prioritised(b, [(1, HIGH), (2, LOW), (3, HIGH), (4, LOW), (5, HIGH), (6, LOW)])

    engine.gate.set()
    await asyncio.gather(*tasks, blocker)
    assert engine.batches == [[0], [1, 3], [5, 2], [4, 6]]


async def test_request_that_does_not_fit_is_not_overtaken_by_a_lower_priority(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=4, max_queue_delay_s=0.01, size_of=len)
    blocker = asyncio.create_task(b.submit(["x"]))
    await engine.wait_entered()
    tasks = await queue_prioritised(b, [(["a"] * 3, HIGH), (["b"] * 3, HIGH), (["c"], LOW)])

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [3, 3, 1]
    await blocker
    assert engine.batches[1:] == [[["a"] * 3], [["b"] * 3, ["c"]]]


async def test_uncontended_requests_run_at_once_whatever_their_priority(make: Factory) -> None:
    engine = Engine()
    b = await make(engine, max_batch_size=8, max_queue_delay_s=0)
    for request, priority in [(1, LOW), (2, CRITICAL), (3, NORMAL)]:
        assert await b.submit(request, priority=priority) == request * 10
    assert engine.batches == [[1], [2], [3]]


async def test_a_later_higher_priority_arrival_does_not_postpone_the_batch(make: Factory) -> None:
    # With a second slot free while a batch executes, the next batch closes max_queue_delay_s after the *oldest*
    # waiting request, not after the most urgent one.
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=32, max_queue_delay_s=1.0, max_concurrent_batches=2)
    blocker = await hold_slot(b, engine)
    loop = asyncio.get_running_loop()
    start = loop.time()
    low = asyncio.create_task(b.submit(1, priority=LOW))
    await asyncio.sleep(0.5)
    high = asyncio.create_task(b.submit(2, priority=HIGH))
    assert list(await asyncio.gather(low, high)) == [10, 20]
    assert loop.time() - start < 1.4  # ~1.0; a clock restarted by the HIGH request would give >= 1.5
    assert engine.batches == [[0], [2, 1]]
    engine.gate.set()
    assert await blocker == 0


async def test_higher_priority_displaces_the_newest_lowest_priority_when_full(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, name="displace", max_batch_size=8, max_queue_size=3)
    blocker = await hold_slot(b, engine)
    low1, low2, normal3 = await queue_prioritised(b, [(1, LOW), (2, LOW), (3, NORMAL)])

    high4 = asyncio.create_task(b.submit(4, priority=HIGH))
    with pytest.raises(ResourceExhausted) as info:
        await low2  # the newest LOW made room
    err = info.value
    assert err.reason == "QUEUE_FULL"
    assert err.message == (
        "displace queue is full (limit 3 items) and a HIGH-priority request took the place of this LOW-priority"
        " one before it ran; retry later"
    )
    assert err.metadata["displaced_by"] == "HIGH" and "retry_after_ms" in err.metadata
    assert b.queue_depth == 3 and b.stats.dropped_displaced == 1 and b.stats.rejected_full == 0

    # Nothing below LOW to displace: the newcomer is refused. A NORMAL displaces the remaining LOW.
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await b.submit(5, priority=LOW)
    normal6 = asyncio.create_task(b.submit(6, priority=NORMAL))
    with pytest.raises(ResourceExhausted, match="took the place of this LOW-priority one"):
        await low1
    # Equal priorities never displace each other.
    with pytest.raises(ResourceExhausted, match=r"queue is full \(3 items waiting"):
        await b.submit(7, priority=NORMAL)
    s = b.stats
    assert (s.dropped_displaced, s.rejected_full, b.queue_depth) == (2, 2, 3)
    assert (
        REGISTRY.get_sample_value("aimass_batcher_dropped_total", {"batcher": "displace", "reason": "displaced"}) == 2
    )

    engine.gate.set()
    assert list(await asyncio.gather(high4, normal3, normal6)) == [40, 30, 60]
    await blocker
    assert engine.batches == [[0], [4, 3, 6]]


async def test_displacement_takes_several_lowest_first_or_none_at_all(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8, max_queue_size=4, size_of=len)
    blocker = asyncio.create_task(b.submit(["x"]))
    await engine.wait_entered()
    low_a, normal_b, low_c, normal_d = await queue_prioritised(
        b, [(["a"], LOW), (["b"], NORMAL), (["c"], LOW), (["d"], NORMAL)]
    )
    # Three units for a CRITICAL request: both LOWs go (newest first), then the newest NORMAL.
    critical = asyncio.create_task(b.submit(["e"] * 3, priority=CRITICAL))
    for displaced in (low_c, low_a, normal_d):
        with pytest.raises(ResourceExhausted, match="CRITICAL-priority request took the place"):
            await displaced
    assert b.queue_depth == 4 and b.stats.dropped_displaced == 3

    # Making room for four HIGH units would need the CRITICAL request's place too: nothing is displaced.
    with pytest.raises(ResourceExhausted, match="4 items waiting, limit 4; this request adds 4"):
        await b.submit(["f"] * 4, priority=HIGH)
    assert b.queue_depth == 4 and b.stats.dropped_displaced == 3 and not normal_b.done()

    engine.gate.set()
    assert list(await asyncio.gather(critical, normal_b)) == [3, 1]
    await blocker
    assert engine.batches[1:] == [[["e"] * 3, ["b"]]]


async def test_cancelled_and_expired_high_priority_requests_are_skipped_and_free_their_units(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8, max_queue_size=5)
    blocker = await hold_slot(b, engine)
    loop = asyncio.get_running_loop()
    low1, high2, high3, low4 = await queue_prioritised(b, [(1, LOW), (2, HIGH), (3, HIGH), (4, LOW)])
    expiring = asyncio.create_task(b.submit(5, priority=CRITICAL, deadline=loop.time() + 0.05))
    await asyncio.sleep(0)
    assert b.queue_depth == 5

    high3.cancel()
    with pytest.raises(asyncio.CancelledError):
        await high3
    assert b.queue_depth == 4  # returned at once, not when the collector reaches the entry
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert b.queue_depth == 3
    # The freed units take new requests right away, and the budget still holds.
    late = await queue_prioritised(b, [(6, LOW), (7, LOW)])
    assert b.queue_depth == 5
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await b.submit(8, priority=LOW)

    engine.gate.set()
    assert await asyncio.gather(low1, high2, low4, *late) == [10, 20, 40, 60, 70]
    await blocker
    assert engine.batches == [[0], [2, 1, 4, 6, 7]]
    s = b.stats
    assert (s.dropped_cancelled, s.dropped_expired, s.rejected_full) == (1, 1, 1)
    assert b.queue_depth == 0


async def test_close_without_drain_fails_every_priority(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=8)
    blocker = await hold_slot(b, engine)
    tasks = await queue_prioritised(b, [(1, LOW), (2, CRITICAL), (3, NORMAL), (4, HIGH)])

    closing = asyncio.create_task(b.close(drain=False))
    for t in tasks:
        with pytest.raises(Unavailable):
            await t
    assert b.stats.dropped_shutdown == 4 and b.queue_depth == 0
    engine.gate.set()
    await closing
    assert await blocker == 0


async def test_close_with_drain_runs_queued_work_in_priority_order(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=2, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    tasks = await queue_prioritised(b, [(1, LOW), (2, NORMAL), (3, HIGH)])
    closing = asyncio.create_task(b.close(drain=True))
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.wait_for(closing, timeout=2)
    assert [t.result() for t in tasks] == [10, 20, 30]
    await blocker
    assert engine.batches == [[0], [3, 2], [1]]


async def test_out_of_range_priority_is_invalid_argument(make: Factory) -> None:
    engine = Engine()
    b = await make(engine)
    with pytest.raises(InvalidArgument) as info:
        await b.submit(1, priority=7)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "BAD_PRIORITY"
    assert info.value.message.startswith("meta.priority is 7, which is not a Priority value; send PRIORITY_LOW (1)")
    assert engine.batches == [] and b.queue_depth == 0
    with pytest.raises(InvalidArgument, match=r"meta\.priority is -1"):
        priority_rank(-1)
    assert [priority_rank(p) for p in (UNSPECIFIED, LOW, NORMAL, HIGH, CRITICAL)] == [2, 3, 2, 1, 0]


# -- tenants: fair share within a priority ------------------------------------------------------------------------


async def test_tenants_take_turns_by_the_service_they_received(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=2, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    # The heavy tenant queued six before the light one's two arrived.
    tasks = await queue_with(b, "tenant", [*((r, "heavy") for r in range(1, 7)), (7, "light"), (8, "light")])

    engine.gate.set()
    assert await asyncio.gather(*tasks) == [r * 10 for r in range(1, 9)]
    await blocker
    # First come, first served would run the light tenant's last: [[1, 2], [3, 4], [5, 6], [7, 8]]. At equal
    # service the tenant with less waiting goes first.
    assert engine.batches[1:] == [[7, 1], [8, 2], [3, 4], [5, 6]]


async def test_tenant_weights_scale_the_share(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, max_batch_size=3, max_queue_delay_s=0.01)
    blocker = await hold_slot(b, engine)
    # Each request carries its tenant's weight, as the gateway's request scope does.
    tasks = [asyncio.create_task(b.submit(r, tenant="gold", weight=2.0)) for r in range(1, 7)]
    tasks += [asyncio.create_task(b.submit(r, tenant="basic")) for r in range(11, 17)]
    await asyncio.sleep(0)

    engine.gate.set()
    await asyncio.gather(*tasks, blocker)
    # While both wait, gold is served twice for every basic request.
    assert engine.batches[1:] == [[1, 11, 2], [3, 12, 4], [5, 13, 6], [14, 15, 16]]


async def test_a_full_queue_makes_room_for_a_tenant_holding_less_of_it(make: Factory) -> None:
    engine = Engine(hold_first=True)
    b = await make(engine, name="fair-full", max_batch_size=8, max_queue_size=4)
    blocker = await hold_slot(b, engine)
    heavy = await queue_with(b, "tenant", [(r, "heavy") for r in range(1, 5)])
    assert b.queue_depth == 4

    # The queue is full of the heavy tenant's requests: its newest gives way to the light tenant's first.
    light = await queue_with(b, "tenant", [(5, "light")])
    with pytest.raises(ResourceExhausted) as info:
        await heavy[3]
    assert info.value.reason == "QUEUE_FULL" and info.value.metadata["displaced_by"] == "fair_share"
    assert "another tenant's request took the place of this one before it ran" in info.value.message
    # The heavy tenant still holds the most: its next request is refused; the light tenant's second gets a place.
    with pytest.raises(ResourceExhausted, match=r"queue is full \(4 items waiting"):
        await b.submit(6, tenant="heavy")
    light += await queue_with(b, "tenant", [(7, "light")])
    with pytest.raises(ResourceExhausted, match="fair share"):
        await heavy[2]
    # Even shares now (two each): nobody gives way.
    with pytest.raises(ResourceExhausted, match=r"queue is full \(4 items waiting"):
        await b.submit(8, tenant="light")
    s = b.stats
    assert (s.dropped_displaced, s.rejected_full, b.queue_depth) == (2, 2, 4)

    engine.gate.set()
    assert await asyncio.gather(*heavy[:2], *light) == [10, 20, 50, 70]
    await blocker
    assert engine.batches[1:] == [[1, 5, 2, 7]]
