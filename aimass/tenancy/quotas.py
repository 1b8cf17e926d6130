"""Per-tenant quotas at the front door: requests per second, requests in flight, LLM tokens per minute and per day.

A tenant's limits hold for the mesh as a whole. With several gateways each enforces its share, ``1/N`` of the
rate and of the concurrency, N being the gateways serving now (from the registry): no per-request coordination,
and the error is one-sided. A tenant whose traffic is spread evenly over the gateways (a load balancer in front)
gets its whole limit; one whose traffic all reaches one gateway gets 1/N of it (never more than the limit); a
concurrency limit below N rounds up to one per gateway. LLM tokens are counted where they are generated: the LLM
replicas account every request's prompt and completion tokens (cancelled streams too) to the scheduler, which
publishes each tenant's trailing-minute and today's totals in the routing view; every gateway refuses a tenant's
next LLM call once those reach its limits. They overshoot by what is generated between a report and the view
reaching the gateway (report interval + view interval, ~1.1 s) plus what calls already admitted go on to generate.

A refusal is RESOURCE_EXHAUSTED with reason QUOTA_EXCEEDED, the quota in ErrorInfo metadata (``quota``, ``limit``)
and a retry delay (``retry_after_ms``, and gRPC's ``grpc-retry-pushback-ms`` that clients with a retry policy
honour).

Per-tenant state is bounded: ``max_tracked`` tenants at most (the least recently seen are let go) and tenants idle
for ``idle_expiry_s`` are forgotten, so even made-up tenant names (with auth off) cannot grow memory.
"""

from __future__ import annotations

import collections
import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aimass.runtime.errors import ResourceExhausted
from aimass.v1 import common_pb2, scheduler_pb2

QUOTA_RPS: Final = "requests_per_second"
QUOTA_CONCURRENCY: Final = "max_concurrent"
QUOTA_LLM_MINUTE: Final = "llm_tokens_per_minute"
QUOTA_LLM_DAY: Final = "llm_tokens_per_day"
# Retries a client's gRPC stack would make on its own are only worth it for short waits; past this the pushback
# says "do not retry automatically" (the ErrorInfo still carries the real delay).
MAX_PUSHBACK_MS: Final = 10_000


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits (0 = unlimited), its priority cap and its fair-share weight."""

    requests_per_second: float = 0.0
    max_concurrent: int = 0
    llm_tokens_per_minute: int = 0
    llm_tokens_per_day: int = 0
    max_priority: int = common_pb2.PRIORITY_HIGH
    weight: float = 1.0


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` banked."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.updated = now

    def take(self, now: float) -> float:
        """Takes one token; returns 0, or the seconds until one is there (nothing taken)."""
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level >= 1:
            self.level -= 1
            return 0.0
        return (1 - self.level) / self.rate


class _TenantState:
    __slots__ = ("bucket", "in_flight", "seen")

    def __init__(self, now: float) -> None:
        self.bucket: TokenBucket | None = None
        self.in_flight = 0
        self.seen = now


def _refused(quota: str, limit: float, retry_after_s: float, what: str) -> ResourceExhausted:
    retry_ms = max(1, math.ceil(retry_after_s * 1000))
    return ResourceExhausted(
        f"{what}; retry in {retry_ms / 1000:.3g} s",
        reason="QUOTA_EXCEEDED",
        metadata={"quota": quota, "limit": f"{limit:g}"},
        retry_after_ms=retry_ms,
        pushback_ms=retry_ms if retry_ms <= MAX_PUSHBACK_MS else -1,
    )


def seconds_to_utc_midnight(now_unix_s: float) -> float:
    now = datetime.datetime.fromtimestamp(now_unix_s, datetime.UTC)
    tomorrow = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class Lease:
    """A request admitted under the quotas; ``release`` when it ends (frees its concurrency slot)."""

    __slots__ = ("_state",)

    def __init__(self, state: _TenantState | None) -> None:
        self._state = state

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None


class TenantQuotas:
    """One gateway's share of every tenant's quotas."""

    def __init__(
        self,
        *,
        gateways: Callable[[], int] = lambda: 1,
        max_tracked: int = 10_000,
        idle_expiry_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # How many gateways share the limits now (at least this one).
        self.gateways = gateways
        self.max_tracked = max_tracked
        self.idle_expiry_s = idle_expiry_s
        self.clock = clock
        # Recency order: a tenant moves to the end when seen, so the first is the least recently seen.
        self._tenants: collections.OrderedDict[str, _TenantState] = collections.OrderedDict()
        self._last_sweep = clock()

    @property
    def tracked(self) -> int:
        return len(self._tenants)

    def _state(self, tenant: str, now: float) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            if now - self._last_sweep > self.idle_expiry_s / 10:
                self._sweep(now)
            while len(self._tenants) >= self.max_tracked:
                self._tenants.popitem(last=False)
            state = self._tenants[tenant] = _TenantState(now)
        else:
            self._tenants.move_to_end(tenant)
        state.seen = now
        return state

    def _sweep(self, now: float) -> None:
        """Forgets tenants idle past the expiry (nothing in flight): their buckets would be full again anyway."""
        self._last_sweep = now
        for tenant, state in list(self._tenants.items()):
            if now - state.seen > self.idle_expiry_s and not state.in_flight:
                del self._tenants[tenant]

    def admit(
        self, tenant: str, limits: Limits, *, llm: bool = False, usage: scheduler_pb2.TenantUsage | None = None
    ) -> Lease:
        """Admits one request of ``tenant`` or raises RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) saying which quota.

        ``llm`` requests also check the tenant's LLM tokens, from the routing view's ``usage``."""
        if llm and usage is not None:
            self._check_tokens(limits, usage)
        if not limits.requests_per_second and not limits.max_concurrent:
            return Lease(None)
        now = self.clock()
        state = self._state(tenant, now)
        share = max(1, self.gateways())
        if limits.max_concurrent:
            allowed = math.ceil(limits.max_concurrent / share)
            if state.in_flight >= allowed:
                raise _refused(
                    QUOTA_CONCURRENCY,
                    limits.max_concurrent,
                    0.05,
                    f"tenant {tenant!r} has {limits.max_concurrent} requests in flight, its limit "
                    f"({QUOTA_CONCURRENCY})",
                )
        if limits.requests_per_second:
            rate = limits.requests_per_second / share
            bucket = state.bucket
            if bucket is None or bucket.rate != rate:
                # A second's worth of burst, and at least one request.
                state.bucket = bucket = TokenBucket(rate, max(1.0, rate), now)
            wait = bucket.take(now)
            if wait:
                raise _refused(
                    QUOTA_RPS,
                    limits.requests_per_second,
                    wait,
                    f"tenant {tenant!r} is over its {limits.requests_per_second:g} requests per second ({QUOTA_RPS})",
                )
        state.in_flight += 1
        return Lease(state)

    @staticmethod
    def _check_tokens(limits: Limits, usage: scheduler_pb2.TenantUsage) -> None:
        now_s = time.time()
        if limits.llm_tokens_per_day and usage.llm_tokens_today >= limits.llm_tokens_per_day:
            raise _refused(
                QUOTA_LLM_DAY,
                limits.llm_tokens_per_day,
                seconds_to_utc_midnight(now_s),
                f"tenant {usage.tenant_id!r} used {usage.llm_tokens_today} LLM tokens today (UTC), its limit is "
                f"{limits.llm_tokens_per_day} ({QUOTA_LLM_DAY})",
            )
        if limits.llm_tokens_per_minute and usage.llm_tokens_last_minute >= limits.llm_tokens_per_minute:
            frees_s = usage.minute_window_frees_unix_ms / 1000 - now_s if usage.minute_window_frees_unix_ms else 1.0
            raise _refused(
                QUOTA_LLM_MINUTE,
                limits.llm_tokens_per_minute,
                max(frees_s, 0.1),
                f"tenant {usage.tenant_id!r} used {usage.llm_tokens_last_minute} LLM tokens in the last minute, its "
                f"limit is {limits.llm_tokens_per_minute} ({QUOTA_LLM_MINUTE})",
            )


def utc_day(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%d")


class TokenUsage:
    """LLM tokens per tenant in the trailing minute (one-second buckets) and in the current UTC day: the scheduler
    keeps them from the replicas' reports and publishes them in the routing view for the token quotas.

    Day totals start from what the store kept (``load_day``) and what was added since is handed to the store in
    deltas (``take_unsaved``), so a daily quota survives a scheduler's restart; at midnight UTC the day starts over.
    """

    def __init__(self, *, max_tracked: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.max_tracked = max_tracked
        self.clock = clock
        self.day = utc_day(clock())
        # tenant → deque of [second, tokens], oldest first, within the last minute.
        self._minute: dict[str, collections.deque[list[int]]] = {}
        self._today: collections.OrderedDict[str, int] = collections.OrderedDict()
        # day → tenant → tokens added and not yet in the store.
        self._unsaved: dict[str, collections.Counter[str]] = {}

    def _roll(self, now: float) -> None:
        day = utc_day(now)
        if day != self.day:
            self.day = day
            self._today.clear()

    def load_day(self, day: str, totals: dict[str, int]) -> None:
        """Today's totals as the store has them (what was added and not yet saved is kept on top)."""
        self._roll(self.clock())
        if day != self.day:
            return
        unsaved = self._unsaved.get(day, collections.Counter())
        self._today = collections.OrderedDict(
            (tenant, totals.get(tenant, 0) + unsaved.get(tenant, 0)) for tenant in sorted({*totals, *unsaved})
        )

    def add(self, tenant: str, tokens: int) -> None:
        if tokens <= 0:
            return
        now = self.clock()
        self._roll(now)
        second = int(now)
        buckets = self._minute.setdefault(tenant, collections.deque())
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += tokens
        else:
            buckets.append([second, tokens])
        self._today[tenant] = self._today.pop(tenant, 0) + tokens
        while len(self._today) > self.max_tracked:
            self._today.popitem(last=False)
        self._unsaved.setdefault(self.day, collections.Counter())[tenant] += tokens

    def last_minute(self, tenant: str) -> tuple[int, int]:
        """(tokens in the trailing 60 s, when the oldest of them leave the window in Unix ms; 0 when none)."""
        buckets = self._minute.get(tenant)
        if not buckets:
            return 0, 0
        horizon = int(self.clock()) - 60
        while buckets and buckets[0][0] <= horizon:
            buckets.popleft()
        if not buckets:
            del self._minute[tenant]
            return 0, 0
        return sum(tokens for _, tokens in buckets), (buckets[0][0] + 61) * 1000

    def today(self, tenant: str) -> int:
        self._roll(self.clock())
        return self._today.get(tenant, 0)

    def take_unsaved(self) -> list[tuple[str, dict[str, int]]]:
        """(day, tenant → tokens) added since the last call, for the store."""
        taken, self._unsaved = self._unsaved, {}
        return [(day, dict(tokens)) for day, tokens in sorted(taken.items())]

    def give_back(self, day: str, unsaved: dict[str, int]) -> None:
        """Saving failed: keep the deltas for the next try."""
        self._unsaved.setdefault(day, collections.Counter()).update(unsaved)

    def forget_idle(self) -> None:
        """Drops minute windows with nothing left in them."""
        for tenant in list(self._minute):
            self.last_minute(tenant)
