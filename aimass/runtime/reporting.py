"""Periodic reports to the scheduler (node readings, replica load), at the interval the scheduler's answers ask for.

The scheduler is never on a request's path: one that is down or slow only delays reports (logged once, retried,
never fatal), and a report source that fails is logged once per failure streak rather than every interval.

A reporter may skip a report that says nothing new (``_send`` returns None: an idle replica's load is the same every
second); it still sends one every ``keepalive_intervals`` intervals, so a scheduler that restarted learns it, and
``report(force=True)`` always sends.
"""

from __future__ import annotations

import abc
import asyncio
import logging

import grpc

from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.tasks import cancel_and_wait
from aimass.v1 import scheduler_pb2_grpc

log = logging.getLogger(__name__)

# Bounds on the interval a scheduler may ask for, so a bad answer can neither flood it nor silence the reporter.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 60.0


class PeriodicReporter(abc.ABC):
    def __init__(
        self, scheduler_address: str, interval_s: float, *, what: str, credentials: MeshCredentials | None
    ) -> None:
        self.scheduler_address = scheduler_address
        self.credentials = credentials
        self.interval_s = interval_s
        self.what = what
        self.reports_sent = 0
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._unreachable = False
        self._failing = False

    @abc.abstractmethod
    async def _send(
        self, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub, timeout_s: float, *, force: bool
    ) -> int | None:
        """Builds and sends one report; returns the interval the scheduler asks for next, in ms (0: unchanged), or
        None when it sent nothing because nothing changed (only when not ``force``)."""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.what} already started")
        self._channel = mesh_channel(self.scheduler_address, self.credentials, server_role=ROLE_SCHEDULER)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.what)

    async def report(self, *, force: bool = True) -> bool:
        """Sends one report now (unless not ``force`` and it would say nothing new); whether the scheduler took it
        (False also when skipped)."""
        assert self._stub is not None, "start() first"
        try:
            interval_ms = await self._send(self._stub, max(self.interval_s, 1.0), force=force)
            if interval_ms is None:
                return False
        except grpc.aio.AioRpcError as err:
            if not self._unreachable:
                log.warning(
                    "%s: scheduler at %s unreachable (%s: %s); will keep trying",
                    self.what,
                    self.scheduler_address,
                    err.code().name,
                    err.details(),
                )
            self._unreachable = True
            return False
        if self._unreachable:
            log.info("%s: scheduler at %s reachable again", self.what, self.scheduler_address)
        self._unreachable = False
        self.reports_sent += 1
        if interval_ms > 0:
            self.interval_s = min(max(interval_ms / 1000, MIN_INTERVAL_S), MAX_INTERVAL_S)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.report(force=False)
                self._failing = False
            except Exception:
                if not self._failing:
                    log.exception("%s: building or sending the report failed; will keep trying", self.what)
                self._failing = True
            # The interval runs from report to report, so slow reads do not stretch it.
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))

    async def _stop_loop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def stop(self) -> None:
        await self._stop_loop()
        await self._close()
