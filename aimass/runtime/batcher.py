"""Dynamic batching in front of an engine's batched ``execute(requests) -> responses`` (Triton style).

Handlers ``await batcher.submit(request, **scope.queue_terms(request.meta.priority))`` (aimass.runtime.scope: the
call's priority capped for its tenant, its deadline, tenant and weight); one collector task forms batches of up to
``max_batch_size`` units (a request's units come from ``size_of``, e.g. the number of texts in an Embed request) and
hands each batch to ``execute`` in a worker thread, so the event loop keeps serving while the model runs.

Batching is adaptive: it never waits while the model is idle. The collector takes a free execution slot *before*
forming a batch, then takes whatever is queued (up to ``max_batch_size`` units) at once. A request arriving at an
idle batcher therefore runs immediately, alone; while every slot is busy, arrivals pile up and the next batch takes
all that queued meanwhile as soon as a slot frees, so batches grow with the load and shrink to one when it goes.
(A fixed "wait up to N ms for the batch to fill" taxes every request of a lightly loaded replica by N ms and
gains nothing: what would have joined the batch during the wait joins the next one instead.)

``max_queue_delay_s`` only matters with ``max_concurrent_batches > 1``: when a slot frees while another batch is
still executing, the collector waits up to that long after the oldest waiting request was queued for the batch to
fill, so a second slot does not fragment the load into batches of one. It stops waiting as soon as the batch is
full or no batch is executing any more (the model went idle). With one slot (the default) it is never used.

``adaptive=False`` restores the classic fixed-delay batcher: a batch closes when it is full or
``max_queue_delay_s`` after its oldest request was queued, idle model or not. It trades every request's latency for
fuller batches (worth it only where a batch of one costs nearly as much as a full one), and tests use it to make
requests sit in the queue.

Priorities (``RequestMeta.priority``): a batch takes the waiting requests in order CRITICAL, HIGH, NORMAL, LOW
(UNSPECIFIED is NORMAL), in tenants' fair-share order within a priority (below; first come first served for one
tenant), and closes at the first request that does not fit, so neither a smaller nor a lower-priority request
overtakes it. This is strict priority, as in the LLM
engine: under sustained higher-priority load lower priorities wait, bounded by their deadlines. Uncontended,
every request runs as soon as it arrives and the order makes no difference.

Tenants (the request scope's, from the caller's API key) share a priority fairly, after virtual token counters
(VTC, Sheng et al., OSDI 2024; the LLM engine does the same with tokens): each tenant waits in its own FIFO, and the
next request taken is the head of the tenant that has received the least service, in units taken into batches
divided by its weight (the tenant's, from the store or ``tenants.weights``; among equals, the tenant with less
waiting). A tenant that starts waiting is lifted to the least counter among the tenants already waiting, so idling
banks no credit; counters restart whenever the queue empties. A flood from one tenant therefore delays its own later
requests, not another tenant's next one. With one tenant (or none named) this is first come, first served.

A full queue refuses a request with RESOURCE_EXHAUSTED, unless it holds requests of a lower priority than the
newcomer's: then the newest of the lowest priority queued are displaced (failed with RESOURCE_EXHAUSTED, as if
they had been refused on arrival) until the newcomer fits, lowest priority first. If displacing every
lower-priority request would not make room, nothing is displaced. Failing that, within the newcomer's priority a
tenant holding more queued units than the newcomer's tenant would gives up its newest requests (longest queue
drop, as in fair queueing), so a flood cannot keep a light tenant out of a full queue either; otherwise the
newcomer is refused. With one priority and one tenant in use this is the plain bounded queue.

Deadline admission (``refuse_unmeetable``, on in every replica's config): a request whose deadline the work queued
ahead of it would outlast is refused on arrival, RESOURCE_EXHAUSTED with reason DEADLINE_UNMEETABLE and a retry
delay (the estimate: aimass.runtime.backlog), instead of waiting only to expire. Work ahead counts by priority and
tenant share as the queue would serve it: all of every higher priority, none of the lower ones, and of other
tenants at its own priority only what fair sharing runs before it. So past saturation the low priorities and the
tenants over their share are the ones refused, early, while high-priority work and light tenants still meet their
deadlines; a request that finds nothing ahead is never refused. The estimate is looked at again after every batch,
for the requests still queued (in priority order, then first come first served): when the replica has slowed since
a request was admitted (a host under pressure, a throttled CPU), the ones that can no longer finish in time are
refused then, the same way, rather than left to wait out their deadlines. The gateway tries a refused request once
on another replica (gateway/forwarder.py).

Each priority holds a deque per tenant, with lazy removal: a cancelled or expired request is marked, its units are
returned to the queue budget at once, and the collector skips the entry when it reaches it.

With tracing on (aimass.runtime.tracing), a request submitted inside a sampled span gets three child spans of it:
"queue wait" (submit until a batch took it, or until it was dropped, with the reason), "batch execution" (from
then until its result was set; the batch's size is in its attributes) and inside that "model inference" (the
``execute`` call in the worker thread). They are recorded with their real times once the batch has finished, on the
event loop, so the worker thread and the queue do no tracing work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import functools
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from prometheus_client import Counter, Gauge, Histogram

from aimass.runtime import tracing
from aimass.runtime.backlog import HEADROOM, DrainEstimate
from aimass.runtime.config import BatchingConfig
from aimass.runtime.errors import AimassError, DeadlineExceeded, ResourceExhausted, Unavailable
from aimass.runtime.scope import RANK_NAMES, priority_rank
from aimass.tenancy.fair_share import FairShare
from aimass.v1 import common_pb2

__all__ = ["UNMEETABLE_REASON", "BatcherStats", "DynamicBatcher", "ExecuteFn"]

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Blocking; runs in a worker thread. One result per request, in order; an Exception in a slot fails only that
# request, raising fails the whole batch.
ExecuteFn = Callable[[Sequence[Req]], Sequence[Resp | Exception]]

BATCH_SIZE = Histogram(
    "aimass_batch_size",
    "Units (size_of) per executed batch.",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_DEPTH = Gauge("aimass_batcher_queue_depth", "Units waiting in the batcher queue.", ["batcher"])
DROPPED = Counter(
    "aimass_batcher_dropped_total",
    "Requests that never reached execute, by reason (queue_full, unmeetable, displaced, cancelled, expired, shutdown).",
    ["batcher", "reason"],
)

# The ErrorInfo reason of a request refused because the work ahead would outlast its deadline.
UNMEETABLE_REASON = "DEADLINE_UNMEETABLE"

_DROP_REASONS = ("queue_full", "unmeetable", "displaced", "cancelled", "expired", "shutdown")


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """Counters since construction. ``*_items`` are units (see ``size_of``); everything else counts requests."""

    submitted: int  # submit() calls on an open, running batcher, whatever happened to them next
    executed_items: int
    executed_requests: int
    executed_batches: int
    rejected_full: int
    rejected_unmeetable: int  # refused on arrival: the backlog ahead would outlast the deadline
    dropped_displaced: int  # queued, then pushed out of a full queue by a higher-priority request
    dropped_cancelled: int  # cancelled while queued; cancelled while executing still counts as executed
    dropped_expired: int  # deadline passed before execution (including already passed at submit)
    dropped_shutdown: int  # failed by close(drain=False)


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    DROPPED = enum.auto()


@dataclass(eq=False, slots=True)
class _Item(Generic[Req, Resp]):
    request: Req
    units: int
    future: asyncio.Future[Resp]
    enqueued_at: float
    deadline: float | None
    level: int
    tenant: str
    timer: asyncio.TimerHandle | None = None
    state: _State = _State.QUEUED
    # The submitter's trace context and when it was queued (wall clock, ns), for requests in a sampled trace.
    trace: otel_context.Context | None = None
    queued_ns: int = 0


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _call_execute(execute: ExecuteFn[Req, Resp], requests: list[Req]) -> tuple[list[Resp | Exception], tuple[int, int]]:
    """The results, and when execute ran (wall clock, ns: the "model inference" span of traced requests)."""
    started = time.time_ns()
    # list() here so a lazily produced result sequence is also computed off the event loop.
    results = list(execute(requests))
    return results, (started, time.time_ns())


def _failure_of(future: asyncio.Future[Any]) -> str | None:
    if future.cancelled():
        return "cancelled"
    error = future.exception() if future.done() else None
    return None if error is None else f"{type(error).__name__}: {error}"


class DynamicBatcher(Generic[Req, Resp]):
    """Queue + batch former + bounded concurrent execution for one engine method."""

    def __init__(
        self,
        execute: ExecuteFn[Req, Resp],
        *,
        name: str,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        size_of: Callable[[Req], int] = lambda r: 1,
        max_concurrent_batches: int = 1,
        executor: concurrent.futures.Executor | None = None,
        adaptive: bool = True,
        refuse_unmeetable: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self.name = name
        self._execute = execute
        self._max_batch_size = max_batch_size
        self._max_queue_delay_s = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._size_of = size_of
        self._max_concurrent_batches = max_concurrent_batches
        self._adaptive = adaptive
        self._refuse_unmeetable = refuse_unmeetable
        self._drain = DrainEstimate()
        # loop.time() at which each executing batch started (the oldest ends first).
        self._running_since: list[float] = []
        self._owns_executor = executor is None
        self._executor: concurrent.futures.Executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent_batches, thread_name_prefix=f"aimass-batcher-{name}"
        )

        # Per priority level, most urgent first: a FIFO per tenant, and the live units queued by each tenant.
        self._queues: tuple[dict[str, deque[_Item[Req, Resp]]], ...] = tuple({} for _ in RANK_NAMES)
        self._tenant_units: tuple[collections.Counter[str], ...] = tuple(collections.Counter() for _ in RANK_NAMES)
        # Live units queued per tenant over all levels (the tenants waiting), and the service each has received.
        self._waiting = collections.Counter[str]()
        self._fair_share = FairShare()
        self._queued_units = 0
        self._in_flight_units = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._executing = 0  # batches handed to _run_batch and not finished
        self._wakeup: asyncio.Future[None] | None = None
        self._closing = False
        # Set at start() when the process traces (aimass.runtime.tracing); None: no span work at all.
        self._tracer: Tracer | None = None

        self._submitted = 0
        self._executed_items = 0
        self._executed_requests = 0
        self._executed_batches = 0
        self._rejected_full = 0
        self._rejected_unmeetable = 0
        self._dropped = dict.fromkeys(_DROP_REASONS, 0)

        # Bind label children once so the hot path is a plain observe/set/inc.
        self._m_batch_size = BATCH_SIZE.labels(batcher=name)
        self._m_queue_depth = QUEUE_DEPTH.labels(batcher=name)
        self._m_dropped = {reason: DROPPED.labels(batcher=name, reason=reason) for reason in _DROP_REASONS}
        self._m_queue_depth.set(0)

    @classmethod
    def from_config(
        cls,
        execute: ExecuteFn[Req, Resp],
        config: BatchingConfig,
        *,
        name: str,
        size_of: Callable[[Req], int] = lambda r: 1,
        executor: concurrent.futures.Executor | None = None,
    ) -> DynamicBatcher[Req, Resp]:
        """A batcher as a replica's ``config`` (one BatchingConfig section) says."""
        return cls(
            execute,
            name=name,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            max_queue_size=config.max_queue_size,
            size_of=size_of,
            max_concurrent_batches=config.max_concurrent_batches,
            executor=executor,
            adaptive=not config.wait_when_idle,
            refuse_unmeetable=config.refuse_unmeetable,
        )

    # -- public API ---------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Units waiting to be batched."""
        return self._queued_units

    @property
    def in_flight(self) -> int:
        """Units inside batches that are executing now."""
        return self._in_flight_units

    @property
    def stats(self) -> BatcherStats:
        return BatcherStats(
            submitted=self._submitted,
            executed_items=self._executed_items,
            executed_requests=self._executed_requests,
            executed_batches=self._executed_batches,
            rejected_full=self._rejected_full,
            rejected_unmeetable=self._rejected_unmeetable,
            dropped_displaced=self._dropped["displaced"],
            dropped_cancelled=self._dropped["cancelled"],
            dropped_expired=self._dropped["expired"],
            dropped_shutdown=self._dropped["shutdown"],
        )

    async def start(self) -> None:
        """Start the collector on the running loop. Idempotent."""
        if self._closing:
            raise RuntimeError(f"{self.name} batcher is closed and cannot be restarted")
        if self._collector is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._tracer = tracing.tracer()
        self._slots = asyncio.Semaphore(self._max_concurrent_batches)
        self._collector = self._loop.create_task(self._collect_loop(), name=f"aimass-batcher-{self.name}")

    async def submit(
        self,
        request: Req,
        *,
        deadline: float | None = None,
        priority: int = common_pb2.PRIORITY_NORMAL,
        tenant: str = "",
        weight: float = 1.0,
    ) -> Resp:
        """Queue ``request`` and wait for its result.

        ``deadline`` is absolute, in ``loop.time()``. ``priority`` is a ``RequestMeta.priority`` value
        (INVALID_ARGUMENT otherwise). ``tenant`` shares the queue fairly with other tenants ("": anonymous, one
        tenant like any other). Cancelling the awaiting task removes a queued request (it never reaches execute) or
        discards the result of one already executing.
        """
        level = priority_rank(priority)
        if self._closing:
            raise Unavailable(f"{self.name} batcher is shutting down; retry on another replica", reason="DRAINING")
        loop = self._loop
        if loop is None:
            raise Unavailable(f"{self.name} batcher is not started yet; retry shortly", reason="NOT_READY")
        self._submitted += 1
        now = loop.time()
        if deadline is not None and deadline <= now:
            self._count_drop("expired")
            raise DeadlineExceeded(
                f"{self.name}: deadline passed {(now - deadline) * 1000:.0f} ms before the request was queued"
            )
        # A zero-unit request still costs a batch slot; counting it as 1 keeps the fill logic finite.
        units = max(1, self._size_of(request))
        if self._refuse_unmeetable and deadline is not None:
            self._check_meetable(level, tenant, units, now, deadline)
        # An empty queue accepts any size, so a request larger than the queue limit is not refused forever.
        if (
            self._queued_units > 0
            and self._queued_units + units > self._max_queue_size
            and not self._make_room(level, units)
            and not self._make_room_for_tenant(level, tenant, units)
        ):
            self._rejected_full += 1
            self._m_dropped["queue_full"].inc()
            this = "" if units == 1 else f"; this request adds {units}"
            raise ResourceExhausted(
                f"{self.name} queue is full ({self._queued_units} items waiting, limit {self._max_queue_size}"
                f"{this}); retry later",
                reason="QUEUE_FULL",
                metadata={
                    "batcher": self.name,
                    "queue_depth": str(self._queued_units),
                    "limit": str(self._max_queue_size),
                },
            )

        item: _Item[Req, Resp] = _Item(request, units, loop.create_future(), now, deadline, level, tenant)
        if self._tracer is not None and trace.get_current_span().is_recording():
            item.trace = otel_context.get_current()
            item.queued_ns = time.time_ns()
        if deadline is not None:
            # Fail a request at its deadline even if no batch forms meanwhile (e.g. all slots busy).
            item.timer = loop.call_at(deadline, self._expire, item)
        self._fair_share.see(tenant, weight)
        if not self._waiting[tenant]:
            self._fair_share.lift(tenant, self._waiting)
        self._queues[level].setdefault(tenant, deque()).append(item)
        self._count_queued(item, +1)
        self._drain.admitted(level, units, now)
        self._m_queue_depth.set(self._queued_units)
        self._notify()
        try:
            return await item.future
        except asyncio.CancelledError:
            if item.state is _State.QUEUED:
                self._drop(item, "cancelled")
            raise

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting work, then wait until the collector and executing batches finish.

        ``drain=True`` executes everything already queued first. ``drain=False`` fails queued requests with
        Unavailable at once; batches already executing cannot be interrupted, so they are still awaited.
        """
        self._closing = True
        if not drain:
            self._fail_queued(
                lambda: Unavailable(
                    f"{self.name} batcher is shutting down; request was not executed, retry elsewhere",
                    reason="DRAINING",
                )
            )
        self._notify()
        if self._collector is not None:
            await asyncio.shield(self._collector)
        while self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        if self._owns_executor:
            # Workers are idle by now; don't block the loop joining them.
            self._executor.shutdown(wait=False)

    # -- deadline admission ---------------------------------------------------------------------------------------

    def _units_ahead(self, level: int, tenant: str, units: int) -> int:
        """Queued units that would run before a newcomer of ``tenant`` at ``level``: every higher priority's, its
        own tenant's at its level, and of each other tenant there as much as fair sharing takes from it meanwhile
        (at most the newcomer's tenant's queue plus the newcomer)."""
        ahead = sum(sum(self._tenant_units[higher].values()) for higher in range(level))
        peers = self._tenant_units[level]
        own = peers.get(tenant, 0)
        return ahead + own + sum(min(n, own + units) for name, n in peers.items() if name != tenant)

    def _check_meetable(self, level: int, tenant: str, units: int, now: float, deadline: float) -> None:
        """Refuses (RESOURCE_EXHAUSTED, reason DEADLINE_UNMEETABLE) a request the work ahead of it would keep past
        its deadline (aimass.runtime.backlog), never one that finds nothing ahead, and only once the batcher has
        learnt its pace."""
        if not self._drain.ready:
            return
        ahead = self._units_ahead(level, tenant, units)
        if ahead == 0:
            return
        running_for, slots = self._running(now)
        higher = self._drain.higher_share(level, now, slots)
        finish = self._drain.seconds_to_finish(ahead, units, running_for, slots, higher)
        left = deadline - now
        if not self._drain.would_miss(finish, left):
            return
        self._rejected_unmeetable += 1
        self._m_dropped["unmeetable"].inc()
        raise self._unmeetable(ahead, finish, left)

    def _unmeetable(
        self, ahead: int, finish: float, left: float, *, waited_ms: float | None = None
    ) -> ResourceExhausted:
        """The refusal of a request the ``ahead`` units before it would keep ``finish`` seconds, ``left`` seconds
        before its deadline (``waited_ms``: it was queued that long, and is refused on a later look)."""
        # Higher priorities taking the whole replica: no wait can be named; a second, for gRPC's retry pushback.
        retry_ms = 1000 if math.isinf(finish) else max(10, round((finish - left / HEADROOM) * 1000))
        estimate = (
            "forever (higher priorities take the whole replica)" if math.isinf(finish) else f"~{finish * 1000:.0f} ms"
        )
        after = "" if waited_ms is None else f" (after {waited_ms:.0f} ms in the queue: the replica slowed)"
        return ResourceExhausted(
            f"{self.name}: the {ahead} units queued ahead would take {estimate} here, past this call's"
            f" deadline in {left * 1000:.0f} ms{after}; retry in {retry_ms} ms, elsewhere, or with more time",
            reason=UNMEETABLE_REASON,
            retry_after_ms=retry_ms,
            metadata={"batcher": self.name, "units_ahead": str(ahead), "estimate": estimate},
        )

    def _running(self, now: float) -> tuple[float | None, int]:
        """How long the oldest executing batch has run (None: none is), and how many batches run at once."""
        running_for = now - min(self._running_since) if self._running_since else None
        return running_for, self._max_concurrent_batches

    def _refuse_late_queued(self, now: float) -> None:
        """After a batch: refuses the queued requests that can no longer finish by their deadlines at the pace the
        batcher now estimates (the module docstring), in the order the queue would run them."""
        if not self._refuse_unmeetable or not self._drain.ready or not self._queued_units:
            return
        running_for, slots = self._running(now)
        ahead = 0
        for level, fifos in enumerate(self._queues):
            higher = self._drain.higher_share(level, now, slots)
            # Each tenant's FIFO is in arrival order already: merged, not sorted (this runs after every batch).
            for item in heapq.merge(*fifos.values(), key=lambda item: item.enqueued_at):
                if item.state is not _State.QUEUED or item.future.done():
                    continue  # dropped or cancelled; skipped when the collector reaches it
                if item.deadline is not None and ahead:
                    finish = self._drain.seconds_to_finish(ahead, item.units, running_for, slots, higher)
                    left = item.deadline - now
                    if self._drain.would_miss(finish, left):
                        self._drop(item, "unmeetable")
                        self._rejected_unmeetable += 1
                        item.future.set_exception(
                            self._unmeetable(ahead, finish, left, waited_ms=(now - item.enqueued_at) * 1000)
                        )
                        continue
                ahead += item.units
        self._m_queue_depth.set(self._queued_units)

    # -- queue bookkeeping ----------------------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._wakeup is not None:
            _wake(self._wakeup)

    def _count_drop(self, reason: str) -> None:
        self._dropped[reason] += 1
        self._m_dropped[reason].inc()

    def _drop(self, item: _Item[Req, Resp], reason: str) -> None:
        """Take a queued item out of the budget; the deque entry is skipped lazily by the collector."""
        item.state = _State.DROPPED
        if item.timer is not None:
            item.timer.cancel()
        self._count_queued(item, -1)
        self._m_queue_depth.set(self._queued_units)
        self._count_drop(reason)
        if item.trace is not None:
            self._trace_dropped(item, reason)

    def _count_queued(self, item: _Item[Req, Resp], sign: int) -> None:
        """Adds (+1) or removes (-1) ``item``'s units in the queue's budgets; the fair-share counters restart when
        nothing is left waiting."""
        units = sign * item.units
        self._queued_units += units
        self._tenant_units[item.level][item.tenant] += units
        self._waiting[item.tenant] += units
        if sign < 0:
            if not self._tenant_units[item.level][item.tenant]:
                del self._tenant_units[item.level][item.tenant]
            if not self._waiting[item.tenant]:
                del self._waiting[item.tenant]
                if not self._waiting:
                    self._fair_share.reset()

    def _fail_queued(self, error: Callable[[], Exception]) -> None:
        """Fail every queued request with a fresh ``error()`` (shutdown)."""
        for fifos in self._queues:
            for queue in fifos.values():
                while queue:
                    item = queue.popleft()
                    if item.state is _State.QUEUED:
                        self._drop(item, "shutdown")
                        if not item.future.done():
                            item.future.set_exception(error())
            fifos.clear()

    def _displace(self, victim: _Item[Req, Resp], why: str, **metadata: str) -> None:
        self._drop(victim, "displaced")
        victim.future.set_exception(
            ResourceExhausted(
                f"{self.name} queue is full (limit {self._max_queue_size} items) and {why}; retry later",
                reason="QUEUE_FULL",
                metadata={"batcher": self.name, "limit": str(self._max_queue_size), **metadata},
            )
        )

    def _pop_newest_live(self, queue: deque[_Item[Req, Resp]]) -> _Item[Req, Resp] | None:
        """The newest queued request of ``queue`` (None when none is left), discarding dead entries on the way."""
        while queue:
            victim = queue.pop()
            if victim.state is not _State.QUEUED:
                continue
            if victim.future.done():  # cancelled; the submit() handler has not run yet
                self._drop(victim, "cancelled")
                continue
            return victim
        return None

    def _make_room(self, level: int, units: int) -> bool:
        """Displace the newest queued requests of the lowest priorities below ``level`` until ``units`` more fit,
        the most-queued tenant's first within a priority.

        Displaces nothing and returns False when even all lower-priority requests together would not make room.
        """
        lower = sum(held.total() for held in self._tenant_units[level + 1 :])
        if lower == 0 or self._queued_units - lower + units > self._max_queue_size:
            return False
        for victim_level in range(len(self._queues) - 1, level, -1):
            fifos, held = self._queues[victim_level], self._tenant_units[victim_level]
            while held and self._queued_units + units > self._max_queue_size:
                victim = self._pop_newest_live(fifos[held.most_common(1)[0][0]])
                if victim is None:  # the units say a request is there; never loop on a miscount
                    break
                self._displace(
                    victim,
                    f"a {RANK_NAMES[level]}-priority request took the place of this "
                    f"{RANK_NAMES[victim_level]}-priority one before it ran",
                    displaced_by=RANK_NAMES[level],
                )
            if self._queued_units + units <= self._max_queue_size:
                break
        return True

    def _make_room_for_tenant(self, level: int, tenant: str, units: int) -> bool:
        """Within ``level``, displace the newest requests of the tenants holding more queued units than ``tenant``
        would with ``units`` more, most-queued first, until they fit (longest queue drop).

        Displaces nothing and returns False when that would not make room.
        """
        held = self._tenant_units[level]
        mine = held[tenant] + units
        excess = sum(queued - mine for other, queued in held.items() if other != tenant and queued > mine)
        if self._queued_units + units - excess > self._max_queue_size:
            return False
        while self._queued_units + units > self._max_queue_size:
            heaviest = max((other for other in held if other != tenant), key=held.__getitem__)
            victim = self._pop_newest_live(self._queues[level][heaviest])
            if victim is None:  # the units say a request is there; never loop on a miscount
                break
            self._displace(
                victim,
                "another tenant's request took the place of this one before it ran (fair share: this tenant held"
                " more of the queue)",
                displaced_by="fair_share",
            )
        return self._queued_units + units <= self._max_queue_size

    def _expire(self, item: _Item[Req, Resp]) -> None:
        if item.state is not _State.QUEUED:
            return
        if item.future.done():  # cancelled; the submit() handler has not run yet
            self._drop(item, "cancelled")
            return
        assert self._loop is not None
        self._drop(item, "expired")
        waited_ms = (self._loop.time() - item.enqueued_at) * 1000
        item.future.set_exception(
            DeadlineExceeded(
                f"{self.name}: waited {waited_ms:.0f} ms in queue; deadline passed before execution",
            )
        )

    # -- collector ------------------------------------------------------------------------------------------------

    async def _wait(self, when: float | None) -> None:
        """Sleep until submit()/close() notifies or the loop clock reaches ``when``."""
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._wakeup = waiter
        timer = self._loop.call_at(when, _wake, waiter) if when is not None else None
        try:
            await waiter
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _oldest_waiting(self) -> float | None:
        """When the longest-waiting live request was queued (None if none is), dropping dead heads on the way."""
        oldest: float | None = None
        for fifos in self._queues:
            for tenant in list(fifos):
                head = self._live_head(fifos, tenant)
                # Each tenant's queue is FIFO: its live head is its oldest request.
                if head is not None and (oldest is None or head.enqueued_at < oldest):
                    oldest = head.enqueued_at
        return oldest

    def _live_head(self, fifos: dict[str, deque[_Item[Req, Resp]]], tenant: str) -> _Item[Req, Resp] | None:
        """``tenant``'s oldest queued request at a level, discarding dead entries (and an emptied FIFO) on the way."""
        queue = fifos[tenant]
        while queue:
            head = queue[0]
            if head.state is _State.QUEUED and not head.future.done():
                return head
            queue.popleft()
            if head.state is _State.QUEUED:  # future cancelled; submit()'s handler has not run yet
                self._drop(head, "cancelled")
        del fifos[tenant]
        return None

    def _next_of_level(self, level: int) -> _Item[Req, Resp] | None:
        """The request a batch takes next at ``level``: the head of the least-served tenant; among equals, the tenant
        with less waiting (a newcomer lifted to a flooding tenant's counter goes first), then the oldest head."""
        fifos = self._queues[level]
        heads = [head for tenant in list(fifos) if (head := self._live_head(fifos, tenant)) is not None]
        if not heads:
            return None
        return min(
            heads,
            key=lambda head: (self._fair_share.served(head.tenant), self._waiting[head.tenant], head.enqueued_at),
        )

    def _take_batch(self) -> list[_Item[Req, Resp]]:
        """Pop a batch of at most max_batch_size units, highest priority first and the least-served tenant's oldest
        request next within a priority (an oversized first request goes alone)."""
        assert self._loop is not None
        now = self._loop.time()
        batch: list[_Item[Req, Resp]] = []
        units = 0
        limit = self._max_batch_size
        for level, fifos in enumerate(self._queues):
            while (item := self._next_of_level(level)) is not None:
                if item.deadline is not None and item.deadline <= now:
                    fifos[item.tenant].popleft()
                    self._expire(item)
                    continue
                if batch and units + item.units > limit:
                    # Strict order: neither smaller nor lower-priority requests overtake the one that doesn't fit.
                    self._m_queue_depth.set(self._queued_units)
                    return batch
                fifos[item.tenant].popleft()
                item.state = _State.RUNNING
                if item.timer is not None:
                    item.timer.cancel()
                self._fair_share.charge(item.tenant, item.units)
                self._count_queued(item, -1)
                batch.append(item)
                units += item.units
                if units >= limit:
                    self._m_queue_depth.set(self._queued_units)
                    return batch
        self._m_queue_depth.set(self._queued_units)
        return batch

    async def _next_batch(self) -> list[_Item[Req, Resp]] | None:
        """The next batch once something is queued (the caller holds a free slot); None once closing and the queue is
        empty. Waits for the batch to fill only while another batch executes (module docstring)."""
        assert self._loop is not None
        while True:
            oldest = self._oldest_waiting()
            if oldest is None:
                if self._closing:
                    return None
                await self._wait(None)
                continue
            if self._max_queue_delay_s > 0:
                fill_by = oldest + self._max_queue_delay_s
                while (
                    (self._executing > 0 or not self._adaptive)
                    and not self._closing
                    and self._queued_units < self._max_batch_size
                    and self._loop.time() < fill_by
                ):
                    await self._wait(fill_by)
            batch = self._take_batch()
            if batch:
                return batch

    async def _collect_loop(self) -> None:
        assert self._loop is not None and self._slots is not None
        try:
            while True:
                await self._slots.acquire()
                batch = await self._next_batch()
                if batch is None:
                    self._slots.release()
                    return
                self._executing += 1  # now, not when the task starts: the next _next_batch must see it
                task = self._loop.create_task(self._run_batch(batch))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)
        except Exception:
            # A bug here must not leave callers waiting forever.
            logger.exception("batcher %s: collector failed; failing queued requests", self.name)
            self._closing = True
            self._fail_queued(lambda: Unavailable(f"{self.name} batcher failed; retry elsewhere"))

    async def _run_batch(self, batch: list[_Item[Req, Resp]]) -> None:
        assert self._loop is not None and self._slots is not None
        units = sum(item.units for item in batch)
        self._in_flight_units += units
        self._m_batch_size.observe(units)
        traced = [item for item in batch if item.trace is not None] if self._tracer is not None else []
        taken_ns = time.time_ns() if traced else 0
        inference: tuple[int, int] | None = None
        started = self._loop.time()
        self._running_since.append(started)
        try:
            call = functools.partial(_call_execute, self._execute, [item.request for item in batch])
            try:
                results, ran = await self._loop.run_in_executor(self._executor, call)
                inference = ran
                self._drain.observe(units, (ran[1] - ran[0]) / 1e9)
                self._refuse_late_queued(self._loop.time())
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            if len(results) != len(batch):
                error = AimassError(
                    f"{self.name}: execute returned {len(results)} results for a batch of {len(batch)} requests;"
                    " it must return exactly one result (or Exception) per request, in order"
                )
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                return
            for item, result in zip(batch, results, strict=True):
                if item.future.done():  # caller cancelled while executing: discard
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(AimassError(f"{self.name}: batch aborted before results were set"))
            if traced:
                self._trace_batch(traced, len(batch), units, taken_ns, inference)
            self._running_since.remove(started)
            self._in_flight_units -= units
            self._executed_items += units
            self._executed_requests += len(batch)
            self._executed_batches += 1
            self._executing -= 1
            self._slots.release()
            # A collector waiting for a batch to fill behind this one stops waiting once the model is idle.
            self._notify()

    # -- traces ---------------------------------------------------------------------------------------------------

    def _trace_batch(
        self,
        items: list[_Item[Req, Resp]],
        requests: int,
        units: int,
        taken_ns: int,
        inference: tuple[int, int] | None,
    ) -> None:
        """Each traced request's queue wait, its share of the batch execution and the model inference inside it."""
        assert self._tracer is not None
        ended_ns = time.time_ns()
        for item in items:
            self._tracer.start_span(
                tracing.QUEUE_SPAN,
                context=item.trace,
                start_time=item.queued_ns,
                attributes={"aimass.batcher": self.name, "aimass.priority": RANK_NAMES[item.level]},
            ).end(end_time=taken_ns)
            execution = self._tracer.start_span(
                tracing.BATCH_SPAN,
                context=item.trace,
                start_time=taken_ns,
                attributes={
                    "aimass.batcher": self.name,
                    "aimass.batch.requests": requests,
                    "aimass.batch.units": units,
                    "aimass.request.units": item.units,
                },
            )
            failure = _failure_of(item.future)
            if failure is not None:
                execution.set_status(Status(StatusCode.ERROR, failure))
            if inference is not None:
                self._tracer.start_span(
                    tracing.INFERENCE_SPAN,
                    context=trace.set_span_in_context(execution, item.trace),
                    start_time=inference[0],
                    attributes={"aimass.batcher": self.name, "aimass.batch.units": units},
                ).end(end_time=inference[1])
            execution.end(end_time=ended_ns)

    def _trace_dropped(self, item: _Item[Req, Resp], reason: str) -> None:
        """The queue wait of a request that never ran, ended now, with why."""
        assert self._tracer is not None
        span = self._tracer.start_span(
            tracing.QUEUE_SPAN,
            context=item.trace,
            start_time=item.queued_ns,
            attributes={
                "aimass.batcher": self.name,
                "aimass.priority": RANK_NAMES[item.level],
                "aimass.dropped": reason,
            },
        )
        if reason != "cancelled":
            span.set_status(Status(StatusCode.ERROR, f"left the {self.name} queue unexecuted: {reason}"))
        span.end()
        item.trace = None
