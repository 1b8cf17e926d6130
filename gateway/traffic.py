"""What this gateway's callers got over the last minute, per public service and per tenant, for ClusterService.

``TrafficInterceptor`` sits right inside the auth interceptor (gateway/app.py), so it sees every call the gateway
admitted (past the key, scope and quota checks) with its verified tenant, whichever servicer or forwarder answers
it. ``TrafficRecorder`` keeps per-second counts (calls, errors) over ``WINDOW_S`` and the latest latencies per
service, and calls in flight per service and per tenant. Everything is bounded: the services are the contract's (a
made-up method name is not counted), a service keeps at most ``LATENCY_SAMPLES`` latencies, and at most
``MAX_TENANTS`` tenants are tracked (with auth off, callers name their own tenant).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Final

import grpc

from aimass.runtime.interceptors import AroundInterceptor, Context
from aimass.runtime.scope import current_scope, held_deadline

WINDOW_S: Final = 60.0
LATENCY_SAMPLES: Final = 4096
MAX_TENANTS: Final = 10_000
# A caller that went away is not the mesh's failure (an LLM stream stopped early, say).
NOT_ERRORS: Final = frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})


class _Counts:
    """Calls finished and failed per second over the window, and calls in flight now."""

    __slots__ = ("in_flight", "seconds")

    def __init__(self) -> None:
        self.in_flight = 0
        # [second, calls, errors], oldest first, one entry per second that had calls.
        self.seconds: collections.deque[list[int]] = collections.deque()

    def finished(self, second: int, failed: bool) -> None:
        if self.seconds and self.seconds[-1][0] == second:
            bucket = self.seconds[-1]
        else:
            bucket = [second, 0, 0]
            self.seconds.append(bucket)
            self.prune(second)
        bucket[1] += 1
        bucket[2] += failed

    def prune(self, second: int) -> None:
        while self.seconds and self.seconds[0][0] <= second - WINDOW_S:
            self.seconds.popleft()

    def totals(self, second: int) -> tuple[int, int]:
        self.prune(second)
        return sum(b[1] for b in self.seconds), sum(b[2] for b in self.seconds)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.seconds


class _Service(_Counts):
    __slots__ = ("latencies",)

    def __init__(self) -> None:
        super().__init__()
        # (end, seconds) of the latest calls, on the monotonic clock.
        self.latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=LATENCY_SAMPLES)


@dataclass(frozen=True)
class Traffic:
    """One service's or tenant's figures over the window."""

    requests: int = 0
    errors: int = 0
    requests_per_second: float = 0.0
    errors_per_second: float = 0.0
    in_flight: int = 0
    p50_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class TrafficRecorder:
    """Per service and per tenant: calls, errors, latencies over the last ``WINDOW_S``, and calls in flight."""

    def __init__(self, services: Iterable[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at = clock()
        self._services = {service: _Service() for service in services}
        # Recency order: the least recently seen tenant is let go first when over MAX_TENANTS.
        self._tenants: collections.OrderedDict[str, _Counts] = collections.OrderedDict()

    @property
    def services(self) -> list[str]:
        return sorted(self._services)

    def service_of(self, method: str) -> str | None:
        """The recorded service ``method`` ("/aimass.v1.NlpService/Embed") belongs to, else None."""
        service = method[1 : method.rfind("/")]
        return service if service in self._services else None

    def _tenant(self, tenant: str) -> _Counts:
        counts = self._tenants.get(tenant)
        if counts is None:
            if len(self._tenants) >= MAX_TENANTS:
                self._let_go_of_idle_tenants()
            counts = self._tenants[tenant] = _Counts()
        else:
            self._tenants.move_to_end(tenant)
        return counts

    def _let_go_of_idle_tenants(self) -> None:
        second = int(self.clock())
        for name, counts in list(self._tenants.items()):
            counts.prune(second)
            if counts.idle:
                del self._tenants[name]
        while len(self._tenants) >= MAX_TENANTS:
            # All busy: the least recently seen goes (its in-flight calls then end uncounted).
            self._tenants.popitem(last=False)

    def started(self, service: str, tenant: str) -> None:
        self._services[service].in_flight += 1
        self._tenant(tenant).in_flight += 1

    def finished(self, service: str, tenant: str, started: float, failed: bool) -> None:
        now = self.clock()
        second = int(now)
        counts = self._services[service]
        counts.in_flight -= 1
        counts.finished(second, failed)
        counts.latencies.append((now, now - started))
        by_tenant = self._tenants.get(tenant)
        if by_tenant is not None:
            by_tenant.in_flight = max(0, by_tenant.in_flight - 1)
            by_tenant.finished(second, failed)

    @property
    def window_s(self) -> float:
        """The window rates are over: WINDOW_S, or less for a gateway that started less than a window ago."""
        return max(1.0, min(WINDOW_S, self.clock() - self.started_at))

    def service(self, service: str) -> Traffic:
        counts = self._services.get(service)
        if counts is None:
            return Traffic()
        now = self.clock()
        requests, errors = counts.totals(int(now))
        latencies = sorted(latency for end, latency in counts.latencies if end > now - WINDOW_S)
        window = self.window_s
        return Traffic(
            requests=requests,
            errors=errors,
            requests_per_second=requests / window,
            errors_per_second=errors / window,
            in_flight=counts.in_flight,
            p50_latency_ms=percentile(latencies, 0.50) * 1000,
            p99_latency_ms=percentile(latencies, 0.99) * 1000,
        )

    @property
    def tenants(self) -> list[str]:
        return list(self._tenants)

    def tenant(self, tenant: str) -> Traffic:
        counts = self._tenants.get(tenant)
        if counts is None:
            return Traffic()
        requests, errors = counts.totals(int(self.clock()))
        window = self.window_s
        return Traffic(
            requests=requests,
            errors=errors,
            requests_per_second=requests / window,
            errors_per_second=errors / window,
            in_flight=counts.in_flight,
        )


class TrafficInterceptor(AroundInterceptor):
    """Records every call of a recorded service: in flight while it runs, then its latency and whether it failed."""

    def __init__(self, recorder: TrafficRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        service = self.recorder.service_of(method)
        if service is None:
            yield
            return
        tenant = current_scope().tenant
        started = self.recorder.clock()
        self.recorder.started(service, tenant)
        failed = True
        try:
            yield
            code = context.code()
            failed = isinstance(code, grpc.StatusCode) and code not in NOT_ERRORS
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled at the deadline the server holds the call to is DEADLINE_EXCEEDED, a failure; otherwise the
            # caller went away (or stopped reading a stream), which is not the mesh's.
            deadline = held_deadline()
            failed = deadline is not None and asyncio.get_running_loop().time() >= deadline
            raise
        except BaseException:
            code = context.code()
            failed = not (isinstance(code, grpc.StatusCode) and code in NOT_ERRORS)
            raise
        finally:
            self.recorder.finished(service, tenant, started, failed)
