"""A budget of decoded pixels in flight across a process's requests, with a bounded, deadline-aware wait queue.

Each image holds a decode slot and its pixels (width x height from its header) while it is decoded and run through
a model; the next waits until both are free. Waiters are served first come, first served (a large image at the head
is not starved by small ones behind it); a wait ends at the call's deadline, and a full queue refuses at once.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from aimass.runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted


@dataclass(eq=False)
class _Waiter:
    pixels: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PixelBudget:
    def __init__(self, pixels: int, slots: int, max_waiting: int) -> None:
        self.capacity = pixels
        self.slots = slots
        self.max_waiting = max_waiting
        self.free_pixels = pixels
        self.free_slots = slots
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        """Pixels held now."""
        return self.capacity - self.free_pixels

    def _fits(self, pixels: int) -> bool:
        return self.free_slots > 0 and pixels <= self.free_pixels

    def _take(self, pixels: int) -> None:
        self.free_slots -= 1
        self.free_pixels -= pixels

    async def acquire(self, pixels: int, *, deadline: float | None, what: str) -> None:
        """Hold a slot and ``pixels`` until ``release(pixels)``. ``what`` names the work in error messages."""
        if pixels > self.capacity:
            raise InvalidArgument(
                f"{what} needs {pixels} decoded pixels; this replica decodes at most {self.capacity} at once: "
                "send a smaller image",
                reason="TOO_MANY_PIXELS",
                metadata={"limit": str(self.capacity)},
            )
        if not self._waiters and self._fits(pixels):
            self._take(pixels)
            return
        if len(self._waiters) >= self.max_waiting:
            raise ResourceExhausted(
                f"the image decoder is busy ({self.slots} images in work, {len(self._waiters)} waiting); retry later",
                reason="DECODE_QUEUE_FULL",
                metadata={"limit": str(self.max_waiting)},
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(pixels)
        self._waiters.append(waiter)
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
        except (TimeoutError, asyncio.CancelledError) as err:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(pixels)  # granted just as the wait ended: hand it on
            else:
                waiter.granted.cancel()
                self._waiters.remove(waiter)
                self._wake()  # a large head that gave up may have held back smaller ones
            if isinstance(err, TimeoutError):
                raise DeadlineExceeded(
                    f"the deadline passed while {what} waited for the image decoder", reason="DECODE_QUEUE_TIMEOUT"
                ) from None
            raise

    def release(self, pixels: int) -> None:
        self.free_slots += 1
        self.free_pixels += pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0].pixels):
            waiter = self._waiters.popleft()
            self._take(waiter.pixels)
            waiter.granted.set_result(None)
