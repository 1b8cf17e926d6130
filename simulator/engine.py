"""The discrete-event loop: a heap of timed actions and a simulated clock that jumps from one to the next.

Actions scheduled for the same instant run in the order they were scheduled, so a run is deterministic for a seed.
A cancelled event stays in the heap and is skipped when reached (cheaper than removing it).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

Action = Callable[[], None]


@dataclass
class Event:
    time: float
    action: Action
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.processed = 0
        # (time, sequence, event): tuples compare in C, and the sequence keeps scheduling order within an instant.
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = itertools.count()

    def at(self, time: float, action: Action) -> Event:
        """Runs ``action`` at simulated ``time`` (never in the past: the clock does not go back)."""
        if time < self.now:
            raise ValueError(f"cannot schedule at {time:.6f}s: the clock is already at {self.now:.6f}s")
        event = Event(time, action)
        heapq.heappush(self._heap, (time, next(self._seq), event))
        return event

    def after(self, delay: float, action: Action) -> Event:
        return self.at(self.now + max(delay, 0.0), action)

    def every(self, interval: float, action: Action, *, start: float, until: float) -> None:
        """Runs ``action`` at ``start``, ``start + interval``, ... while before ``until``."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")

        def tick() -> None:
            action()
            if self.now + interval < until:
                self.after(interval, tick)

        if start < until:
            self.at(start, tick)

    @property
    def pending(self) -> int:
        return sum(1 for _, _, e in self._heap if not e.cancelled)

    def run(self, until: float | None = None) -> float:
        """Runs events in time order (up to and including ``until``); returns the clock afterwards."""
        heap = self._heap
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                break
            when, _, event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self.now = when
            self.processed += 1
            event.action()
        return self.now
