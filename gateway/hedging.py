"""Hedged requests: when a unary call has no answer after its method's usual latency, a copy goes to another replica.

A call caught on a replica that froze (SIGSTOP, a stalled GPU, a long GC pause, a noisy neighbour) would wait for
the freeze to end or for keepalive pings to give up, seconds later. Following "The Tail at Scale" (Dean & Barroso)
and gRPC's hedging policy (gRFC A6), the forwarder sends such a call once more, to a different replica, after a
delay; the first success wins and the other attempt is cancelled at once. The rules, all decided here (no I/O):

- **Which methods.** Only unary methods whose rpc declares ``option idempotency_level = NO_SIDE_EFFECTS`` (or
  ``IDEMPOTENT``) in protos/aimass/v1 (``contract.idempotent_methods``): inference and read-only queries. Lifecycle
  and admin mutations (LoadModel, keys, deployments) and streams are never hedged.
- **When.** After the method's delay: ``hedging.delay_ms`` when set, else the method's observed ``quantile``
  (default p97) of attempt latencies on this gateway (``LatencyQuantile``: a bounded ring of recent latencies, its
  quantile recomputed every few observations), clamped to ``[min_delay_ms, max_delay_ms]``. Until ``min_samples``
  latencies are known (a cold gateway) there is no adaptive delay and no hedge. A loser's latency is recorded as its
  time when cancelled (a lower bound), so a slow tail is not hidden by the hedges that cut it short.
- **How many.** A token bucket per method (``HedgeBudget``): every call adds ``max_extra_load`` tokens (default 0.05)
  up to ``burst``, a hedge takes one; hedges are therefore at most 5% of calls over time, plus a burst held in
  reserve for the moment a replica freezes. The default quantile sits below the budget (about 3% of calls go past
  p97) so that in normal running the bucket stays full.
- **Not** when only one replica could serve the call (the Router's choice excluding the first attempt's replica is
  that same replica), nor when the call's remaining deadline is shorter than the delay.
- **A frozen replica is left out.** When a call's delay passes and its replica answered nothing at all since the
  call was sent, the forwarder asks it a health check; one that does not answer within ``stall_probe_s`` is left
  out of routing (while others serve, and as a hedge's target) until it answers one (asked every ``stall_probe_s``),
  ``stall_eject_s`` at most. This happens whether or not the call can be hedged. A replica merely busy with a long
  batch answers the check and is not left out; a frozen one would otherwise keep getting calls from the router (the
  cancelled ones no longer count as in flight there), each one costing a hedge until the budget ran dry, and the
  hedges of calls slowed on the others (now carrying all the load) would be wasted on it.
- **Until it can be sent.** A call past its delay whose hedge could not go (the budget spent, no other replica that
  is not left out) is looked at again after each further delay, until it ends or its deadline is nearer than that.

A hedge is the same call: the tenant's quotas were taken once, when the call was admitted at the gateway (the auth
interceptor); the hedge goes from the forwarder straight to a replica, with the same metadata and deadline. (A
replica that started the losing attempt still counts it in its per-tenant load report: work it did, not a quota.)
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from aimass.runtime import contract
from aimass.runtime.config import HedgingConfig


class LatencyQuantile:
    """A streaming quantile of recent latencies: the last ``size`` observations in a ring, the quantile recomputed
    (one sort of at most ``size`` floats) every ``refresh_every`` observations, so an observation costs O(1)
    amortised and the estimate follows the method as its latency changes."""

    def __init__(self, quantile: float, *, size: int = 1000, refresh_every: int = 0) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1 (exclusive), not {quantile}")
        self.quantile = quantile
        self.size = size
        self.refresh_every = refresh_every or max(1, size // 32)
        self._ring: list[float] = []
        self._next = 0
        self._since_refresh = 0
        self._value: float | None = None

    def __len__(self) -> int:
        return len(self._ring)

    def observe(self, seconds: float) -> None:
        if len(self._ring) < self.size:
            self._ring.append(seconds)
        else:
            self._ring[self._next] = seconds
            self._next = (self._next + 1) % self.size
        self._since_refresh += 1
        # Recomputed often while the ring fills (the first estimates matter most), then every refresh_every.
        if self._value is None or self._since_refresh >= min(self.refresh_every, len(self._ring)):
            self._refresh()

    def value(self) -> float | None:
        """The quantile of the latencies held, or None before any."""
        return self._value

    def _refresh(self) -> None:
        ordered = sorted(self._ring)
        # Nearest rank: the smallest latency that at least ``quantile`` of the observations do not exceed.
        rank = max(0, math.ceil(self.quantile * len(ordered)) - 1)
        self._value = ordered[rank]
        self._since_refresh = 0


class HedgeBudget:
    """A token bucket capping hedges to ``ratio`` of calls: each call deposits ``ratio`` tokens (at most ``burst``
    held), each hedge spends one. It starts full: a gateway that just started may hedge ``burst`` calls."""

    def __init__(self, ratio: float, burst: float) -> None:
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def deposit(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def available(self) -> bool:
        return self.tokens >= 1.0

    def take(self) -> bool:
        """Spends a token for one hedge; False (nothing spent) when the budget is used up."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class MethodHedging:
    """One method's hedging state: its latency estimate and its budget."""

    method: str
    latencies: LatencyQuantile
    budget: HedgeBudget
    fixed_delay_s: float
    min_delay_s: float
    max_delay_s: float
    min_samples: int

    def delay_s(self) -> float | None:
        """Seconds to wait for the first attempt before hedging, or None (not enough latencies seen yet)."""
        if self.fixed_delay_s:
            return self.fixed_delay_s
        if len(self.latencies) < self.min_samples:
            return None
        estimate = self.latencies.value()
        if estimate is None:
            return None
        delay = max(self.min_delay_s, estimate)
        return min(delay, self.max_delay_s) if self.max_delay_s else delay

    def should_wait(self, remaining_s: float | None) -> float | None:
        """For a call about to be sent: its hedge delay, or None when it is not to be hedged (no delay known yet, or
        its remaining deadline shorter than the delay). Counts the call into the budget; whether the budget allows
        the hedge is asked when the delay has passed (``budget.take``)."""
        self.budget.deposit()
        delay = self.delay_s()
        if delay is None or (remaining_s is not None and remaining_s <= delay):
            return None
        return delay


class Stalls:
    """Replicas that look frozen. A replica is suspect when a call it holds is past its hedge delay and it answered
    nothing since the call was sent (``silent_since``); the forwarder then asks it a health check, and one that does
    not answer within ``stall_probe_s`` is left out of routing (``exclude``) for ``eject_s`` (while others serve) or
    until it answers again. Keyed weakly: a replica that left the view is forgotten with it."""

    def __init__(self, eject_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.eject_s = eject_s
        self.clock = clock
        self._last_answer: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
        self._until: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()

    def __bool__(self) -> bool:
        return bool(self._until)

    def answered(self, replica: object, now: float) -> None:
        self._last_answer[replica] = now
        self._until.pop(replica, None)

    def silent_since(self, replica: object, sent_at: float, now: float) -> bool:
        """Whether ``replica`` answered nothing since ``sent_at`` and is not left out already (0 ``eject_s``: never)."""
        return (
            bool(self.eject_s)
            and self._last_answer.get(replica, -math.inf) < sent_at
            and not self.stalled(replica, now)
        )

    def exclude(self, replica: object, now: float) -> None:
        """Leaves ``replica`` out for ``eject_s`` from ``now``, or until it answers."""
        self._until[replica] = now + self.eject_s

    def stalled(self, replica: object, now: float) -> bool:
        until = self._until.get(replica)
        if until is None:
            return False
        if now >= until:
            del self._until[replica]
            return False
        return True


class HedgingPolicy:
    """Per method, whether and when a call is hedged (the module docstring states the rules)."""

    def __init__(self, config: HedgingConfig, methods: frozenset[str] | None = None) -> None:
        self.config = config
        self.stalls = Stalls(config.stall_eject_s)
        hedged = contract.idempotent_methods() if methods is None else methods
        unary = {
            path for path, kind in contract.methods().items() if not (kind.client_streaming or kind.server_streaming)
        }
        self._methods: dict[str, MethodHedging] = {}
        if not config.enabled:
            return
        for path in sorted(hedged & unary):
            self._methods[path] = MethodHedging(
                method=path,
                latencies=LatencyQuantile(config.quantile, size=config.window),
                budget=HedgeBudget(config.max_extra_load, config.burst),
                fixed_delay_s=config.delay_ms / 1000,
                min_delay_s=config.min_delay_ms / 1000,
                max_delay_s=config.max_delay_ms / 1000,
                min_samples=config.min_samples,
            )

    def for_method(self, method: str) -> MethodHedging | None:
        """The method's hedging, or None when its calls are never hedged (not idempotent, or hedging is off)."""
        return self._methods.get(method)

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._methods)
